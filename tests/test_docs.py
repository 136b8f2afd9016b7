"""The examples in docstrings run (doctest) and the README's quickstart runs."""

import doctest
import importlib
import pathlib
import re

import pytest

MODULES = ["lmconv_jax.ops", "lmconv_jax.directions", "lmconv_jax.reference"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0


def test_readme_quickstart_runs():
  readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
  blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
  quick = [b for b in blocks if "# quickstart" in b]
  assert quick, "README.md has no ```python block marked '# quickstart'"
  for block in quick:
    exec(compile(block, "README.md", "exec"), {})
