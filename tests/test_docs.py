"""Every ```python block of README.md and docs/*.md runs, and prints what it
says; every ```bash block runs too, or says why not and is checked as far as
it can be without running it.

(The package's docstring examples are collected by pytest itself:
--doctest-modules in pyproject.toml.)

How the docs are run, i.e. the conventions a doc writer follows:

* **One process per file, blocks in order, one namespace.** The blocks of a
  file build on each other as the text does (a later block uses ``model``
  from an earlier one), so they run one after the other in the same globals,
  in a fresh ``sys.executable`` process started in an empty folder of the
  file's own (files a block writes land there, not in the checkout). A
  fresh process gives every file jax's defaults (``jax_enable_x64`` off,
  whatever tests/conftest.py sets for the suite) and lets a file ask for an
  environment that must exist before jax is imported. Each block is its own
  test, id ``FILE:N`` (N-th python block of the file, from 1); a block after
  a failed one fails as "not reached". Tracebacks point at the markdown line.

* **Environment the prose asks for**: ``<!-- run-env: NAME=VALUE ... -->``
  anywhere in a file (next to the sentence that tells the reader to set it)
  starts that file's process with those variables, e.g.
  ``<!-- run-env: JAX_PLATFORMS=cpu
  XLA_FLAGS=--xla_force_host_platform_device_count=8 -->``. Otherwise the
  process inherits the test's environment without ``XLA_FLAGS`` and
  ``JAX_ENABLE_X64``.

* **A fresh process where the text says so**: ``<!-- fresh-process: WHY -->``
  on the line before a block's fence starts a new process (new globals, jax
  and lmconv_jax imported anew) in the same folder for that block and the
  ones after it, e.g. the loading side of an export, which must work from
  the files the exporting side wrote.

* **What a block prints**: every ``print(...)`` in a block carries a trailing
  comment on the line where the call ends that says what it prints, and the
  block's stdout must be exactly those lines, in order (one line per print;
  runs of whitespace compare equal; ``...`` in the comment matches any
  text). A print with no comment fails the test: the text must say what
  the reader will see. Other comments are not read: a claim worth checking
  ("the output keeps x's sharding") is written as a print (or an assert).

* **Blocks that cannot run here** (several processes and a coordinator, a
  GPU) carry ``<!-- not-run: WHY -->`` on the line before their fence; WHY
  says why and what runs the recipe instead. Such a block must still
  compile (and its prints say what they print); it is reported as skipped
  with its reason. There is no other way to skip, and a marker anywhere
  else fails the test.

* **Shell blocks** (```bash): each block runs as one ``bash -euo pipefail``
  script in the repository root (the reader's checkout, with the ``.venv``
  the test's interpreter belongs to), and must exit 0; a block that takes
  minutes, builds, or needs a GPU carries ``<!-- not-run: WHY -->`` as a
  Python block does. Every shell block, run or not, must parse (``bash
  -n``), call Python and pip through a venv (``.venv/bin/python``), not a
  bare ``python``/``python3.12`` (which under pyenv may not exist, and in
  the checkout imports the source tree without jax), unless the block
  activates the venv itself; and every ``-m lmconv_jax`` command line in it
  must parse with the command line's own parser. ``-m lmconv_jax`` in
  inline code (``python -m lmconv_jax bench [--sections LIST]``) must name
  a command and options that exist.
"""

import ast
import functools
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(
  str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")
)
TIMEOUT_S = 300  # per file

_FENCE = re.compile(r"^([ \t]*)```python[ \t]*$")
_SHELL_FENCE = re.compile(r"^([ \t]*)```(?:bash|sh|shell)[ \t]*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(.*?)-->\s*$")
_FRESH = re.compile(r"^\s*<!--\s*fresh-process:(.*?)-->\s*$")
_RUN_ENV = re.compile(r"<!--\s*run-env:(.*?)-->", re.S)


