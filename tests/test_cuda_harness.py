"""The device harness (tests/cuda_harness.cu), where this machine allows.

The harness is a plain CUDA program (no JAX): it drives the kernels through
the XLA handlers' plan and launch code and compares every output with the
CPU kernels, bit for bit, failing on any element left poisoned. On a GPU it
is scripts/gpu_check.sh's first step. Here:

* its host twin (the same source built by the host compiler; the CUDA
  bodies run on the CPU in the GPU's launch geometry) runs the grid, so the
  case generation, the comparison and the poison check run in CI; a planted
  unwritten element and a planted flipped bit fail it;
* its grid covers every direction, grouping, dtype, guide and pass, with odd
  shapes and channel counts off the block's chunk; its direction table is
  lmconv_jax's;
* the CUDA build, without a GPU, says so and exits 3; with one (``-m gpu``)
  every case passes.

The binaries are where the build put them (the emulator module's
build_info); the tests skip where this build has none (LMCONV_HARNESS=OFF,
no nvcc, or a wheel built elsewhere).
"""

import os
import re
import shutil
import subprocess

import pytest

from lmconv_jax.directions import DIRECTIONS

try:
  from lmconv_jax import _lmconv_cuda_emu as EMULATOR
except ImportError:
  EMULATOR = None

PASSES = ("fwd-train", "fwd-infer", "tangent", "backward")
DTYPES = ("float32", "float64", "float16", "bfloat16")
GUIDES = ("none", "full", "(C,)", "(B,1,1,1)", "scalar")
GROUPINGS = tuple(DIRECTIONS) + (
  "quadrants",
  "octants",
  "top_bottom",
  "left_right",
  "all_quadrants",
  "mixed",
)
GROUPS = {
  **{d: 1 for d in DIRECTIONS},
  "quadrants": 4,
  "octants": 8,
  "top_bottom": 2,
  "left_right": 2,
  "all_quadrants": 1,
  "mixed": 4,
}


def binary(kind):
  """The path of the harness ('cuda') or its host twin ('host'), or None."""
  if EMULATOR is None:
    return None
  path = EMULATOR.build_info().get("harness_" + kind, "")
  return path if path and os.access(path, os.X_OK) else None


HOST = binary("host")
CUDA = binary("cuda")
needs_host = pytest.mark.skipif(
  HOST is None,
  reason="this build has no harness host twin "
  "(LMCONV_EMULATOR and LMCONV_HARNESS on, in this checkout's build)",
)
needs_cuda = pytest.mark.skipif(
  CUDA is None, reason="this build has no CUDA harness (no nvcc?)"
)


def run(path, *args, timeout=900):
  return subprocess.run(
    [path, *map(str, args)], capture_output=True, text=True, timeout=timeout
  )


def cases(text):
  """{case: 'ok' or 'FAIL'} from the harness's lines."""
  out = {}
  for line in text.splitlines():
    m = re.match(r"(ok|FAIL) +(\S+ +\S+ +\S+ +guide=\S+ +x=\S+)", line)
    if m:
      out[" ".join(m.group(2).split())] = m.group(1).strip()
  return out


@needs_host
def test_direction_table_is_lmconv_jax_s():
  p = run(HOST, "--directions", timeout=60)
  assert p.returncode == 0, p.stderr
  rows = {}
  for line in p.stdout.splitlines():
    name, *v = line.split()
    rows[name] = tuple(map(int, v))
  for name, d in DIRECTIONS.items():
    assert rows.pop(name) == (d.row_step, d.col_step) + d.n1 + d.n2, name
  # The one left is the skew-2 direction of tests/test_cuda.py's MIXED.
  assert rows == {"skewed": (1, 1, 0, -1, -1, 1)}


