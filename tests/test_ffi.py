"""The FFI kernels against the reference: forward and gradients on the full grid.

Each test stacks the four input kinds (small integers, post-ReLU zeros, a
constant plane, random normals) along a batch axis, so every case is tie-heavy
and tie-free at once. Cotangents are small integers: with g = 1 every gradient
is an exact sum of integers, so float32/float64 must agree bit for bit.

Half types: g = 1 is exact (a max of representable values, stored as is). With
a guide, both sides blend in float32 and round each output to the half type,
but XLA may order or fuse the reference's float32 ops differently from the
kernel, and one flipped rounding propagates along a chain of blends; we allow
4 ulps of the storage type relative to the output scale, and compare the half
result with the float32 result within the error of one rounding per step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import lmconv_jax
from lmconv_jax import OCTANTS, QUADRANTS, _ffi

import inputs

ALL = QUADRANTS + OCTANTS
DTYPES = {
  "float32": jnp.float32,
  "float64": jnp.float64,
  "float16": jnp.float16,
  "bfloat16": jnp.bfloat16,
}
EPS = {
  "float32": 2.0**-23,
  "float64": 2.0**-52,
  "float16": 2.0**-10,
  "bfloat16": 2.0**-7,
}

pytestmark = pytest.mark.skipif(
  not _ffi.has_kernels("cpu"), reason="the CPU extension is not built"
)


def stacked_x(shape, seed=0):
  """(4,) + shape: one slice per input kind."""
  return inputs.stacked_kinds(shape, seed)


@functools.lru_cache(maxsize=None)
def _vjp_fn(direction, implementation, guided):
  def f(x, g, ct):
    pool = functools.partial(
      lmconv_jax.landmark_pool,
      direction=direction,
      implementation=implementation,
    )
    if not guided:
      out, vjp = jax.vjp(lambda x: pool(x), x)
      return out, vjp(ct)[0], None
    out, vjp = jax.vjp(lambda x, g: pool(x, guide=g), x, g)
    return (out,) + vjp(ct)

  return jax.jit(f)


def run_both(direction, x, g, ct):
  guided = g is not None
  got = _vjp_fn(direction, "ffi", guided)(x, g, ct)
  want = _vjp_fn(direction, "reference", guided)(x, g, ct)
  return got, want


def assert_close(got, want, dtype_name, exact, scale=1.0):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  if exact:
    np.testing.assert_array_equal(got, want)
  else:
    tol = 4 * EPS[dtype_name] * max(scale, 1.0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("guide_mode", inputs.GUIDE_MODES)
@pytest.mark.parametrize("dtype", inputs.dtype_params(DTYPES))
@pytest.mark.parametrize("direction", ALL)
def test_ffi_equals_reference_all_dtypes_and_guides(
  direction, dtype, guide_mode
):
  shape = (2, 5, 6, 3)  # with the kind axis: rank 5
  dt = DTYPES[dtype]
  x = jnp.asarray(stacked_x(shape), dt)
  full = (4,) + shape
  g = inputs.make_guide(guide_mode, full, tie_heavy=(guide_mode == "full"))
  g = None if g is None else jnp.asarray(g, dt)
  ct = jnp.asarray(inputs.make_ct(full), dt)
  (out, dx, dg), (rout, rdx, rdg) = run_both(direction, x, g, ct)
  assert out.dtype == x.dtype and dx.dtype == x.dtype
  assert_close(out, rout, dtype, exact=g is None)
  # Gradients: exact integer sums with g = 1; with a guide G grows along
  # chains of blends (|g| <= 1.5), so compare relative to its magnitude.
  scale = float(jnp.max(jnp.abs(jnp.asarray(rdx, jnp.float32))))
  assert_close(
    dx,
    rdx,
    dtype,
    exact=g is None and dtype in ("float32", "float64"),
    scale=scale,
  )
  if g is not None:
    assert dg.shape == g.shape and dg.dtype == g.dtype
    dscale = float(jnp.max(jnp.abs(jnp.asarray(rdg, jnp.float32))))
    assert_close(dg, rdg, dtype, exact=False, scale=dscale)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("direction", ["top_right", "I4", "I7"])
def test_half_types_against_float32(direction, dtype):
  """A half-type pool equals the float32 pool of the same values within the
  rounding it does: with g in [0, 1] each output is a convex combination, so
  earlier errors do not grow, and each of the at most H + W steps of a chain
  adds one rounding of eps / 2 relative to max|x|; g = 1 is exact."""
  dt = DTYPES[dtype]
  x = jnp.asarray(stacked_x((2, 6, 5, 3)), dt)
  g = jnp.asarray(np.random.default_rng(3).uniform(0, 1, x.shape), dt)
  for guide in (None, g):
    half = lmconv_jax.landmark_pool(x, direction, guide, implementation="ffi")
    f32 = lmconv_jax.landmark_pool(
      x.astype(jnp.float32),
      direction,
      None if guide is None else guide.astype(jnp.float32),
      implementation="ffi",
    )
    half = np.asarray(half.astype(jnp.float32))
    if guide is None:
      np.testing.assert_array_equal(half, f32)
    else:
      bound = (
        (6 + 5)
        * EPS[dtype]
        / 2
        * float(jnp.max(jnp.abs(x.astype(jnp.float32))))
      )
      assert np.max(np.abs(half - np.asarray(f32))) <= bound


SHAPES = {
  "square": (1, 6, 6, 4),
  "non_square": (2, 3, 7, 4),
  "H1": (2, 1, 9, 3),
  "W1": (2, 8, 1, 3),
  "C1": (1, 5, 4, 1),
  "odd": (1, 5, 3, 5),
  "unbatched": (5, 3, 2),
  "one_pixel": (1, 1, 1, 2),
  "deep_batch": (2, 1, 2, 4, 3, 2),
}


@pytest.mark.x64  # float64 inputs, float64 tolerances (1e-13) when guided
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", ALL)
def test_ffi_equals_reference_all_shapes(direction, shape, guided):
  shp = SHAPES[shape]
  x = jnp.asarray(
    np.concatenate([inputs.make_x(k, shp, 5) for k in inputs.KINDS], axis=-1)
  )
  g = jnp.asarray(inputs.make_guide("full", x.shape)) if guided else None
  ct = jnp.asarray(inputs.make_ct(x.shape))
  (out, dx, dg), (rout, rdx, rdg) = run_both(direction, x, g, ct)
  if not guided:
    np.testing.assert_array_equal(out, rout)
    np.testing.assert_array_equal(dx, rdx)
  else:
    np.testing.assert_allclose(out, rout, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dx, rdx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dg, rdg, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
  "shape",
  [(0, 4, 4, 2), (2, 0, 4, 2), (2, 4, 0, 2), (2, 4, 4, 0), (0, 3, 0, 0, 1)],
)
def test_zero_size_arrays(shape):
  x = jnp.zeros(shape, jnp.float32)
  for impl in ("ffi", "reference"):
    out = lmconv_jax.landmark_pool(x, "top_left", implementation=impl)
    assert out.shape == shape
    dx = jax.grad(
      lambda x: lmconv_jax.landmark_pool(
        x, "I5", x + 1, implementation=impl
      ).sum()
    )(x)
    assert dx.shape == shape


@pytest.mark.x64
@pytest.mark.parametrize("direction", ALL)
def test_check_grads_float64_ffi(direction):
  x = jnp.asarray(inputs.make_x("random", (2, 4, 5, 3), seed=11))
  g = jnp.asarray(inputs.make_guide("full", x.shape, seed=12))
  pool = functools.partial(
    lmconv_jax.landmark_pool, direction=direction, implementation="ffi"
  )
  check_grads(lambda x: pool(x), (x,), order=1, modes=("rev",))
  check_grads(lambda x, g: pool(x, guide=g), (x, g), order=1, modes=("rev",))


@pytest.mark.parametrize("direction", ["top_left", "bottom_right", "I2", "I8"])
def test_nan_and_inf_match_reference(direction):
  x = inputs.make_x("small_int", (2, 6, 5, 3))
  x[0, 2, 3, 1] = np.nan
  x[1, 4, 1, 0] = np.inf
  x[1, 1, 1, 2] = -np.inf
  x[0, 0, 0, 0] = np.nan
  x = jnp.asarray(x)
  g = jnp.asarray(inputs.make_guide("full", x.shape, tie_heavy=True))
  ct = jnp.asarray(inputs.make_ct(x.shape))
  for guide in (None, g):
    (out, dx, dg), (rout, rdx, rdg) = run_both(direction, x, guide, ct)
    np.testing.assert_array_equal(out, rout)  # NaN positions included
    np.testing.assert_array_equal(dx, rdx)
    if guide is not None:
      np.testing.assert_array_equal(dg, rdg)
  out = lmconv_jax.landmark_pool(x, direction, implementation="ffi")
  assert np.isnan(np.asarray(out)).sum() > 2  # NaN spread over its region
  assert np.isinf(np.asarray(out)).any()


@pytest.mark.parametrize("direction", QUADRANTS)
def test_unguided_ffi_quadrant_is_two_cumulative_maxima(direction):
  d = lmconv_jax.DIRECTIONS[direction]
  x = jnp.asarray(stacked_x((2, 7, 6, 3)))
  want = jax.lax.cummax(x, axis=x.ndim - 3, reverse=d.row_step < 0)
  want = jax.lax.cummax(want, axis=x.ndim - 2, reverse=d.col_step < 0)
  np.testing.assert_array_equal(
    lmconv_jax.landmark_pool(x, d, implementation="ffi"), want
  )


@pytest.mark.x64  # float64 inputs, float64 tolerances (1e-13)
def test_jit_grad_vmap_work_with_ffi():
  x = jnp.asarray(stacked_x((3, 5, 4)))  # (4, 3, 5, 4) + kinds
  g = jnp.asarray(inputs.make_guide("per_channel", x.shape))
  f = lambda x, g: lmconv_jax.landmark_pool(x, "I3", g, implementation="ffi")
  r = lambda x, g: lmconv_jax.landmark_pool(
    x, "I3", g, implementation="reference"
  )
  np.testing.assert_allclose(jax.jit(f)(x, g), r(x, g), rtol=1e-13)
  gx, gg = jax.grad(lambda x, g: (f(x, g) ** 2).sum(), argnums=(0, 1))(x, g)
  rx, rg = jax.grad(lambda x, g: (r(x, g) ** 2).sum(), argnums=(0, 1))(x, g)
  np.testing.assert_allclose(gx, rx, rtol=1e-12)
  np.testing.assert_allclose(gg, rg, rtol=1e-12)
  assert gg.shape == g.shape
  # vmap over a trailing axis: the mapped axis is not the images' batch axis.
  xt = jnp.moveaxis(x, 0, -1)
  np.testing.assert_allclose(
    jax.vmap(f, in_axes=(-1, None), out_axes=0)(xt, g[0]),
    r(x, g[0]),
    rtol=1e-13,
  )


def test_auto_picks_ffi_on_cpu():
  """On CPU "auto" lowers to our custom call; "reference" never does."""
  x = jnp.ones((3, 3, 1))
  auto = jax.jit(lambda x: lmconv_jax.landmark_pool(x, "tl")).lower(x).as_text()
  ref = (
    jax.jit(
      lambda x: lmconv_jax.landmark_pool(x, "tl", implementation="reference")
    )
    .lower(x)
    .as_text()
  )
  assert "lmconv_pool_fwd" in auto
  assert "lmconv_pool" not in ref
