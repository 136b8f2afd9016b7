"""The README's quickstart runs. (The package's docstring examples are
collected by pytest itself: --doctest-modules in pyproject.toml.)"""

import pathlib
import re


def test_readme_quickstart_runs():
  readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
  blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
  quick = [b for b in blocks if "# quickstart" in b]
  assert quick, "README.md has no ```python block marked '# quickstart'"
  for block in quick:
    exec(compile(block, "README.md", "exec"), {})