@needs_host
@pytest.mark.parametrize("quick", [False, True], ids=["grid", "quick"])
def test_grid_covers_every_grouping_dtype_guide_and_pass(quick):
  p = run(HOST, "--list", *(["--quick"] if quick else []), timeout=60)
  assert p.returncode == 0, p.stderr
  rows = [line.split() for line in p.stdout.splitlines()]
  assert len(rows) == len(GROUPINGS) * len(DTYPES) * len(GUIDES) * 4
  seen = {(r[0], r[1], r[2], r[3][len("guide=") :]) for r in rows}
  assert seen == {
    (p_, d, g, gd)
    for p_ in PASSES
    for d in DTYPES
    for g in GROUPINGS
    for gd in GUIDES
  }
  shapes = []
  for r in rows:
    b, h, w, c = map(
      int, re.fullmatch(r"x=\((\d+),(\d+),(\d+),(\d+)\)", r[4]).groups()
    )
    assert c % GROUPS[r[2]] == 0, r
    shapes.append((b, h, w, c // GROUPS[r[2]]))
  # Odd sizes, single rows and columns, batches, and channels per group off
  # the 16- and 32-channel chunks, both below and above a chunk.
  assert any(h % 2 and w % 2 and h > 1 and w > 1 for _, h, w, _ in shapes)
  assert any(h == 1 for _, h, _, _ in shapes)
  assert any(w == 1 for _, _, w, _ in shapes)
  assert any(b > 1 for b, *_ in shapes)
  assert any(cg % 16 and cg < 16 for *_, cg in shapes)
  if not quick:
    assert any(cg % 16 and cg > 32 for *_, cg in shapes)
    assert any(h > 16 and w > 16 for _, h, w, _ in shapes)
    # A broadcast guide's gradient over several of the reduction's slices
    # (kGuideSlice = 256), the last one partial: every (C,) case, and some
    # scalar and (B,1,1,1) ones.
    per_element = {
      "(C,)": lambda b, h, w, c: b * h * w,
      "(B,1,1,1)": lambda b, h, w, c: h * w * c,
      "scalar": lambda b, h, w, c: b * h * w * c,
    }
    for guide, n_of in per_element.items():
      ns = [
        n_of(*map(int, re.findall(r"\d+", r[4])))
        for r in rows
        if r[3] == "guide=" + guide
      ]
      sliced = [n > 256 and n % 256 != 0 for n in ns]
      assert all(sliced) if guide == "(C,)" else any(sliced), (guide, ns)


@needs_host
def test_host_twin_passes_the_grid(tmp_path):
  """The CUDA bodies on the CPU against the CPU kernels, every case: one line
  each, the summary last, exit 0, and the TSV gpu_check.sh's report reads."""
  tsv = tmp_path / "harness.tsv"
  p = run(HOST, "--tsv", tsv)
  lines = p.stdout.strip().splitlines()
  assert p.returncode == 0, "\n".join(
    [l for l in lines if l.startswith("FAIL")][:20] + [p.stderr]
  )
  got = cases(p.stdout)
  n = len(GROUPINGS) * len(DTYPES) * len(GUIDES) * 4
  assert len(got) == n and set(got.values()) == {"ok"}
  assert lines[-1] == f"{n} passed, 0 failed"
  assert lines[0].startswith("lmconv_cuda_harness (host build")
  assert len(lines) == n + 2
  rows = [l.split("\t") for l in tsv.read_text().splitlines()]
  assert len(rows) == n and {r[0] for r in rows} == {"ok"}


@needs_host
@pytest.mark.parametrize(
  "fault,says", [("unwritten", "left poisoned"), ("flip", "elements differ")]
)
def test_a_planted_fault_fails_every_case(fault, says):
  """An element left at the poison, or one flipped bit, in each case's first
  output: every case fails and says why; exit 1."""
  p = run(HOST, "--quick", "--filter", "float32", "--plant", fault)
  assert p.returncode == 1, p.stdout[-2000:] + p.stderr
  got = cases(p.stdout)
  assert got and set(got.values()) == {"FAIL"}
  fails = [l for l in p.stdout.splitlines() if l.startswith("FAIL")]
  assert all(says in l and "1 of" in l for l in fails), fails[:3]
  assert p.stdout.strip().splitlines()[-1] == f"0 passed, {len(got)} failed"


@needs_host
def test_bad_arguments_exit_2():
  p = run(HOST, "--frobnicate", timeout=60)
  assert p.returncode == 2 and "unknown argument" in p.stderr
  p = run(HOST, "--plant", "everything", timeout=60)
  assert p.returncode == 2


def _has_gpu():
  smi = shutil.which("nvidia-smi")
  if smi is None:
    return False
  p = subprocess.run([smi, "-L"], capture_output=True, text=True)
  return p.returncode == 0 and "GPU " in p.stdout


@needs_cuda
@pytest.mark.skipif(_has_gpu(), reason="a GPU is here: see the gpu test")
def test_cuda_harness_without_a_gpu_says_so_and_exits_3():
  p = run(CUDA, timeout=120)
  assert p.returncode == 3, p.stdout + p.stderr
  lines = (p.stdout + p.stderr).strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
    "lmconv_cuda_harness: no CUDA device"
  ), lines


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
def test_cuda_harness_passes_on_the_gpu():
  p = run(CUDA)
  lines = p.stdout.strip().splitlines()
  assert p.returncode == 0, "\n".join(
    [l for l in lines if l.startswith("FAIL")][:20] + [p.stderr]
  )
  n = len(GROUPINGS) * len(DTYPES) * len(GUIDES) * 4
  assert lines[-1] == f"{n} passed, 0 failed"
