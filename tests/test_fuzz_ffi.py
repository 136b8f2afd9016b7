"""The FFI kernels against the reference, bit for bit, on the seeded fuzz
cases of tests/fuzz.py: tie-heavy data with +-0.0, subnormals, NaN and inf
in x and in the guide, guides outside [0, 1] in every broadcast shape,
every valid direction (listed or not) and merged groups, all dtypes;
forward, inference forward, backward and tangent (issue 14)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmconv_jax
from lmconv_jax import _ffi
from lmconv_jax.directions import resolve_grouping

import fuzz
import spec_oracle

pytestmark = pytest.mark.skipif(
  not _ffi.has_kernels("cpu"), reason="the CPU extension is not built"
)


def _run(case, impl):
  x = jnp.asarray(case.x)
  g = None if case.guide is None else jnp.asarray(case.guide)
  pool = lambda x, g: lmconv_jax.grouped_landmark_pool(
    x, case.groups, g, implementation=impl
  )
  infer = jax.jit(pool)(x, g)
  if g is None:
    out, vjp = jax.vjp(lambda x: pool(x, None), x)
    (dx,), dg = vjp(jnp.asarray(case.ct)), None
    t = jax.jvp(lambda x: pool(x, None), (x,), (jnp.asarray(case.tx),))[1]
  else:
    out, vjp = jax.vjp(pool, x, g)
    dx, dg = vjp(jnp.asarray(case.ct))
    t = jax.jvp(pool, (x, g), (jnp.asarray(case.tx), jnp.asarray(case.tg)))[1]
  return infer, out, dx, dg, t


def _compare(case, msg):
  with fuzz.x64_if(case.x.dtype):
    got = _run(case, "ffi")
    want = _run(case, "reference")
  names = ("inference", "forward", "dx", "dguide", "tangent")
  for name, a, b in zip(names, got, want):
    if a is None:
      assert b is None
      continue
    if name == "dguide" and case.guide.shape != case.x.shape:
      # A sum over the broadcast dims: the order of the sum is the one
      # freedom (docs/semantics.md); NaN and inf where the other has them.
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=msg)
      np.testing.assert_allclose(
        a,
        b,
        rtol=2e-2 if case.x.dtype.itemsize == 2 else 1e-5,
        atol=1e-3,
        err_msg=msg,
      )
      continue
    spec_oracle.assert_same_bits(a, b, f"{name} {msg}")


@pytest.mark.parametrize("dtype,guide_kind", fuzz.TEST_GRID)
def test_ffi_equals_reference_on_every_valid_direction(dtype, guide_kind):
  case = fuzz.make_case(
    11, dtype, shape=fuzz.SHAPE, groups=fuzz.ALL_GROUPS, guide_kind=guide_kind
  )
  _compare(case, f"{dtype} {guide_kind}")


@pytest.mark.parametrize("dtype", fuzz.DTYPES)
def test_ffi_equals_reference_on_drawn_cases(dtype):
  for seed in range(3):
    case = fuzz.make_case(100 + seed, dtype)
    _compare(
      case,
      f"seed {100 + seed} {dtype} {case.guide_kind} "
      f"{case.x.shape} {[[d.name for d in g] for g in case.groups]}",
    )


@pytest.mark.parametrize(
  "dtype,guide_kind",
  [("float32", "none"), ("float32", "full"), ("bfloat16", "none")],
)
@pytest.mark.parametrize("width", [1, 6])
def test_row_bands_and_their_edges(dtype, guide_kind, width):
  """The CPU forward sweeps a narrow block (at most 128 bytes of channels
  per pixel) four view rows at a time, each row two columns behind the one
  before, and saves a merged group's members band by band: nine rows are
  two bands and a row of a third, and narrow images put most pixels on an
  edge. Every valid direction alone and the merged groups (one channel
  each), forward, backward and tangent, bit for bit."""
  shape = (2, 9, width, len(fuzz.ALL_GROUPS))
  case = fuzz.make_case(
    31 + width,
    dtype,
    shape=shape,
    groups=fuzz.ALL_GROUPS,
    guide_kind=guide_kind,
  )
  _compare(case, f"{dtype} {guide_kind} {shape}")


@pytest.mark.parametrize("grouping", ["top_bottom", "left_right", "quadrants"])
def test_row_bands_at_the_width_limit(grouping):
  """top_bottom / left_right of 64 float32 channels: merged groups of 32
  channels, 128 bytes, the widest block the banded sweeps take, their
  members masked and summed in the backward; quadrants: 16 channels each."""
  groups = resolve_grouping(grouping)
  case = fuzz.make_case(
    7, "float32", shape=(2, 11, 7, 64), groups=groups, guide_kind="none"
  )
  _compare(case, grouping)


def _both(x, d, g=None, ct=None, dtype="float32"):
  """(out, dx, dg) from each implementation for the issue's repros."""
  x = jnp.asarray(x, dtype)
  g = None if g is None else jnp.asarray(g, dtype)
  ct = jnp.ones_like(x) if ct is None else jnp.asarray(ct, dtype)
  res = {}
  for impl in ("ffi", "reference"):
    f = lambda x, g: lmconv_jax.landmark_pool(x, d, g, implementation=impl)
    if g is None:
      out, vjp = jax.vjp(lambda x: f(x, None), x)
      res[impl] = (out, vjp(ct)[0], None)
    else:
      out, vjp = jax.vjp(f, x, g)
      res[impl] = (out,) + vjp(ct)
  for a, b in zip(res["ffi"], res["reference"]):
    if a is not None:
      spec_oracle.assert_same_bits(a, b, "ffi vs reference")
  return res["ffi"]


def test_issue_repros_give_the_same_bits_in_both():
  # 1. Subnormals are read as zeros of their sign: the max of the region.
  out, _, _ = _both(
    np.array([[1e-40, 3e-40], [2e-40, 0]])[None, ..., None], "top_left"
  )
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 0], [0, 0]])
  # 2. A valid direction outside the table: +1 column offset honoured.
  d = lmconv_jax.Direction("custom", "c", 1, 1, (-1, 1), (-1, 0), "")
  out, _, _ = _both(np.array([[0, 5], [0, 0]])[None, ..., None], d)
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 5], [5, 5]])
  # 3. The guided backward by the contract's formulas: a 1x1 image's dguide
  # is exactly 0; x = float32 max gives dguide [0, inf].
  _, _, dg = _both(
    np.full((1, 1, 1, 1), 0.3), "top_left", np.full((1, 1, 1, 1), 0.7)
  )
  assert float(dg[0, 0, 0, 0]) == 0.0
  big = np.finfo(np.float32).max
  _, _, dg = _both(
    np.array([big, 1.0]).reshape(1, 2, 1, 1),
    "top_left",
    np.ones((1, 2, 1, 1)),
    np.full((1, 2, 1, 1), 2.0),
  )
  np.testing.assert_array_equal(dg[0, :, 0, 0], [0.0, np.inf])
  # 4. A NaN guide: s * take * G literally (NaN spreads as the formulas say).
  _, dx, _ = _both(
    np.array([[0, 1], [5, 0]])[None, ..., None],
    "top_left",
    np.array([[1, 1], [1, np.nan]])[None, ..., None],
  )
  assert np.isnan(np.asarray(dx)).all()
  # 5. float16 keeps the sign of zero through the guided blend.
  out, _, _ = _both(
    np.array([0, -6e-8]).reshape(1, 1, 2, 1),
    "top_left",
    np.full((1, 1, 2, 1), 0.75),
    dtype="float16",
  )
  assert np.signbit(np.asarray(out, np.float32)[0, 0, 1, 0])
