"""The Pallas TPU kernels (lmconv_jax._pallas_tpu) in Pallas' interpret mode
equal the pure-jnp reference bit for bit: forward, tangent and backward.

Inputs come from tests/fuzz.py (ties, +-0, NaN, +-inf, subnormals; guides
inside and outside [0, 1] with NaN and inf). Interpret mode compiles each
kernel with XLA:CPU (seconds per direction in a grouping and pass), so the
grid is chosen, not crossed: every named grouping once, each with another
guide shape and dtype, bands that do not divide H, and a few cases for the
rest (custom and merged directions, the wavefront's seams with one row, one
column and several bands, float64, float16, random guides for the no-FMA
blend, the TPU-semantics race detector). A case checks all its passes in
one jit per side.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

import fuzz
import spec_oracle
from inputs import dtype_params
from lmconv_jax import _pallas_tpu as K
from lmconv_jax.directions import DIRECTIONS, resolve_grouping

_D = DIRECTIONS


def _j(v):
  return None if v is None else jnp.asarray(v)


def _lead(v, lead):
  """v (B, H, W, C) with its batch dim split into ``lead`` (kept at 1s for
  a guide of batch size 1)."""
  if v is None or lead is None:
    return v
  return v.reshape((lead if v.shape[0] > 1 else (1,) * len(lead)) + v.shape[1:])


def _check(case, passes="fbt", band_rows=2, lead=None, interpret=True):
  """The kernels' passes against the reference's on one fuzz case; ``lead``
  splits the batch dim into leading dims. The passes go through one jit
  each side: interpret mode lowers and compiles every kernel, so a jit per
  pass would redo the shared forward kernel's work."""
  groups = case.groups
  x, g = _j(_lead(case.x, lead)), _j(_lead(case.guide, lead))
  ct, tx = _j(_lead(case.ct, lead)), _j(_lead(case.tx, lead))
  tg = _j(_lead(case.tg, lead))
  kw = dict(interpret=interpret, band_rows=band_rows)

  def kernels(x, g, ct, tx, tg):
    out = {}
    if "b" in passes:  # the forward as the backward's own forward pass
      fwd, out["dx"], out["dguide"] = K.forward_backward(x, g, ct, groups, **kw)
      if "f" in passes:
        out["forward"] = fwd
    elif "f" in passes:
      out["forward"] = K.grouped_forward(x, g, groups, **kw)
    if "t" in passes:
      out["tangent"] = K.grouped_tangent(x, g, tx, tg, groups, **kw)
    return out

  def reference(x, g, ct, tx, tg):
    out = {}
    if "f" in passes:
      out["forward"] = fuzz.FWD(x, g, groups)
    if "b" in passes:
      out["dx"], out["dguide"] = fuzz.BWD(x, g, ct, groups)
    if "t" in passes:
      out["tangent"] = fuzz.TAN(x, g, tx, tg, groups)
    return out

  with fuzz.x64_if(case.x.dtype):
    got = jax.jit(kernels)(x, g, ct, tx, tg)
    want = jax.jit(reference)(x, g, ct, tx, tg)
    for name, v in want.items():
      if v is None:
        assert got[name] is None, name
        continue
      assert got[name].shape == v.shape, name
      spec_oracle.assert_same_bits(got[name], v, name)


# Every named grouping, each with another guide shape, dtype, lane layout
# and band seams: at these C the lane block holds whole groups of both row
# orders (two row-order slots), a merged group adds member slots; quadrants
# run the anti-diagonal wavefront over three bands (the last partial),
# octants the column one over five, top_bottom bands taller than W.
# (name, dtype, guide, shape, passes, lead dims, band rows)
NAMED = [
  ("quadrants", "float32", "full", (2, 7, 9, 8), "fbt", None, 3),
  ("octants", "float32", "per_channel", (1, 9, 5, 16), "fb", None, 2),
  ("top_bottom", "bfloat16", "per_batch", (2, 6, 4, 4), "fbt", None, 4),
  ("left_right", "float32", "scalar", (2, 5, 5, 4), "fb", (1, 2), 2),
  ("all_quadrants", "float32", "none", (2, 9, 2, 3), "fbt", (2, 1), 2),
]


