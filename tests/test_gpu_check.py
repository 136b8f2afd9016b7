"""scripts/gpu_check.sh where there is no GPU: the refusal and the dry run.

The GPU path itself (the build against the image's jax, the device harness,
the gpu tests, compute-sanitizer, the benchmark) needs an NVIDIA GPU: see the
README's "Running on a GPU". Here: without a GPU the script exits with code 3
and one line; --dry-run, reusing this interpreter's lmconv_jax (no rebuild;
the project's .venv found by itself where the base python has no jax), runs
every step that needs no GPU (the harness as its host twin) and writes the
report and the JSON; benchmarks/bench_gpu.py without a GPU exits 3 too.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
  shutil.which("bash") is None, reason="needs bash"
)


def run(*args, env=None, timeout=300):
  return subprocess.run(
    ["bash", str(SCRIPT), *map(str, args)],
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, **(env or {})},
    cwd=ROOT,
  )


@pytest.mark.parametrize("smi", ["/nonexistent/nvidia-smi", "false"])
def test_no_gpu_exits_3_with_one_line(tmp_path, smi):
  """A missing nvidia-smi, or one that lists no GPU: exit 3, one line, and
  nothing made (not even OUTDIR)."""
  out = tmp_path / "out"
  p = run(out, env={"NVIDIA_SMI": smi}, timeout=30)
  assert p.returncode == 3, p.stdout + p.stderr
  lines = (p.stdout + p.stderr).strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith("gpu_check: no NVIDIA GPU here")
  assert "--dry-run" in lines[0]
  assert not out.exists()


def test_bad_arguments_exit_2(tmp_path):
  p = run("--frobnicate", timeout=30)
  assert p.returncode == 2 and "unknown option" in p.stderr
  p = run(tmp_path / "a", tmp_path / "b", timeout=30)
  assert p.returncode == 2 and "one OUTDIR" in p.stderr


def _host_twin():
  """Whether this build has the device harness's host twin."""
  try:
    from lmconv_jax import _lmconv_cuda_emu as emu
  except ImportError:
    return False
  path = emu.build_info().get("harness_host", "")
  return bool(path) and os.access(path, os.X_OK)


def test_dry_run_runs_the_steps_that_need_no_gpu(tmp_path):
  """About 30-60 s on 2 busy cores: the harness's host twin over the quick
  grid, the gpu tests collected (and skipped), the sanitizer workload on the
  CPU, the benchmark at a tiny shape. Run from the project's .venv, the
  script finds it by itself (the base python here has no jax); from another
  environment, LMCONV_GPU_CHECK_PYTHON names it."""
  out = tmp_path / "out"
  env = {"NVIDIA_SMI": "/nonexistent/nvidia-smi"}
  venv = ROOT / ".venv" / "bin" / "python"
  by_itself = venv.exists() and os.path.samefile(sys.executable, venv)
  if by_itself:
    bare = tmp_path / "python3"  # a python without jax
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    env["LMCONV_GPU_CHECK_BASE_PYTHON"] = str(bare)
    env.pop("LMCONV_GPU_CHECK_PYTHON", None)
  else:
    env["LMCONV_GPU_CHECK_PYTHON"] = sys.executable
  p = run(out, "--dry-run", env=env)
  log = p.stdout + p.stderr
  assert p.returncode == 0, log
  assert "dry run" in log and "all steps passed" in log
  if by_itself:
    assert "has no jax; the dry run reuses" in log
  # At most 8 files come back from a device run: the script keeps to that.
  names = sorted(f.name for f in out.iterdir())
  assert names == sorted(
    [
      "gpu_report.md",
      "gpu_results.json",
      "env.log",
      "build.log",
      "tests.log",
      "memcheck.log",
      "racecheck.log",
      "bench.log",
    ]
  ), names
  res = json.loads((out / "gpu_results.json").read_text())
  assert res["mode"] == "dry-run" and res["passed"] is True
  steps = {s["name"]: s["status"] for s in res["steps"]}
  twin = _host_twin()
  assert steps == {
    "build": "reused",
    "harness": "ok" if twin else "skipped",
    "tests": "ok",
    "memcheck": "ok",
    "racecheck": "skipped",
    "bench": "ok",
  }, steps
  if twin:
    assert res["harness"]["passed"] > 0 and res["harness"]["failed"] == 0
    assert "top_left" in res["harness"]["by_grouping"]
    assert "passed, 0 failed" in (out / "tests.log").read_text()
  assert res["tests"]["ran"] and res["tests"]["failures"] == 0
  assert res["tests"]["tests"] > 0  # the gpu-marked tests were collected
  assert res["tests"]["passed"] == 0  # ... and skipped: no GPU here
  rows = res["bench"]["rows"]
  assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
  assert {r["op"] for r in rows} == {"top_left", "quadrants"}
  for r in rows:
    assert r["ffi_us"] > 0 and r["reference_us"] > 0 and r["copy_us"] > 0
    if r["op"] == "top_left":
      assert r["cummax_us"] > 0 and "x_cummax" in r
  assert "12 directions fwd/bwd/jvp" in (out / "memcheck.log").read_text()
  report = (out / "gpu_report.md").read_text()
  assert report.startswith("# GPU check: PASSED (dry run, no GPU)")
  for section in (
    "## Steps",
    "## Device harness",
    "## Tests",
    "## compute-sanitizer",
    "## Benchmark",
    "## Not verified by this run",
  ):
    assert section in report


def test_bench_gpu_without_a_gpu_exits_3():
  """Nothing measured is not a success: exit 3 (gpu_check.sh's "no GPU"),
  the reason on stderr."""
  import jax

  try:
    if jax.devices("gpu"):
      pytest.skip("a GPU is here")
  except RuntimeError:
    pass
  bench = ROOT / "benchmarks" / "bench_gpu.py"
  p = subprocess.run(
    [sys.executable, str(bench)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert p.returncode == 3, p.stdout + p.stderr
  assert "no gpu device visible to JAX" in p.stderr
