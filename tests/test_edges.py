"""The edges of docs/semantics.md ("Edges"), as issue 14 reproduced them, at
the level of the reference's grouped functions, plus a seeded fuzz run of
the reference against the independent oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmconv_jax import reference as R
from lmconv_jax.directions import DIRECTIONS, Direction, resolve

import fuzz

FWD, BWD, TAN = fuzz.FWD, fuzz.BWD, fuzz.TAN
TL = ((DIRECTIONS["top_left"],),)


def _img(rows, dtype=jnp.float32):
  """A (1, H, W, 1) image from nested lists."""
  return jnp.asarray(np.asarray(rows, np.float64)[None, ..., None], dtype)


def _bits(v):
  return np.signbit(np.asarray(v, np.float64))


# --------------------------------------------------------------------------
# 1. Subnormals: x and guide are read with float32/float64 subnormals as
# zeros of the same sign (float16 subnormals are normal in float32: kept).


def test_subnormal_inputs_read_as_signed_zeros_float32():
  x = _img([[1e-40, 3e-40], [2e-40, 0.0]])
  out = FWD(x, None, TL)
  np.testing.assert_array_equal(out, np.zeros((1, 2, 2, 1)))
  assert not _bits(out).any()
  # Every pixel ties with its flushed neighbours: self wins, dx = ct.
  ct = _img([[1.0, 2.0], [3.0, 4.0]])
  np.testing.assert_array_equal(BWD(x, None, ct, TL)[0], ct)
  np.testing.assert_array_equal(TAN(x, None, ct, None, TL), ct)
  # The sign survives: -1e-40 is read as -0.0.
  out = FWD(_img([[-1e-40, -0.0]]), None, TL)
  np.testing.assert_array_equal(_bits(out), [[[[True], [True]]]])


def test_subnormal_guide_reads_as_zero():
  x = _img([[2.0, 1.0]])
  g = _img([[1e-40, -1e-40]])
  out = FWD(x, g, TL)  # g = +-0: out = x
  np.testing.assert_array_equal(out, x)
  dx, dg = BWD(x, g, _img([[1.0, 1.0]]), TL)
  np.testing.assert_array_equal(dx, [[[[1.0], [1.0]]]])
  np.testing.assert_array_equal(dg, [[[[0.0], [1.0]]]])  # (m - x) * G


@pytest.mark.parametrize(
  "dtype,value,flushed",
  [
    ("bfloat16", 1e-39, True),
    ("float16", 6e-8, False),
    ("float64", 1e-310, True),
  ],
)
def test_subnormal_rule_per_dtype(dtype, value, flushed):
  with fuzz.x64_if(dtype):
    x = _img([[value, 0.0]], jnp.dtype(fuzz.np_dtype(dtype)))
    assert float(x[0, 0, 0, 0]) != 0.0  # representable in the dtype
    out = np.asarray(FWD(x, None, TL), np.float64)
  want = 0.0 if flushed else float(x[0, 0, 0, 0])
  np.testing.assert_array_equal(out[0, 0, :, 0], [want, want])


# --------------------------------------------------------------------------
# 2. Direction validation; every valid direction works.


def test_custom_valid_direction_uses_its_offsets():
  d = Direction("custom", "c", 1, 1, (-1, 1), (-1, 0), "")
  out = FWD(_img([[0.0, 5.0], [0.0, 0.0]]), None, ((resolve(d),),))
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 5], [5, 5]])


def test_skew2_direction_is_a_wavefront():
  # n = (0,-1) and (-1,+1): the region of (1, 0) holds (0, 1).
  d = Direction("skew2", "s", 1, 1, (0, -1), (-1, 1), "")
  x = _img([[0.0, 7.0, 0.0], [0.0, 0.0, 0.0]])
  out = FWD(x, None, ((d,),))
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 7, 7], [7, 7, 7]])


@pytest.mark.parametrize(
  "bad,rule",
  [
    (Direction("a", "", 1, 1, (0, -1), (0, -1), ""), "must differ"),
    (Direction("a", "", 2, 1, (0, -1), (-1, 0), ""), r"\+1 or -1"),
    (Direction("a", "", 1, 1, (0, -2), (-1, 0), ""), r"\{-1, 0, \+1\}"),
    (Direction("a", "", 1, 1, (0, 1), (-1, 0), ""), "visited before"),
    (Direction("a", "", -1, 1, (-1, 0), (0, -1), ""), "visited before"),
  ],
)
def test_invalid_direction_names_the_rule(bad, rule):
  with pytest.raises(ValueError, match=rule):
    resolve(bad)
  with pytest.raises(ValueError, match=rule):
    R.grouped_forward(jnp.zeros((1, 2, 2, 1)), None, ((bad,),))


# --------------------------------------------------------------------------
# 3. The guided backward is the contract's formulas, literally.


def test_one_pixel_dguide_is_exactly_zero():
  x = _img([[0.1]])
  g = _img([[0.3]])
  dx, dg = BWD(x, g, _img([[0.7]]), TL)
  assert float(dg[0, 0, 0, 0]) == 0.0
  # dx = (s*1 + (1 - s)) * G evaluated literally, no FMA.
  s, G = np.float32(0.3), np.float32(0.7)
  assert float(dx[0, 0, 0, 0]) == float(
    (s * np.float32(1) + (np.float32(1) - s)) * G
  )


def test_float32_max_dguide_is_zero_then_inf():
  big = float(np.finfo(np.float32).max)
  x = _img([[big], [1.0]])  # (1, 2, 1, 1)
  dx, dg = BWD(x, jnp.ones_like(x), jnp.full_like(x, 2.0), TL)
  np.testing.assert_array_equal(dg[0, :, 0, 0], [0.0, np.inf])
  np.testing.assert_array_equal(dx[0, :, 0, 0], [4.0, 0.0])


def test_float64_huge_guide_dx_is_zero():
  with jax.enable_x64(True):
    x = _img([[3.0]], jnp.float64)
    dx, _ = BWD(x, jnp.full_like(x, 1e30), jnp.ones_like(x), TL)
    assert float(dx[0, 0, 0, 0]) == 0.0  # (1e30 + (1 - 1e30)) * 1


# --------------------------------------------------------------------------
# 4. Non-finite guides and cotangents: the formulas as written.


def test_nan_guide_spreads_as_the_formulas_say():
  x = _img([[0.0, 1.0], [5.0, 0.0]])
  g = _img([[1.0, 1.0], [1.0, np.nan]])
  dx, dg = BWD(x, g, jnp.ones_like(x), TL)
  assert np.isnan(np.asarray(dx)).all()  # NaN * 0 = NaN reaches all


def test_nan_cotangent_stays_on_the_winner_without_guide():
  x = _img([[0.0, 1.0]])
  ct = _img([[0.0, np.nan]])
  dx, _ = BWD(x, None, ct, TL)
  np.testing.assert_array_equal(np.isnan(dx[0, 0, :, 0]), [False, True])
  # With an explicit guide of ones, s * take * G = 1 * 0 * NaN spreads it.
  dx, _ = BWD(x, jnp.ones_like(x), ct, TL)
  np.testing.assert_array_equal(np.isnan(dx[0, 0, :, 0]), [True, True])


# --------------------------------------------------------------------------
# 5. Sign of zero in the half types' rounding.


def test_float16_blend_keeps_negative_zero():
  x = _img([[0.0, -6e-8]], jnp.float16)
  out = FWD(x, jnp.full_like(x, 0.75), TL)
  np.testing.assert_array_equal(np.asarray(out, np.float32)[0, 0, :, 0], [0, 0])
  np.testing.assert_array_equal(_bits(out)[0, 0, :, 0], [False, True])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_tangent_and_gradient_keep_negative_zero(dtype):
  dt = jnp.dtype(fuzz.np_dtype(dtype))
  x = _img([[1.0, 0.0]], dt)
  ct = _img([[-0.0, -0.0]], dt)
  dx, dg = BWD(x, jnp.ones_like(x), ct, TL)
  assert _bits(dx[0, 0, 1, 0]) and _bits(dg[0, 0, 1, 0])
  t = TAN(x, None, ct, None, TL)
  np.testing.assert_array_equal(_bits(t)[0, 0, :, 0], [True, True])


# --------------------------------------------------------------------------
# The fuzz: seeded cases (tests/fuzz.py) against the oracle, bit for bit.

_GRID = fuzz.TEST_GRID  # the shapes test_reference.py compiles too


@pytest.mark.parametrize("dtype,guide_kind", _GRID)
def test_fuzz_all_directions_against_oracle(dtype, guide_kind):
  case = fuzz.make_case(
    100 + _GRID.index((dtype, guide_kind)),
    dtype,
    shape=fuzz.SHAPE,
    groups=fuzz.ALL_GROUPS,
    guide_kind=guide_kind,
  )
  fuzz.check_reference(case, f"{dtype} {guide_kind}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fuzz_drawn_shapes_and_groupings(dtype):
  seed = fuzz.DTYPES.index(dtype)
  case = fuzz.make_case(seed, dtype)
  fuzz.check_reference(
    case, f"seed {seed} {dtype} {case.x.shape} {case.guide_kind} {case.groups}"
  )


# --------------------------------------------------------------------------
# No FMA on any image shape (issue 36). XLA's CPU compiler compiled a tiny
# image's scan as one function, where LLVM contracted a push's product into
# the add that receives it: a (1, 2, 1, 1) image, I7, guide -0.45967445,
# x = [-0.5, 3], ct = [-3, -1] gave dx[1] = 0.37902334, the contract (and
# the kernels) 0.3790233. One image per call (one element per step: where
# the contraction happened), a jit per shape, 30 random guides each.

NO_FMA_SHAPES = [(1, 2, 1, 1), (1, 3, 1, 1), (1, 1, 3, 1), (1, 1, 1, 1)]


@pytest.mark.parametrize("direction", ["I2", "I3", "I5", "I7", "tl"])
def test_no_fma_on_one_row_one_column_and_one_pixel_images(direction):
  import spec_oracle
  from lmconv_jax import _ffi, ops

  groups = ((resolve(direction),),)
  ffi = _ffi.has_kernels("cpu")
  rng = np.random.default_rng(36)

  def passes(impl):
    pool = lambda x, g: ops.landmark_pool(x, direction, g, implementation=impl)

    def run(x, g, ct, t):
      out, vjp = jax.vjp(pool, x, g)
      return (out,) + vjp(ct) + (jax.jvp(pool, (x, g), (t, t))[1],)

    return jax.jit(run)

  ref, kernels = passes("reference"), passes("ffi") if ffi else None
  for shape in NO_FMA_SHAPES:
    for k in range(30):
      x = rng.uniform(-3, 3, shape).astype(np.float32)
      g = rng.uniform(-0.5, 1, shape).astype(np.float32)
      ct = rng.uniform(-3, 3, shape).astype(np.float32)
      if k == 0 and shape == (1, 2, 1, 1):  # the case
        x, g = np.float32([-0.5, 3.0]), np.full(2, -0.45967445, np.float32)
        x, g, ct = (
          x.reshape(shape),
          g.reshape(shape),
          np.float32([-3.0, -1.0]).reshape(shape),
        )
      got = ref(x, g, ct, ct)
      what = f"{direction} {shape} case {k}"
      want = (
        spec_oracle.grouped_forward(x, g, groups),
        *spec_oracle.grouped_backward(x, g, ct, groups),
        spec_oracle.grouped_tangent(x, g, ct, ct, groups),
      )
      for name, a, b in zip(("out", "dx", "dg", "tangent"), got, want):
        spec_oracle.assert_same_bits(a, b, f"{name} {what}")
      if kernels is not None:
        for name, a, b in zip(
          ("out", "dx", "dg", "tangent"), got, kernels(x, g, ct, ct)
        ):
          spec_oracle.assert_same_bits(a, b, f"ffi {name} {what}")
