"""Seeded fuzz cases for bit-for-bit comparisons (reference, oracle, kernels).

``make_case(seed, dtype)`` gives tie-heavy inputs with +-0.0, subnormals,
NaN and +-inf in x, guides inside and outside [0, 1] (NaN and inf included)
in every broadcast shape, integer-valued cotangents and tangents (with the
odd NaN / inf / -0.0), and a grouping of valid directions (table ones,
custom ones, merged groups). Values are chosen so that no arithmetic result
is subnormal (where XLA's CPU runtime would flush it), so every
implementation following docs/semantics.md must agree bit for bit.

Usage::

    case = fuzz.make_case(seed, "bfloat16")
    out = impl(case.x, case.guide, case.groups)      # numpy arrays in dtype
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import ml_dtypes
import numpy as np

from lmconv_jax.directions import DIRECTIONS, Direction, GROUPINGS, resolve

DTYPES = ("float32", "float64", "float16", "bfloat16")
GUIDE_KINDS = ("none", "full", "per_channel", "per_batch", "scalar", "row")


def np_dtype(dtype):
  return (
    np.dtype(ml_dtypes.bfloat16)
    if str(dtype) == "bfloat16"
    else np.dtype(dtype)
  )


def _valid(rs, cs, n1, n2):
  def before(o):
    return o[0] * rs < 0 or (o[0] == 0 and o[1] * cs < 0)

  return n1 != n2 and before(n1) and before(n2)


# Every valid direction (by the C++ make_direction rules): 4 scan orders x
# 12 ordered neighbour pairs = 48; the table's 12 are among them.
_OFFS = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
VALID_DIRECTIONS = tuple(
  Direction(
    f"v{rs:+d}{cs:+d}_{n1[0]:+d}{n1[1]:+d}_{n2[0]:+d}{n2[1]:+d}",
    "",
    rs,
    cs,
    n1,
    n2,
    "",
  )
  for rs, cs in itertools.product((1, -1), (1, -1))
  for n1, n2 in itertools.product(_OFFS, _OFFS)
  if _valid(rs, cs, n1, n2)
)
assert len(VALID_DIRECTIONS) == 48

# One grouping that exercises everything at once: every valid direction as
# its own group, plus merged groups of 2, 3 and 4 members (mixed sweep kinds).
_T = DIRECTIONS
ALL_GROUPS = tuple((d,) for d in VALID_DIRECTIONS) + (
  (_T["top_left"], _T["top_right"]),
  (_T["east_northeast"], _T["bottom_right"], _T["north_northwest"]),
  tuple(
    _T[n] for n in ("top_left", "top_right", "bottom_left", "bottom_right")
  ),
  (VALID_DIRECTIONS[3], _T["west_southwest"]),
)


# The shape the tests use with ALL_GROUPS (one compile per dtype and guide).
SHAPE = (4, 4, 3, len(ALL_GROUPS))


# (dtype, guide kind) pairs the tests run at SHAPE: every guide shape in
# float32, no guide and a full one in the others, one broadcast in bfloat16.
TEST_GRID = (
  [("float32", k) for k in GUIDE_KINDS]
  + [(d, k) for d in DTYPES[1:] for k in ("none", "full")]
  + [("bfloat16", "per_batch")]
)


class Case(NamedTuple):
  x: np.ndarray  # (B, H, W, C) in dtype
  guide: Optional[np.ndarray]  # None or x.ndim dims, each x's or 1
  ct: np.ndarray  # cotangent of the output, x's shape
  tx: np.ndarray  # tangent of x
  tg: Optional[np.ndarray]  # tangent of the guide (guide's shape)
  groups: tuple  # tuple of tuples of Directions
  guide_kind: str


def _subnormals(dt):
  """A few subnormals of the compute type (float32 for bfloat16), and for
  float16 its own subnormals (normal in float32, so not flushed)."""
  if dt == np.float64:
    return [1e-310, -2e-310, 5e-324]
  if dt == np.float16:
    return [6e-8, -6e-8, 3e-5, -1.2e-7]
  return [1e-40, -3e-40, 2e-39, -1e-45]


def _guide_shape(kind, shape):
  b, h, w, c = shape
  return {
    "none": None,
    "full": shape,
    "per_channel": (1, 1, 1, c),
    "per_batch": (b, 1, 1, 1),
    "scalar": (1, 1, 1, 1),
    "row": (1, 1, w, 1),
  }[kind]


def make_case(
  seed: int, dtype, shape=None, groups=None, guide_kind: Optional[str] = None
) -> Case:
  """A seeded case. ``shape`` (B, H, W, C), ``groups`` and ``guide_kind``
  are drawn from the seed unless given (C must then split into the groups)."""
  rng = np.random.default_rng(seed)
  dt = np_dtype(dtype)
  if groups is None:
    pick = rng.integers(4)
    if pick == 0:
      groups = GROUPINGS[list(GROUPINGS)[rng.integers(len(GROUPINGS))]]
    elif pick == 1:
      groups = tuple(
        (VALID_DIRECTIONS[k],)
        for k in rng.choice(48, size=rng.integers(1, 5), replace=False)
      )
    else:
      groups = tuple(
        tuple(
          VALID_DIRECTIONS[k]
          for k in rng.choice(48, size=rng.integers(1, 4), replace=False)
        )
        for _ in range(rng.integers(1, 4))
      )
  groups = tuple(
    tuple(resolve(d) for d in g)
    for g in (
      (gr,) if isinstance(gr, (str, Direction)) else gr for gr in groups
    )
  )
  if shape is None:
    shape = (
      int(rng.integers(1, 3)),
      int(rng.integers(1, 6)),
      int(rng.integers(1, 6)),
      len(groups) * int(rng.integers(1, 3)),
    )
  if guide_kind is None:
    guide_kind = GUIDE_KINDS[rng.integers(len(GUIDE_KINDS))]
  specials = _subnormals(dt) + [0.0, -0.0, np.nan, np.inf, -np.inf]
  pool = np.array([-2, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3], np.float64)
  x = rng.choice(pool, size=shape)
  x = np.where(rng.random(shape) < 0.25, rng.normal(size=shape), x)
  x = np.where(rng.random(shape) < 0.15, rng.choice(specials, size=shape), x)
  x = x.astype(dt)
  guide = tg = None
  gshape = _guide_shape(guide_kind, shape)
  if gshape is not None:
    gpool = np.array([0, 0.5, 1, 1, 1.5, -0.5, 0.25, 2, -0.0], np.float64)
    guide = rng.choice(gpool, size=gshape)
    guide = np.where(
      rng.random(gshape) < 0.3, rng.uniform(-0.5, 1.5, gshape), guide
    )
    gspec = [np.nan, np.inf, -np.inf] + _subnormals(dt)
    guide = np.where(
      rng.random(gshape) < 0.08, rng.choice(gspec, size=gshape), guide
    ).astype(dt)
    tg = rng.integers(-3, 4, gshape).astype(dt)
  ct = rng.integers(-3, 4, shape).astype(np.float64)
  ct = np.where(
    rng.random(shape) < 0.05,
    rng.choice([np.nan, np.inf, -np.inf, -0.0], size=shape),
    ct,
  ).astype(dt)
  tx = rng.integers(-3, 4, shape).astype(np.float64)
  tx = np.where(
    rng.random(shape) < 0.05, rng.choice([np.nan, np.inf, -0.0], size=shape), tx
  ).astype(dt)
  return Case(x, guide, ct, tx, tg, groups, guide_kind)


# --------------------------------------------------------------------------
# Checking the pure-jnp reference against the oracle (the kernels' tests can
# do the same with their own functions in place of these).

import contextlib

import jax
import jax.numpy as jnp

import spec_oracle
from lmconv_jax import reference as _R

FWD = jax.jit(_R.grouped_forward, static_argnums=2)
BWD = jax.jit(_R.grouped_backward, static_argnums=3)
TAN = jax.jit(_R.grouped_tangent, static_argnums=4)


def x64_if(dtype):
  """float64 needs x64: scoped to the call, not the session."""
  return (
    jax.enable_x64(True)
    if np_dtype(dtype) == np.float64
    else contextlib.nullcontext()
  )


def _j(v):
  return None if v is None else jnp.asarray(v)


def check_reference(case: Case, err_msg: str = ""):
  """grouped_forward / grouped_backward / grouped_tangent equal the oracle
  bit for bit (a broadcast guide's gradient, a sum, up to summation order)."""
  x, g, ct, tx, tg, groups = (
    case.x,
    case.guide,
    case.ct,
    case.tx,
    case.tg,
    case.groups,
  )
  with x64_if(x.dtype):
    out = FWD(_j(x), _j(g), groups)
    dx, dg = BWD(_j(x), _j(g), _j(ct), groups)
    t = TAN(_j(x), _j(g), _j(tx), _j(tg), groups)
  spec_oracle.assert_same_bits(
    out, spec_oracle.grouped_forward(x, g, groups), f"forward {err_msg}"
  )
  want_dx, want_dg = spec_oracle.grouped_backward(x, g, ct, groups)
  spec_oracle.assert_same_bits(dx, want_dx, f"dx {err_msg}")
  spec_oracle.assert_same_bits(
    t, spec_oracle.grouped_tangent(x, g, tx, tg, groups), f"tangent {err_msg}"
  )
  if g is None:
    assert dg is None
    return
  if g.shape == x.shape:
    spec_oracle.assert_same_bits(dg, want_dg, f"dguide {err_msg}")
    return
  # Broadcast guide: the per-pixel dguide (exact) summed over broadcast dims.
  _, per_pixel = spec_oracle.grouped_backward(
    x, np.broadcast_to(g, x.shape).copy(), ct, groups
  )
  axes = tuple(
    i for i, (a, b) in enumerate(zip(g.shape, x.shape)) if a == 1 and b != 1
  )
  pp = per_pixel.astype(np.float64)
  bound = np.nansum(
    np.abs(np.where(np.isinf(pp), 0, pp)), axis=axes, keepdims=True
  )
  n = int(np.prod([x.shape[a] for a in axes]))
  eps = float(np.finfo(spec_oracle.compute_dtype(x.dtype)).eps)
  half_ulp = float(np.finfo(np.float16).eps if x.dtype.itemsize == 2 else 0)
  got, want = np.asarray(dg, np.float64), want_dg.astype(np.float64)
  assert dg.shape == g.shape and dg.dtype == g.dtype, err_msg
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=err_msg)
  fin = np.isfinite(want)
  np.testing.assert_array_equal(
    got[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)], err_msg=err_msg
  )
  tol = n * eps * bound + (np.abs(want) * 2 * half_ulp if half_ulp else 0)
  np.testing.assert_array_less(
    np.abs(got - want)[fin],
    (tol + 1e-300)[fin] if np.ndim(tol) else tol + 1e-300,
    err_msg=f"dguide {err_msg}",
  )
