"""lmconv_jax.landmarks: which input pixel the max chose, vs brute force."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmconv_jax
from lmconv_jax import _ffi
from lmconv_jax.directions import DIRECTIONS, OCTANTS, QUADRANTS, resolve
from lmconv_jax.landmarks import (
  grouped_landmark_map,
  grouped_landmarks,
  landmark_map,
  landmarks,
)

import spec_oracle

ALL = tuple(DIRECTIONS)
IMPL = "auto"  # the FFI kernels where compiled; the reference otherwise


# --------------------------------------------------------------------------
# Brute force, sharing no code with the package.


def _region(d, h, w, p):
  """Pixels reachable from p through n1 / n2 links: p's region with g = 1."""
  seen, todo = {p}, [p]
  while todo:
    i, j = todo.pop()
    for di, dj in (d.n1, d.n2):
      q = (i + di, j + dj)
      if 0 <= q[0] < h and 0 <= q[1] < w and q not in seen:
        seen.add(q)
        todo.append(q)
  return seen


def brute_landmark(x2d, d, p):
  """Walks from p by the SPEC precedence; region maxima computed as sets."""
  h, w = x2d.shape
  rmax = functools.lru_cache(None)(
    lambda q: max(x2d[r] for r in _region(d, h, w, q))
  )
  while True:
    m = rmax(p)
    if x2d[p] >= m:
      return p
    nxt = None
    for di, dj in (d.n1, d.n2):
      q = (p[0] + di, p[1] + dj)
      if 0 <= q[0] < h and 0 <= q[1] < w and rmax(q) >= m:
        nxt = q
        break
    assert nxt is not None
    p = nxt


def brute_guided_landmark(x, out, d, b, c, p):
  """Walks from p over ``out = spec_oracle.forward(x, d, g)``, the literal
  SPEC forward (tests/spec_oracle.py)."""
  h, w = x.shape[1:3]
  while True:
    m = x[b, p[0], p[1], c]
    cands = []
    for di, dj in (d.n1, d.n2):
      q = (p[0] + di, p[1] + dj)
      if 0 <= q[0] < h and 0 <= q[1] < w:
        cands.append(q)
        m = max(m, out[b, q[0], q[1], c])
    if x[b, p[0], p[1], c] >= m:
      return p
    p = next(q for q in cands if out[b, q[0], q[1], c] >= m)


def _ints(shape, high=3, seed=0):
  """Small integers: many ties."""
  return np.random.default_rng(seed).integers(0, high, shape).astype(np.float64)


# --------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ALL)
def test_every_pixel_matches_brute_force_with_ties(direction):
  d = resolve(direction)
  x = _ints((2, 5, 6, 3), seed=ALL.index(direction))
  got = np.asarray(
    landmark_map(jnp.asarray(x), direction, implementation="reference")
  )
  assert got.shape == (2, 5, 6, 3, 2) and got.dtype == np.int32
  for b in range(2):
    for c in range(3):
      for i in range(5):
        for j in range(6):
          want = brute_landmark(x[b, :, :, c], d, (i, j))
          assert tuple(got[b, i, j, c]) == want, (b, c, i, j)
  # And the value there is the pooled value (g = 1).
  out = lmconv_jax.landmark_pool(x, direction, implementation="reference")
  at = x[
    np.arange(2)[:, None, None, None], got[..., 0], got[..., 1], np.arange(3)
  ]
  np.testing.assert_array_equal(at, out)


@pytest.mark.parametrize("direction", ALL)
def test_guided_matches_literal_forward_walk(direction):
  d = resolve(direction)
  rng = np.random.default_rng(7)
  x = _ints((1, 4, 5, 2), seed=11)
  g = rng.integers(0, 5, x.shape) / 4.0  # dyadic: every blend is exact
  got = np.asarray(
    landmark_map(
      jnp.asarray(x), direction, jnp.asarray(g), implementation="reference"
    )
  )
  out = spec_oracle.forward(x, d, g)
  for c in range(2):
    for i in range(4):
      for j in range(5):
        want = brute_guided_landmark(x, out, d, 0, c, (i, j))
        assert tuple(got[0, i, j, c]) == want, (c, i, j)


