"""The public ops: input checks and the choice of implementation.

``landmark_pool`` is one directional pool; ``grouped_landmark_pool`` splits
channels into groups, pools each group in its own direction (or the max of
several directions) and concatenates. See docs/semantics.md for the contract.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lmconv_jax import _ffi
from lmconv_jax.directions import (OCTANTS, QUADRANTS, Direction,
                                   DirectionLike, resolve)
from lmconv_jax.reference import landmark_pool_reference

IMPLEMENTATIONS = ("auto", "reference", "ffi")
DTYPES = (jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16)

# Groupings by name. Each group is a tuple of directions whose pools are
# merged by max; a group of one direction is a plain pool.
TOP_BOTTOM = (("top_left", "top_right"), ("bottom_left", "bottom_right"))
LEFT_RIGHT = (("top_left", "bottom_left"), ("top_right", "bottom_right"))
ALL_QUADRANTS = (QUADRANTS,)
GROUPINGS = {
    "quadrants": tuple((d,) for d in QUADRANTS),   # P = 4 (PConv2d4)
    "octants": tuple((d,) for d in OCTANTS),       # P = 8 (PConv2d8)
    "top_bottom": TOP_BOTTOM,                      # P = 2, merged by max
    "left_right": LEFT_RIGHT,                      # P = 2, merged by max
    "all_quadrants": ALL_QUADRANTS,                # P = 1, merged by max
}

Grouping = Union[str, Sequence[Union[DirectionLike, Sequence[DirectionLike]]]]


# --------------------------------------------------------------------------
# Input checks: every error names what was given, what was expected, the fix.

def _check_x(x, where: str) -> jax.Array:
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if x.ndim < 3:
    raise ValueError(
        f"{where}: x must have shape (..., H, W, C) with at least 3 dims, got "
        f"shape {tuple(x.shape)}. Add the missing axes, e.g. x[..., None] for "
        f"a single channel.")
  dtype = jnp.dtype(x.dtype)
  if dtype not in [jnp.dtype(d) for d in DTYPES]:
    raise TypeError(
        f"{where}: x must be float32, float64, float16 or bfloat16, got "
        f"{dtype}. Cast it first, e.g. x.astype(jnp.float32).")
  return jnp.asarray(x)


def _check_guide(guide, x: jax.Array, where: str) -> Optional[jax.Array]:
  """Returns the guide broadcast to x's shape and cast to x's dtype."""
  if guide is None:
    return None
  guide = jnp.asarray(guide)
  if jnp.issubdtype(guide.dtype, jnp.complexfloating):
    raise TypeError(f"{where}: guide must be real, got dtype {guide.dtype}.")
  try:
    shape = np.broadcast_shapes(tuple(guide.shape), tuple(x.shape))
  except ValueError:
    shape = None
  if shape != tuple(x.shape):
    raise ValueError(
        f"{where}: guide of shape {tuple(guide.shape)} does not broadcast to x "
        f"of shape {tuple(x.shape)}. Give a guide per pixel (..., H, W, C), "
        f"per channel (C,) or per batch (..., 1, 1, 1).")
  return jnp.broadcast_to(guide.astype(x.dtype), x.shape)


def _platform() -> str:
  backend = jax.default_backend()
  if backend == "gpu":
    version = getattr(jax.devices()[0].client, "platform_version", "").lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


def _choose(implementation: str, where: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"{where}: unknown implementation {implementation!r}; expected one of "
        f"{', '.join(map(repr, IMPLEMENTATIONS))}.")
  if implementation == "reference":
    return "reference"
  platform = _platform()
  if _ffi.has_kernels(platform):
    return "ffi"
  if implementation == "auto":
    return "reference"
  raise NotImplementedError(
      f"{where}: implementation='ffi' has no kernel for platform {platform!r} "
      f"(compiled: {', '.join(_ffi.available_platforms()) or 'none'}). "
      f"Use implementation='auto' or 'reference', or rebuild lmconv_jax where "
      f"`nvcc` is on PATH (pip install --no-build-isolation -e .) to get the "
      f"CUDA kernels; `python -m lmconv_jax info` shows what is available.")


def _pool(x, d: Direction, g, implementation: str):
  """Checked inputs in, one pool out (g already has x's shape and dtype)."""
  if implementation == "reference":
    return landmark_pool_reference(x, d, g)
  if x.size == 0:
    return x
  # A JAX primitive: its own JVP, transpose, batching and sharding rules
  # (lmconv_jax/_primitives.py, docs/transforms.md).
  return _ffi.pool_forward(x, g, d)


# --------------------------------------------------------------------------
# Public API.

def landmark_pool(x: jax.Array, direction: DirectionLike,
                  guide: Optional[jax.Array] = None, *,
                  implementation: str = "auto") -> jax.Array:
  """Directional landmark pool (a running max over a region) of ``x``.

  Args:
    x: float array of shape ``(..., H, W, C)`` (NHWC, any leading batch dims).
    direction: a name from :data:`QUADRANTS` or :data:`OCTANTS` (e.g.
      ``"top_left"``, ``"east_northeast"``) or an original alias (``"tl"``,
      ``"I1"``).
    guide: None (all ones: the output is the max over the pixel's region) or
      an array broadcastable to ``x``; each pixel blends
      ``g * max + (1 - g) * x``. Its gradient is summed over broadcast dims.
    implementation: ``"ffi"`` (our XLA custom call), ``"reference"`` (pure
      jnp) or ``"auto"`` (``"ffi"`` where compiled for the platform).

  Returns:
    An array with the shape and dtype of ``x``.

  Example:
    >>> import jax.numpy as jnp, lmconv_jax
    >>> x = jnp.array([[1., 0.], [0., 2.]])[..., None]
    >>> lmconv_jax.landmark_pool(x, "top_left")[..., 0].tolist()
    [[1.0, 1.0], [1.0, 2.0]]
  """
  where = "landmark_pool"
  d = resolve(direction)
  impl = _choose(implementation, where)
  x = _check_x(x, where)
  g = _check_guide(guide, x, where)
  return _pool(x, d, g, impl)


def _max_first_wins(a, b):
  """max(a, b) that routes ties to ``a`` (never splits) and propagates NaN."""
  return jnp.where((b > a) | jnp.isnan(b), b, a)


def resolve_grouping(directions: Grouping) -> tuple[tuple[Direction, ...], ...]:
  """Normalises a grouping to a tuple of groups of Directions."""
  if isinstance(directions, str):
    if directions in GROUPINGS:
      directions = GROUPINGS[directions]
    else:
      try:
        directions = (resolve(directions),)
      except ValueError:
        raise ValueError(
            f"Unknown grouping {directions!r}: expected one of "
            f"{', '.join(map(repr, GROUPINGS))} or a sequence of directions "
            f"(each a direction name or a tuple of names merged by max).") from None
  groups = []
  for item in directions:
    if isinstance(item, (str, Direction)):
      groups.append((resolve(item),))
    else:
      members = tuple(resolve(m) for m in item)
      if not members:
        raise ValueError("grouped_landmark_pool: a group has no directions.")
      groups.append(members)
  if not groups:
    raise ValueError("grouped_landmark_pool: `directions` is empty.")
  return tuple(groups)


def grouped_landmark_pool(x: jax.Array, directions: Grouping,
                          guide: Optional[jax.Array] = None, *,
                          implementation: str = "auto") -> jax.Array:
  """Splits channels into ``len(directions)`` groups, pools each, concatenates.

  Args:
    x: float array of shape ``(..., H, W, C)``; C must be a multiple of the
      number of groups.
    directions: a grouping name - ``"quadrants"`` (P = 4, the original
      PConv2d4: top_left, top_right, bottom_left, bottom_right),
      ``"octants"`` (P = 8, PConv2d8: I1 ... I8), ``"top_bottom"`` and
      ``"left_right"`` (P = 2, LBYLNet: each group the max of two quadrant
      pools), ``"all_quadrants"`` (P = 1, the max of all four) - or a
      sequence whose items are a direction or a tuple of directions merged
      by max (ties go to the first listed).
    guide: None or an array broadcastable to ``x``.
    implementation: as in :func:`landmark_pool`.

  Example:
    >>> import jax.numpy as jnp, lmconv_jax
    >>> x = jnp.arange(16.).reshape(1, 2, 2, 4)
    >>> lmconv_jax.grouped_landmark_pool(x, "quadrants").shape
    (1, 2, 2, 4)
  """
  where = "grouped_landmark_pool"
  groups = resolve_grouping(directions)
  impl = _choose(implementation, where)
  x = _check_x(x, where)
  g = _check_guide(guide, x, where)
  p, c = len(groups), x.shape[-1]
  if c % p:
    raise ValueError(
        f"{where}: x has {c} channels, which do not split into {p} equal "
        f"groups (one per direction group). Use a channel count that is a "
        f"multiple of {p}, e.g. {p * max(1, round(c / p))}.")
  cg = c // p
  outs = []
  for k, members in enumerate(groups):
    xk = x[..., k * cg:(k + 1) * cg]
    gk = None if g is None else g[..., k * cg:(k + 1) * cg]
    out = None
    for d in members:
      pooled = _pool(xk, d, gk, impl)
      out = pooled if out is None else _max_first_wins(out, pooled)
    outs.append(out)
  return outs[0] if p == 1 else jnp.concatenate(outs, axis=-1)
