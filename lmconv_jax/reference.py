"""The pure-jnp reference: landmark pooling with lax only, no custom call.

It is the executable form of docs/semantics.md and is differentiable by JAX
itself. Gradients follow the SPEC tie rule (the whole gradient goes to the
one winner chosen by precedence x, n1, n2) because the winner is selected
with ``jnp.where`` on masks computed from the forward values, never with
``lax.max`` (whose JVP splits ties 0.5/0.5).

Every direction is mapped to one of two canonical recurrences on a flipped
and possibly transposed view, in which both neighbours come earlier:

* "row" form: n1 = (-1, c1), n2 = (-1, c2): each row depends only on the
  previous row, so a ``lax.scan`` over rows computes a whole row per step
  (all octants, after transposing H and W for the column-wise ones);
* "quadrant" form: n1 = (0, -1), n2 = (-1, 0): a scan over rows with an
  inner scan over columns.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from lmconv_jax.directions import Direction, DirectionLike, resolve

_HALF = (jnp.float16, jnp.bfloat16)


def _round_to(v: jax.Array, dtype) -> jax.Array:
  """Rounds float32 `v` to the storage dtype, with an identity gradient.

  Neighbours read outputs as stored (docs/semantics.md, precision rules),
  while the backward accumulates in float32 like the kernels do.
  """
  if dtype not in _HALF:
    return v
  return v + lax.stop_gradient(v.astype(dtype).astype(v.dtype) - v)


def _step(x, a, a_ok, b, b_ok, g, dtype):
  """One pixel (vectorised over whatever shape x has): the SPEC forward step."""
  neg = jnp.array(-jnp.inf, x.dtype)
  a = jnp.where(a_ok, a, neg)
  b = jnp.where(b_ok, b, neg)
  m_val = lax.max(lax.max(x, a), b)            # value; NaN propagates
  mv = lax.stop_gradient(m_val)
  take_x = x >= mv
  take_a = ~take_x & a_ok & (lax.stop_gradient(a) >= mv)
  take_b = ~take_x & ~take_a & b_ok & (lax.stop_gradient(b) >= mv)
  # The winner carries the gradient; with NaN nobody wins and m is constant.
  m = jnp.where(take_x, x, jnp.where(take_a, a, jnp.where(take_b, b, mv)))
  if g is None:
    return m
  # The barrier keeps XLA from contracting the blend into an FMA, so it is
  # evaluated literally, with the same roundings as the kernels.
  gm, rest = lax.optimization_barrier((g * m, (1 - g) * x))
  return _round_to(gm + rest, dtype)


def _shift_right(v):
  """v[..., j-1, :] at column j (column axis -2); column 0 gets junk."""
  return jnp.concatenate([v[..., :1, :], v[..., :-1, :]], axis=-2)


def _row_form(x, g, c1, c2, dtype):
  """Canonical row recurrence on (H, B, W, C) arrays, n = (-1, c1), (-1, c2)."""
  h, _, w, _ = x.shape
  col_ok = (jnp.arange(w) >= 1)[:, None]        # (W, 1): j - 1 exists
  xs = (x, g, jnp.arange(h)) if g is not None else (x, jnp.arange(h))

  def body(prev, inp):
    if g is not None:
      xi, gi, i = inp
    else:
      (xi, i), gi = inp, None
    row_ok = i > 0
    a = _shift_right(prev) if c1 == -1 else prev
    b = _shift_right(prev) if c2 == -1 else prev
    a_ok = row_ok & (col_ok if c1 == -1 else True)
    b_ok = row_ok & (col_ok if c2 == -1 else True)
    out = _step(xi, a, a_ok, b, b_ok, gi, dtype)
    return out, out

  _, out = lax.scan(body, jnp.zeros_like(x[0]), xs)
  return out


def _quadrant_form(x, g, dtype):
  """Canonical quadrant recurrence on (H, B, W, C): n1 = (0,-1), n2 = (-1,0)."""
  h, w = x.shape[0], x.shape[2]

  def row_body(prev_row, inp):
    if g is not None:
      xi, gi, i = inp
    else:
      (xi, i), gi = inp, None
    # Inner scan over columns of (W, B, C) views.
    xc = jnp.moveaxis(xi, -2, 0)
    uc = jnp.moveaxis(prev_row, -2, 0)
    gc = None if gi is None else jnp.moveaxis(gi, -2, 0)

    def col_body(left, cin):
      if gc is not None:
        xj, uj, gj, j = cin
      else:
        (xj, uj, j), gj = cin, None
      out = _step(xj, left, j > 0, uj, i > 0, gj, dtype)
      return out, out

    cins = (xc, uc, gc, jnp.arange(w)) if gc is not None else (
        xc, uc, jnp.arange(w))
    _, row = lax.scan(col_body, jnp.zeros_like(xc[0]), cins)
    row = jnp.moveaxis(row, 0, -2)
    return row, row

  xs = (x, g, jnp.arange(h)) if g is not None else (x, jnp.arange(h))
  _, out = lax.scan(row_body, jnp.zeros_like(x[0]), xs)
  return out


def _canonical(d: Direction):
  """Flips (row, col), transpose flag and the canonical (c1, c2) or None."""
  flip_r, flip_c = d.row_step < 0, d.col_step < 0
  n1 = (d.n1[0] * d.row_step, d.n1[1] * d.col_step)   # offsets in scan order
  n2 = (d.n2[0] * d.row_step, d.n2[1] * d.col_step)
  if n1 == (0, -1) and n2 == (-1, 0):
    return flip_r, flip_c, False, None                 # quadrant
  if n1[0] == n2[0] == -1:
    return flip_r, flip_c, False, (n1[1], n2[1])       # depends on prev row
  if n1[1] == n2[1] == -1:                             # depends on prev column
    return flip_r, flip_c, True, (n1[0], n2[0])
  raise ValueError(f"direction {d} has no canonical form")


def landmark_pool_reference(x: jax.Array, direction: DirectionLike,
                            guide: Optional[jax.Array] = None) -> jax.Array:
  """Pure-jnp landmark pool of ``x`` (shape (..., H, W, C)) in ``direction``.

  ``guide`` is None (all ones) or an array broadcastable to ``x``. No input
  checking beyond what jnp does: use :func:`lmconv_jax.landmark_pool` with
  ``implementation="reference"`` for the checked public entry point.
  """
  d = resolve(direction)
  x = jnp.asarray(x)
  dtype = x.dtype
  batch = x.shape[:-3]
  h, w, c = x.shape[-3:]
  if x.size == 0:
    return x
  cdt = jnp.float32 if dtype in _HALF else dtype
  xv = x.reshape((-1, h, w, c)).astype(cdt)
  gv = None
  if guide is not None:
    gv = jnp.broadcast_to(jnp.asarray(guide).astype(dtype), x.shape)
    gv = gv.reshape((-1, h, w, c)).astype(cdt)
  flip_r, flip_c, transpose, cc = _canonical(d)

  def to_canon(v):
    if flip_r:
      v = jnp.flip(v, 1)
    if flip_c:
      v = jnp.flip(v, 2)
    if transpose:
      v = jnp.swapaxes(v, 1, 2)
    return jnp.moveaxis(v, 1, 0)                      # (H', B, W', C)

  def from_canon(v):
    v = jnp.moveaxis(v, 0, 1)
    if transpose:
      v = jnp.swapaxes(v, 1, 2)
    if flip_c:
      v = jnp.flip(v, 2)
    if flip_r:
      v = jnp.flip(v, 1)
    return v

  xc = to_canon(xv)
  gc = None if gv is None else to_canon(gv)
  if cc is None:
    out = _quadrant_form(xc, gc, dtype)
  else:
    out = _row_form(xc, gc, cc[0], cc[1], dtype)
  return from_canon(out).astype(dtype).reshape(batch + (h, w, c))