@pytest.mark.parametrize(
  "name,dtype,guide,shape,passes,lead,bh", NAMED, ids=[n[0] for n in NAMED]
)
def test_named_groupings(name, dtype, guide, shape, passes, lead, bh):
  case = fuzz.make_case(
    hash(name) % 1000,
    dtype,
    shape=shape,
    groups=resolve_grouping(name),
    guide_kind=guide,
  )
  _check(case, passes, band_rows=bh, lead=lead)


def test_custom_and_merged_directions():
  """Skew-2 directions (phases 2 r + k: not in the table) in both row and
  column orders, one of them in a custom merged group of three with a
  transposed octant and a row octant; bands of 3 over 8 rows; a guide
  constant over rows and channels."""
  v = fuzz.VALID_DIRECTIONS
  groups = ((v[11],), (v[39], _D["west_southwest"], v[40]))
  case = fuzz.make_case(
    7, "bfloat16", shape=(2, 8, 5, 4), groups=groups, guide_kind="row"
  )
  _check(case, "fb", band_rows=3)


def test_wide_lanes_random_guide():
  """128-lane blocks of one group each (C/P = 128) and random guides, where
  an FMA in the blend, the pushes or the tangent would change the last bit
  (the reference has no FMA; the kernel must not let XLA contract)."""
  groups = ((_D["bottom_right"],), (_D["south_southeast"],))
  rng = np.random.default_rng(5)
  shape = (1, 7, 16, 256)
  x = rng.normal(size=shape).astype(np.float32)
  x[0, 2, 3:6] = x[0, 2, 2]  # some ties
  g = rng.uniform(-0.5, 1.5, shape).astype(np.float32)
  ct, tx, tg = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
  case = fuzz.Case(x, g, ct, tx, tg, groups, "full")
  _check(case, "fbt", band_rows=3)


# One row and one column: a group of each same-row kind (column octant,
# quadrant, skew 2; indices into fuzz.VALID_DIRECTIONS), their orders and
# which neighbour is in the row varied; the wider dtypes ride along.
EDGES = {
  "float64": ((2, 9, 1, 3), 2, (27, 37, 14), "full", "fbt"),
  "float16": ((2, 1, 9, 3), 1, (23, 30, 36), "per_channel", "fb"),
}


@pytest.mark.parametrize("dtype", dtype_params(["float64", "float16"]))
def test_float64_float16_one_row_or_column(dtype):
  shape, bh, dirs, guide, passes = EDGES[dtype]
  groups = tuple((fuzz.VALID_DIRECTIONS[i],) for i in dirs)
  case = fuzz.make_case(13, dtype, shape=shape, groups=groups, guide_kind=guide)
  _check(case, passes, band_rows=bh)


def test_race_detector():
  """The TPU-semantics interpreter (uninitialised memory NaN, out-of-bounds
  reads raise) with race detection (a race raises): same bits; a partial
  band and a row-order reversal included."""
  groups = ((_D["top_left"],), (_D["south_southwest"],))
  case = fuzz.make_case(
    17, "float32", shape=(1, 3, 4, 2), groups=groups, guide_kind="none"
  )
  params = pltpu.InterpretParams(detect_races=True)
  _check(case, "fb", band_rows=2, interpret=params)


@pytest.mark.parametrize("shape", [(8, 128, 128, 256), (1, 512, 512, 64)])
def test_block_sizes_fit_vmem(shape):
  """The plan's bands keep every pass of the grouping within the budget."""
  for name in ("quadrants", "octants", "all_quadrants"):
    for pass_ in ("forward", "tangent", "backward"):
      bs = K.block_sizes(
        shape,
        "float32",
        resolve_grouping(name),
        (1, 1, 1, shape[-1]),
        pass_=pass_,
      )
      assert bs.vmem_bytes <= K.VMEM_BUDGET, (name, pass_, bs)
      assert (
        bs.band_rows * bs.n_bands
        >= shape[1]
        > (bs.n_bands - 1) * (bs.band_rows)
      )
      assert bs.lanes * bs.n_lane_blocks == shape[-1]
