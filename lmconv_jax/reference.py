"""The pure-jnp reference: grouped landmark pooling with lax only, no custom call.

It is the executable form of docs/semantics.md, evaluated literally:

* :func:`grouped_forward` - the pool of every group (a group of several
  directions is the max of their pools, ties to the first listed);
* :func:`grouped_tangent` - its forward-mode derivative (the winner's
  tangent, never split);
* :func:`grouped_backward` - its VJP by the contract's backward formulas,
  in the contract's order (no algebraically equal rewrite, no FMA).

Each recomputes what it needs from ``x`` and ``g``; none takes residuals. The
JAX primitives wrap them (JVP = tangent, transpose = backward) on platforms
without compiled kernels; ``ops.landmark_pool_reference`` is the public
single-direction pool built on them.

Schedule. Every member pool of every group is cut into *phases*:
sets of pixels whose two neighbours all lie in the phase just before, so a
phase is computed at once. With (i, j) the pixel in the direction's scan
order (rows and columns flipped so the scan runs ascending):

* both neighbours in the previous column: phase j (W phases);
* both in the previous row (the other octants): phase i (H phases);
* (0, -1) and (-1, 0), the quadrants: phase i + j (H + W - 1 phases);
* (0, -1) and (-1, +1) (valid, not in the table): phase 2i + j
  (2(H - 1) + W phases).

All members of all groups are padded to the longest phase count and the
widest phase and stacked, so one ``lax.scan`` advances every group in the
same steps: a pass of any grouping is at most H + W - 1 sequential steps
(2H + W with a skew-2 direction). Pixels are read and written through
static index tables (a gather from x, a scatter into the output), so no
skewed copy of x is made; see docs/semantics.md for depths and memory.

Precision: float16/bfloat16 compute in float32; a pool's output is stored
(rounded once) before a neighbour reads it, the running cotangent G and the
running tangent stay in float32, each output is rounded once. x and the
guide are read with float32/float64 subnormals flushed to a zero of the
same sign (docs/semantics.md, "Edges").
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmconv_jax import _jax_compat
from lmconv_jax.directions import Direction, resolve

_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

Groups = Sequence[Sequence[Direction]]


# --------------------------------------------------------------------------
# Scalars: loads, the flush rule, the forward's max.


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype the pool computes in: float32 for float16/bfloat16, else dtype."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if dtype in _HALF else dtype


def flush_subnormals(v: jax.Array) -> jax.Array:
  """Reads subnormals of v's (float32 or float64) dtype as a zero of the same sign.

  Written so that it does not depend on whether the runtime flushes
  (``v * 0`` keeps the sign; -0.0 and NaN pass unchanged).
  """
  tiny = jnp.finfo(v.dtype).tiny
  return jnp.where(jnp.abs(v) < tiny, v * jnp.zeros((), v.dtype), v)


def _load(v: jax.Array, cd) -> jax.Array:
  """An input (x or guide) as the kernels read it: compute dtype, flushed."""
  return flush_subnormals(v.astype(cd))


def _take_max(m, v):
  """m := v if v > m or v is NaN (a NaN m stays): like lax.max, x first."""
  return jnp.where(v != v, v, jnp.where(v > m, v, m))


def winner_masks(x, in1, o1, in2, o2):
  """m and the winner masks (self, take1, take2) of the contract, for the
  reference's backward and tangent and for ``landmarks.winners``.

  Where m is NaN all three masks are false, as the backward's comparisons
  with m are (docs/semantics.md): no gradient is routed there.
  ``landmarks.winners`` uses this for the rest and picks the first NaN
  candidate there instead, because a landmark chain needs a winner.
  """
  m = jnp.where(in1, _take_max(x, o1), x)
  m = jnp.where(in2, _take_max(m, o2), m)
  self_ = x >= m
  take1 = ~self_ & in1 & (o1 >= m)
  take2 = ~self_ & ~take1 & in2 & (o2 >= m)
  return m, self_, take1, take2


def _blend(g, m, x):
  """g * m + (1 - g) * x, literally: the barrier keeps XLA from an FMA."""
  gm, rest = lax.optimization_barrier((g * m, (1 - g) * x))
  return gm + rest


# --------------------------------------------------------------------------
# The plan: static index tables of the phases of every member pool.


class _Plan(NamedTuple):
  h: int
  w: int
  p: int  # groups
  k: int  # member pools per group (padded to the largest)
  t: int  # phases (sequential steps of one pass)
  l: int  # pixels per phase (padded)
  r: int  # rows per member in a group's buffer: h*w + l
  ok: np.ndarray  # (P, K) bool: a real member (not padding)
  src: np.ndarray  # (T, P, K, L) row of x / g in the group's image
  dst: np.ndarray  # (T, P, K, L) row of the pixel in the group's buffer
  nb1: np.ndarray  # (T, P, K, L) row of neighbour n1 (own dummy if none)
  nb2: np.ndarray
  in1: np.ndarray  # (T, P, K, L) bool: pixel real and n1 inside
  in2: np.ndarray
  first: np.ndarray  # (T, P, K, L) row receiving the push applied first
  second: np.ndarray
  n2_first: np.ndarray  # (P, K) bool: the n2 push is added before the n1 push


def _sweep(d: Direction, h: int, w: int):
  """Phase and slot of every pixel (flat, row-major) for one direction."""
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  i, j = i.ravel(), j.ravel()
  fi = i if d.row_step > 0 else h - 1 - i
  fj = j if d.col_step > 0 else w - 1 - j
  v1 = (d.n1[0] * d.row_step, d.n1[1] * d.col_step)  # scan-order offsets
  v2 = (d.n2[0] * d.row_step, d.n2[1] * d.col_step)
  if v1[1] == -1 and v2[1] == -1:  # previous column
    phase, slot = fj, fi
  elif v1[0] == -1 and v2[0] == -1:  # previous row
    phase, slot = fi, fj
  else:  # (0, -1) with (-1, 0) or (-1, +1)
    up = v1 if v1[0] == -1 else v2
    assert {v1, v2} == {(0, -1), up} and up[1] in (0, 1), d
    phase, slot = (1 + up[1]) * fi + fj, fi
  # The pusher later in the scan order (rows outer) pushes first.
  n2_first = (-v2[0], -v2[1]) > (-v1[0], -v1[1])
  return phase, slot, n2_first


@functools.lru_cache(maxsize=256)
def _plan(groups: tuple, h: int, w: int) -> _Plan:
  hw, p = h * w, len(groups)
  kk = max(len(g) for g in groups)
  # A group with fewer members is padded with its first (computed, ignored).
  dirs = [[g[min(j, len(g) - 1)] for j in range(kk)] for g in groups]
  ok = np.array([[j < len(g) for j in range(kk)] for g in groups])
  sweeps = {d: _sweep(d, h, w) for g in groups for d in g}
  t = max(int(s[0].max()) + 1 for s in sweeps.values())
  l = max(int(s[1].max()) + 1 for s in sweeps.values())
  r = hw + l
  idx = np.int32 if kk * r < 2**31 else np.int64
  ll = np.broadcast_to(np.arange(l), (t, l))
  shape = (t, p, kk, l)
  src, dst = np.empty(shape, idx), np.empty(shape, idx)
  nbs = [np.empty(shape, idx) for _ in range(2)]
  ins = [np.zeros(shape, bool) for _ in range(2)]
  n2f = np.zeros((p, kk), bool)
  i_of, j_of = np.arange(hw) // w, np.arange(hw) % w
  for q in range(p):
    for m in range(kk):
      d = dirs[q][m]
      phase, slot, n2f[q, m] = sweeps[d]
      pix = np.full((t, l), -1, np.int64)
      pix[phase, slot] = np.arange(hw)
      real = pix >= 0
      dummy = m * r + hw + ll
      src[:, q, m] = np.where(real, pix, hw)
      dst[:, q, m] = np.where(real, m * r + pix, dummy)
      pp = np.where(real, pix, 0)
      for k, off in enumerate((d.n1, d.n2)):
        ni, nj = i_of + off[0], j_of + off[1]
        inside = (ni >= 0) & (ni < h) & (nj >= 0) & (nj < w)
        nflat = np.where(inside, ni * w + nj, 0)
        # Every neighbour is in the phase just before: a phase is one step.
        assert np.all(phase[nflat[inside]] == phase[inside] - 1), d
        okk = real & inside[pp]
        nbs[k][:, q, m] = np.where(okk, m * r + nflat[pp], dummy)
        ins[k][:, q, m] = okk
  n2 = n2f[None, :, :, None]
  return _Plan(
    h,
    w,
    p,
    kk,
    t,
    l,
    r,
    ok,
    src,
    dst,
    nbs[0],
    nbs[1],
    ins[0],
    ins[1],
    np.where(n2, nbs[1], nbs[0]),
    np.where(n2, nbs[0], nbs[1]),
    n2f,
  )


def sequential_steps(groups: Groups, h: int, w: int) -> int:
  """Sequential steps of one pass (forward, backward or tangent) of a grouping."""
  return _plan(_groups(groups), h, w).t


def _groups(groups) -> tuple:
  out = tuple(tuple(resolve(d) for d in g) for g in groups)
  if not out or not all(out):
    raise ValueError(
      f"groups must be a non-empty tuple of non-empty groups, got {groups!r}"
    )
  return out


# --------------------------------------------------------------------------
# Layouts (all batched over the P groups, so channel-sharded inputs stay
# sharded: nothing moves data between groups). A group's image: (P, HW + 1,
# B, C/P), row = pixel, one zero row for padding slots. A group's
# buffer: (P, K * R, B, C/P), row m*R + pixel for member m, then L dummy rows
# (one per slot of a phase).


def _to_groups(v, p):
  b, h, w, c = v.shape
  return v.reshape(b, h * w, p, c // p).transpose(2, 1, 0, 3)


def _from_groups(v, b, h, w, c):
  return v.transpose(2, 1, 0, 3).reshape(b, h, w, c)


def _group_rows(v, p):
  """(B, H, W, C) -> (P, HW + 1, N), the last row zero."""
  v = _to_groups(v, p)
  return jnp.concatenate([v, jnp.zeros_like(v[:, :1])], axis=1)


def _member_rows(v, plan):
  """(P, K, HW, N) -> (P, K * R, N) (dummy rows zero)."""
  pad = jnp.broadcast_to(
    jnp.zeros_like(v[:, :, :1]), v.shape[:2] + (plan.l,) + v.shape[3:]
  )
  return jnp.concatenate([v, pad], 2).reshape(
    (plan.p, plan.k * plan.r) + v.shape[3:]
  )


def _member_images(buf, plan):
  """(P, K * R, N) -> (P, K, HW, N)."""
  return buf.reshape((plan.p, plan.k, plan.r) + buf.shape[2:])[
    :, :, : plan.h * plan.w
  ]


def _get(buf, idx):
  """buf (P, rows, N), idx (P, K, L) -> (P, K, L, N)."""
  return jax.vmap(lambda b, i: b.at[i].get(mode="promise_in_bounds"))(buf, idx)


def _set(buf, idx, v):
  return jax.vmap(
    lambda b, i, u: b.at[i].set(
      u, unique_indices=True, mode="promise_in_bounds"
    )
  )(buf, idx, v)


def _add(buf, idx, v):
  return jax.vmap(lambda b, i, u: b.at[i].add(u, mode="promise_in_bounds"))(
    buf, idx, v
  )


def _buffer(like, plan, dtype, *inputs):
  """Zeros (P, K * R, B, C/P) varying like ``inputs`` (shard_map). Under
  Explicit mesh axes the primitives run this module per shard
  (_sharding.reference_per_shard): no array here has a sharded type."""
  z = jnp.zeros((plan.p, plan.k * plan.r) + like.shape[2:], dtype)
  return _jax_compat.vary(z, *inputs)


class _GuideIn(NamedTuple):
  """A guide (or its tangent) as the passes read it."""

  rows: jax.Array  # group image, or (P, 1, 1, N) when constant over H, W
  const: bool


def _guide_in(v, shape, b, plan) -> _GuideIn:
  """v (compute dtype, dims equal to x's or 1) in the layout of the passes.

  A guide constant over H and W (per channel, per batch, scalar) is not
  materialised at x's size: each group reads its (1, N) row every step.
  """
  h, w, c = shape[-3:]
  v = v.reshape((1,) * (len(shape) - v.ndim) + v.shape)
  if v.shape[-3] == 1 and v.shape[-2] == 1:
    vb = jnp.broadcast_to(v, shape[:-3] + (1, 1, c)).reshape(b, 1, 1, c)
    return _GuideIn(_to_groups(vb, plan.p)[:, None], True)
  vf = jnp.broadcast_to(v, shape).reshape(b, h, w, c)
  return _GuideIn(_group_rows(vf, plan.p), False)


def _read(gi: _GuideIn, src):
  return gi.rows if gi.const else _get(gi.rows, src)


class _Prepared(NamedTuple):
  plan: _Plan
  shape: tuple
  b: int
  dtype: jnp.dtype
  cd: jnp.dtype
  xg: jax.Array
  gg: Optional[_GuideIn]


def check_static_dims(shape, groups: int) -> None:
  """Raises where the reference cannot trace ``shape`` (dims symbolic under
  jax.export's shape polymorphism): H and W must be concrete (the wavefront
  plan is static index tables over the H x W pixels, one scan step per
  phase), and C too when it splits into several groups; the batch dims may
  be symbolic."""
  h, w, c = shape[-3:]
  fixed = {"H": h, "W": w} | ({"C": c} if groups > 1 else {})
  symbolic = ", ".join(n for n, d in fixed.items() if not isinstance(d, int))
  if symbolic:
    why = "static index tables over the H x W pixels (one scan step per phase)"
    if groups > 1:
      why += f" and splits C into {groups} equal groups"
    raise ValueError(
      f"lmconv_jax's reference pool (implementation='reference', or 'auto' "
      f"on a platform without kernels) got x of shape {tuple(shape)} with "
      f"symbolic {symbolic}: its wavefront plan is {why}, so {symbolic} "
      f"must be concrete. Give them as numbers in "
      f"jax.export.symbolic_shape (e.g. 'b, 32, 32, 16'); the batch dims "
      f"may stay symbolic."
    )


def _prepare(x, g, groups) -> _Prepared:
  x = jnp.asarray(x)
  groups = _groups(groups)
  h, w, c = x.shape[-3:]
  p = len(groups)
  check_static_dims(x.shape, p)
  if c % p:
    raise ValueError(f"x has {c} channels, which do not split into {p} groups")
  b = math.prod(x.shape[:-3])  # symbolic where the batch is (jax.export)
  dtype = jnp.dtype(x.dtype)
  cd = compute_dtype(dtype)
  plan = _plan(groups, h, w)
  xg = _group_rows(_load(x, cd).reshape(b, h, w, c), p)
  gg = None
  if g is not None:
    gg = _guide_in(_load(jnp.asarray(g), cd), tuple(x.shape), b, plan)
  return _Prepared(plan, tuple(x.shape), b, dtype, cd, xg, gg)


def _steps(plan: _Plan, *names):
  return tuple(jnp.asarray(getattr(plan, n)) for n in names)


def _kernel_bound(src):
  """src (this step's index table) unchanged, through a two-element sort.

  XLA's CPU compiler compiles a while loop without a sort (or a custom
  call) as one function (a "small call", at every size here), where LLVM
  contracts a product into the add that reads it, across the
  optimization barriers that keep them in separate kernels elsewhere: FMAs
  (one-column images with a row octant did). A sort keeps the loop's
  kernels apart; the sorted pair is two copies of one index, so the offset
  added is 0 (which XLA cannot fold)."""
  a = src.reshape(-1)[0]
  lo, hi = lax.sort(jnp.stack([a, a]))
  return src + (hi - lo)


# --------------------------------------------------------------------------
# The passes.


def _forward_scan(pr: _Prepared, txg=None, tgg=None):
  """Forward pass in member layout; with txg, also the running tangent."""
  plan, cd, sd = pr.plan, pr.cd, pr.dtype
  tangent = txg is not None

  def body(carry, s):
    src, dst, nb1, nb2, in1, in2 = s
    src = _kernel_bound(src)
    out_buf = carry[0]
    xv = _get(pr.xg, src)
    o1 = _get(out_buf, nb1).astype(cd)
    o2 = _get(out_buf, nb2).astype(cd)
    i1, i2 = in1[..., None, None], in2[..., None, None]
    m, self_, take1, take2 = winner_masks(xv, i1, o1, i2, o2)
    if pr.gg is None:
      out = m
    else:
      gv = _read(pr.gg, src)
      out = _blend(gv, m, xv)
    new = (_set(out_buf, dst, out.astype(sd)),)
    if tangent:
      t_buf = carry[1]
      txv = _get(txg, src)
      t1, t2 = _get(t_buf, nb1), _get(t_buf, nb2)
      zero = jnp.zeros((), cd)
      win = jnp.where(
        self_, txv, jnp.where(take1, t1, jnp.where(take2, t2, zero))
      )
      if pr.gg is None:
        tv = win
      else:
        tgv = _read(tgg, src)
        a, bb, cc = lax.optimization_barrier(
          (gv * win, (1 - gv) * txv, (m - xv) * tgv)
        )
        tv = a + bb + cc
      new += (_set(t_buf, dst, tv),)
    return new, None

  # The outputs never depend on the tangents (reverse mode needs them known).
  ins = (pr.xg, None if pr.gg is None else pr.gg.rows)
  init = (_buffer(pr.xg, plan, sd, *ins),)
  if tangent:
    init += (
      _buffer(pr.xg, plan, cd, *ins, txg, None if tgg is None else tgg.rows),
    )
  carry, _ = lax.scan(
    body, init, _steps(plan, "src", "dst", "nb1", "nb2", "in1", "in2")
  )
  return carry


def merge_members(vals: Sequence[jax.Array], valid=None):
  """The merge of a group's member pools: ``(merged, winner)``.

  The one home of the merge rule (docs/semantics.md): the first-listed-wins
  chain ``out = where((p_k > out) | isnan(p_k), p_k, out)`` over the members
  ``vals`` in listed order, so ties go to the first listed and a later member
  wins only where it is strictly greater or NaN. ``valid`` (None, or one mask
  per member, broadcastable to it) keeps a padding member from winning.
  ``winner`` is the position of the member the chain ends on, or None for a
  single member.
  """
  out, win = vals[0], None
  for j in range(1, len(vals)):
    v = vals[j]
    c = (v > out) | jnp.isnan(v)
    if valid is not None:
      c = c & valid[j]
    out = jnp.where(c, v, out)
    win = jnp.where(c, j, 0 if win is None else win)
  return out, win


def _merge(vals, plan):
  """Members' stored outputs (P, K, HW, N) -> groups (P, HW, N), winner."""
  return merge_members(
    [vals[:, j] for j in range(plan.k)],
    [jnp.asarray(plan.ok[:, j])[:, None, None, None] for j in range(plan.k)],
  )


def pick_member(vals: Sequence[jax.Array], win):
  """Where ``win`` (from :func:`merge_members`) is j, ``vals[j]``."""
  out = vals[0]
  for j in range(1, len(vals)):
    out = jnp.where(win == j, vals[j], out)
  return out


def _pick(vals, win, plan):
  """Per group, the winning member's value of vals (P, K, HW, N)."""
  return pick_member([vals[:, j] for j in range(plan.k)], win)


def _sum_members(vals, plan):
  """Per group, the members' values summed in member order, in vals' dtype."""
  acc = vals[:, 0]
  for j in range(1, plan.k):
    acc = jnp.where(
      jnp.asarray(plan.ok[:, j])[:, None, None, None], acc + vals[:, j], acc
    )
  return acc


def _finish(v_grp, pr):
  """Group layout images (P, HW, N) -> x's shape."""
  h, w, c = pr.shape[-3:]
  return _from_groups(v_grp, pr.b, h, w, c).reshape(pr.shape)


def grouped_forward(x: jax.Array, g: Optional[jax.Array], groups) -> jax.Array:
  """The grouped pool of x (..., H, W, C): group k pools channel block k.

  ``g`` is None (g = 1: the exact max) or an array of x.ndim dims, each equal
  to x's or 1, in x's dtype. ``groups``: tuple of P non-empty tuples of
  Directions (a group of several is the max of their pools, first wins).
  """
  x = jnp.asarray(x)
  if x.size == 0:
    return x
  pr = _prepare(x, g, groups)
  (out_buf,) = _forward_scan(pr)
  out, _ = _merge(_member_images(out_buf, pr.plan), pr.plan)
  return _finish(out, pr)


def _forward_and_tangent(x, g, tx, tg, groups):
  x = jnp.asarray(x)
  if x.size == 0:
    return x, jnp.zeros_like(x)
  pr = _prepare(x, g, groups)
  h, w, c = pr.shape[-3:]
  txv = jnp.asarray(tx).astype(pr.dtype).astype(pr.cd)
  txg = _group_rows(
    jnp.broadcast_to(txv, pr.shape).reshape(pr.b, h, w, c), pr.plan.p
  )
  tgg = None
  if g is not None:
    if tg is None:
      tgg = _GuideIn(jnp.zeros_like(pr.gg.rows), pr.gg.const)
    else:
      tgg = _guide_in(
        jnp.asarray(tg).astype(pr.dtype).astype(pr.cd), pr.shape, pr.b, pr.plan
      )
  out_buf, t_buf = _forward_scan(pr, txg, tgg)
  plan = pr.plan
  out, win = _merge(_member_images(out_buf, plan), plan)
  tm = _member_images(t_buf, plan).astype(pr.dtype)  # rounded once
  t = tm[:, 0] if win is None else _pick(tm, win, plan)
  return _finish(out, pr), _finish(t, pr)


def grouped_tangent(
  x: jax.Array,
  g: Optional[jax.Array],
  tx: jax.Array,
  tg: Optional[jax.Array],
  groups,
) -> jax.Array:
  """The tangent of :func:`grouped_forward` at (x, g) along (tx, tg).

  Per member: the winner's tangent (self: tx, take1 / take2: the
  neighbour's), guided ``g*win + (1-g)*tx + (m-x)*tg`` literally; a merged
  group's tangent is its winning member's. tg None means a zero tangent.
  """
  return _forward_and_tangent(x, g, tx, tg, groups)[1]


def grouped_backward(
  x: jax.Array, g: Optional[jax.Array], ct: jax.Array, groups
):
  """The VJP of :func:`grouped_forward`: (dx, dg), dg None when g is None.

  The contract's backward formulas in the contract's order. A merged group
  sends each output pixel's cotangent to its winning member; the members'
  dx (and dguide) are rounded to x's dtype and summed in member order. A
  broadcast guide's gradient is the per-pixel dguide summed over its
  broadcast dims (in float32 for the half types), rounded once.
  """
  x = jnp.asarray(x)
  if x.size == 0:
    return jnp.zeros_like(x), (None if g is None else jnp.zeros_like(g))
  pr = _prepare(x, g, groups)
  plan, cd, sd = pr.plan, pr.cd, pr.dtype
  (out_buf,) = _forward_scan(pr)
  _, win = _merge(_member_images(out_buf, plan), plan)
  h, w, c = pr.shape[-3:]
  ctg = _to_groups(jnp.asarray(ct).astype(sd).reshape(pr.b, h, w, c), plan.p)
  ct_m = jnp.broadcast_to(ctg[:, None], (plan.p, plan.k) + ctg.shape[1:])
  if win is not None:  # the cotangent goes to the winning member only
    rank = jnp.arange(plan.k)[None, :, None, None, None]
    ct_m = jnp.where(win[:, None] == rank, ct_m, jnp.zeros((), sd))
  G0 = _member_rows(ct_m.astype(cd), plan)
  n2f = jnp.asarray(plan.n2_first)[:, :, None, None, None]
  guided = pr.gg is not None

  def body(carry, s):
    src, dst, nb1, nb2, in1, in2, first, second = s
    src = _kernel_bound(src)
    G_buf = carry[0]
    G = _get(G_buf, dst)  # final: every push has arrived
    xv = _get(pr.xg, src)
    o1 = _get(out_buf, nb1).astype(cd)
    o2 = _get(out_buf, nb2).astype(cd)
    i1, i2 = in1[..., None, None], in2[..., None, None]
    m, self_, take1, take2 = winner_masks(xv, i1, o1, i2, o2)
    zero = jnp.zeros((), cd)
    if not guided:
      dx = jnp.where(self_, G, zero)
      p1 = jnp.where(take1, G, zero)
      p2 = jnp.where(take2, G, zero)
    else:
      one = jnp.ones((), cd)
      sv = _read(pr.gg, src)
      # The barrier hides that these are 0/1 (XLA would turn s * [bool]
      # into a select, which drops the NaN of inf * 0).
      selff, k1, k2 = lax.optimization_barrier(
        (
          self_.astype(cd),
          (i1 & (o1 >= m)).astype(cd),
          (i2 & (o2 >= m)).astype(cd),
        )
      )
      # t1 is exact (0 or 1), but the barrier keeps even 1 - t1 from an FMA.
      (t1,) = lax.optimization_barrier(((one - selff) * k1,))
      t2 = (one - selff) * (one - t1) * k2
      a, bb = lax.optimization_barrier((sv * selff, one - sv))
      dx = (a + bb) * G
      dg = (m - xv) * G
      p1 = (sv * t1) * G
      p2 = (sv * t2) * G
    # The barrier keeps XLA from fusing a push's product into the add that
    # receives it (where LLVM would contract them into an FMA).
    f, sc = lax.optimization_barrier(
      (jnp.where(n2f, p2, p1), jnp.where(n2f, p1, p2))
    )
    G_buf = _add(G_buf, first, f)
    G_buf = _add(G_buf, second, sc)
    # dx[p] (rounded to the storage dtype) replaces G[p], never read again.
    G_buf = _set(G_buf, dst, dx.astype(sd).astype(cd))
    new = (G_buf,)
    if guided:
      new += (_set(carry[1], dst, dg.astype(sd)),)
    return new, None

  ins = (pr.xg, None if pr.gg is None else pr.gg.rows, out_buf)
  init = (_jax_compat.vary(G0, *ins),)
  if guided:
    init += (_buffer(pr.xg, plan, sd, G0, *ins),)
  carry, _ = lax.scan(
    body,
    init,
    _steps(plan, "src", "dst", "nb1", "nb2", "in1", "in2", "first", "second"),
    reverse=True,
  )

  def per_group(v):
    return _finish(_sum_members(v, plan), pr)  # in the storage dtype

  dx = per_group(_member_images(carry[0], plan).astype(sd))
  if not guided:
    return dx, None
  dg = per_group(_member_images(carry[1], plan))
  gshape = tuple(jnp.shape(g))
  axes = tuple(
    i
    for i, (a, bdim) in enumerate(zip(gshape, pr.shape))
    if a == 1 and bdim != 1
  )
  if axes:
    dg = jnp.sum(dg.astype(cd), axis=axes, keepdims=True).astype(sd)
  return dx, dg.reshape(gshape)
