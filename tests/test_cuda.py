"""The CUDA kernels of the grouped pool, verified where there is no GPU, and
on one where there is.

1. Emulation. ``lmconv_jax._lmconv_cuda_emu`` runs the CUDA kernel bodies
   (xla_ffi/cuda_schedule.h, the code cuda.cu launches) on the CPU for every
   block and thread of the launch the CUDA handler would make, phase by phase,
   behind FFI targets of its own (tests/emulator.py). Its outputs and
   workspace start as NaN, so an element never written, or read before it is
   written, shows. The tests pin bit-for-bit equality with the CPU kernels
   (the grouped targets lmconv_pool_*, called directly) over the grid: every
   direction, the groupings quadrants / octants / top_bottom / left_right /
   all_quadrants and a custom mixed one, guides full / (C,) / per batch /
   none, 4 dtypes, tie-heavy inputs, NaN and inf, forward, tangent and
   backward (the guide's gradient at its own shape), blocks and threads of
   each phase run in both orders, and plans for several multiprocessor
   counts.
2. The race and bounds detector (emulator, order bit 2) runs over the whole
   grid; a planted race and a planted out-of-bounds read fail it.
3. Launch plans: one launch per pass for the whole grouping (plus the
   reduction of a broadcast guide's gradient).
4. Lowering for "cuda" through the public API, on this CPU-only machine.
5. GPU (``-m gpu``; skipped without an NVIDIA GPU): the CUDA targets on the
   device against the CPU kernels and the emulation, bit for bit.
6. ptxas (where nvcc is found): no float32 kernel spills registers to local
   memory, as ``nvcc -Xptxas -v`` reports for sm_80.
"""

import pathlib
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmconv_jax
from lmconv_jax import _ffi
from lmconv_jax.directions import DIRECTIONS, Direction

import emulator
import inputs
from spec_oracle import assert_same_bits as same_values
from emulator import CHECK, PLANT_OUT_OF_BOUNDS, PLANT_RACE, REVERSE

CPU = jax.devices("cpu")[0]
DTYPES = {
  "float32": jnp.float32,
  "float64": jnp.float64,
  "float16": jnp.float16,
  "bfloat16": jnp.bfloat16,
}

SKEWED = Direction(
  "skewed",
  "skewed",
  +1,
  +1,
  (0, -1),
  (-1, +1),
  "left neighbour and the one up and to the right",
)
# Every kind of sweep in one grouping: 1 to 4 members, quadrants, row and
# column octants, the skew-2 wavefront, merged in mixed orders.
MIXED = (
  (SKEWED,),
  ("north_northeast", "bottom_right"),
  ("west_northwest", "south_southwest", "top_right"),
  ("bottom_left", "east_northeast", "south_southeast", "east_southeast"),
)
GROUPINGS = {
  "quadrants": "quadrants",
  "octants": "octants",
  "top_bottom": "top_bottom",
  "left_right": "left_right",
  "all_quadrants": "all_quadrants",
  "mixed": MIXED,
}
GUIDE_MODES = ("none", "full", "per_channel", "per_batch")

needs_emulator = pytest.mark.skipif(
  emulator.EMULATOR is None or not _ffi.has_kernels("cpu"),
  reason="the CUDA emulator or the CPU extension is not built",
)


def n_groups(grouping):
  return len(emulator.resolve_groups(grouping))


@pytest.fixture(autouse=True)
def _on_the_cpu_unless_marked_gpu(request):
  """The emulation tests compare with the CPU kernels, on the CPU, even on a
  machine with a GPU."""
  if request.node.get_closest_marker("gpu"):
    yield
  else:
    with jax.default_device(CPU):
      yield


# --------------------------------------------------------------------------
# Inputs and running one case.


def grid_case(dtype, grouping, hw=(5, 6), per_group=3, seed=0):
  """{x, guides by mode, ct, tx, tguides}: x stacks the input kinds (ties
  everywhere: small integers, post-ReLU zeros, a constant plane, normals)
  along a leading axis, shape (4, 2, H, W, P * per_group)."""
  c = n_groups(grouping) * per_group
  shape = (2,) + tuple(hw) + (c,)
  x = inputs.stacked_kinds(shape, seed)
  rng = np.random.default_rng(seed + 7)
  guides = {
    "none": None,
    "full": rng.choice([0.0, 0.5, 1.0, 1.5, -0.5], size=x.shape),
    "per_channel": rng.uniform(-0.5, 1.5, (c,)),
    "per_batch": rng.uniform(-0.5, 1.5, x.shape[:-3] + (1, 1, 1)),
  }
  dt = DTYPES[dtype]
  ct = inputs.make_ct(x.shape)
  tx = inputs.make_ct(x.shape, seed=3)
  tguides = {
    m: None
    if g is None
    else jnp.asarray(inputs.make_ct(np.shape(g), seed=4), dt)
    for m, g in guides.items()
  }
  return dict(
    x=jnp.asarray(x, dt),
    guides={
      m: None if g is None else jnp.asarray(g, dt) for m, g in guides.items()
    },
    ct=jnp.asarray(ct, dt),
    tx=jnp.asarray(tx, dt),
    tguides=tguides,
  )


def run(x, g, grouping, ct, tx, tg, **how):
  """(out, members, tout, dx, dguide, inference out) of one
  implementation: emulated=True (with multiprocessors, order) or False (the
  CPU kernels). The tangent and the backward take the CPU forward's out and
  members, so each pass is compared on its own; the last is the forward
  that does not save the member pools (merging as it goes)."""
  fwd = emulator.forward(x, g, grouping, **how)
  base = emulator.forward(x, g, grouping, emulated=False)
  tout = emulator.tangent(x, g, grouping, *base, tx, tg, **how)
  dx, dg = emulator.backward(x, g, grouping, *base, ct, **how)
  inference = emulator.forward(x, g, grouping, save_members=False, **how)[0]
  return tuple(fwd) + (tout, dx, dg, inference)


