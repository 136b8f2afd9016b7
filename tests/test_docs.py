"""Every ```python block of README.md and docs/*.md runs, and prints what it says.

(The package's docstring examples are collected by pytest itself:
--doctest-modules in pyproject.toml.)

How the docs are run, i.e. the conventions a doc writer follows:

* **One process per file, blocks in order, one namespace.** The blocks of a
  file build on each other as the text does (a later block uses ``model``
  from an earlier one), so they run one after the other in the same globals,
  in a fresh ``sys.executable`` process started in the repository root. A
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
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
TIMEOUT_S = 300      # per file

_FENCE = re.compile(r"^([ \t]*)```python[ \t]*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(.*?)-->\s*$")
_RUN_ENV = re.compile(r"<!--\s*run-env:(.*?)-->", re.S)


@functools.cache
def blocks_of(path: str) -> tuple[dict, ...]:
  """The ```python blocks of a markdown file, dedented to their fence."""
  lines = (ROOT / path).read_text().splitlines()
  found, i = [], 0
  while i < len(lines):
    fence = _FENCE.match(lines[i])
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
          f"{path}:{k}: line less indented than its fence")
      body.append(line[len(indent):])
    prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()),
                "")
    not_run = _NOT_RUN.match(prev)
    found.append({
        "id": f"{path}:{len(found) + 1}",
        "path": path,
        "line": start + 1,          # 1-based line of the block's first line
        "source": "\n".join(body) + "\n",
        "not_run": None if not_run is None else not_run.group(1).strip(),
    })
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
      if tok.type == tokenize.COMMENT}
  calls = sorted(
      (node.lineno, node.end_lineno) for node in ast.walk(ast.parse(source))
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id == "print")
  return [(first, comments.get(last)) for first, last in calls]


def output_matches(expected: str, actual: str) -> bool:
  squash = lambda s: " ".join(s.split())          # noqa: E731
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


@functools.cache
def _start(path: str):
  """Starts the process that runs a file's blocks (one per file, once)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
  env.update(run_env(path))
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="test_docs_"))
  (tmp / "blocks.json").write_text(json.dumps(blocks_of(path)))
  proc = subprocess.Popen(
      [sys.executable, "-c", _RUNNER, str(tmp / "blocks.json"),
       str(tmp / "results.json")],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  return proc, tmp


@functools.cache
def run_file(path: str, start_too: tuple = ()) -> tuple[dict, ...]:
  """A file's blocks run in a fresh process: one result per block.

  The processes of ``start_too`` (the other files this session will ask
  for) start first, so that they share the cores while this one runs."""
  for other in start_too:
    _start(other)
  proc, tmp = _start(path)
  try:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    output, _ = proc.communicate()
  try:
    results = tmp / "results.json"
    assert proc.returncode == 0 and results.exists(), (
        f"running {path}'s blocks: exit {proc.returncode}\n{output[-8000:]}")
    return tuple(json.loads(results.read_text()))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


ALL_BLOCKS = [b for path in DOCS for b in blocks_of(path)]


def test_the_docs_have_python_blocks():
  files = {b["path"] for b in ALL_BLOCKS}
  assert {"README.md", "docs/layers.md", "docs/multidevice.md"} <= files


@pytest.mark.parametrize("path", DOCS)
def test_every_not_run_marker_belongs_to_a_block(path):
  """A not-run marker skips only the block right after it, with a reason."""
  text = (ROOT / path).read_text()
  markers = len(re.findall(r"<!--\s*not-run\b", text))
  reasons = [b["not_run"] for b in blocks_of(path) if b["not_run"] is not None]
  assert markers == len(reasons), (
      f"{path}: {markers} not-run markers, {len(reasons)} of them on the line "
      f"before a ```python block (as <!-- not-run: WHY -->)")
  assert all(len(r) > 10 for r in reasons), (
      f"{path}: a not-run marker must say why: {reasons}")


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


@pytest.mark.parametrize("index", range(len(ALL_BLOCKS)),
                         ids=[b["id"] for b in ALL_BLOCKS])
def test_block(index, request):
  block = ALL_BLOCKS[index]
  where = f"{block['id']} (line {block['line']})"
  compile(block["source"], block["path"], "exec")      # every block parses
  prints = expected_prints(block["source"])
  silent = [block["line"] + line - 1 for line, text in prints if text is None]
  assert not silent, (
      f"{where}: print(...) at line(s) {silent} of {block['path']} does not "
      f"say what it prints (a trailing comment on the line the call ends)")
  if block["not_run"] is not None:
    assert len(block["not_run"]) > 10, (
        f"{where}: <!-- not-run: WHY --> must say why, and what runs it")
    pytest.skip(f"not run: {block['not_run']}")

  results = run_file(block["path"], _files_selected(request.session))
  result = results[int(block["id"].rsplit(":", 1)[1]) - 1]
  assert result["status"] == "ok", (
      f"{where}: {result['status']}\n{result.get('error', '')}"
      f"\n--- stdout ---\n{result.get('stdout', '')}")
  actual = result["stdout"].splitlines()
  wanted = [text for _, text in prints]
  assert len(actual) == len(wanted) and all(
      output_matches(w, a) for w, a in zip(wanted, actual)), (
      f"{where}: printed\n  " + "\n  ".join(actual) +
      "\nbut the text says\n  " + "\n  ".join(wanted))
