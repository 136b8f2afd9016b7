"""The pure-jnp reference against the contract: by hand, and bit for bit
against the independent oracle (tests/spec_oracle.py) in every dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lmconv_jax
from lmconv_jax import DIRECTIONS, OCTANTS, QUADRANTS
from lmconv_jax import reference as R
from lmconv_jax.directions import GROUPINGS, resolve_grouping
from lmconv_jax.ops import landmark_pool_reference as ref

import fuzz
import inputs
import spec_oracle

ALL = QUADRANTS + OCTANTS
TABLE = tuple((DIRECTIONS[n],) for n in ALL)

# Compiled once per (groups, shapes, dtype), shared with the fuzz tests.
FWD, BWD, TAN = fuzz.FWD, fuzz.BWD, fuzz.TAN


def _vjp(x, d, g, ct):
  if g is None:
    out, f = jax.vjp(lambda x: ref(x, d), x)
    return out, f(ct)[0], None
  out, f = jax.vjp(lambda x, g: ref(x, d, g), x, g)
  return (out,) + f(ct)


def _tie_heavy(shape, seed=0):
  """The tie-heavy kinds of tests/inputs.py stacked along the batch axis."""
  return np.concatenate(
    [
      inputs.make_x(k, (1,) + shape[1:], seed=seed + i)
      for i, k in enumerate(inputs.KINDS)
    ]
  )


def _tie_heavy_case(groups, dtype, guide_kind, shape, seed=0):
  dt = fuzz.np_dtype(dtype)
  x = _tie_heavy(shape, seed).astype(dt)
  gshape = fuzz._guide_shape(guide_kind, x.shape)
  rng = np.random.default_rng(seed + 10)
  g = tg = None
  if gshape is not None:
    g = rng.choice([0.0, 0.5, 1.0, 1.5, -0.5], size=gshape).astype(dt)
    tg = rng.integers(-3, 4, gshape).astype(dt)
  ct = inputs.make_ct(x.shape, seed + 2).astype(dt)
  tx = inputs.make_ct(x.shape, seed + 3).astype(dt)
  return fuzz.Case(x, g, ct, tx, tg, groups, guide_kind)


_GRID = fuzz.TEST_GRID


@pytest.mark.parametrize("dtype,guide_kind", _GRID)
def test_grouped_matches_oracle_bit_for_bit(dtype, guide_kind):
  """All 48 valid directions (the table's 12 among them) as groups, plus
  merged groups of mixed sweep kinds, in one grouped call (H != W), on the
  tie-heavy inputs of tests/inputs.py."""
  groups = fuzz.ALL_GROUPS
  fuzz.check_reference(_tie_heavy_case(groups, dtype, guide_kind, fuzz.SHAPE))


def test_named_groupings_match_oracle():
  """Every named grouping, all in one grouped call."""
  groups = sum((resolve_grouping(n) for n in GROUPINGS), ())
  fuzz.check_reference(
    _tie_heavy_case(
      groups, "float32", "per_channel", (1, 3, 5, 2 * len(groups)), seed=5
    )
  )


def test_direction_table_names_and_aliases():
  assert QUADRANTS == ("top_left", "top_right", "bottom_left", "bottom_right")
  assert [DIRECTIONS[n].alias for n in QUADRANTS] == ["tl", "tr", "bl", "br"]
  assert [DIRECTIONS[n].alias for n in OCTANTS] == [
    f"I{k}" for k in range(1, 9)
  ]
  for d in DIRECTIONS.values():
    assert lmconv_jax.directions.resolve(d.alias) is d


@pytest.mark.x64  # float64 tolerances (1e-14)
def test_public_reference_equals_the_grouped_functions():
  """landmark_pool_reference: forward, VJP (unguided exact: integer
  cotangents) and JVP equal grouped_* (one direction here: tests/
  test_transforms.py runs every transform of the reference)."""
  x = _tie_heavy((1, 4, 5, 2))
  g = np.random.default_rng(3).choice([0.0, 0.5, 1.0, 1.5], size=x.shape)
  ct = inputs.make_ct(x.shape)
  xs = jnp.asarray(np.concatenate([x] * len(ALL), axis=-1))
  gs = jnp.asarray(np.concatenate([g] * len(ALL), axis=-1))
  cts = jnp.asarray(np.concatenate([ct] * len(ALL), axis=-1))
  want = FWD(xs, None, TABLE)
  want_dx, _ = BWD(xs, None, cts, TABLE)
  want_t = TAN(xs, gs, cts, gs, TABLE)
  for k, d in enumerate(ALL):
    if d != "top_right":
      continue
    blk = slice(2 * k, 2 * k + 2)
    out, dx, _ = _vjp(jnp.asarray(x), d, None, jnp.asarray(ct))
    np.testing.assert_array_equal(out, want[..., blk])
    np.testing.assert_array_equal(dx, want_dx[..., blk])
    _, t = jax.jvp(
      lambda x, g: ref(x, d, g),
      (jnp.asarray(x), jnp.asarray(g)),
      (jnp.asarray(ct), jnp.asarray(g)),
    )
    # Its guided tangent may be FMA-contracted (no barriers: JAX transposes
    # it for reverse mode); grouped_tangent is the literal one.
    np.testing.assert_allclose(t, want_t[..., blk], rtol=1e-14, atol=1e-14)


def test_tie_between_self_and_neighbour_goes_to_self():
  x = jnp.array([[1.0, 1.0]])[None, ..., None]  # (1, 1, 2, 1)
  _, dx, _ = _vjp(x, "top_left", None, jnp.array([[0.0, 1.0]])[None, ..., None])
  np.testing.assert_array_equal(dx[0, ..., 0], [[0.0, 1.0]])


def test_tie_between_neighbours_goes_to_n1_never_split():
  # top_left: n1 = left, n2 = up. out[1,1] = max(1, left=2, up=2): left wins.
  tl, br = (DIRECTIONS["top_left"],), (DIRECTIONS["bottom_right"],)
  x = jnp.array([[0.0, 2.0], [2.0, 1.0]])[None, ..., None]
  ct = jnp.array([[0.0, 0.0], [0.0, 1.0]])[None, ..., None]
  np.testing.assert_array_equal(
    FWD(x, None, (tl,))[0, ..., 0], [[0, 2], [2, 2]]
  )
  np.testing.assert_array_equal(
    BWD(x, None, ct, (tl,))[0][0, ..., 0], [[0.0, 0.0], [1.0, 0.0]]
  )
  # bottom_right: n1 = right, n2 = down. out[0,0] = max(1, right=2, down=2).
  x = jnp.array([[1.0, 2.0], [2.0, 0.0]])[None, ..., None]
  ct = jnp.array([[1.0, 0.0], [0.0, 0.0]])[None, ..., None]
  np.testing.assert_array_equal(
    BWD(x, None, ct, (br,))[0][0, ..., 0], [[0.0, 1.0], [0.0, 0.0]]
  )


def test_merged_group_tie_goes_to_first_member_never_split():
  # max(top_left, top_right) on a constant row: both pools tie everywhere.
  groups = ((DIRECTIONS["top_left"], DIRECTIONS["top_right"]),)
  x = jnp.full((1, 1, 3, 1), 2.0)
  ct = jnp.array([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
  dx, _ = BWD(x, None, ct, groups)
  np.testing.assert_array_equal(dx[0, 0, :, 0], [1.0, 2.0, 3.0])
  # [1, 3, 2]: top_left gives [1, 3, 3], top_right [3, 3, 2]; pixel 0 is
  # top_right's (3 > 1), pixel 1 a tie (top_left's), pixel 2 top_left's.
  x = jnp.array([1.0, 3.0, 2.0]).reshape(1, 1, 3, 1)
  np.testing.assert_array_equal(FWD(x, None, groups)[0, 0, :, 0], [3, 3, 3])
  dx, _ = BWD(x, None, ct, groups)
  np.testing.assert_array_equal(dx[0, 0, :, 0], [0.0, 6.0, 0.0])
  t = TAN(
    x, None, jnp.array([10.0, 20.0, 30.0]).reshape(1, 1, 3, 1), None, groups
  )
  np.testing.assert_array_equal(t[0, 0, :, 0], [20.0, 20.0, 20.0])


def test_constant_plane_gradient_stays_in_place():
  x = jnp.full((1, 4, 4, 2 * len(ALL)), 3.0)
  ct = jnp.asarray(inputs.make_ct(x.shape))
  np.testing.assert_array_equal(BWD(x, None, ct, TABLE)[0], ct)


def test_guided_pixel_by_hand():
  # top_left on one row [3, 1], g = [0.5, 0.25]:
  # out0 = 0.5*3 + 0.5*3 = 3; out1 = 0.25*max(1, 3) + 0.75*1 = 1.5.
  x = jnp.array([[3.0, 1.0]])[None, ..., None]
  g = jnp.array([[0.5, 0.25]])[None, ..., None]
  ct = jnp.array([[0.0, 1.0]])[None, ..., None]
  out, dx, dg = _vjp(x, "top_left", g, ct)
  np.testing.assert_array_equal(out[0, ..., 0], [[3.0, 1.5]])
  # dx1 = 1 - s = 0.75; G0 = s * G1 = 0.25, dx0 = (0.5 + 0.5) * 0.25.
  np.testing.assert_array_equal(dx[0, ..., 0], [[0.25, 0.75]])
  # dguide = (m - x) * G: (3 - 3) * 0.25 and (3 - 1) * 1.
  np.testing.assert_array_equal(dg[0, ..., 0], [[0.0, 2.0]])
  dx2, dg2 = BWD(x, g, ct, ((DIRECTIONS["top_left"],),))
  np.testing.assert_array_equal(dx2, dx)
  np.testing.assert_array_equal(dg2, dg)


def test_unguided_quadrant_is_two_cumulative_maxima():
  x = jnp.asarray(inputs.make_x("random", (2, 6, 7, 3)))
  out = FWD(jnp.concatenate([x] * 4, -1), None, TABLE[:4])
  for k, name in enumerate(QUADRANTS):
    d = DIRECTIONS[name]
    want = lax.cummax(x, axis=1, reverse=d.row_step < 0)
    want = lax.cummax(want, axis=2, reverse=d.col_step < 0)
    np.testing.assert_array_equal(out[..., 3 * k : 3 * k + 3], want)


def test_unguided_octant_is_max_over_its_region():
  x = inputs.make_x("random", (1, 7, 6, 1)).astype(np.float32)
  out = np.asarray(
    FWD(jnp.asarray(np.concatenate([x] * 8, -1)), None, TABLE[4:])
  )
  for k, name in enumerate(OCTANTS):
    d = DIRECTIONS[name]
    # The region is the cone of integer combinations of the two offsets.
    (a, b), (c, e) = d.n1, d.n2
    det = a * e - b * c
    for i in range(7):
      for j in range(6):
        region = []
        for ii in range(7):
          for jj in range(6):
            di, dj = ii - i, jj - j
            p = (di * e - dj * c) / det  # di = p*a + q*c, dj = p*b + q*e
            q = (a * dj - b * di) / det
            if p >= 0 and q >= 0:
              region.append(x[0, ii, jj, 0])
        assert out[0, i, j, k] == max(region), name


def test_nan_in_region_makes_output_nan_like_lax_max():
  x = np.zeros((1, 4, 4, 1))
  x[0, 1, 2, 0] = np.nan
  out = np.asarray(ref(jnp.asarray(x), "top_left"))[0, ..., 0]
  want = np.zeros((4, 4), bool)
  want[1:, 2:] = True  # pixels whose top-left region holds (1, 2)
  np.testing.assert_array_equal(np.isnan(out), want)
  # A NaN coming from a neighbour is not dropped (the original dropped it).
  assert np.isnan(out[3, 3])


def test_inf_is_an_ordinary_value_without_guide():
  x = np.zeros((1, 3, 3, 1))
  x[0, 0, 0, 0] = np.inf
  x[0, 2, 2, 0] = -np.inf
  out = np.asarray(
    FWD(jnp.asarray(np.concatenate([x, x], -1)), None, (TABLE[0], TABLE[3]))
  )
  assert np.all(out[0, ..., 0] == np.inf)
  assert out[0, 2, 2, 1] == -np.inf and out[0, 1, 1, 1] == 0
  assert out[0, 0, 0, 1] == np.inf
