"""Bad input gets a clear error at the Python boundary, before any tracing into C++."""

import re

import jax
import jax.numpy as jnp
import pytest

import lmconv_jax
from lmconv_jax import _ffi, _primitives

X = jnp.zeros((2, 4, 5, 8), jnp.float32)


@pytest.mark.parametrize("fn", ["landmark_pool", "grouped_landmark_pool"])
@pytest.mark.parametrize("shape", [(), (5,), (4, 5)])
def test_x_with_fewer_than_three_dims(fn, shape):
  arg = "top_left" if fn == "landmark_pool" else "quadrants"
  with pytest.raises(ValueError, match=re.escape(f"got shape {shape}")):
    getattr(lmconv_jax, fn)(jnp.zeros(shape), arg)


@pytest.mark.parametrize(
  "dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_, jnp.complex64]
)
def test_integer_bool_complex_x_is_a_type_error(dtype):
  with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
    lmconv_jax.landmark_pool(jnp.zeros((3, 3, 2), dtype), "tl")


@pytest.mark.parametrize("name", ["top-lef", "north", "I9", "", 3, None])
def test_unknown_direction_lists_valid_names(name):
  with pytest.raises(ValueError) as e:
    lmconv_jax.landmark_pool(X, name)
  msg = str(e.value)
  assert repr(name) in msg
  for valid in lmconv_jax.QUADRANTS + lmconv_jax.OCTANTS:
    assert repr(valid) in msg
  assert "'I8'" in msg and "'br'" in msg


@pytest.mark.parametrize(
  "given",
  ["TL", "Tl", "TOP_LEFT", "Top-Left", "top left", "i3", "North_NorthWest"],
)
def test_direction_names_and_aliases_ignore_case(given):
  want = {"t": "top_left", "n": "north_northwest", "i": "north_northwest"}[
    given[0].lower()
  ]
  assert lmconv_jax.directions.resolve(given) is lmconv_jax.DIRECTIONS[want]
  assert jnp.array_equal(
    lmconv_jax.landmark_pool(X, given), lmconv_jax.landmark_pool(X, want)
  )


@pytest.mark.parametrize(
  "given,suggestion",
  [
    ("top_lef", "Did you mean 'top_left' or 'bottom_left'?"),
    ("TOP_RIGTH", "Did you mean 'top_right'"),
    ("north_north_west", "Did you mean 'north_northwest'"),
    ("Tll", "Did you mean 'tl'"),
  ],
)
def test_unknown_direction_suggests_the_closest_names(given, suggestion):
  with pytest.raises(ValueError) as e:
    lmconv_jax.landmark_pool(X, given)
  msg = str(e.value)
  assert msg.startswith(
    f"Unknown landmark-pool direction {given!r}. {suggestion}"
  )
  assert "(case does not matter)" in msg


def test_no_suggestion_when_nothing_is_close():
  with pytest.raises(ValueError) as e:
    lmconv_jax.landmark_pool(X, "xyz")
  assert str(e.value).startswith(
    "Unknown landmark-pool direction 'xyz'. Valid directions (case does not "
    "matter) are: 'top_left' (alias 'tl'),"
  )


@pytest.mark.parametrize(
  "grouping,groups",
  [
    ("quadrants", 4),
    ("octants", 8),
    ("top_bottom", 2),
    ("Quadrants", 4),
    ("lbylnet_p4", 4),
  ],
)
def test_a_grouping_given_for_one_direction_says_where_it_goes(
  grouping, groups
):
  with pytest.raises(ValueError) as e:
    lmconv_jax.landmark_pool(X, grouping)
  assert str(e.value).startswith(
    f"{grouping!r} is a grouping ({groups} channel groups), not a "
    f"direction: pass it to lmconv_jax.grouped_landmark_pool (or "
    f"LandmarkConv(directions=...)), or give one direction here: "
    f"'top_left' (alias 'tl'),"
  )


@pytest.mark.parametrize(
  "gshape", [(3,), (4, 1, 8, 2), (2, 4, 6, 8), (5, 2, 4, 5, 8)]
)
def test_guide_that_does_not_broadcast_shows_both_shapes(gshape):
  with pytest.raises(ValueError) as e:
    lmconv_jax.landmark_pool(X, "tl", jnp.ones(gshape))
  assert str(gshape) in str(e.value) and str(X.shape) in str(e.value)