@functools.cache
def blocks_of(path: str, fence_re=_FENCE, kind: str = "") -> tuple[dict, ...]:
  """The ```python blocks (or those ``fence_re`` matches) of a markdown file,
  dedented to their fence; ids FILE:N, or FILE:KIND-N."""
  lines = (ROOT / path).read_text().splitlines()
  found, i = [], 0
  while i < len(lines):
    fence = fence_re.match(lines[i])
    if not fence:
      i += 1
      continue
    indent, start = fence.group(1), i + 1
    end = start
    while end < len(lines) and lines[end].strip() != "```":
      end += 1
    assert end < len(lines), f"{path}:{i + 1}: ```python block never closed"
    body = []
    for k, line in enumerate(lines[start:end], start + 1):
      assert not line.strip() or line.startswith(indent), (
        f"{path}:{k}: line less indented than its fence"
      )
      body.append(line[len(indent) :])
    prev = next(
      (lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), ""
    )
    not_run, fresh = _NOT_RUN.match(prev), _FRESH.match(prev)
    found.append(
      {
        "id": f"{path}:{kind + '-' if kind else ''}{len(found) + 1}",
        "path": path,
        "line": start + 1,  # 1-based line of the block's first line
        "source": "\n".join(body) + "\n",
        "not_run": None if not_run is None else not_run.group(1).strip(),
        "fresh_process": fresh is not None,
      }
    )
    i = end + 1
  return tuple(found)


def run_env(path: str) -> dict:
  """The variables a file's ``<!-- run-env: ... -->`` markers ask for."""
  env = {}
  for marker in _RUN_ENV.findall((ROOT / path).read_text()):
    for item in marker.split():
      name, eq, value = item.partition("=")
      assert eq and name, f"{path}: bad run-env item {item!r} (NAME=VALUE)"
      env[name] = value
  return env


def expected_prints(source: str) -> list:
  """What each print(...) of a block says it prints: [(line, text | None)]."""
  comments = {
    tok.start[0]: tok.string[1:].strip()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
    if tok.type == tokenize.COMMENT
  }
  calls = sorted(
    (node.lineno, node.end_lineno)
    for node in ast.walk(ast.parse(source))
    if isinstance(node, ast.Call)
    and isinstance(node.func, ast.Name)
    and node.func.id == "print"
  )
  return [(first, comments.get(last)) for first, last in calls]


def output_matches(expected: str, actual: str) -> bool:
  squash = lambda s: " ".join(s.split())  # noqa: E731
  pattern = ".*".join(re.escape(part) for part in squash(expected).split("..."))
  return re.fullmatch(pattern, squash(actual)) is not None


# Runs in the docs' process: argv[1] is the blocks (JSON), argv[2] where the
# results go. Each block's stdout is captured on its own.
_RUNNER = r"""
import contextlib, io, json, sys, time, traceback

def main(blocks_json, results_json):
  with open(blocks_json) as f:
    blocks = json.load(f)
  namespace = {"__name__": "__main__", "__builtins__": __builtins__}
  results, failed = [], None
  for b in blocks:
    if b["not_run"] is not None:
      results.append({"status": "not run"})
      continue
    if failed is not None:
      results.append({"status": "not reached", "error": failed})
      continue
    out, start = io.StringIO(), time.perf_counter()
    try:
      code = compile("\n" * (b["line"] - 1) + b["source"], b["path"], "exec")
      with contextlib.redirect_stdout(out):
        exec(code, namespace)
      result = {"status": "ok"}
    except BaseException:
      result = {"status": "error", "error": traceback.format_exc()}
      failed = b["id"] + " failed before it"
    result.update(stdout=out.getvalue(),
                  seconds=round(time.perf_counter() - start, 2))
    results.append(result)
  with open(results_json, "w") as f:
    json.dump(results, f)

main(sys.argv[1], sys.argv[2])
"""


def segments_of(path: str) -> list[list[dict]]:
  """A file's python blocks, split where a block asks for a fresh process."""
  segments = [[]]
  for block in blocks_of(path):
    if block["fresh_process"] and segments[-1]:
      segments.append([])
    segments[-1].append(block)
  return segments