def bits(a):
  """The bit patterns of an array (so -0.0 != 0.0 and NaNs compare)."""
  a = np.asarray(a)
  return a.view(
    {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]
  )


NAMES = ("out", "members", "tout", "dx", "dguide", "inference out")


def member_slots(grouping, shape):
  """Which elements of `members` ((..., K, H, W, C)) a grouping defines:
  member k of a group of m > 1 members, k < m, at the group's channels; the
  other slots are left unwritten by every back end."""
  groups = emulator.resolve_groups(grouping)
  k = max(len(g) for g in groups)
  cg = shape[-1] // len(groups)
  used = np.zeros((k, shape[-1]), bool)
  for p, g in enumerate(groups):
    if len(g) > 1:
      used[: len(g), p * cg : (p + 1) * cg] = True
  return used[:, None, None, :]


def assert_same_bits(got, want, grouping=None):
  for name, g, w in zip(NAMES, got, want):
    assert (g is None) == (w is None), name
    if g is None:
      continue
    assert g.dtype == w.dtype and g.shape == w.shape, name
    g, w = bits(g), bits(w)
    if name == "members" and g.size:
      used = np.broadcast_to(member_slots(grouping, w.shape), w.shape)
      g, w = g[used], w[used]
    np.testing.assert_array_equal(g, w, err_msg=name)


# --------------------------------------------------------------------------
# 1 + 2. Emulation equals the CPU kernels, under the race detector


@needs_emulator
@pytest.mark.parametrize("dtype", inputs.dtype_params(DTYPES))
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_emulation_equals_cpu_kernels_bit_for_bit(grouping, dtype):
  """Every guide mode, forward / tangent / backward; the emulation runs once
  with the race and bounds detector (blocks ascending, an H200's 132
  multiprocessors) and once with the blocks and threads of each phase in
  reverse (one multiprocessor: the same plan here, C / P = 3)."""
  grouping = GROUPINGS[grouping]
  case = grid_case(dtype, grouping)
  for mode in GUIDE_MODES:
    args = (
      case["x"],
      case["guides"][mode],
      grouping,
      case["ct"],
      case["tx"],
      case["tguides"][mode],
    )
    want = run(*args, emulated=False)
    assert not np.isnan(np.asarray(want[0], np.float32)).any()
    for how in (
      dict(multiprocessors=132, order=CHECK),
      dict(multiprocessors=1, order=REVERSE),
    ):
      assert_same_bits(run(*args, emulated=True, **how), want, grouping)


# Bit patterns every 16-bit neighbour set below includes: zeros of both
# signs, the smallest subnormals, +-1, +-inf, signalling and quiet NaNs of
# both signs with payloads, for float16 and for bfloat16 (whose infinity is
# 0x7F80).
SPECIAL_16 = np.array(
  [
    0x0000,
    0x8000,
    0x0001,
    0x8001,
    0x03FF,
    0x007F,
    0x807F,
    0x0080,
    0x3C00,
    0xBC00,
    0x3F80,
    0xBF80,
    0x7BFF,
    0xFBFF,
    0x7C00,
    0xFC00,
    0x7C01,
    0xFC01,
    0x7D00,
    0x7E00,
    0xFE00,
    0x7F7F,
    0xFF7F,
    0x7F80,
    0xFF80,
    0x7F81,
    0xFF81,
    0x7FA0,
    0x7FC0,
    0xFFC0,
    0x7FFF,
    0xFFFF,
  ],
  np.uint16,
)


@needs_emulator
@pytest.mark.parametrize(
  "dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"]
)
@pytest.mark.parametrize(
  "grouping,lanes",
  [
    (("top_left",), 1 << 16),
    ("quadrants", 1 << 14),
    ("quadrants", 16),
    ("octants", 8),
    ("octants", 4),
    ("octants", 2),
  ],
  ids=[
    "top_left",
    "quadrants",
    "quadrants-16",
    "octants-8",
    "octants-4",
    "octants-2",
  ],
)
def test_16bit_forward_max_on_bits_equals_the_float_path(
  grouping, lanes, dtype
):
  """The CPU kernels' unguided 16-bit forward takes the max on the bits
  (landmark_pool.h: take_max_bits, no conversion); the emulation converts
  to float and back. Over every one of the 65536 bit patterns of x, against
  neighbours that include every special value, they agree bit for bit, NaN
  bits included, and the reference agrees on every value and NaN position.
  `lanes` is a group's width: 16, 8 and 4 have their own loops in
  cpu_kernels.h (forward_pixel), wide groups and 2 the general one."""
  allbits = np.arange(1 << 16, dtype=np.uint16)
  rng = np.random.default_rng(0)
  px = [
    allbits,
    np.resize(SPECIAL_16, allbits.size),
    rng.permutation(allbits),
    np.roll(np.resize(SPECIAL_16, allbits.size), 7),
  ]
  # (B, 2, 2, C): every pixel has 0, 1 or 2 neighbours in every direction,
  # and pixel (i, j) of the images holds all of px[2 i + j].
  groups = len(lmconv_jax.directions.resolve_grouping(grouping))
  channels = groups * lanes
  x = np.stack(px).reshape(4, -1, channels).transpose(1, 0, 2)
  x = x.reshape(-1, 2, 2, channels)
  x = jax.lax.bitcast_convert_type(jnp.asarray(x), dtype)
  got = emulator.forward(x, None, grouping, emulated=False)[0]
  want = emulator.forward(x, None, grouping, emulated=True)[0]
  np.testing.assert_array_equal(bits(got), bits(want))
  inputs_nan = np.isnan(np.asarray(x, np.float32))
  assert inputs_nan.any() and (bits(got) != bits(x)).any()  # a real check
  same_values(
    got,
    lmconv_jax.grouped_landmark_pool(x, grouping, implementation="reference"),
  )


WIDE = {
  "top_bottom": (1, 7, 9, 2 * 70),  # 3 chunks of 32 (last partial)
  "quadrants": (2, 6, 5, 4 * 40),
  "mixed": (1, 5, 8, 4 * 33),
}


