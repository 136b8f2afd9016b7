"""The pure-jnp reference against the SPEC, by hand and by an independent oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import lmconv_jax
from lmconv_jax import DIRECTIONS, OCTANTS, QUADRANTS
from lmconv_jax.reference import landmark_pool_reference as ref

import inputs
import spec_oracle

ALL = QUADRANTS + OCTANTS


def _vjp(x, d, g, ct):
  if g is None:
    out, f = jax.vjp(lambda x: ref(x, d), x)
    return out, f(ct)[0], None
  out, f = jax.vjp(lambda x, g: ref(x, d, g), x, g)
  return (out,) + f(ct)


def test_direction_table_names_and_aliases():
  assert QUADRANTS == ("top_left", "top_right", "bottom_left", "bottom_right")
  assert [DIRECTIONS[n].alias for n in QUADRANTS] == ["tl", "tr", "bl", "br"]
  assert [DIRECTIONS[n].alias for n in OCTANTS] == [f"I{k}" for k in range(1, 9)]
  for d in DIRECTIONS.values():
    assert lmconv_jax.directions.resolve(d.alias) is d


@pytest.mark.parametrize("direction", ALL)
@pytest.mark.parametrize("kind", inputs.KINDS)
@pytest.mark.parametrize("guided", [False, True])
def test_reference_matches_oracle_forward_and_backward(direction, kind, guided):
  d = DIRECTIONS[direction]
  shape = (2, 4, 5, 3)
  x = inputs.make_x(kind, shape)
  g = inputs.make_guide("full", shape, tie_heavy=True) if guided else None
  ct = inputs.make_ct(shape)
  out, dx, dg = _vjp(jnp.asarray(x), d, None if g is None else jnp.asarray(g),
                     jnp.asarray(ct))
  want_dx, want_dg = spec_oracle.backward(x, d, g, ct)
  if g is None:  # max and integer cotangents: exact
    np.testing.assert_array_equal(out, spec_oracle.forward(x, d))
    np.testing.assert_array_equal(dx, want_dx)
  else:
    np.testing.assert_allclose(out, spec_oracle.forward(x, d, g), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dg, want_dg, rtol=1e-12, atol=1e-12)


def test_tie_between_self_and_neighbour_goes_to_self():
  x = jnp.array([[1.0, 1.0]])[None, ..., None]          # (1, 1, 2, 1)
  _, dx, _ = _vjp(x, "top_left", None, jnp.array([[0.0, 1.0]])[None, ..., None])
  np.testing.assert_array_equal(dx[0, ..., 0], [[0.0, 1.0]])


def test_tie_between_neighbours_goes_to_n1_never_split():
  # top_left: n1 = left, n2 = up. out[1,1] = max(1, left=2, up=2): left wins.
  x = jnp.array([[0.0, 2.0], [2.0, 1.0]])[None, ..., None]
  ct = jnp.array([[0.0, 0.0], [0.0, 1.0]])[None, ..., None]
  out, dx, _ = _vjp(x, "top_left", None, ct)
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 2], [2, 2]])
  np.testing.assert_array_equal(dx[0, ..., 0], [[0.0, 0.0], [1.0, 0.0]])
  # bottom_right: n1 = right, n2 = down. out[0,0] = max(1, right=2, down=2).
  x = jnp.array([[1.0, 2.0], [2.0, 0.0]])[None, ..., None]
  ct = jnp.array([[1.0, 0.0], [0.0, 0.0]])[None, ..., None]
  _, dx, _ = _vjp(x, "bottom_right", None, ct)
  np.testing.assert_array_equal(dx[0, ..., 0], [[0.0, 1.0], [0.0, 0.0]])


def test_constant_plane_gradient_stays_in_place():
  x = jnp.full((1, 4, 4, 2), 3.0)
  ct = jnp.asarray(inputs.make_ct(x.shape))
  for d in ALL:
    _, dx, _ = _vjp(x, d, None, ct)
    np.testing.assert_array_equal(dx, ct)


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


@pytest.mark.parametrize("direction", QUADRANTS)
def test_unguided_quadrant_is_two_cumulative_maxima(direction):
  d = DIRECTIONS[direction]
  x = jnp.asarray(inputs.make_x("random", (2, 6, 7, 3)))
  want = lax.cummax(x, axis=1, reverse=d.row_step < 0)
  want = lax.cummax(want, axis=2, reverse=d.col_step < 0)
  np.testing.assert_array_equal(ref(x, d), want)


@pytest.mark.parametrize("direction", OCTANTS)
def test_unguided_octant_is_max_over_its_region(direction):
  d = DIRECTIONS[direction]
  x = inputs.make_x("random", (1, 7, 6, 1))
  out = np.asarray(ref(jnp.asarray(x), d))
  # The region is the cone of integer combinations of the two offsets.
  (a, b), (c, e) = d.n1, d.n2
  det = a * e - b * c
  for i in range(7):
    for j in range(6):
      region = []
      for ii in range(7):
        for jj in range(6):
          di, dj = ii - i, jj - j
          p = (di * e - dj * c) / det   # di = p*a + q*c, dj = p*b + q*e
          q = (a * dj - b * di) / det
          if p >= 0 and q >= 0:
            region.append(x[0, ii, jj, 0])
      assert out[0, i, j, 0] == max(region)


@pytest.mark.parametrize("direction", ["top_left", "east_northeast", "south_southeast"])
def test_check_grads_float64_tie_free(direction):
  x = jnp.asarray(inputs.make_x("random", (1, 4, 5, 2), seed=3))
  g = jnp.asarray(inputs.make_guide("full", x.shape, seed=4))
  check_grads(lambda x: ref(x, direction), (x,), order=1, modes=("rev",))
  check_grads(lambda x, g: ref(x, direction, g), (x, g), order=1, modes=("rev",))


def test_nan_in_region_makes_output_nan_like_lax_max():
  x = np.zeros((1, 4, 4, 1))
  x[0, 1, 2, 0] = np.nan
  out = np.asarray(ref(jnp.asarray(x), "top_left"))[0, ..., 0]
  want = np.zeros((4, 4), bool)
  want[1:, 2:] = True                      # pixels whose top-left region holds (1, 2)
  np.testing.assert_array_equal(np.isnan(out), want)
  # A NaN coming from a neighbour is not dropped (the original dropped it).
  assert np.isnan(out[3, 3])


def test_inf_is_an_ordinary_value_without_guide():
  x = np.zeros((1, 3, 3, 1))
  x[0, 0, 0, 0] = np.inf
  x[0, 2, 2, 0] = -np.inf
  out = np.asarray(ref(jnp.asarray(x), "top_left"))[0, ..., 0]
  assert np.all(out == np.inf)
  out = np.asarray(ref(jnp.asarray(x), "bottom_right"))[0, ..., 0]
  assert out[2, 2] == -np.inf and out[1, 1] == 0 and out[0, 0] == np.inf