def _launch(path: str, k: int, tmp: pathlib.Path):
  """Starts the process for segment ``k`` of a file's blocks, in tmp/work."""
  env = {
    name: value
    for name, value in os.environ.items()
    if name not in ("XLA_FLAGS", "JAX_ENABLE_X64")
  }
  env.update(run_env(path))
  # The checkout importable as from its root (where the reader starts), while
  # the process runs in a folder of its own.
  env["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
  )
  (tmp / "work").mkdir(exist_ok=True)
  (tmp / f"blocks{k}.json").write_text(json.dumps(segments_of(path)[k]))
  return subprocess.Popen(
    [
      sys.executable,
      "-c",
      _RUNNER,
      str(tmp / f"blocks{k}.json"),
      str(tmp / f"results{k}.json"),
    ],
    cwd=tmp / "work",
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


@functools.cache
def _start(path: str):
  """Starts the process of a file's first segment (once per file)."""
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="test_docs_"))
  return _launch(path, 0, tmp), tmp


def _finish(path: str, k: int, proc, tmp: pathlib.Path) -> list[dict]:
  try:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    output, _ = proc.communicate()
  results = tmp / f"results{k}.json"
  assert proc.returncode == 0 and results.exists(), (
    f"running {path}'s blocks: exit {proc.returncode}\n{output[-8000:]}"
  )
  return json.loads(results.read_text())


@functools.cache
def run_file(path: str, start_too: tuple = ()) -> tuple[dict, ...]:
  """A file's blocks run in fresh processes (one, or one per fresh-process
  segment, one after the other in the same folder): one result per block.

  The processes of ``start_too`` (the other files this session will ask
  for) start first, so that they share the cores while this one runs."""
  for other in start_too:
    _start(other)
  proc, tmp = _start(path)
  try:
    results = _finish(path, 0, proc, tmp)
    for k, segment in enumerate(segments_of(path)[1:], 1):
      failed = next((r for r in results if r["status"] == "error"), None)
      if failed is not None:
        results += [
          {"status": "not reached", "error": "a block before it failed"}
        ] * len(segment)
        continue
      results += _finish(path, k, _launch(path, k, tmp), tmp)
    return tuple(results)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


ALL_BLOCKS = [b for path in DOCS for b in blocks_of(path)]
SHELL_BLOCKS = [
  b for path in DOCS for b in blocks_of(path, _SHELL_FENCE, "shell")
]


def test_the_docs_have_python_blocks():
  files = {b["path"] for b in ALL_BLOCKS}
  assert {"README.md", "docs/layers.md", "docs/multidevice.md"} <= files


@pytest.mark.parametrize("path", DOCS)
def test_every_not_run_marker_belongs_to_a_block(path):
  """A not-run marker skips only the block right after it, with a reason."""
  text = (ROOT / path).read_text()
  blocks = blocks_of(path) + blocks_of(path, _SHELL_FENCE, "shell")
  markers = len(re.findall(r"<!--\s*not-run\b", text))
  reasons = [b["not_run"] for b in blocks if b["not_run"] is not None]
  assert markers == len(reasons), (
    f"{path}: {markers} not-run markers, {len(reasons)} of them on the line "
    f"before a ```python or ```bash block (as <!-- not-run: WHY -->)"
  )
  assert all(len(r) > 10 for r in reasons), (
    f"{path}: a not-run marker must say why: {reasons}"
  )
  fresh = len(re.findall(r"<!--\s*fresh-process\b", text))
  assert fresh == sum(b["fresh_process"] for b in blocks_of(path)), (
    f"{path}: a fresh-process marker must be on the line before a "
    f"```python block's fence (as <!-- fresh-process: WHY -->)"
  )


def _files_selected(session) -> tuple:
  """The files whose blocks this session runs (they start together)."""
  files = []
  for item in session.items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if getattr(item, "originalname", "") == "test_block" and "index" in params:
      block = ALL_BLOCKS[params["index"]]
      if block["not_run"] is None and block["path"] not in files:
        files.append(block["path"])
  return tuple(files)