@needs_emulator
@pytest.mark.parametrize("grouping", WIDE)
def test_emulation_is_the_same_for_every_plan_and_thread_order(grouping):
  """Wide groups split into channel chunks, more chunks when there are more
  multiprocessors; several pixel batches per thread; every plan and order
  changes no bit, and the detector finds nothing."""
  g = GROUPINGS[grouping]
  shape = WIDE[grouping]
  x = jnp.asarray(inputs.make_x("small_int", shape, 5), jnp.float32)
  guide = jnp.asarray(
    inputs.make_guide("per_channel", shape, tie_heavy=True), jnp.float32
  )
  ct = jnp.asarray(inputs.make_ct(shape), jnp.float32)
  tx = jnp.asarray(inputs.make_ct(shape, seed=3), jnp.float32)
  tg = jnp.asarray(inputs.make_ct(guide.shape, seed=4), jnp.float32)
  lanes = {
    emulator.launch_plan(g, shape, multiprocessors=m)["lanes"]
    for m in (1, 10**6)
  }
  assert lanes == {32, 16}  # the plans really differ
  for gd, tgd in ((None, None), (guide, tg)):
    want = run(x, gd, g, ct, tx, tgd, emulated=False)
    for how in (
      dict(multiprocessors=1, order=CHECK),
      dict(multiprocessors=10**6, order=CHECK | REVERSE),
      dict(multiprocessors=8, order=REVERSE),
    ):
      assert_same_bits(
        run(x, gd, g, ct, tx, tgd, emulated=True, **how), want, g
      )


@needs_emulator
@pytest.mark.parametrize("grouping", ["octants", "all_quadrants", "mixed"])
def test_emulated_nan_and_inf_equal_cpu_kernels(grouping):
  g = GROUPINGS[grouping]
  shape = (2, 6, 5, 4 * n_groups(g))
  x = inputs.make_x("small_int", shape)
  for where, value in {
    (0, 2, 3, 1): np.nan,
    (1, 4, 1, 0): np.inf,
    (1, 1, 1, 2): -np.inf,
    (0, 0, 0, 0): np.nan,
    (1, 5, 4, shape[-1] - 1): np.nan,
  }.items():
    x[where] = value
  guide = inputs.make_guide("full", shape, tie_heavy=True)
  ct = inputs.make_ct(shape)
  tx = inputs.make_ct(shape, seed=3)
  tx[1, 2, 2, 0] = np.nan
  for dtype in ("float32", "bfloat16"):
    a = [jnp.asarray(v, DTYPES[dtype]) for v in (x, guide, ct, tx)]
    for gd in (None, a[1]):
      tg = None if gd is None else a[3]
      want = run(a[0], gd, g, a[2], a[3], tg, emulated=False)
      assert np.isnan(np.asarray(want[0], np.float32)).sum() > 2
      assert_same_bits(
        run(a[0], gd, g, a[2], a[3], tg, emulated=True, order=CHECK), want, g
      )


@needs_emulator
def test_emulated_subnormal_inputs_equal_cpu_kernels():
  """x and the guide flush subnormals on load; the arithmetic flushes too
  (FTZ/DAZ, as the GPU's -ftz=true for float32)."""
  shape = (2, 4, 5, 8)
  rng = np.random.default_rng(3)
  x = rng.choice([1e-40, -1e-40, 0.0, 1.0, -1.0, 2e-38], size=shape)
  guide = rng.choice([1e-40, 0.5, 1e-38, 1.0], size=shape)
  ct = rng.choice([1e-40, 1.0, 1e-38, -2.0], size=shape)
  for dtype in ("float32", "bfloat16"):
    a = [jnp.asarray(v, DTYPES[dtype]) for v in (x, guide, ct)]
    for grouping in ("quadrants", "top_bottom"):
      for gd in (None, a[1], a[1][:1, :1, :1, :]):
        want = run(
          a[0],
          gd,
          grouping,
          a[2],
          a[2],
          None if gd is None else gd,
          emulated=False,
        )
        assert_same_bits(
          run(
            a[0],
            gd,
            grouping,
            a[2],
            a[2],
            None if gd is None else gd,
            emulated=True,
            order=CHECK,
          ),
          want,
          grouping,
        )


@needs_emulator
@pytest.mark.x64
def test_emulated_guide_of_any_broadcast_shape():
  """Guides broadcast along any dims (scalar-like, per row, per column, per
  leading dim) come back with their gradient at their own shape."""
  shape = (3, 2, 4, 5, 6)
  x = jnp.asarray(inputs.make_x("relu", shape, 2), jnp.float64)
  ct = jnp.asarray(inputs.make_ct(shape), jnp.float64)
  rng = np.random.default_rng(4)
  for gshape in [
    (1, 1, 1, 1, 1),
    (1, 2, 4, 1, 1),
    (3, 1, 1, 5, 6),
    (1, 1, 4, 5, 1),
    (3, 2, 1, 1, 6),
  ]:
    g = jnp.asarray(rng.uniform(-0.5, 1.5, gshape), jnp.float64)
    tg = jnp.asarray(rng.normal(size=gshape), jnp.float64)
    for grouping in ("left_right", MIXED[1:3] + MIXED[1:2]):
      want = run(x, g, grouping, ct, ct, tg, emulated=False)
      assert want[4].shape == gshape
      assert_same_bits(
        run(x, g, grouping, ct, ct, tg, emulated=True, order=CHECK | REVERSE),
        want,
        grouping,
      )
      plan = emulator.launch_plan(
        grouping, shape, "backward", guide_shape=gshape
      )
      assert plan["launches"] == 3
      pairs = plan["guide_slices"] * np.prod(gshape)
      assert plan["slice_blocks"] * plan["reduce_threads"] >= pairs
      assert plan["total_blocks"] * plan["reduce_threads"] >= np.prod(gshape)