def test_guide_error_suggests_the_per_pixel_shape():
  with pytest.raises(ValueError, match=r"per pixel \(\.\.\., H, W, 1\)"):
    lmconv_jax.landmark_pool(X, "tl", jnp.ones((3,)))


def test_an_h_w_guide_that_would_broadcast_as_w_c_is_refused():
  """x (1, 4, 4, 4): an (H, W) guide broadcasts, but as (W, C)."""
  x = jnp.zeros((1, 4, 4, 4))
  with pytest.raises(ValueError, match=r"guide\[\.\.\., None\]"):
    lmconv_jax.landmark_pool(x, "tl", jnp.ones((4, 4)))
  per_pixel = lmconv_jax.landmark_pool(x + 1, "tl", jnp.ones((4, 4, 1)) / 2)
  assert per_pixel.shape == x.shape
  # A 2-D guide that is not (H, W) keeps broadcasting as before: (W, C).
  y = jnp.zeros((1, 3, 4, 4))
  assert lmconv_jax.landmark_pool(y, "tl", jnp.ones((4, 4))).shape == y.shape


def test_complex_guide_is_a_type_error():
  with pytest.raises(TypeError, match="guide must be real"):
    lmconv_jax.landmark_pool(X, "tl", jnp.ones((8,), jnp.complex64))


@pytest.mark.parametrize(
  "grouping,c",
  [
    ("quadrants", 6),
    ("octants", 12),
    ("top_bottom", 3),
    (["tl", "br", "I3"], 4),
  ],
)
def test_channels_not_divisible_by_groups(grouping, c):
  with pytest.raises(ValueError, match=rf"{c} channels.*multiple of"):
    lmconv_jax.grouped_landmark_pool(jnp.zeros((3, 3, c)), grouping)


@pytest.mark.parametrize("grouping", ["quadrant", "diagonals", [], [()]])
def test_unknown_or_empty_grouping(grouping):
  with pytest.raises(ValueError):
    lmconv_jax.grouped_landmark_pool(X, grouping)


@pytest.mark.parametrize("fn", ["landmark_pool", "grouped_landmark_pool"])
def test_unknown_implementation(fn):
  arg = "top_left" if fn == "landmark_pool" else "quadrants"
  with pytest.raises(
    ValueError, match=r"'cuda'.*expected one of 'auto', 'reference', 'ffi'"
  ):
    getattr(lmconv_jax, fn)(X, arg, implementation="cuda")


def test_ffi_without_kernel_for_platform_names_the_fix(monkeypatch):
  monkeypatch.setattr(_ffi, "has_kernels", lambda platform: False)
  with pytest.raises(
    NotImplementedError,
    match=r"no kernel for platform 'cpu'.*CPU extension.*info",
  ):
    lmconv_jax.landmark_pool(X, "tl", implementation="ffi")
  # "auto" falls back to the reference instead of failing.
  out = lmconv_jax.landmark_pool(X, "tl", implementation="auto")
  assert out.shape == X.shape


def test_errors_are_raised_before_tracing(monkeypatch):
  """Checks run in Python at trace time: the primitive is never bound."""
  calls = []
  real = _primitives.grouped_pool
  monkeypatch.setattr(
    _primitives, "grouped_pool", lambda *a: calls.append(a) or real(*a)
  )
  for bad in (
    lambda: lmconv_jax.landmark_pool(jnp.zeros((4, 4)), "tl"),
    lambda: lmconv_jax.landmark_pool(X, "nowhere"),
    lambda: lmconv_jax.landmark_pool(X, "tl", jnp.ones((7,))),
  ):
    with pytest.raises((ValueError, TypeError)):
      jax.jit(bad)()
  assert not calls


def test_errors_inside_jit_name_the_problem():
  with pytest.raises(ValueError, match="does not broadcast"):
    jax.jit(lambda x, g: lmconv_jax.landmark_pool(x, "br", g))(
      X, jnp.ones((3, 8))
    )
