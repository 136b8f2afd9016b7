"""A newcomer's first hour (issue 37): setup.sh says how long the build takes
and shows its progress; the README's recipes run as written; export works
from the page and its two mistakes are findable; bench explains itself and
refuses a bad shape before it runs; direction names forgive case."""

import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import lmconv_jax
from lmconv_jax import benchmark, cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
README = (ROOT / "README.md").read_text()


def run_cli(capsys, *argv):
  """(exit code, stdout, stderr) of the CLI run in this process."""
  try:
    code = cli.main(list(argv))
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


# --------------------------------------------------------------------------
# scripts/setup.sh


def test_setup_help_says_how_long_the_build_takes_and_where_its_log_is():
  p = subprocess.run([SETUP, "--help"], capture_output=True, text=True)
  assert p.returncode == 0 and p.stderr == ""
  text = " ".join(p.stdout.split())
  assert "about 3 minutes on a quiet 2-core machine" in text
  assert "[done/total]" in text and "$VENV/build.log" in text
  assert "--print-python" in text and "LMCONV_BUILD_DIR" in text


def test_setup_rejects_an_unknown_argument_with_the_valid_ones():
  p = subprocess.run([SETUP, "--lowset"], capture_output=True, text=True)
  assert p.returncode == 2 and p.stdout == ""
  assert p.stderr == (
    "setup.sh: unknown argument '--lowset'; expected "
    "--lowest, --print-python or --help\n"
  )


def test_print_python_names_a_python_of_at_least_3_12():
  """The README's by-hand recipe's first line: PY=$(setup.sh --print-python)."""
  p = subprocess.run([SETUP, "--print-python"], capture_output=True, text=True)
  assert p.returncode == 0, p.stderr
  py = p.stdout.strip()
  version = subprocess.run(
    [py, "-c", "import sys; print(sys.version_info >= (3, 12))"],
    capture_output=True,
    text=True,
  )
  assert version.stdout == "True\n"
  assert "PY=$(scripts/setup.sh --print-python)" in README


def test_print_python_takes_lmconv_python():
  env = dict(os.environ, LMCONV_PYTHON=sys.executable)
  p = subprocess.run(
    [SETUP, "--print-python"], capture_output=True, text=True, env=env
  )
  assert p.returncode == 0 and p.stdout == sys.executable + "\n"


# What `pip install -v` prints around a ninja build (abridged), with ninja's
# status lines indented by pip.
PIP_VERBOSE = """\
Using pip 26.3 from /x/.venv/lib/python3.12/site-packages/pip (python 3.12)
  Running command Building editable for lmconv-jax (pyproject.toml)
  *** scikit-build-core 0.11.6 using CMake 4.1.0 (editable)
  -- The CXX compiler identification is GNU 12.2.0
  [1/3] Building CXX object CMakeFiles/a.dir/a.cc.o
  warning: something the log keeps
  [2/3] Building CXX object CMakeFiles/b.dir/b.cc.o
  [3/3] Linking CXX shared module _lmconv_cpu.so
  *** Installing project into wheel...
Successfully installed lmconv-jax-0.1.0
"""


def test_setup_progress_shows_ninja_lines_and_logs_everything(tmp_path):
  """setup.sh's filter of pip's verbose output, run on a canned output."""
  log = tmp_path / "build.log"
  script = (
    f"set -euo pipefail\nLOG={log}\n"
    f"eval \"$(sed -n '/^progress() {{/,/^}}/p' {SETUP})\"\n"
    f"progress"
  )
  p = subprocess.run(
    ["bash", "-c", script], input=PIP_VERBOSE, capture_output=True, text=True
  )
  assert p.returncode == 0, p.stderr
  shown = [line.split(None, 1)[1] for line in p.stdout.splitlines()]
  assert shown == [
    "[1/3] Building CXX object CMakeFiles/a.dir/a.cc.o",
    "[2/3] Building CXX object CMakeFiles/b.dir/b.cc.o",
    "[3/3] Linking CXX shared module _lmconv_cpu.so",
  ]
  assert all(line.split()[0].count(":") == 1 for line in p.stdout.splitlines())
  assert log.read_text() == PIP_VERBOSE


def test_the_build_folder_of_another_venv_is_its_own():
  """LMCONV_VENV=/tmp/x gets build/x-{wheel_tag}, never .venv's build/."""
  text = SETUP.read_text()
  assert 'BUILD_DIR="build/$(basename "$VENV")-{wheel_tag}"' in text
  assert 'BUILD_ARGS+=(-C "build-dir=$BUILD_DIR")' in text