# Broadcast guides whose N = x.size / guide.size x elements per guide
# element span several of the reduction's slices (kGuideSlice = 256), the
# last one partial: {name: (x shape, guide shape)}.
SLICED_GUIDES = {
  "per_channel": ((3, 11, 13, 8), (8,)),  # N = 429
  "per_batch": ((3, 11, 13, 8), (3, 1, 1, 1)),  # N = 1144
  "scalar": ((3, 11, 13, 8), ()),  # N = 3432
  "per_pixel": ((2, 5, 4, 3, 60), (1, 1, 4, 3, 1)),  # N = 600
  "batch_channel": ((5, 9, 7, 16), (1, 1, 1, 16)),  # N = 315
}


def sliced_case(name, dtype, seed=0):
  """x, its broadcast guide (in [0, 1]: no gradient grows past float16)
  and a cotangent whose magnitudes span four decades, so the order of the
  guide gradient's sum shows in its bits."""
  shape, gshape = SLICED_GUIDES[name]
  rng = np.random.default_rng(seed)
  x = inputs.make_x("random", shape, seed)
  g = rng.uniform(0.0, 1.0, gshape)
  ct = rng.normal(size=shape) * 10.0 ** rng.integers(-3, 2, shape)
  dt = DTYPES[dtype]
  return [jnp.asarray(v, dt) for v in (x, g, ct)]