def test_input_at_landmark_equals_pool_output_on_random_floats():
  x = jax.random.normal(jax.random.key(1), (2, 9, 7, 4), jnp.float32)
  b = jnp.arange(2)[:, None, None, None]
  for direction in ("top_left", "south_southwest"):
    out = lmconv_jax.landmark_pool(x, direction, implementation=IMPL)
    lm = landmark_map(x, direction, implementation=IMPL)
    np.testing.assert_array_equal(
      x[b, lm[..., 0], lm[..., 1], jnp.arange(4)], out
    )


@pytest.mark.parametrize("direction", ALL)
def test_gradient_is_one_hot_at_landmark(direction):
  """The backward routes a tie to one winner: the same one landmarks picks."""
  h = w = 5
  x = jnp.asarray(_ints((1, h, w, 3), high=2, seed=3))
  _, vjp = jax.vjp(
    lambda v: lmconv_jax.landmark_pool(v, direction, implementation=IMPL), x
  )
  # One cotangent per query pixel, one-hot there in every channel; channels
  # are independent, so grads[q, ..., k] is d out[q, k] / d x[..., k].
  cts = jnp.eye(h * w).reshape(h * w, 1, h, w, 1) * jnp.ones(3)
  grads = np.asarray(jax.jit(jax.vmap(lambda ct: vjp(ct)[0]))(cts))
  lm = np.asarray(landmark_map(x, direction, implementation=IMPL))
  want = np.zeros_like(grads)
  for i in range(h):
    for j in range(w):
      for k in range(3):
        r, c = lm[0, i, j, k]
        want[i * w + j, 0, r, c, k] = 1.0
  np.testing.assert_array_equal(grads, want)


def test_docstring_example_and_query_shape():
  x = jnp.array([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 7.0, 0.0]])[..., None]
  assert landmarks(x, "tl", (2, 2)).tolist() == [[2, 1]]
  assert landmarks(x, "top_left", (1, 2)).tolist() == [[0, 0]]
  assert landmarks(x, "bottom_right", (0, 0)).tolist() == [[2, 1]]
  xb = jnp.zeros((3, 2, 4, 4, 8))
  assert landmarks(xb, "I5", (1, 1)).shape == (3, 2, 8, 2)


def test_query_may_be_traced_under_jit():
  x = jnp.asarray(_ints((4, 6, 2), seed=5))
  full = landmark_map(x, "top_right", implementation=IMPL)
  f = jax.jit(
    lambda v, i, j: landmarks(v, "top_right", (i, j), implementation=IMPL)
  )
  for i, j in [(0, 0), (3, 5), (2, 1)]:
    np.testing.assert_array_equal(f(x, i, j), full[i, j])


@pytest.mark.x64  # the landmarks of float64 x
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_half_dtypes_give_the_float64_landmarks_on_exact_values(dtype):
  x = _ints((2, 6, 5, 4), high=4, seed=9)
  want = landmark_map(jnp.asarray(x), "north_northwest", implementation=IMPL)
  got = landmark_map(
    jnp.asarray(x, dtype), "north_northwest", implementation=IMPL
  )
  np.testing.assert_array_equal(got, want)


def test_nan_landmark_is_the_nan_pixel():
  x = np.zeros((5, 5, 1))
  x[1, 1, 0] = np.nan
  x[0, 0, 0] = 9.0
  lm = np.asarray(
    landmark_map(jnp.asarray(x), "top_left", implementation=IMPL)
  )[..., 0, :]
  assert tuple(lm[4, 4]) == (1, 1) and tuple(lm[1, 1]) == (1, 1)
  assert tuple(lm[0, 3]) == (0, 0) and tuple(lm[3, 0]) == (0, 0)


