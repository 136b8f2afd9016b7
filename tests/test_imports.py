"""The package's module graph: no import circle, lazy imports included, and
JAX internals read in one module only (lmconv_jax/_jax_compat.py)."""

import ast
import pathlib

import pytest

from lmconv_jax import _jax_compat

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lmconv_jax"


def _modules() -> dict:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    modules[".".join(rel.parts).removesuffix(".__init__")] = path
  return modules


def _imports(path: pathlib.Path, modules) -> set:
  """The lmconv_jax modules ``path`` imports, at the top or inside
  functions; ``from pkg import mod`` is an edge to ``pkg.mod``."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if (
      isinstance(node, ast.ImportFrom)
      and node.module
      and (node.module.split(".")[0] == "lmconv_jax")
    ):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        found.add(sub if sub in modules else node.module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("lmconv_jax.")}
  return found


def _graph() -> dict:
  modules = _modules()
  return {
    name: {m for m in _imports(path, modules) if m in modules and m != name}
    for name, path in modules.items()
  }


def test_no_import_circle():
  graph = _graph()
  # The package's __init__ only re-exports: an edge into it is not a circle.
  graph = {
    m: {d for d in deps if d != "lmconv_jax"} for m, deps in graph.items()
  }
  state = {}

  def visit(m, path):
    state[m] = "open"
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        cycle = path[path.index(d) :] + [d]
        pytest.fail("import circle: " + " -> ".join(cycle))
      if d not in state:
        visit(d, path + [d])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_jax_internals_are_read_in_one_module():
  readers = sorted(
    p.name
    for p in PACKAGE.rglob("*.py")
    if "jax._src" in p.read_text() and p.name != "_jax_compat.py"
  )
  assert readers == []


def test_a_moved_internal_fails_loudly():
  class Ctx:  # a lowering context without the fields jax used to have
    module_context = object()

  with pytest.raises(RuntimeError, match="_jax_compat.py"):
    _jax_compat.lowering_for_export(Ctx())
  with pytest.raises(RuntimeError, match="axis_context"):
    _jax_compat.lowering_devices(Ctx())
