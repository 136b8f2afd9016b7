"""Landmarks: which input pixel each pooled value came from.

docs/semantics.md, "Landmarks": for a query pixel p and a channel, the
landmark is the input pixel whose value the max chose, found by following the
winners back (x[p] first, then n1, then n2, exactly the forward precedence)
to a pixel that won as ``self``.

Nothing here re-runs a recurrence: the pool's forward output is computed once
(by whichever implementation ``implementation`` picks), every pixel's winner
is recomputed locally from ``x`` and that output, and the resulting pointer
forest is followed by pointer doubling, O(log(H + W)) gathers.

With a guide the same forward selection still defines one winner per pixel,
so the chain is well defined and it is the path along which the backward
pass routes the gradient of the max term; the value at the landmark is then
blended with ``(1 - g) * x`` at every step on the way, so ``x[landmark]`` is
no longer equal to ``out[p]``. With ``guide=None`` it is.

Where the max is NaN, the chain follows the first NaN candidate (x, n1, n2)
and ends at the NaN input pixel that made it.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lmconv_jax import ops, reference
from lmconv_jax.directions import Direction, DirectionLike, resolve

Query = Union[Sequence[int], jax.Array]


def _neighbour(v: jax.Array, off: tuple[int, int]):
  """v[..., i + dr, j + dc, :] at (i, j) and a mask of where that exists."""
  dr, dc = off
  h, w = v.shape[-3], v.shape[-2]
  pad = [(0, 0)] * (v.ndim - 3) + [
    (max(-dr, 0), max(dr, 0)),
    (max(-dc, 0), max(dc, 0)),
    (0, 0),
  ]
  padded = jnp.pad(v, pad)
  r0, c0 = max(dr, 0), max(dc, 0)
  shifted = padded[..., r0 : r0 + h, c0 : c0 + w, :]
  rows = jnp.arange(h) + dr
  cols = jnp.arange(w) + dc
  ok = (
    ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
  )[..., None]
  return shifted, ok


def winners(
  x: jax.Array, out: jax.Array, direction: DirectionLike
) -> jax.Array:
  """Each pixel's forward winner: 0 = itself, 1 = its n1 neighbour, 2 = n2.

  Where the max is finite or infinite this is the contract's precedence, by
  ``reference.winner_masks`` itself. Where it is NaN, those masks are all
  false (the backward routes no gradient there); a landmark instead needs a
  winner, so this takes the first NaN candidate (x, n1, n2): the chain ends
  at the NaN input pixel that made the max NaN.

  Args:
    x: the pool's input, shape ``(..., H, W, C)``.
    out: the pool's output for ``x`` in ``direction``, with or without a
      guide: the max is over ``x[p]`` and the neighbours' stored outputs
      either way, so the guide itself is not needed.
    direction: the pool's direction.

  Returns:
    int8 array of the shape of ``x``.
  """
  d = resolve(direction)
  cdt = reference.compute_dtype(x.dtype)
  xv = jnp.asarray(x).astype(cdt)
  ov = jnp.asarray(out).astype(cdt)  # neighbours read as stored
  a, a_ok = _neighbour(ov, d.n1)
  b, b_ok = _neighbour(ov, d.n2)
  # Normal case: precedence x, n1, n2, a later one only if strictly greater.
  m, take_x, take_a, _ = reference.winner_masks(xv, a_ok, a, b_ok, b)
  # NaN case: the first NaN candidate, so the chain ends at the NaN's source.
  nan_x = jnp.isnan(xv)
  nan_a = ~nan_x & a_ok & jnp.isnan(a)
  code = jnp.where(
    jnp.isnan(m),
    jnp.where(nan_x, 0, jnp.where(nan_a, 1, 2)),
    jnp.where(take_x, 0, jnp.where(take_a, 1, 2)),
  )
  return code.astype(jnp.int8)


def _index_dtype(pixels: int):
  """int32 flat pixel indices while they fit, else int64 (which needs x64)."""
  if pixels < 2**31:
    return jnp.int32
  if not jax.config.jax_enable_x64:
    raise ValueError(
      f"landmark maps of {pixels} pixels per image need 64-bit indices; "
      f"enable them with jax.config.update('jax_enable_x64', True), or "
      f"compute the map on tiles of under 2**31 pixels."
    )
  return jnp.int64


def _follow(code: jax.Array, d: Direction) -> jax.Array:
  """Pointer doubling over the winner forest; flat landmark index per pixel."""
  h, w = code.shape[-3], code.shape[-2]
  lead = code.shape[:-3]
  c = code.shape[-1]
  flat = (jnp.arange(h)[:, None] * w + jnp.arange(w)[None, :])[..., None]
  off1 = d.n1[0] * w + d.n1[1]
  off2 = d.n2[0] * w + d.n2[1]
  ptr = flat + jnp.where(code == 1, off1, jnp.where(code == 2, off2, 0))
  ptr = ptr.reshape(lead + (h * w, c)).astype(_index_dtype(h * w))
  # Every step moves one row or one column towards an edge, so a chain has at
  # most H + W - 2 links; 2**k >= H + W doublings reach every root.
  for _ in range(max(1, int(np.ceil(np.log2(h + w))))):
    ptr = jnp.take_along_axis(ptr, ptr, axis=-2)
  return ptr.reshape(lead + (h, w, c))


def _to_rowcol(flat: jax.Array, w: int) -> jax.Array:
  return jnp.stack([flat // w, flat % w], axis=-1)


def landmark_map(
  x: jax.Array,
  direction: DirectionLike,
  guide: Optional[jax.Array] = None,
  *,
  implementation: str = "auto",
) -> jax.Array:
  """The landmark of every pixel and channel of one directional pool.

  Args:
    x: float array ``(..., H, W, C)``.
    direction: as in :func:`lmconv_jax.landmark_pool`.
    guide: None or an array broadcastable to ``x``.
    implementation: which pool computes the forward output (``"auto"``,
      ``"reference"`` or ``"ffi"``).

  Returns:
    int32 array ``(..., H, W, C, 2)``: the (row, col) of each landmark.
  """
  d = resolve(direction)
  x = ops.check_x(x, "landmark_map")
  g = ops.check_guide(guide, x, "landmark_map")
  ops.resolve_implementation(implementation, "landmark_map")
  if x.size == 0:
    return jnp.zeros(x.shape + (2,), jnp.int32)
  return _landmark_map(x, g, d, implementation)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _landmark_map(x, g, d: Direction, implementation: str):
  out = ops.landmark_pool(x, d, g, implementation=implementation)
  return _to_rowcol(_follow(winners(x, out, d), d), x.shape[-2])


def _check_query(query, shape, where: str):
  """(i, j) as ints or traced scalars; bounds checked where concrete."""
  h, w = shape[-3], shape[-2]
  try:
    i, j = query
  except (TypeError, ValueError):
    raise ValueError(
      f"{where}: query must be a (row, col) pair, got {query!r}."
    ) from None
  for name, v, n in (("row", i, h), ("col", j, w)):
    if isinstance(v, (int, np.integer)):
      if not 0 <= int(v) < n:
        raise ValueError(
          f"{where}: query {name} {int(v)} is outside the image (valid: 0 "
          f"to {n - 1} for x of shape {tuple(shape)})."
        )
    elif not jnp.issubdtype(jnp.asarray(v).dtype, jnp.integer):
      raise TypeError(f"{where}: query must hold integers, got {query!r}.")
  return i, j


def landmarks(
  x: jax.Array,
  direction: DirectionLike,
  query: Query,
  guide: Optional[jax.Array] = None,
  *,
  implementation: str = "auto",
) -> jax.Array:
  """Where the max at ``query`` came from, per channel.

  For the query pixel ``(row, col)`` and every channel, the (row, col) of the
  input pixel that won the max (docs/semantics.md, "Landmarks"). With
  ``guide=None``, ``x[..., r, c, k] == landmark_pool(x, direction)[..., row,
  col, k]`` for the returned ``(r, c)`` of channel ``k``, and the gradient of
  that output is one-hot at it (ties resolved as in the forward pass: x[p]
  first, then n1, then n2).

  Args:
    x: float array ``(..., H, W, C)``.
    direction: a direction name or alias, as for :func:`landmark_pool`.
    query: ``(row, col)`` of the query pixel (ints, or traced int scalars).
    guide: None or an array broadcastable to ``x``; the winners are still
      the forward selection's (see the module docstring).
    implementation: which pool computes the forward output.

  Returns:
    int32 array ``(..., C, 2)``.

  Example:
    >>> import jax.numpy as jnp, lmconv_jax
    >>> x = jnp.array([[5., 0., 0.], [0., 0., 0.], [0., 7., 0.]])[..., None]
    >>> lmconv_jax.landmarks(x, "top_left", (2, 2)).tolist()
    [[2, 1]]
    >>> lmconv_jax.landmarks(x, "top_left", (1, 2)).tolist()
    [[0, 0]]
  """
  where = "landmarks"
  x = ops.check_x(x, where)
  i, j = _check_query(query, x.shape, where)
  return landmark_map(x, direction, guide, implementation=implementation)[
    ..., i, j, :, :
  ]


def grouped_landmark_map(
  x: jax.Array, directions: ops.Grouping, *, implementation: str = "auto"
) -> jax.Array:
  """The landmark of every pixel and channel of :func:`grouped_landmark_pool`.

  Channel group k uses its direction; for a group merged by max
  (``"top_bottom"`` and the like) the landmark is that of the member pool that
  won the merge (ties to the first listed, NaN wins, as in the pool). No
  guide: the layers pool with g = 1.

  Returns:
    int32 array ``(..., H, W, C, 2)``, channels in the order of ``x``.
  """
  where = "grouped_landmark_map"
  groups = ops.resolve_grouping(directions)
  x = ops.check_x(x, where)
  ops.resolve_implementation(implementation, where)
  ops.check_channels(x.shape[-1], len(groups), where)
  if x.size == 0:
    return jnp.zeros(x.shape + (2,), jnp.int32)
  return _grouped_map(x, groups, implementation)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _grouped_map(x, groups, implementation):
  maps = []
  for xk, members in zip(jnp.split(x, len(groups), axis=-1), groups):
    vals = [
      ops.landmark_pool(xk, d, implementation=implementation) for d in members
    ]
    ats = [
      _to_rowcol(_follow(winners(xk, v, d), d), x.shape[-2])
      for v, d in zip(vals, members)
    ]
    _, win = reference.merge_members(vals)  # the pool's merge rule
    maps.append(
      ats[0] if win is None else reference.pick_member(ats, win[..., None])
    )
  return maps[0] if len(maps) == 1 else jnp.concatenate(maps, axis=-2)


def grouped_landmarks(
  x: jax.Array,
  directions: ops.Grouping,
  query: Query,
  *,
  implementation: str = "auto",
) -> jax.Array:
  """Landmarks of :func:`grouped_landmark_pool` (no guide) at ``query``.

  What a :class:`LandmarkConv` layer's pool chose for one output pixel: for
  each input channel, the (row, col) whose value reached ``query``. See
  :func:`grouped_landmark_map` for merged groups.

  Returns:
    int32 array ``(..., C, 2)``, channels in the order of ``x``.
  """
  x = ops.check_x(x, "grouped_landmarks")
  i, j = _check_query(query, x.shape, "grouped_landmarks")
  return grouped_landmark_map(x, directions, implementation=implementation)[
    ..., i, j, :, :
  ]