@pytest.mark.parametrize(
  "index", range(len(ALL_BLOCKS)), ids=[b["id"] for b in ALL_BLOCKS]
)
def test_block(index, request):
  block = ALL_BLOCKS[index]
  where = f"{block['id']} (line {block['line']})"
  compile(block["source"], block["path"], "exec")  # every block parses
  prints = expected_prints(block["source"])
  silent = [block["line"] + line - 1 for line, text in prints if text is None]
  assert not silent, (
    f"{where}: print(...) at line(s) {silent} of {block['path']} does not "
    f"say what it prints (a trailing comment on the line the call ends)"
  )
  if block["not_run"] is not None:
    assert len(block["not_run"]) > 10, (
      f"{where}: <!-- not-run: WHY --> must say why, and what runs it"
    )
    pytest.skip(f"not run: {block['not_run']}")

  results = run_file(block["path"], _files_selected(request.session))
  result = results[int(block["id"].rsplit(":", 1)[1]) - 1]
  assert result["status"] == "ok", (
    f"{where}: {result['status']}\n{result.get('error', '')}"
    f"\n--- stdout ---\n{result.get('stdout', '')}"
  )
  actual = result["stdout"].splitlines()
  wanted = [text for _, text in prints]
  assert len(actual) == len(wanted) and all(
    output_matches(w, a) for w, a in zip(wanted, actual)
  ), (
    f"{where}: printed\n  "
    + "\n  ".join(actual)
    + "\nbut the text says\n  "
    + "\n  ".join(wanted)
  )


# --------------------------------------------------------------------------
# Shell blocks.

SHELL_TIMEOUT_S = 120
# Shell blocks of docs that other people edit, whose fix was proposed to
# them (issue 37) and has not landed yet: each is checked to be still as
# described (an entry whose block is fixed fails, so that it goes).
PENDING = {}
# A command word that runs some Python other than a venv's.
_BARE_PYTHON = re.compile(
  r"(?:^|[;&|(]|\$\()\s*(?:[A-Z_]+=\S*\s+)*((?:python|pip)[0-9.]*)(?=\s|$)",
  re.M,
)
_OPERATORS = {"&&", "||", ";", "|", "&"}


def _code_lines(source: str) -> list[str]:
  """A shell block's commands: continuations joined, comments dropped."""
  joined = re.sub(r"\\\n", " ", source)
  return [
    line
    for line in (l.split(" #")[0].strip() for l in joined.splitlines())
    if line and line[0] != "#"
  ]


def lmconv_jax_commands(line: str) -> list[list[str]]:
  """The arguments after each ``-m lmconv_jax`` of a command line."""
  import shlex

  words = shlex.split(line, comments=True)
  found = []
  for i in range(len(words) - 1):
    if words[i] == "-m" and words[i + 1] == "lmconv_jax":
      args = []
      for w in words[i + 2 :]:
        if w in _OPERATORS:
          break
        args.append(w)
      found.append(args)
  return found


def shell_problems(block: dict) -> list[str]:
  """What keeps a shell block from running as written (without running it)."""
  problems = []
  check = subprocess.run(
    ["bash", "-n"], input=block["source"], text=True, capture_output=True
  )
  if check.returncode:
    problems.append(f"bash -n: {check.stderr.strip()}")
  code = "\n".join(_code_lines(block["source"]))
  if "bin/activate" not in code:
    bare = sorted(set(_BARE_PYTHON.findall(code)))
    if bare:
      problems.append(
        f"calls {', '.join(bare)} bare: write .venv/bin/python (a bare "
        f"python in the checkout imports the source tree without jax; "
        f"python3.12 may not exist under pyenv)"
      )
  from lmconv_jax import cli

  for line in _code_lines(block["source"]):
    for args in lmconv_jax_commands(line):
      error = _cli_parse_error(cli, args)
      if error:
        problems.append(f"`-m lmconv_jax {' '.join(args)}`: {error}")
  return problems


def _cli_parse_error(cli, args: list[str]):
  """None if ``python -m lmconv_jax ARGS`` parses, else argparse's message."""
  import contextlib

  err = io.StringIO()
  parser = cli.build_parser()
  try:
    with (
      contextlib.redirect_stderr(err),
      contextlib.redirect_stdout(io.StringIO()),
    ):
      parsed, unknown = parser.parse_known_args(args)
      if unknown:
        parsed.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  except SystemExit as e:
    return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]
  return None