@pytest.mark.parametrize(
  "grouping,dirs", [("quadrants", QUADRANTS), ("octants", OCTANTS)]
)
def test_grouped_landmarks_use_each_groups_direction(grouping, dirs):
  p = len(dirs)
  x = jnp.asarray(_ints((2, 5, 6, 2 * p), seed=13))
  got = grouped_landmarks(x, grouping, (2, 3), implementation=IMPL)
  assert got.shape == (2, 2 * p, 2)
  for k, d in enumerate(dirs):
    want = landmarks(x[..., 2 * k : 2 * k + 2], d, (2, 3), implementation=IMPL)
    np.testing.assert_array_equal(got[:, 2 * k : 2 * k + 2], want)


def test_grouped_landmarks_of_merged_groups_follow_the_merge_winner():
  x = jnp.asarray(_ints((1, 6, 6, 2), seed=17))
  got = np.asarray(
    grouped_landmarks(x, "top_bottom", (3, 2), implementation=IMPL)
  )
  pooled = lmconv_jax.grouped_landmark_pool(
    x, "top_bottom", implementation=IMPL
  )
  for k in range(2):
    r, c = got[0, k]
    assert x[0, r, c, k] == pooled[0, 3, 2, k]
    # Ties go to the first member (top_left / bottom_left) as in the pool.
    first = ("top_left", "bottom_left")[k]
    first_val = lmconv_jax.landmark_pool(
      x[..., k : k + 1], first, implementation=IMPL
    )
    if first_val[0, 3, 2, 0] == pooled[0, 3, 2, k]:
      want = landmarks(x[..., k : k + 1], first, (3, 2), implementation=IMPL)
      assert tuple(got[0, k]) == tuple(np.asarray(want)[0, 0])


@pytest.mark.skipif(
  not _ffi.has_kernels(jax.default_backend()),
  reason="no FFI kernels compiled for this platform",
)
def test_ffi_forward_gives_the_brute_force_landmarks():
  # All twelve directions in one call: twelve channel groups of two.
  x = _ints((2, 7, 6, 24), seed=19)
  got = np.asarray(
    grouped_landmark_map(jnp.asarray(x, jnp.float32), ALL, implementation="ffi")
  )
  for k, direction in enumerate(ALL):
    d = resolve(direction)
    for b in range(2):
      for c in (2 * k, 2 * k + 1):
        for i in range(7):
          for j in range(6):
            want = brute_landmark(x[b, :, :, c], d, (i, j))
            assert tuple(got[b, i, j, c]) == want, (direction, b, c, i, j)
  g = np.random.default_rng(2).integers(0, 5, x.shape) / 4.0
  for direction in ("bottom_left", "west_southwest"):
    d = resolve(direction)
    got = np.asarray(
      landmark_map(
        jnp.asarray(x, jnp.float32),
        direction,
        jnp.asarray(g, jnp.float32),
        implementation="ffi",
      )
    )
    out = spec_oracle.forward(x, d, g)
    for c in range(0, 24, 5):
      for i in range(7):
        for j in range(6):
          assert tuple(got[1, i, j, c]) == brute_guided_landmark(
            x, out, d, 1, c, (i, j)
          ), (direction, c, i, j)


@pytest.mark.parametrize(
  "query,msg",
  [
    ((5, 0), "query row 5 is outside the image (valid: 0 to 3"),
    ((0, -1), "query col -1 is outside the image"),
    ((1,), "query must be a (row, col) pair"),
    (7, "query must be a (row, col) pair"),
    ((0.5, 1), "query must hold integers"),
  ],
)
def test_bad_query_is_a_clear_error(query, msg):
  with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
    landmarks(jnp.zeros((4, 4, 2)), "tl", query)


def test_bad_direction_and_channel_split_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown landmark-pool direction"):
    landmarks(jnp.zeros((4, 4, 2)), "up", (0, 0))
  with pytest.raises(ValueError, match="multiple of 4"):
    grouped_landmarks(jnp.zeros((4, 4, 6)), "quadrants", (0, 0))