def test_readme_gives_the_build_time():
  text = " ".join(README.split())
  assert "about 3 minutes on a quiet 2-core machine" in text
  assert "python3.12 -m venv" not in README


# --------------------------------------------------------------------------
# jax.export: the two mistakes, and what the README says of them. (The
# recipe itself runs in test_docs.py, its step 2 in a fresh process.)

EXPORT_ERROR = (
  "Cannot serialize code with custom calls whose targets have "
  "no compatibility guarantees"
)
LOAD_ERROR = (
  "NOT_FOUND: No FFI handler registered for lmconv_pool_fwd on a platform Host"
)


def _model():
  import jax
  import jax.numpy as jnp

  model = lmconv_jax.LandmarkConv4(8, (3, 3), implementation="ffi")
  x = jnp.ones((2, 8, 8, 8))
  return model, x, model.init(jax.random.key(0), x)


@pytest.fixture
def ffi():
  if not lmconv_jax._ffi.has_kernels("cpu"):
    pytest.skip("the CPU kernels are not built")


def test_export_without_disabled_checks_names_our_target(ffi):
  import jax
  from jax import export

  model, x, params = _model()
  with pytest.raises(ValueError) as e:
    export.export(jax.jit(model.apply))(params, x)
  assert EXPORT_ERROR in str(e.value) and "lmconv_pool_fwd" in str(e.value)
  readme = " ".join(README.split())
  assert EXPORT_ERROR in readme
  assert "disabled_checks=lmconv_jax.export_disabled_checks()" in readme