@needs_emulator
@pytest.mark.parametrize("dtype", inputs.dtype_params(DTYPES))
@pytest.mark.parametrize("guide", SLICED_GUIDES)
def test_emulated_guide_gradient_over_several_slices(guide, dtype):
  """The guide gradient's two levels (several slices, a partial last one)
  in the emulated CUDA launches equal the CPU kernels' bit for bit, under
  the detector and in reverse order."""
  x, g, ct = sliced_case(guide, dtype)
  plan = emulator.launch_plan(
    "quadrants", x.shape, "backward", guide_shape=g.shape
  )
  n = x.size // max(g.size, 1)
  assert plan["guide_n"] == n and n > plan["guide_slice"]
  assert plan["guide_slices"] == -(-n // plan["guide_slice"]) >= 2
  assert n % plan["guide_slice"]
  want = run(x, g, "quadrants", ct, ct, g, emulated=False)
  for how in (dict(order=CHECK), dict(multiprocessors=1, order=REVERSE)):
    assert_same_bits(
      run(x, g, "quadrants", ct, ct, g, emulated=True, **how), want
    )


def two_level_sum(dg_full, gshape, acc, slice_):
  """The guide gradient as landmark_pool.h states the order: the x
  elements reading each guide element, in x's element order, summed from
  0 in `acc` over slices of `slice_`, then the slices' sums from 0; with
  slice_ = None, one sequential sum."""
  gshape = (1,) * (dg_full.ndim - len(gshape)) + tuple(gshape)
  owner = np.broadcast_to(
    np.arange(int(np.prod(gshape))).reshape(gshape), dg_full.shape
  ).ravel()
  order = np.argsort(owner, kind="stable")  # x's order within each owner
  v = (
    np.asarray(dg_full, acc)
    .ravel()[order]
    .reshape(-1, owner.size // int(np.prod(gshape)))
  )
  n = v.shape[1]
  slice_ = slice_ or n
  k = -(-n // slice_)
  # Padding with +0 changes no partial (none is -0: each starts at +0).
  v = np.pad(v, ((0, 0), (0, k * slice_ - n))).reshape(len(v), k, slice_)
  part = np.zeros(v.shape[:2], acc)
  for i in range(slice_):
    part = part + v[:, :, i]
  total = np.zeros(len(v), acc)
  for s in range(k):
    total = total + part[:, s]
  return total.reshape(gshape)


@needs_emulator
@pytest.mark.parametrize("dtype", inputs.dtype_params(["float32", "float64"]))
@pytest.mark.parametrize("guide", ["per_channel", "per_batch", "per_pixel"])
def test_guide_gradient_is_summed_in_two_levels(guide, dtype):
  """The CPU kernels' broadcast-guide gradient is the two-level sum
  (slices of 256, then the slices' sums) of the per-pixel gradient, which
  the same call with the guide materialised at x's shape returns; on this
  data a plain sequential sum and slices of 128 or 512 give other bits, so
  the order is pinned. (The half types' sums, in float32, differ by less
  than their rounding on such data; the emulator test above covers them.)"""
  x, g, ct = sliced_case(guide, dtype)
  full = jnp.broadcast_to(g, x.shape)
  grouping = "quadrants"
  out, members = emulator.forward(x, full, grouping, emulated=False)
  dg_full = emulator.backward(
    x, full, grouping, out, members, ct, emulated=False
  )[1]
  out, members = emulator.forward(x, g, grouping, emulated=False)
  dg = emulator.backward(x, g, grouping, out, members, ct, emulated=False)[1]
  plan = emulator.launch_plan(
    grouping, x.shape, "backward", guide_shape=g.shape
  )
  assert plan["guide_slice"] == 256
  acc = np.float64 if dtype == "float64" else np.float32

  def summed(slice_):
    return bits(two_level_sum(dg_full, dg.shape, acc, slice_).astype(dg.dtype))

  want = summed(256)
  for other in (None, 128, 512):  # the order shows on this data
    assert not np.array_equal(summed(other), want), other
  np.testing.assert_array_equal(bits(dg), want)


SHAPES = {
  "square": (1, 6, 6),
  "non_square": (2, 3, 7),
  "H1": (2, 1, 9),
  "W1": (2, 8, 1),
  "one_pixel": (1, 1, 1),
  "unbatched": (5, 3),
  "deep_batch": (2, 1, 2, 4, 3),
}


@needs_emulator
@pytest.mark.parametrize("shape", SHAPES)
def test_emulation_all_shapes(shape):
  """Degenerate images (one row, one column, one pixel), no batch, several
  batch dims; with and without a per-channel guide, for the groupings that
  hold every kind of sweep (mixed) and 1 to 4 members (mixed, octants)."""
  for g in (GROUPINGS["mixed"], GROUPINGS["octants"]):
    shp = SHAPES[shape] + (2 * n_groups(g),)
    x = jnp.asarray(inputs.make_x("small_int", shp, 5), jnp.float32)
    guide = jnp.asarray(inputs.make_guide("per_channel", shp), jnp.float32)
    ct = jnp.asarray(inputs.make_ct(shp), jnp.float32)
    for gd in (None, guide):
      want = run(x, gd, g, ct, ct, gd, emulated=False)
      assert_same_bits(
        run(x, gd, g, ct, ct, gd, emulated=True, order=CHECK), want, g
      )


@needs_emulator
def test_emulated_several_pixel_batches_per_thread():
  """Images large enough that each thread takes more than one batch of
  kBatch = 4 pixels per phase, the last batch partial."""
  shape = (1, 40, 45, 128)
  plan = emulator.launch_plan("quadrants", shape, multiprocessors=1)
  assert plan["lanes"] == 32 and plan["pixel_lanes"] == 8
  assert plan["pixels_per_batch"] < 40  # 40-pixel diagonals: 2 batches
  x = jnp.asarray(inputs.make_x("relu", shape, 6), jnp.float32)
  ct = jnp.asarray(inputs.make_ct(shape), jnp.float32)
  want = run(x, None, "quadrants", ct, ct, None, emulated=False)
  assert_same_bits(
    run(
      x,
      None,
      "quadrants",
      ct,
      ct,
      None,
      emulated=True,
      multiprocessors=1,
      order=REVERSE,
    ),
    want,
  )


@needs_emulator
@pytest.mark.parametrize("grouping", ["quadrants", "octants", "top_bottom"])
def test_race_detector_catches_a_planted_race(grouping):
  """The test hook makes each body read what another thread writes in the
  same phase: the forward the next pixel's pool, the tangent and the
  backward the next pixel's slot of the workspace ring. The detector names
  the buffer and both threads; run the other way round, it sees the read
  of data not yet written."""
  shape = (1, 6, 7, 8)
  x = jnp.asarray(inputs.make_x("random", shape), jnp.float32)
  assert emulator.launch_plan(grouping, shape)["pixel_lanes"] > 1
  out, members = emulator.emulated_forward(x, None, grouping, order=CHECK)
  passes = {
    "pool": lambda o: emulator.emulated_forward(x, None, grouping, order=o),
    "workspace ring": lambda o: emulator.emulated_tangent(
      x, None, grouping, out, members, x, order=o
    ),
    "workspace ring ": lambda o: emulator.emulated_backward(
      x, None, grouping, out, members, x, order=o
    ),
  }
  for buffer, call in passes.items():
    call(CHECK)  # clean
    buffer = buffer.strip()
    if buffer == "pool":
      # Unguided, a merged group's pools are never stored: member 0's is
      # out, a later member's the ring (the residual is winner codes).
      buffer = "out"
    # Threads ascending: the read comes before the other thread's write, so
    # it reads what this launch has not written (yet, or since two phases).
    with pytest.raises(
      Exception,
      match=(
        rf"(read before write|stale read): (workspace ring|{buffer}) "
        rf"element \d+"
      ),
    ):
      call(CHECK | PLANT_RACE)
    # Descending: the write comes first; the read is the race.
    with pytest.raises(
      Exception,
      match=(
        rf"race: read of {buffer} element \d+, written by block \d+ "
        rf"thread \d+ in the same phase"
      ),
    ):
      call(CHECK | PLANT_RACE | REVERSE)


@needs_emulator
def test_bounds_detector_catches_a_planted_out_of_bounds_read():
  shape = (1, 6, 7, 4)
  x = jnp.asarray(inputs.make_x("random", shape), jnp.float32)
  with pytest.raises(Exception, match=r"out of bounds: read of x element 168"):
    emulator.emulated_forward(
      x, None, "quadrants", order=CHECK | PLANT_OUT_OF_BOUNDS
    )


@needs_emulator
def test_planted_faults_need_the_detector():
  """Without the detector bit the hooks are off (a real out-of-bounds read
  would be undefined behaviour): the results are the clean ones."""
  shape = (1, 6, 7, 8)
  x = jnp.asarray(inputs.make_x("random", shape), jnp.float32)
  want = emulator.emulated_forward(x, None, "octants")
  got = emulator.emulated_forward(
    x, None, "octants", order=PLANT_RACE | PLANT_OUT_OF_BOUNDS
  )
  assert_same_bits(got, want)


@needs_emulator
def test_emulated_zero_size_arrays_are_no_launch():
  for shape in [(0, 4, 4, 4), (2, 0, 4, 4), (2, 4, 0, 4), (2, 4, 4, 0)]:
    x = jnp.zeros(shape, jnp.float32)
    g = jnp.ones((1, 1, 1, shape[-1]), jnp.float32)
    for grouping in ("quadrants", "all_quadrants"):
      out, members = emulator.emulated_forward(x, g, grouping, order=CHECK)
      dx, dg = emulator.emulated_backward(
        x, g, grouping, out, members, x, order=CHECK
      )
      assert out.shape == dx.shape == shape
      np.testing.assert_array_equal(dg, np.zeros(g.shape))


@needs_emulator
def test_emulator_handler_checks_reach_python():
  """The checks are ffi_common.h's, shared by every back end."""
  x = jnp.ones((1, 3, 3, 4), jnp.float32)
  bad = Direction("bad", "bad", +1, +1, (0, -1), (0, -1), "n1 == n2")
  call = jax.ffi.ffi_call(
    "lmconv_emu_pool_fwd",
    (
      jax.ShapeDtypeStruct(x.shape, x.dtype),
      jax.ShapeDtypeStruct((1, 0, 3, 3, 4), x.dtype),
    ),
  )
  attrs = dict(
    group_sizes=np.array([1], np.int64),
    directions=np.array(
      [bad.row_step, bad.col_step, *bad.n1, *bad.n2], np.int64
    ),
    multiprocessors=np.int64(132),
    order=np.int64(0),
  )
  with pytest.raises(Exception, match="n1 and n2 must differ"):
    call(x, **attrs)
  with pytest.raises(Exception, match="unsupported dtype"):
    emulator.emulated_forward(
      jnp.ones((1, 3, 3, 4), jnp.int32), None, "quadrants"
    )
  with pytest.raises(Exception, match="do not split into 8"):
    emulator.emulated_forward(x, None, "octants")
  with pytest.raises(Exception, match="multiprocessors must be >= 1"):
    emulator.emulated_forward(x, None, "quadrants", multiprocessors=0)


@needs_emulator
def test_build_info_says_when_nvcc_was_missing(monkeypatch):
  """A build without nvcc is CPU only and `python -m lmconv_jax info` (which
  prints _ffi.build_info()) says so."""
  monkeypatch.setattr(
    _ffi, "_MODULES", {k: v for k, v in _ffi._MODULES.items() if k != "cuda"}
  )
  info = _ffi.build_info()
  assert info["platforms"] == ("cpu",)
  assert not info["cuda"]["built"]


# --------------------------------------------------------------------------
# 3. Launch plans


def expected_phases(grouping, shape, pass_, guided=False):
  """Each member's sweep in turn; a merge phase only in a guided forward
  that saves its member pools (unguided, members merge as they go)."""
  h, w = shape[-3:-1]
  per_dir = lambda d: (
    h + w - 1 if d.is_quadrant else (w if d.n1[1] == d.n2[1] != 0 else h)
  )
  return max(
    sum(per_dir(d) for d in grp)
    + (1 if pass_ == "forward" and guided and len(grp) > 1 else 0)
    for grp in emulator.resolve_groups(grouping)
  )


@needs_emulator
@pytest.mark.parametrize("shape", [(32, 16, 16, 128), (8, 64, 64, 64)])
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_launch_plan_is_one_launch_for_the_whole_grouping(grouping, shape):
  """(image, group, channel chunk) blocks; one launch per pass; the phases of
  the group with the most; the tangent and backward need a workspace, and
  so does a forward with merged groups but no guide (a later member's pool
  in the ring); the kernel arguments fit CUDA's 4 KB."""
  g = GROUPINGS[grouping]
  p = n_groups(g)
  if shape[-1] % p:
    pytest.skip("channels do not split")
  for pass_ in ("forward", "tangent", "backward"):
    plan = emulator.launch_plan(g, shape, pass_)
    assert plan["launches"] == 1
    assert plan["blocks"] == shape[0] * p * plan["chunks"]
    assert plan["chunks"] * plan["lanes"] >= shape[-1] // p
    assert plan["phases"] == expected_phases(g, shape, pass_)
    assert plan["threads"] <= 256 and plan["threads"] % plan["lanes"] == 0
    merged = max(len(grp) for grp in emulator.resolve_groups(g)) > 1
    assert (plan["workspace_elements"] == 0) == (
      pass_ == "forward" and not merged
    )
    assert plan["kernel_args_bytes"] <= 4096
  guided_fwd = emulator.launch_plan(g, shape, guide_shape=(shape[-1],))
  assert guided_fwd["phases"] == expected_phases(g, shape, "forward", True)
  assert guided_fwd["workspace_elements"] == 0  # the member pools, merged
  inference = emulator.launch_plan(g, shape, saved_members=False)
  assert inference["phases"] == expected_phases(g, shape, "tangent")
  assert (inference["workspace_elements"] > 0) == merged  # the ring
  guided = emulator.launch_plan(g, shape, "backward", guide_shape=(shape[-1],))
  assert guided["launches"] == 3  # + the reduction of dguide, two levels
  full = emulator.launch_plan(g, shape, "backward", guide_shape=shape)
  assert full["launches"] == 1


@needs_emulator
def test_launch_plan_fills_the_gpu_with_a_small_batch():
  """LBYLNet's (32, 16, 16, 128) quadrants: 32 images x 4 groups = 128
  blocks of 32 channels, under an H200's 132 multiprocessors, so the
  channels are split once more."""
  plan = emulator.launch_plan("quadrants", (32, 16, 16, 128))
  assert (plan["lanes"], plan["blocks"]) == (16, 256)
  plan = emulator.launch_plan(
    "quadrants", (32, 16, 16, 128), multiprocessors=100
  )
  assert (plan["lanes"], plan["blocks"]) == (32, 128)


def _bench_gpu():
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"
  spec = importlib.util.spec_from_file_location("bench_gpu", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@needs_emulator
def test_gpu_model_is_the_grouped_launch_plan():
  """benchmarks/bench_gpu.py --model (docs/benchmarks.md's GPU model) reads
  the handler's own plan: one launch per unguided pass, the plan's blocks
  and phases; a quadrant's wavefront is one batch per anti-diagonal at
  LBYLNet's shape, a merged group runs its members' sweeps in turn, and the
  bytes are 2 arrays forward, 4 backward (+ uint8 winner codes)."""
  bench = _bench_gpu()
  shape = (64, 32, 32, 128)
  n = 4 * int(np.prod(shape))
  for grouping in (
    "top_left",
    "quadrants",
    "octants",
    "top_bottom",
    "all_quadrants",
  ):
    for pass_ in ("forward", "backward", "tangent"):
      m = bench.grouped_model(grouping, shape, pass_)
      plan = emulator.launch_plan(grouping, shape, pass_)
      assert (m["launches"], m["blocks"], m["phases"]) == (
        1,
        plan["blocks"],
        plan["phases"],
      )
  tl = bench.grouped_model("top_left", shape, "forward")
  assert (tl["batches"], tl["bytes"]) == (63, 2 * n)
  tb = bench.grouped_model("top_bottom", shape, "backward")
  assert (tb["batches"], tb["bytes"]) == (126, 4 * n + n // 4)
  guided = bench.grouped_model(
    "quadrants", shape, "backward", guide_shape=(128,)
  )
  assert guided["launches"] == 3
  assert guided["latency_us"] > tl["latency_us"]  # the reduction's chains
  table = bench.model_table()
  assert table.count("\n| (") == 3 * 7 * 3  # shapes x cases x passes


# --------------------------------------------------------------------------
# 4. Lowering for CUDA on a machine without a GPU (the public API)

needs_cuda_build = pytest.mark.skipif(
  not _ffi.has_kernels("cuda"),
  reason="the CUDA kernels are not built (no nvcc at build time)",
)


def cuda_hlo(f, *args):
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def custom_call_targets(text):
  return sorted(re.findall(r"custom_call @(\w+)", text))


def has_loop(text):
  return re.search(r"stablehlo\.while|\bwhile\b", text) is not None


ALL = tuple(DIRECTIONS)


@needs_cuda_build
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("direction", ALL)
def test_cuda_lowering_is_our_custom_calls_and_no_loop(direction, guided):
  x = jnp.ones((2, 5, 6, 3), jnp.float32)
  g = jnp.full(x.shape, 0.5, jnp.float32) if guided else None
  suffix = "_guided" if guided else ""

  def fwd(x, g):
    return lmconv_jax.landmark_pool(x, direction, g, implementation="ffi")

  def grad(x, g):
    return jax.grad(
      lambda x, g: (fwd(x, g) * x).sum(), argnums=(0, 1) if guided else 0
    )(x, g)

  text = cuda_hlo(fwd, x, g)
  assert custom_call_targets(text) == [f"lmconv_pool_fwd{suffix}"]
  assert not has_loop(text)
  text = cuda_hlo(grad, x, g)
  assert set(custom_call_targets(text)) == {
    f"lmconv_pool_fwd{suffix}",
    f"lmconv_pool_bwd{suffix}",
  }
  assert not has_loop(text)


@needs_cuda_build
@pytest.mark.parametrize(
  "grouping",
  ["quadrants", "octants", "top_bottom", "left_right", "all_quadrants"],
)
def test_cuda_lowering_of_grouped_pools_is_two_custom_calls(grouping):
  """Forward + backward of any grouping: one custom call each, no slicing
  or concatenation of x outside the kernels."""
  x = jnp.ones((2, 8, 8, 16), jnp.float32)
  f = lambda x: lmconv_jax.grouped_landmark_pool(
    x, grouping, implementation="ffi"
  )
  text = cuda_hlo(jax.grad(lambda x: (f(x) * x).sum()), x)
  assert custom_call_targets(text) == ["lmconv_pool_bwd", "lmconv_pool_fwd"]
  assert "concatenate" not in text
  assert not has_loop(text)


@needs_cuda_build
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("direction", ["top_left", "east_southeast"])
def test_cuda_lowering_of_jvp_is_the_tangent_kernel_and_no_loop(
  direction, guided
):
  x = jnp.ones((2, 5, 6, 3), jnp.float32)
  g = jnp.full(x.shape, 0.5, jnp.float32) if guided else None
  suffix = "_guided" if guided else ""

  def jvp(x, g, tx, tg):
    if g is None:
      return jax.jvp(
        lambda x: lmconv_jax.landmark_pool(x, direction, implementation="ffi"),
        (x,),
        (tx,),
      )
    return jax.jvp(
      lambda x, g: lmconv_jax.landmark_pool(
        x, direction, g, implementation="ffi"
      ),
      (x, g),
      (tx, tg),
    )

  text = cuda_hlo(jvp, x, g, x, g)
  assert custom_call_targets(text) == [
    f"lmconv_pool_fwd{suffix}",
    f"lmconv_pool_tangent{suffix}",
  ]
  assert not has_loop(text)


# --------------------------------------------------------------------------
# 5. On a GPU


def _gpu():
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:
    return None


def needs_gpu(f):
  f = pytest.mark.skipif(
    not _ffi.has_kernels("cuda"), reason="the CUDA kernels are not built"
  )(f)
  f = pytest.mark.skipif(_gpu() is None, reason="no GPU visible to JAX")(f)
  return pytest.mark.gpu(f)


def on_gpu(*arrays):
  return [None if a is None else jax.device_put(a, _gpu()) for a in arrays]


def gpu_run(x, g, grouping, out, members, ct, tx, tg):
  """(out, members, tout, dx, dguide, inference out) of the CUDA targets on
  the GPU (the same names as the CPU ones, platform CUDA), back on the host;
  the tangent and the backward take the given (CPU) out and members."""
  x, g, out, members, ct, tx, tg = on_gpu(x, g, out, members, ct, tx, tg)
  fwd = emulator.forward(x, g, grouping, emulated=False)
  assert fwd[0].devices() == {_gpu()}
  tout = emulator.tangent(x, g, grouping, out, members, tx, tg, emulated=False)
  dx, dg = emulator.backward(x, g, grouping, out, members, ct, emulated=False)
  inference = emulator.forward(
    x, g, grouping, emulated=False, save_members=False
  )[0]
  return [
    None if a is None else np.asarray(jax.device_get(a))
    for a in tuple(fwd) + (tout, dx, dg, inference)
  ]


@needs_gpu
@pytest.mark.parametrize("dtype", inputs.dtype_params(DTYPES))
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_gpu_kernels_equal_cpu_kernels_and_emulation(grouping, dtype):
  """The grouped CUDA targets on the device against the CPU kernels and the
  emulation, bit for bit, every guide mode and pass. float64 with subnormal
  results and NaN bit patterns are not covered (cuda.cu: the GPU does not
  flush float64 and has one canonical NaN; these inputs make neither)."""
  g = GROUPINGS[grouping]
  for mode in GUIDE_MODES:
    with jax.default_device(CPU):
      case = jax.device_put(grid_case(dtype, g), CPU)
      args = (
        case["x"],
        case["guides"][mode],
        g,
        case["ct"],
        case["tx"],
        case["tguides"][mode],
      )
      want = run(*args, emulated=False)
      emulated = (
        run(*args, emulated=True, order=CHECK)
        if emulator.EMULATOR is not None
        else None
      )
    got = gpu_run(args[0], args[1], g, want[0], want[1], *args[3:])
    assert_same_bits(got, want, g)
    if emulated is not None:
      assert_same_bits(got, emulated, g)


@needs_gpu
@pytest.mark.parametrize("grouping", WIDE)
def test_gpu_kernels_wide_channels(grouping):
  """Several channel chunks per group, several pixel batches per thread."""
  g = GROUPINGS[grouping]
  shape = WIDE[grouping]
  with jax.default_device(CPU):
    x, guide, ct = jax.device_put(
      (
        jnp.asarray(inputs.make_x("small_int", shape, 5), jnp.float32),
        jnp.asarray(inputs.make_guide("per_channel", shape), jnp.float32),
        jnp.asarray(inputs.make_ct(shape), jnp.float32),
      ),
      CPU,
    )
    wants = {
      gd is None: run(x, gd, g, ct, ct, gd, emulated=False)
      for gd in (None, guide)
    }
  for gd in (None, guide):
    want = wants[gd is None]
    got = gpu_run(x, gd, g, want[0], want[1], ct, ct, gd)
    assert_same_bits(got, want, g)


@needs_gpu
@pytest.mark.x64  # the float64 sum of dx at the end
def test_gpu_kernels_index_past_2_to_the_31():
  """64-bit indexing: a float32 tensor of more than 2**31 elements (8.6 GB;
  skipped on a GPU with less than 60 GB). With g = 1 a quadrant is two
  cumulative maxima, which XLA computes independently."""
  gpu = _gpu()
  stats = gpu.memory_stats() or {}
  if stats.get("bytes_limit", 0) < 60 * 2**30:
    pytest.skip("needs a GPU with 60 GB")
  shape = (1, 1024, 1024, 2049)  # 2**31 + 2**20 elements
  assert np.prod(shape) > 2**31
  key = jax.random.key(0)
  x = jax.device_put(jax.random.normal(key, shape, jnp.float32), gpu)
  d = DIRECTIONS["bottom_right"]
  out = jax.jit(
    lambda x: emulator.forward(x, None, ((d,),), emulated=False)[0]
  )(x)
  want = jax.jit(
    lambda x: jax.lax.cummax(
      jax.lax.cummax(x, axis=1, reverse=True), axis=2, reverse=True
    )
  )(x)
  assert bool(jnp.array_equal(out, want))
  del out, want
  dx = jax.jit(
    jax.grad(
      lambda x: lmconv_jax.landmark_pool(x, d, implementation="ffi").sum()
    )
  )(x)
  # Every pixel's gradient lands on its landmark: the total is the pixel count.
  assert float(jnp.sum(dx, dtype=jnp.float64)) == np.prod(shape)


# --------------------------------------------------------------------------
# 6. ptxas: no float32 kernel spills

# float32 kernels that still spill (CUDA 13.0, sm_80), each with why: the
# check fails on any other, and on one of these that no longer spills (so
# the list only shrinks). The guided tangent keeps eight values per pixel of
# a batch live across its loads (x, both neighbours, g, tx, t1, t2, tg).
FLOAT32_SPILLS_KNOWN = {"TangentBody<float, true>"}


def _nvcc():
  """nvcc on PATH, or CUDA's default place (where .ci/run puts it)."""
  default = pathlib.Path("/usr/local/cuda/bin/nvcc")
  return shutil.which("nvcc") or (str(default) if default.exists() else None)


def ptxas_report(nvcc, arch="sm_80"):
  """{kernel body: (registers, spill store bytes, spill load bytes)} of
  xla_ffi/cuda.cu compiled with the project's flags (CMakeLists.txt)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  with tempfile.TemporaryDirectory() as tmp:
    p = subprocess.run(
      [
        nvcc,
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "--fmad=false",
        "-ftz=true",
        f"-arch={arch}",
        "-cubin",
        "-Xptxas",
        "-v",
        "-I",
        str(root / "xla_ffi"),
        str(root / "xla_ffi" / "cuda.cu"),
        "-o",
        str(pathlib.Path(tmp) / "cuda.cubin"),
      ],
      capture_output=True,
      text=True,
      timeout=900,
    )
  assert p.returncode == 0, p.stderr[-3000:]
  out = {}
  pattern = re.compile(
    r"Compiling entry function '(\w+)' for '\w+'\n(?:.*\n)*?.*?"
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
    r"spill loads\n.*?Used (\d+) registers"
  )
  for m in pattern.finditer(p.stdout + p.stderr):
    name = subprocess.run(
      ["c++filt", m.group(1)], capture_output=True, text=True
    ).stdout.strip()
    body = re.search(r"phased_kernel<lmconv::(\w+)<(.*)> *>", name)
    key = (f"{body.group(1)}<{body.group(2)}>" if body else name).replace(
      "lmconv::", ""
    )
    out[key] = (int(m.group(5)), int(m.group(3)), int(m.group(4)))
  return out


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_no_float32_kernel_spills():
  """ptxas -v over every kernel (32: 4 dtypes x 8 bodies); float32's must
  not spill (a spill is a local-memory round trip per pixel). The numbers
  of every kernel are in the failure message."""
  if shutil.which("c++filt") is None:
    pytest.skip("c++filt not found")
  report = ptxas_report(_nvcc())
  table = "\n".join(
    f"{k}: {v[0]} registers, spills {v[1]} / {v[2]} bytes"
    for k, v in sorted(report.items())
  )
  assert len(report) == 32, table
  f32 = {k: v for k, v in report.items() if "<float" in k}
  assert len(f32) == 8, table
  spilling = {k for k, v in f32.items() if v[1] or v[2]}
  assert spilling == FLOAT32_SPILLS_KNOWN, table