@pytest.mark.parametrize(
  "index", range(len(SHELL_BLOCKS)), ids=[b["id"] for b in SHELL_BLOCKS]
)
def test_shell_block(index):
  block = SHELL_BLOCKS[index]
  where = f"{block['id']} (line {block['line']})"
  problems = shell_problems(block)
  if block["id"] in PENDING:
    if block["not_run"] is None:
      problems.append("no not-run marker")
    assert problems, (
      f"{where} is fixed: remove its entry from PENDING in tests/test_docs.py"
    )
    pytest.xfail(f"{PENDING[block['id']]} (now: {'; '.join(problems)})")
  assert not problems, f"{where}:\n  " + "\n  ".join(problems)
  if block["not_run"] is not None:
    pytest.skip(f"not run: {block['not_run']}")
  if (
    ".venv/bin/" in block["source"]
    and not (ROOT / ".venv" / "bin" / "python").exists()
  ):
    pytest.skip("no .venv in the checkout (scripts/setup.sh makes it)")
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")
  }
  env.update(run_env(block["path"]))
  try:
    proc = subprocess.run(
      ["bash", "-euo", "pipefail", "-c", block["source"]],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=SHELL_TIMEOUT_S,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(
      f"{where}: still running after {SHELL_TIMEOUT_S} s; a long "
      f"block needs <!-- not-run: WHY --> before its fence"
    )
  assert proc.returncode == 0, (
    f"{where}: exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
    f"\n--- stderr ---\n{proc.stderr[-4000:]}"
  )
  assert "Traceback" not in proc.stderr, f"{where}:\n{proc.stderr[-4000:]}"


# `python -m lmconv_jax CMD [--opt ...]` in inline code: a synopsis, not run.
_INLINE = re.compile(r"`[^`\n]*-m lmconv_jax(?: +([a-z]+))?([^`]*)`")


def inline_cli_mentions():
  found = []
  for path in DOCS:
    text = re.sub(
      r"^[ \t]*```.*?^[ \t]*```",
      "",
      (ROOT / path).read_text(),
      flags=re.M | re.S,
    )  # prose only: no fenced code
    for m in _INLINE.finditer(text.replace("\n", " ")):
      found.append((path, m.group(0), m.group(1), m.group(2)))
  return found


def test_inline_command_lines_name_real_commands_and_options():
  """`python -m lmconv_jax bench [--directions LIST]` in prose: each command
  and --option exists (what the shell blocks get by parsing)."""
  from lmconv_jax import cli

  parser = cli.build_parser()
  commands = parser._subparsers._group_actions[0].choices
  mentions = inline_cli_mentions()
  assert any(cmd == "bench" for _, _, cmd, _ in mentions)
  bad = []
  for path, text, cmd, rest in mentions:
    if cmd is None:
      continue
    if cmd not in commands:
      bad.append(f"{path}: {text}: no command {cmd!r}")
      continue
    known = commands[cmd]._option_string_actions
    for option in re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", rest):
      if option not in known:
        bad.append(f"{path}: {text}: {cmd} has no option {option}")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
  "source,problem",
  [
    ("python3.12 -m venv .venv\n", "calls python3.12 bare"),
    ("python -m lmconv_jax info\n", "calls python bare"),
    ("X=1 pip install .\n", "calls pip bare"),
    ("cd x && python -m pytest\n", "calls python bare"),
    (
      ".venv/bin/python -m lmconv_jax bench --directions quadrants\n",
      "`-m lmconv_jax bench --directions quadrants`: python -m lmconv_jax "
      "bench: error: unrecognized arguments: --directions quadrants",
    ),
    (
      ".venv/bin/python -m lmconv_jax demo [--quick]\n",
      "unrecognized arguments: [--quick]",
    ),
    ("for i in 0 1; do\n", "bash -n"),
  ],
)
def test_shell_checks_catch_what_fails_as_written(source, problem):
  block = {"source": source}
  problems = shell_problems(block)
  assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
  "source",
  [
    ".venv/bin/python -m lmconv_jax info   # versions\n",
    "source .venv/bin/activate\npython -m lmconv_jax demo --quick\n",
    'PY=$(scripts/setup.sh --print-python)\n"$PY" -m venv .venv\n',
    ".venv/bin/python -m lmconv_jax bench --help\n",
    "scripts/python_check.sh --dry-run\n",
  ],
)
def test_shell_checks_pass_what_runs_as_written(source):
  assert shell_problems({"source": source}) == []