def test_loading_without_import_lmconv_jax_names_the_target(ffi, tmp_path):
  import jax
  from flax import serialization
  from jax import export

  model, x, params = _model()
  exported = export.export(
    jax.jit(model.apply), disabled_checks=lmconv_jax.export_disabled_checks()
  )(params, x)
  (tmp_path / "m.bin").write_bytes(exported.serialize())
  (tmp_path / "p.msgpack").write_bytes(serialization.msgpack_serialize(params))
  load = (
    "import sys, jax.numpy as jnp\n"
    "from flax import serialization\n"
    "from jax import export\n"
    "m = export.deserialize(bytearray(open('m.bin', 'rb').read()))\n"
    "p = serialization.msgpack_restore(open('p.msgpack', 'rb').read())\n"
    "try:\n"
    "  m.call(p, jnp.ones((2, 8, 8, 8)))\n"
    "except Exception as e:\n"
    "  print(type(e).__name__, e)\n"
    "print('lmconv_jax' in sys.modules)\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  p = subprocess.run(
    [sys.executable, "-c", load],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr
  assert p.stdout.splitlines()[-1] == "False"  # never imported
  assert LOAD_ERROR in p.stdout
  assert LOAD_ERROR in " ".join(README.split())


# --------------------------------------------------------------------------
# bench


@pytest.fixture
def no_run(monkeypatch):
  """bench's run() fails the test: nothing may be measured."""

  def run(**kwargs):
    raise AssertionError("bench ran")

  monkeypatch.setattr(benchmark, "run", run)


def test_bench_c_not_a_multiple_of_8_is_one_line_and_exit_2_before_it_runs(
  capsys, no_run
):
  code, out, err = run_cli(capsys, "bench", "--shape", "8,64,64,6")
  assert code == 2 and out == ""
  assert err == (
    "python -m lmconv_jax bench: error: --shape 8,64,64,6: C = 6 is not a "
    "multiple of 8, which the grouping, dtype, layers sections need "
    "(octants: 8 channel groups). Give C a multiple of 8 (e.g. --shape "
    "8,64,64,8), or run only --sections guide,wide.\n"
  )


def test_bench_c_check_names_only_the_sections_asked_for(capsys, no_run):
  code, _, err = run_cli(
    capsys, "bench", "--shape", "2,16,16,12", "--sections", "guide,layers"
  )
  assert code == 2
  assert (
    "C = 12 is not a multiple of 8, which the layers section needs" in err
  ) and "e.g. --shape 2,16,16,8" in err


def test_bench_shape_of_too_few_dims_shows_bench_usage(capsys, no_run):
  code, out, err = run_cli(capsys, "bench", "--shape", "64,8")
  assert code == 2 and out == ""
  assert err.startswith("usage: python -m lmconv_jax bench ")
  assert err.splitlines()[-1] == (
    "python -m lmconv_jax bench: error: argument --shape: expected at "
    "least 3 positive dims (..., H, W, C) like 8,64,64,64, got '64,8'"
  )


def test_bench_c_of_any_size_where_no_section_splits_it(capsys, monkeypatch):
  seen = {}
  monkeypatch.setattr(benchmark, "run", lambda **kw: seen.update(kw) or [])
  code, _, _ = run_cli(
    capsys,
    "bench",
    "--shape",
    "1,8,8,6",
    "--sections",
    "guide,wide",
    "--no-progress",
  )
  assert code == 0 and seen["shape"] == (1, 8, 8, 6)


def test_bench_help_says_what_c_must_be(capsys):
  code, out, _ = run_cli(capsys, "bench", "--help")
  text = " ".join(out.split())
  assert code == 0
  assert "C must be a multiple of 8 for the grouping, dtype and layers" in text
  assert "docs/benchmarks.md" in text and "quiet 2-core CPU" in text


@pytest.mark.parametrize(
  "argv",
  [["bench", "--bogus"], ["info", "--bogus"], ["demo", "--directions", "x"]],
)
def test_a_subcommand_error_shows_that_subcommands_usage(capsys, argv):
  code, out, err = run_cli(capsys, *argv)
  assert code == 2 and out == ""
  assert err.startswith(f"usage: python -m lmconv_jax {argv[0]} ")
  assert err.splitlines()[-1] == (
    f"python -m lmconv_jax {argv[0]}: error: unrecognized arguments: "
    f"{' '.join(argv[1:])}"
  )


ROW = dict(
  section="grouping",
  case="quadrants",
  pass_="forward",
  ms=2.0,
  baseline="single pool (top_left)",
  baseline_ms=1.0,
  ratio=2.0,
  target=1.25,
  shape=[8, 64, 64, 64],
  dtype="float32",
)
QUIET = dict(cpu="cpu", cores=2, load_avg_1min=0.3, jax="0", date="d")


def test_bench_table_is_followed_by_a_legend():
  text = benchmark.markdown([ROW], QUIET)
  table, legend = text.split("\n\nHow to read it: ")
  assert table.splitlines()[-1].startswith("| grouping | quadrants |")
  legend = " ".join(legend.split())
  for words in (
    "'over' names the row's baseline",
    "ratio = ms / baseline ms",
    "set for the default shape (8, 64, 64, 64) float32 on both "
    "cores of a quiet 2-core CPU",
    "Load from other processes moves the ratios",
    "docs/benchmarks.md has the sections, where the targets come from",
  ):
    assert words in legend, words
  assert "busy" not in legend and "not the targets'" not in legend


def test_bench_legend_says_when_the_machine_was_busy_or_the_shape_differs():
  busy = dict(QUIET, load_avg_1min=3.5)
  row = dict(ROW, shape=[1, 8, 8, 8])
  legend = " ".join(benchmark.legend([row], busy).split())
  assert (
    "The machine was busy (1-min load average 3.5 on 2 cores): rerun "
    "on a quiet machine before reading a 'not met'."
  ) in legend
  assert (
    "This run's shape (1, 8, 8, 8) float32 is not the targets': its "
    "'met' / 'not met' say little."
  ) in legend


# --------------------------------------------------------------------------
# The demo's page.


def test_demo_page_says_deterministic_for_the_same_jax_version():
  text = " ".join((ROOT / "docs" / "demo.md").read_text().split())
  assert "deterministic for the same jax version" in text
  assert "--directions" not in text


# --------------------------------------------------------------------------
# regions.png's legend.


def _make_figures():
  pytest.importorskip("matplotlib")
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "make_figures", ROOT / "docs" / "make_figures.py"
  )
  figures = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(figures)
  return figures


def test_regions_legend_names_each_colour_and_the_overlap_mix():
  figures = _make_figures()
  groups = figures.group_regions("quadrants")
  entries = figures.legend_entries(groups)
  assert [label for label, _ in entries] == [
    "tl",
    "tr",
    "bl",
    "br",
    figures.OVERLAP_LABEL,
  ]
  # The overlap swatch is a colour the picture really shows on a border.
  image = figures.colour_image(groups)
  count = sum(mask.astype(int) for _, mask in groups)
  border_colours = {
    tuple(np.round(image[r, c], 6)) for r, c in np.argwhere(count >= 2)
  }
  assert tuple(np.round(entries[-1][1], 6)) in border_colours
  # No overlap, no overlap entry.
  assert [
    label for label, _ in figures.legend_entries(figures.box_region())
  ] == ["3x3"]
