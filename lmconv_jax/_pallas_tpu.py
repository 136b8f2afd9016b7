"""Pallas TPU kernels of the grouped landmark pool: forward, tangent, backward.

The same contract as :mod:`lmconv_jax.reference` (docs/semantics.md), bit for
bit in Pallas' interpret mode, written for Mosaic TPU: x is (..., H, W, C)
with C on lanes and W on sublanes; the leading dims are folded into one
batch dim B.

Layout and grid
---------------
Every valid direction scans rows as the outer loop, and in its scan order a
pixel's neighbours lie in the previous row (row octants), or one just before
it in the same row and one in the previous row at scan column k + e, e = -1
(column octants: both in the previous column), 0 (quadrants) or +1 (skew 2).
So each pass walks a band of rows at a time:

* row octants: row by row, a row computed at once as a (W, Cb) slab from the
  previous row (neighbour columns by a shifted read of a padded VMEM row
  buffer, edge columns masked);
* the others: a wavefront over the band (:class:`_Wave`). Pixel (scan row r,
  scan column k) has phase d = a (r + 1) + k with a = 1 + e (0, 1, 2); both
  its neighbours have phase d - 1, so a phase is computed at once. The band
  (and the carried row before it, row q = 0) is copied into skewed VMEM
  buffers, row q at offset a q (a (bh - q) when columns scan leftwards), so
  that a phase is one column of pitch P = W + a bh + 2: one strided
  sublane load (``pl.ds(start, bh, stride=P)``) per operand, its neighbours
  the previous column, rows q and q - 1. Padding slots hold garbage that the
  edge masks drop; results are stored in place over x and un-skewed to the
  output block at the end of the band. A column octant steps over the
  columns ((bh, Cb) slabs), a quadrant over anti-diagonals. The backward
  runs the phases in reverse: the push to the pixel's row neighbour is
  carried in registers, the push to the row above goes through a skewed
  buffer at its target (its row bh is seeded with the pushes of the band
  after this one), and G = (ct + push from below) + push from the right,
  the contract's order.

The grid is ``(B, C // Cb, S, nb)``:

* axis 0, batch (parallel);
* axis 1, lane block of ``Cb`` channels (parallel): 128 lanes when the group
  width C/P is a multiple of 128 (one group per block), 128 lanes holding
  several whole groups when 128 is a multiple of C/P and of C, else all C
  channels (the full-dim rule of TPU blocks). A block may hold groups of
  several directions: each direction present (a static table, scalar
  prefetch) runs its own body on the whole block and stores only its lanes.
* axis 2, slot ``s`` (parallel): member ``k`` of the groups (a merged group's
  k-th direction) and, when one lane block holds directions that scan rows
  in opposite orders, the row order (``S = K`` or ``2 K``); slots a group
  lacks are skipped and their lanes dropped when the members are merged;
* axis 3, band of ``bh`` rows (arbitrary: sequential). The band index map
  reverses (nb - 1 - t) for a slot whose rows scan upwards (forward) or
  downwards (backward), chosen per (lane block, slot) from a prefetched
  table, so every band sees the bands before it in its scan order.

Scratch (VMEM, persists across grid steps, hence across bands):

* forward / tangent: ``prev`` (W, Cb) float32, the stored (rounded) output
  of the previous row in scan order, which the next band's first row reads;
  ``tprev`` the same for the running tangent (float32, unrounded);
* backward: ``pend`` (2, W, Cb) float32, the pushes the next row to visit
  (in reverse scan order) receives from the row visited last, already at
  their target columns, the contract's first and second push apart so that
  ``G = (ct + first) + second`` keeps its order (wavefront directions use
  only the first: their in-row push never crosses a band);
* a (W + 2, Cb) row buffer for shifted reads (row octants);
* the wavefront's skewed buffers, ((bh + 1) P, Cb) in the compute dtype,
  when the grouping has a direction that is not a row octant: forward x
  (then the output) and the guide; tangent also tx (then the tangent) and
  the guide's tangent; backward x (then dx), the routed cotangent, the
  member's pool (row 0: the boundary row), the pushes to the row above,
  and the guide (then dguide). Their size grows as bh (W + a bh), so they
  bound the band height of quadrants and skew 2.

The backward takes the forward's member pools (``out`` of each member) as
input rather than carrying them: the row before a band in scan order comes
in as a one-row block of its own. A merged group's members are merged in
jnp around the kernels (elementwise, the reference's own chain), the
cotangent is routed to the winner inside the backward kernel, and the
members' dx / dguide are summed in member order in jnp in the storage dtype,
as the reference does; a broadcast guide's gradient is the per-pixel
dguide summed by the reference's own ``jnp.sum``.

Block sizes: the lane block is the smallest the TPU allows (128 lanes or
the full C) so that bands can be tall; the band height is the most rows
whose double-buffered blocks (all inputs and outputs of the pass) and the
skewed buffers fit a VMEM budget (12 MiB by default, under v5e's 16 MiB
scoped default), so (8, 128, 128, 256) and (1, 512, 512, 64) fit: at
(8, 128, 128, 256) float32 with no guide the forward's bands are 34 rows,
the tangent's 16 and the backward's 14 for quadrants and octants alike
(``block_sizes``; fewer with a guide). Bands of a grouping with a wavefront
direction are at most WAVE_MAX_ROWS rows: the copies into and out of the
skewed buffers are unrolled per row.

Exactness on TPU: no ``v != v`` (``v == v`` instead); no
``optimization_barrier`` (no Pallas TPU lowering): a product that must not
be contracted into an FMA, or a 0/1 float XLA must not turn into a select,
goes through :func:`_opaque`, an integer XOR of its bits with a zero the
compiler cannot see (derived from a program id). Without it, interpret
mode differs from the reference in the last bit of about a third of
guided outputs, dguides and tangents.

Dtypes: float32 and bfloat16 compile for TPU (v5e, v6e, checked with
libtpu's compiler); float16 does not (Mosaic: "Invalid vector type for
load") and float64 does not (no 64-bit types); both are exact in interpret
mode.

Cost (per (batch, lane block, slot)), sequential steps of a pass over
nb = ceil(H / bh) bands: a row octant H steps on (W, Cb) slabs; a column
octant nb W, a quadrant nb (W + bh - 1) = H + nb (W - 1) (full bands), a
skew 2 nb (W + 2 (bh - 1)) steps, each on (bh, Cb) strided slabs (against
H W (1, Cb) steps before); plus, per band, bh row copies into and out of
the skewed buffers per operand (independent, not a dependence chain). A
block holding several directions runs each in turn. The backward is the
same count again after its forward pass. HBM traffic: forward reads x (and
g) and writes S pools; the backward reruns the forward, then reads x, g, ct,
the winner map (int32, merged groups only), the S pools and one boundary
row per band, and writes S dx (and S dguide); merges, lane selects and
member sums are jnp passes over (B, H, W, C) arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lmconv_jax import _jax_compat
from lmconv_jax import reference as _R
from lmconv_jax.directions import Direction

VMEM_BUDGET = 12 * 2**20
WAVE_MAX_ROWS = 64


# --------------------------------------------------------------------------
# The static plan.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block sizes of one pass (see the module docstring).

  Attributes:
    band_rows: rows per band (bh); the last band may be partial.
    n_bands: bands per image, ceil(H / band_rows).
    lanes: channels per lane block (Cb).
    n_lane_blocks: C // lanes.
    slots: S, grid axis 2 (members times row orders).
    vmem_bytes: the estimate of VMEM the pass's blocks and scratch use.
  """

  band_rows: int
  n_bands: int
  lanes: int
  n_lane_blocks: int
  slots: int
  vmem_bytes: int


@dataclasses.dataclass(frozen=True)
class _Layout:
  p: int
  k: int
  cg: int
  cb: int
  nc: int
  r: int  # row orders per member (1 or 2)
  s: int  # slots
  codes: tuple  # distinct Directions
  lane_code: np.ndarray  # (S, C) code of each channel per slot, -1 none
  up: np.ndarray  # (nc * S,) 1 where the slot's rows scan up
  present: np.ndarray  # (nc * S * ncodes,) 1 where code in block
  uniform: bool  # every (block, slot) holds at most one code
  valid: np.ndarray  # (K, C) bool: member k exists for the channel
  lane_up: np.ndarray  # (K, C) bool: member k scans rows upwards


def _lanes(c, cg):
  if cg % 128 == 0:
    return 128
  if c % 128 == 0 and 128 % cg == 0:
    return 128
  return c


@functools.lru_cache(maxsize=256)
def _layout(groups: tuple, c: int) -> _Layout:
  p = len(groups)
  kk = max(len(g) for g in groups)
  cg = c // p
  cb = _lanes(c, cg)
  nc = c // cb
  codes = []
  for g in groups:
    for d in g:
      if d not in codes:
        codes.append(d)
  up_of = np.zeros((kk, c), bool)
  valid = np.zeros((kk, c), bool)
  for q, g in enumerate(groups):
    for k, d in enumerate(g):
      valid[k, q * cg : (q + 1) * cg] = True
      up_of[k, q * cg : (q + 1) * cg] = d.row_step < 0
  mixed = False
  for cc in range(nc):
    sl = slice(cc * cb, (cc + 1) * cb)
    for k in range(kk):
      ups = set(up_of[k, sl][valid[k, sl]].tolist())
      mixed |= len(ups) > 1
  r = 2 if mixed else 1
  s = kk * r
  lane_code = np.full((s, c), -1, np.int32)
  for q, g in enumerate(groups):
    for k, d in enumerate(g):
      slot = k * r + (int(d.row_step < 0) if r == 2 else 0)
      lane_code[slot, q * cg : (q + 1) * cg] = codes.index(d)
  nd = len(codes)
  up = np.zeros(nc * s, np.int32)
  present = np.zeros(nc * s * nd, np.int32)
  uniform = True
  for cc in range(nc):
    for sl_ in range(s):
      lc = lane_code[sl_, cc * cb : (cc + 1) * cb]
      here = sorted(set(lc.tolist()) - {-1})
      uniform &= len(set(lc.tolist())) == 1
      for ci in here:
        present[(cc * s + sl_) * nd + ci] = 1
      if here:
        up[cc * s + sl_] = int(codes[here[0]].row_step < 0)
        assert all(
          (codes[ci].row_step < 0) == bool(up[cc * s + sl_]) for ci in here
        )
  return _Layout(
    p,
    kk,
    cg,
    cb,
    nc,
    r,
    s,
    tuple(codes),
    lane_code,
    up,
    present,
    uniform,
    valid,
    up_of,
  )


def _pad(n, m):
  return -(-n // m) * m


def block_sizes(
  shape,
  dtype,
  groups,
  guide_shape=None,
  *,
  pass_="backward",
  band_rows: Optional[int] = None,
  vmem_budget: int = VMEM_BUDGET,
) -> BlockSizes:
  """The block sizes a pass uses for x of ``shape`` (..., H, W, C).

  ``pass_`` is "forward", "tangent" or "backward" (the backward moves the
  most blocks, so its bands are the shortest); ``band_rows`` forces the
  band height (clipped to H).
  """
  groups = _R._groups(groups)
  h, w, c = (int(v) for v in shape[-3:])
  lay = _layout(groups, c)
  isz = jnp.dtype(dtype).itemsize
  cdsz = _R.compute_dtype(dtype).itemsize
  cbp = _pad(lay.cb, 128)
  row = _pad(w, 8 * max(1, 4 // isz)) * cbp * isz  # one row of one block
  full_guide = (
    guide_shape is not None and len(guide_shape) >= 3 and guide_shape[-3] != 1
  )
  n_arr = {"forward": 2, "tangent": 4, "backward": 4}[pass_]
  n_arr += int(full_guide) * (1 if pass_ != "tangent" else 2)
  if pass_ == "backward":
    n_arr += int(guide_shape is not None) + int(lay.k > 1) * max(1, 4 // isz)
  fixed = 4 * _pad(w + 2, 8) * cbp * cdsz + 2 * 2 * row
  per_row = 2 * n_arr * row

  def vmem(bh):
    n, rows = _skew_buffers(lay.codes, pass_, guide_shape is not None, w, bh)
    return fixed + bh * per_row + n * _pad(rows, 8) * cbp * cdsz

  if band_rows is None:
    bh = max(1, min(h, (vmem_budget - fixed) // per_row))
    if _skew_buffers(lay.codes, pass_, False, w, 1)[0]:
      bh = min(bh, WAVE_MAX_ROWS)  # the band's copies are unrolled per row
    # The skewed buffers grow as bh * (W + a * bh): shrink bh until all fit.
    while bh > 1 and vmem(bh) > vmem_budget:
      bh = max(1, min(bh - 1, bh * 7 // 8))
  else:
    bh = int(band_rows)
  bh = max(1, min(bh, h))
  return BlockSizes(bh, -(-h // bh), lay.cb, lay.nc, lay.s, vmem(bh))


def _skew_buffers(codes, pass_, guided, w, bh):
  """(count, rows) of the wavefront's skewed (rows, Cb) buffers (_Wave)."""
  a = [_Wave(g, w, bh).a for g in map(_geo, codes) if not g.row_type]
  if not a:
    return 0, 0
  n = {
    "forward": 1 + guided,
    "tangent": 2 + 2 * guided,
    "backward": 4 + guided,
  }[pass_]
  return n, (bh + 1) * (w + max(a) * bh + 2)


# --------------------------------------------------------------------------
# Scalar rules inside the kernels.


def _opaque(v, z):
  """v, unchanged, through an integer XOR with z (a zero the compiler cannot
  see): stops XLA (interpret mode) and Mosaic from contracting a product
  into an add (FMA) or rewriting a 0/1 float as a select."""
  it = jnp.int64 if v.dtype == jnp.float64 else jnp.int32
  bits = lax.bitcast_convert_type(v, it)
  return lax.bitcast_convert_type(bits ^ z.astype(it), v.dtype)


def _hidden_zero():
  """0, as the compilers cannot prove: a program id (< 2**31) shifted right
  by 31. (A constant would be folded: XLA sinks it into the interpret
  mode's grid loop and drops the XOR.)"""
  return lax.shift_right_logical(
    pl.program_id(0).astype(jnp.int32), jnp.int32(31)
  )


def _flush(v):
  tiny = jnp.finfo(v.dtype).tiny
  return jnp.where(jnp.abs(v) < tiny, v * jnp.zeros((), v.dtype), v)


def _take_max(m, v):
  """m := v if v > m or v is NaN (``v == v`` compiles on TPU, ``!=`` not)."""
  return jnp.where(v == v, jnp.where(v > m, v, m), v)


def _winner(x, in1, o1, in2, o2):
  m = jnp.where(in1, _take_max(x, o1), x)
  m = jnp.where(in2, _take_max(m, o2), m)
  self_ = x >= m
  take1 = jnp.logical_not(self_) & in1 & (o1 >= m)
  take2 = jnp.logical_not(self_) & jnp.logical_not(take1) & in2 & (o2 >= m)
  return m, self_, take1, take2


def _blend(g, m, x, z):
  one = jnp.ones((), g.dtype)
  return _opaque(g * m, z) + _opaque((one - g) * x, z)


@dataclasses.dataclass(frozen=True)
class _Geo:
  """A direction in the kernels' terms (actual column offsets)."""

  up: bool  # rows scan upwards (row_step = -1)
  cs: int  # col_step
  row_type: bool  # both neighbours in the previous row
  dc: tuple  # (dc1, dc2) column offsets of n1, n2
  same: int  # which neighbour (0 or 1) is in the same row
  n2_first: bool  # backward: the n2 push is added first


def _geo(d: Direction) -> _Geo:
  row_type = d.n1[0] != 0 and d.n2[0] != 0
  same = -1 if row_type else (0 if d.n1[0] == 0 else 1)
  v1 = (d.n1[0] * d.row_step, d.n1[1] * d.col_step)
  v2 = (d.n2[0] * d.row_step, d.n2[1] * d.col_step)
  n2_first = (-v2[0], -v2[1]) > (-v1[0], -v1[1])
  return _Geo(
    d.row_step < 0, d.col_step, row_type, (d.n1[1], d.n2[1]), same, n2_first
  )


# --------------------------------------------------------------------------
# Kernels.


class _Ctx:
  """What a kernel body needs: static sizes and the refs of the step."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


def _shifted(sh, v, d, w):
  """u[j] = v[j + d] (garbage where j + d is outside; mask it)."""
  if d == 0:
    return v
  sh[pl.ds(1, w), :] = v
  return sh[pl.ds(1 + d, w), :]


def _colmask(w, cb, d):
  j = lax.broadcasted_iota(jnp.int32, (w, cb), 0) + d
  return (j >= 0) & (j < w)


def _load_guide(ref, row, gh, w, cb, cd):
  v = ref[row if gh > 1 else 0]
  return _flush(jnp.broadcast_to(v.astype(cd), (w, cb)))


def _put_under(mask):
  """A store of v at ref[idx] in the lanes of ``mask`` only (every lane for
  None): a lane block may hold groups of several directions."""

  def put(ref, idx, v):
    if mask is not None:
      v = jnp.where(mask, v, ref[idx])
    ref[idx] = v

  return put


def _fwd_kernel(cx, *refs):
  """Forward (and, with cx.tangent, the running tangent) of one band."""
  rev_ref, present_ref = refs[:2]
  it = iter(refs[2:])
  lc_ref = None if cx.uniform else next(it)
  x_ref = next(it)
  g_ref = next(it) if cx.guided else None
  tx_ref = next(it) if cx.tangent else None
  tg_ref = next(it) if cx.tangent and cx.guided and cx.has_tg else None
  out_ref = next(it)
  tout_ref = next(it) if cx.tangent else None
  prev_ref = next(it)
  tprev_ref = next(it) if cx.tangent else None
  sh_ref = next(it)
  sk = list(it)  # skewed buffers of the wavefront (if any)
  del rev_ref
  w, cb, bh, h, nb, cd, sd = cx.w, cx.cb, cx.bh, cx.h, cx.nb, cx.cd, cx.sd
  c_i, s_i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  z = _hidden_zero()
  nd = len(cx.geos)
  zero = jnp.zeros((), cd)

  def load_tg(rr, n):
    if tg_ref is None:
      return jnp.zeros((n, cb), cd)
    return jnp.broadcast_to(tg_ref[rr if cx.gh > 1 else 0].astype(cd), (n, cb))

  for ci, geo in enumerate(cx.geos):

    @pl.when(present_ref[(c_i * cx.s + s_i) * nd + ci] == 1)
    def _body(ci=ci, geo=geo):
      mask = None if cx.uniform else (lc_ref[...] == ci)  # (1, Cb)
      band = (nb - 1 - t) if geo.up else t

      put = _put_under(mask)

      if not geo.row_type:
        _fwd_wave(
          cx,
          geo,
          band,
          put,
          z,
          x_ref,
          g_ref,
          tx_ref,
          load_tg,
          out_ref,
          tout_ref,
          prev_ref,
          tprev_ref,
          sk,
        )
        return

      def row_step(r, carry):
        rr = (bh - 1 - r) if geo.up else r
        i = band * bh + rr
        ip = i + (1 if geo.up else -1)
        has_prev = (ip >= 0) & (ip < h)
        prev = carry[0]
        xv = _flush(x_ref[rr].astype(cd))
        gv = _load_guide(g_ref, rr, cx.gh, w, cb, cd) if cx.guided else None
        ins = [has_prev & _colmask(w, cb, d) for d in geo.dc]
        os_ = [_shifted(sh_ref, prev, d, w) for d in geo.dc]
        m, self_, tk1, tk2 = _winner(xv, ins[0], os_[0], ins[1], os_[1])
        out = m if gv is None else _blend(gv, m, xv, z)
        out = out.astype(sd).astype(cd)
        new = (out,)
        if cx.tangent:
          txv = tx_ref[rr].astype(cd)
          ts = [_shifted(sh_ref, carry[1], d, w) for d in geo.dc]
          win = jnp.where(
            self_, txv, jnp.where(tk1, ts[0], jnp.where(tk2, ts[1], zero))
          )
          new += (_tangent_blend(gv, win, txv, m, xv, load_tg(rr, w), z),)
        put(out_ref, rr, new[0].astype(sd))
        if cx.tangent:
          put(tout_ref, rr, new[1].astype(sd))
        return new

      init = (prev_ref[...],)
      if cx.tangent:
        init += (tprev_ref[...],)
      fin = lax.fori_loop(0, bh, row_step, init)
      put(prev_ref, Ellipsis, fin[0])
      if cx.tangent:
        put(tprev_ref, Ellipsis, fin[1])


class _Wave:
  """The skewed layout of one band for a direction with a neighbour in the
  same row: pixel (scan row r, scan column k) of phase d = a * (r + 1) + k
  (a = 0 column octant, 1 quadrant, 2 skew 2) sits at row q = r + 1, column
  col(d) of a flat ((bh + 1) * P, Cb) buffer of pitch P; row q = 0 is the
  row before the band. Both neighbours of a pixel of phase d have phase
  d - 1, the same column col(d) - cs, rows q and q - 1: one step of the
  wavefront is a strided load of bh pixels, one per row."""

  def __init__(self, geo, w, bh):
    self.e = geo.dc[1 - geo.same] * geo.cs  # up neighbour, scan column
    self.a = 1 + self.e
    self.cs, self.w, self.bh, self.up = geo.cs, w, bh, geo.up
    self.p = w + self.a * bh + 2
    self.d0, self.d1 = self.a, self.a * bh + w - 1  # phases of the band

  def off(self, q):  # flat offset of image column 0 of row q
    a, bh = self.a, self.bh
    return q * self.p + 1 + (a * q if self.cs > 0 else a * (bh - q))

  def col(self, d):  # flat column of phase d
    if self.cs > 0:
      return 1 + d
    return self.a * self.bh + self.w - d

  def rr(self, q):  # block row of band row q
    return (self.bh - q) if self.up else (q - 1)

  def ld(self, ref, q0, c):  # rows q0 .. q0 + bh - 1 at column c
    return ref[pl.ds(q0 * self.p + c, self.bh, stride=self.p), :]

  def st(self, ref, q0, c, v):
    ref[pl.ds(q0 * self.p + c, self.bh, stride=self.p), :] = v

  def row(self, ref, q):
    return ref[pl.ds(self.off(q), self.w), :]

  def set_row(self, ref, q, v):
    ref[pl.ds(self.off(q), self.w), :] = v

  def rows_image(self, band, cb):
    """(bh, Cb) image row index of band rows q = 1 .. bh."""
    q = lax.broadcasted_iota(jnp.int32, (self.bh, cb), 0) + 1
    rr = (self.bh - q) if self.up else (q - 1)
    return q, band * self.bh + rr


def _fwd_wave(
  cx,
  geo,
  band,
  put,
  z,
  x_ref,
  g_ref,
  tx_ref,
  load_tg,
  out_ref,
  tout_ref,
  prev_ref,
  tprev_ref,
  sk,
):
  """Forward (and tangent) of one band as an anti-diagonal (or column)
  wavefront: a (bh, Cb) strided step per phase instead of a pixel loop."""
  w, cb, bh, h, cd, sd = cx.w, cx.cb, cx.bh, cx.h, cx.cd, cx.sd
  wv = _Wave(geo, w, bh)
  a, e, cs = wv.a, wv.e, geo.cs
  zero = jnp.zeros((), cd)
  it = iter(sk)
  xk = next(it)  # x, overwritten by the output phase by phase
  gk = next(it) if cx.guided else None
  txk = next(it) if cx.tangent else None  # tx, then the tangent
  tgk = next(it) if cx.tangent and cx.guided else None
  for q in range(1, bh + 1):
    rr = wv.rr(q)
    wv.set_row(xk, q, _flush(x_ref[rr].astype(cd)))
    if gk is not None:
      wv.set_row(gk, q, _load_guide(g_ref, rr, cx.gh, w, cb, cd))
    if cx.tangent:
      wv.set_row(txk, q, tx_ref[rr].astype(cd))
      if tgk is not None:
        wv.set_row(tgk, q, load_tg(rr, w))
  wv.set_row(xk, 0, prev_ref[...])
  if cx.tangent:
    wv.set_row(txk, 0, tprev_ref[...])
  qv, iv = wv.rows_image(band, cb)
  ip = iv + (1 if geo.up else -1)
  has_prev = (ip >= 0) & (ip < h)

  def step(d, carry):
    c = wv.col(d)
    kv = d - a * qv
    in_s = kv > 0
    in_u = has_prev & (kv + e >= 0) & (kv + e < w)
    xj = wv.ld(xk, 1, c)
    uj = wv.ld(xk, 0, c - cs)
    if geo.same == 0:
      m, self_, tk1, tk2 = _winner(xj, in_s, carry[0], in_u, uj)
    else:
      m, self_, tk1, tk2 = _winner(xj, in_u, uj, in_s, carry[0])
    gj = None if gk is None else wv.ld(gk, 1, c)
    y = m if gj is None else _blend(gj, m, xj, z)
    y = y.astype(sd).astype(cd)
    wv.st(xk, 1, c, y)
    res = (y,)
    if cx.tangent:
      txj = wv.ld(txk, 1, c)
      tuj = wv.ld(txk, 0, c - cs)
      ts = (carry[1], tuj) if geo.same == 0 else (tuj, carry[1])
      win = jnp.where(
        self_, txj, jnp.where(tk1, ts[0], jnp.where(tk2, ts[1], zero))
      )
      if gj is None:
        tv = win
      else:
        tv = _tangent_blend(gj, win, txj, m, xj, wv.ld(tgk, 1, c), z)
      wv.st(txk, 1, c, tv)
      res += (tv,)
    return res

  init = (jnp.zeros((bh, cb), cd),) * (2 if cx.tangent else 1)
  lax.fori_loop(wv.d0, wv.d1 + 1, step, init)
  for q in range(1, bh + 1):
    put(out_ref, wv.rr(q), wv.row(xk, q).astype(sd))
    if cx.tangent:
      put(tout_ref, wv.rr(q), wv.row(txk, q).astype(sd))
  put(prev_ref, Ellipsis, wv.row(xk, bh))
  if cx.tangent:
    put(tprev_ref, Ellipsis, wv.row(txk, bh))


def _tangent_blend(g, win, tx, m, x, tg, z):
  if g is None:
    return win
  one = jnp.ones((), g.dtype)
  a = _opaque(g * win, z)
  b = _opaque((one - g) * tx, z)
  c = _opaque((m - x) * tg, z)
  return (a + b) + c


def _bwd_kernel(cx, *refs):
  """Backward of one band, rows in reverse scan order."""
  present_ref = refs[1]
  it = iter(refs[2:])
  lc_ref = None if cx.uniform else next(it)
  x_ref = next(it)
  g_ref = next(it) if cx.guided else None
  ct_ref = next(it)
  win_ref = next(it) if cx.k > 1 else None
  pool_ref, bnd_ref = next(it), next(it)
  dx_ref = next(it)
  dg_ref = next(it) if cx.guided else None
  pend_ref, sh_ref = next(it), next(it)
  sk = list(it)  # skewed buffers of the wavefront (if any)
  w, cb, bh, h, nb, cd, sd = cx.w, cx.cb, cx.bh, cx.h, cx.nb, cx.cd, cx.sd
  c_i, s_i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  z = _hidden_zero()
  member = s_i if cx.r == 1 else lax.div(s_i.astype(jnp.int32), jnp.int32(cx.r))
  nd = len(cx.geos)
  zero, one = jnp.zeros((), cd), jnp.ones((), cd)
  guided = cx.guided

  def fl(v):  # a 0/1 float XLA must not see as one
    return _opaque(v.astype(cd), z)

  def load_ct(rr):
    ctv = ct_ref[rr]
    if win_ref is not None:
      ctv = jnp.where(win_ref[rr] == member, ctv, jnp.zeros((), sd))
    return ctv.astype(cd)

  def grads(xv, sv, G, ins, os_):
    """m, dx, dguide and the two pushes of pixels with cotangent G."""
    m, self_, tk1, tk2 = _winner(xv, ins[0], os_[0], ins[1], os_[1])
    if guided:
      selff = fl(self_)
      k1 = fl(ins[0] & (os_[0] >= m))
      k2 = fl(ins[1] & (os_[1] >= m))
      t1 = (one - selff) * k1
      t2 = ((one - selff) * (one - t1)) * k2
      a, bb = sv * selff, one - sv
      dx = (a + bb) * G
      dg = (m - xv) * G
      pushes = [_opaque((sv * tt) * G, z) for tt in (t1, t2)]
    else:
      dx = jnp.where(self_, G, zero)
      dg = None
      pushes = [jnp.where(tk, G, zero) for tk in (tk1, tk2)]
    return dx, dg, pushes

  for ci, geo in enumerate(cx.geos):

    @pl.when(present_ref[(c_i * cx.s + s_i) * nd + ci] == 1)
    def _body(ci=ci, geo=geo):
      mask = None if cx.uniform else (lc_ref[...] == ci)
      band = t if geo.up else (nb - 1 - t)
      rs = -1 if geo.up else 1

      put = _put_under(mask)

      if not geo.row_type:
        _bwd_wave(
          cx,
          geo,
          band,
          put,
          x_ref,
          g_ref,
          load_ct,
          pool_ref,
          bnd_ref,
          dx_ref,
          dg_ref,
          pend_ref,
          sk,
          grads,
        )
        return

      def row_step(r, pend):
        rr = r if geo.up else (bh - 1 - r)
        i = band * bh + rr
        has_next = (i + rs >= 0) & (i + rs < h)
        has_prev = (i - rs >= 0) & (i - rs < h)
        pr = rr - rs
        inband = (pr >= 0) & (pr < bh)
        pv = jnp.where(
          inband, pool_ref[jnp.clip(pr, 0, bh - 1)], bnd_ref[0]
        ).astype(cd)
        xv = _flush(x_ref[rr].astype(cd))
        sv = _load_guide(g_ref, rr, cx.gh, w, cb, cd) if guided else None
        order = (1, 0) if geo.n2_first else (0, 1)
        G = load_ct(rr)
        for n in order:
          G = jnp.where(has_next & _colmask(w, cb, -geo.dc[n]), G + pend[n], G)
        os_ = [_shifted(sh_ref, pv, d, w) for d in geo.dc]
        ins = [has_prev & _colmask(w, cb, d) for d in geo.dc]
        dx, dg, pushes = grads(xv, sv, G, ins, os_)
        put(dx_ref, rr, dx.astype(sd))
        if guided:
          put(dg_ref, rr, dg.astype(sd))
        return tuple(_shifted(sh_ref, pushes[n], -geo.dc[n], w) for n in (0, 1))

      init = (pend_ref[0], pend_ref[1])
      fin = lax.fori_loop(0, bh, row_step, init)
      put(pend_ref, 0, fin[0])
      put(pend_ref, 1, fin[1])


def _bwd_wave(
  cx,
  geo,
  band,
  put,
  x_ref,
  g_ref,
  load_ct,
  pool_ref,
  bnd_ref,
  dx_ref,
  dg_ref,
  pend_ref,
  sk,
  grads,
):
  """Backward of one band as the forward's wavefront run backwards: phases
  in reverse, each pixel's G = (ct + push from the next row) + push from
  the next pixel of its row (the contract's order), the latter carried in
  registers, the former through a skewed buffer (its row bh holds the
  pushes of the band after this one)."""
  w, cb, bh, h, cd, sd = cx.w, cx.cb, cx.bh, cx.h, cx.cd, cx.sd
  wv = _Wave(geo, w, bh)
  a, e, cs = wv.a, wv.e, geo.cs
  rs = -1 if geo.up else 1
  it = iter(sk)
  xk = next(it)  # x, overwritten by dx phase by phase
  ck = next(it)  # the cotangent routed to this member
  ok = next(it)  # the member's pool; row 0: the row before
  pk = next(it)  # pushes to the row above, at their targets
  gk = next(it) if cx.guided else None  # the guide, then dguide
  for q in range(1, bh + 1):
    rr = wv.rr(q)
    wv.set_row(xk, q, _flush(x_ref[rr].astype(cd)))
    wv.set_row(ck, q, load_ct(rr))
    wv.set_row(ok, q, pool_ref[rr].astype(cd))
    if gk is not None:
      wv.set_row(gk, q, _load_guide(g_ref, rr, cx.gh, w, cb, cd))
  wv.set_row(ok, 0, bnd_ref[0].astype(cd))
  wv.set_row(pk, bh, pend_ref[0])
  qv, iv = wv.rows_image(band, cb)
  has_next = (iv + rs >= 0) & (iv + rs < h)
  has_prev = (iv - rs >= 0) & (iv - rs < h)

  def step(n, push_s):
    d = wv.d1 - n
    c = wv.col(d)
    kv = d - a * qv
    in_s = kv > 0
    in_u = has_prev & (kv + e >= 0) & (kv + e < w)
    below = has_next & (kv - e >= 0) & (kv - e < w)
    xj = wv.ld(xk, 1, c)
    base = wv.ld(ck, 1, c)
    G = jnp.where(below, base + wv.ld(pk, 1, c), base)
    G = jnp.where(kv < w - 1, G + push_s, G)
    o_s, o_u = wv.ld(ok, 1, c - cs), wv.ld(ok, 0, c - cs)
    if geo.same == 0:
      ins, os_ = (in_s, in_u), (o_s, o_u)
    else:
      ins, os_ = (in_u, in_s), (o_u, o_s)
    sj = None if gk is None else wv.ld(gk, 1, c)
    dx, dg, pushes = grads(xj, sj, G, ins, os_)
    wv.st(xk, 1, c, dx)
    if gk is not None:
      wv.st(gk, 1, c, dg)
    wv.st(pk, 0, c - cs, pushes[1 - geo.same])
    return pushes[geo.same]

  lax.fori_loop(0, wv.d1 - wv.d0 + 1, step, jnp.zeros((bh, cb), cd))
  for q in range(1, bh + 1):
    put(dx_ref, wv.rr(q), wv.row(xk, q).astype(sd))
    if gk is not None:
      put(dg_ref, wv.rr(q), wv.row(gk, q).astype(sd))
  put(pend_ref, 0, wv.row(pk, 0))


# --------------------------------------------------------------------------
# The wrappers.


def _fold(shape):
  return int(np.prod(shape[:-3], dtype=np.int64))


def _guide4(g, xshape, b):
  """g (x's rank or fewer dims, each x's or 1) as (gb, gh, gw, gc)."""
  g = jnp.asarray(g)
  g = g.reshape((1,) * (len(xshape) - g.ndim) + g.shape)
  lead, xl = g.shape[:-3], tuple(xshape[:-3])
  if all(v == 1 for v in lead):
    gb = 1
  else:
    if tuple(lead) != xl:
      g = jnp.broadcast_to(g, xl + g.shape[-3:])
    gb = b
  return g.reshape((gb,) + g.shape[-3:])


class _Pass:
  """Static description of one pallas_call."""

  def __init__(self, kind, x4shape, dtype, groups, gshape4, has_tg, band_rows):
    self.kind = kind
    self.b, self.h, self.w, self.c = x4shape
    self.sd = jnp.dtype(dtype)
    self.cd = _R.compute_dtype(dtype)
    self.lay = _layout(groups, self.c)
    self.gshape = gshape4
    self.bs = block_sizes(
      x4shape, dtype, groups, gshape4, pass_=kind, band_rows=band_rows
    )
    self.geos = tuple(_geo(d) for d in self.lay.codes)
    self.has_tg = has_tg

  def ctx(self):
    lay, bs = self.lay, self.bs
    gh = 1 if self.gshape is None else self.gshape[1]
    return _Ctx(
      w=self.w,
      h=self.h,
      cb=lay.cb,
      bh=bs.band_rows,
      nb=bs.n_bands,
      cd=self.cd,
      sd=self.sd,
      s=lay.s,
      r=lay.r,
      k=lay.k,
      uniform=lay.uniform,
      guided=self.gshape is not None,
      gh=gh,
      geos=self.geos,
      tangent=self.kind == "tangent",
      has_tg=self.has_tg,
    )

  def band(self, c, s, t, up_ref):
    nb, flip = self.bs.n_bands, int(self.kind != "backward")
    up = up_ref[c * self.lay.s + s]
    return jnp.where(up == flip, nb - 1 - t, t)

  def x_spec(self):
    bh, cb = self.bs.band_rows, self.lay.cb
    return pl.BlockSpec(
      (None, bh, self.w, cb),
      lambda b, c, s, t, up, pr: (b, self.band(c, s, t, up), 0, c),
    )

  def g_spec(self):
    gb, gh, gw, gc = self.gshape
    bh, cb = self.bs.band_rows, self.lay.cb

    def index(b, c, s, t, up, pr):
      return (
        b if gb > 1 else 0,
        self.band(c, s, t, up) if gh > 1 else 0,
        0,
        c if gc > 1 else 0,
      )

    return pl.BlockSpec(
      (None, bh if gh > 1 else 1, gw, cb if gc > 1 else 1), index
    )

  def slot_spec(self):
    bh, cb = self.bs.band_rows, self.lay.cb
    return pl.BlockSpec(
      (None, None, bh, self.w, cb),
      lambda b, c, s, t, up, pr: (s, b, self.band(c, s, t, up), 0, c),
    )

  def bnd_spec(self):
    bh, cb, h = self.bs.band_rows, self.lay.cb, self.h

    def index(b, c, s, t, up, pr):
      band = self.band(c, s, t, up)
      fwd_up = up[c * self.lay.s + s] == 1
      row = jnp.where(
        fwd_up,
        jnp.minimum((band + 1) * bh, h - 1),
        jnp.maximum(band * bh - 1, 0),
      )
      return (s, b, row, 0, c)

    return pl.BlockSpec((None, None, 1, self.w, cb), index)

  def lc_spec(self):
    return pl.BlockSpec(
      (None, 1, self.lay.cb), lambda b, c, s, t, up, pr: (s, 0, c)
    )

  def scratch(self):
    w, cb, cd = self.w, self.lay.cb, self.cd
    v = lambda *shape: pltpu.VMEM(shape, cd)  # noqa: E731
    if self.kind == "backward":
      out = [v(2, w, cb), v(w + 2, cb)]
    else:
      out = [v(w, cb)] * (2 if self.kind == "tangent" else 1)
      out = [v(w, cb) for _ in out] + [v(w + 2, cb)]
    n, rows = _skew_buffers(
      self.lay.codes, self.kind, self.gshape is not None, w, self.bs.band_rows
    )
    return out + [v(rows, cb) for _ in range(n)]

  def call(self, inputs, in_specs, n_out, interpret):
    lay, bs = self.lay, self.bs
    shape5 = (lay.s, self.b, self.h, self.w, self.c)
    pre = [jnp.asarray(lay.up), jnp.asarray(lay.present)]
    if not lay.uniform:
      inputs = [jnp.asarray(lay.lane_code[:, None, :])] + list(inputs)
      in_specs = [self.lc_spec()] + list(in_specs)
    kernel = functools.partial(
      _bwd_kernel if self.kind == "backward" else _fwd_kernel, self.ctx()
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(self.b, lay.nc, lay.s, bs.n_bands),
      in_specs=in_specs,
      out_specs=[self.slot_spec() for _ in range(n_out)],
      scratch_shapes=self.scratch(),
    )
    limit = int(min(max(2 * bs.vmem_bytes, 16 * 2**20), 100 * 2**20))
    # Inside shard_map the arrays and results vary over the same manual axes
    # (a cast, no data moved); the scalar tables stay as the grid indices.
    operands = pre + [_jax_compat.vary(a, *inputs) for a in inputs]
    out = _jax_compat.shape_dtype_like(shape5, self.sd, operands[-1])
    return pl.pallas_call(
      kernel,
      out_shape=[out] * n_out,
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=limit,
      ),
      interpret=interpret,
      name=f"landmark_pool_{self.kind}",
    )(*operands)


def _members(v5, lay):
  """Slots (S, B, H, W, C) -> each member's pool (B, H, W, C)."""
  if lay.r == 1:
    return [v5[k] for k in range(lay.k)]
  return [
    jnp.where(jnp.asarray(lay.lane_up[k]), v5[2 * k + 1], v5[2 * k])
    for k in range(lay.k)
  ]


def _valid(lay):
  return [jnp.asarray(lay.valid[k]) for k in range(lay.k)]


def _prepare(x, g, groups):
  x = jnp.asarray(x)
  groups = _R._groups(groups)
  h, w, c = x.shape[-3:]
  if c % len(groups):
    raise ValueError(
      f"x has {c} channels, which do not split into {len(groups)} groups"
    )
  b = _fold(x.shape)
  x4 = x.reshape(b, h, w, c)
  g4 = (
    None if g is None else _guide4(jnp.asarray(g).astype(x.dtype), x.shape, b)
  )
  return x, groups, x4, g4


def _forward_pools(x4, g4, groups, interpret, band_rows):
  ps = _Pass(
    "forward",
    x4.shape,
    x4.dtype,
    groups,
    None if g4 is None else g4.shape,
    False,
    band_rows,
  )
  ins, specs = [x4], [ps.x_spec()]
  if g4 is not None:
    ins.append(g4)
    specs.append(ps.g_spec())
  (out5,) = ps.call(ins, specs, 1, interpret)
  return out5, ps.lay


def _merged(out5, lay):
  """The grouped pool's output from the member pools (S, B, H, W, C)."""
  pools = _members(out5, lay)
  return pools[0] if lay.k == 1 else _R.merge_members(pools, _valid(lay))[0]


def grouped_forward(x, g, groups, *, interpret=False, band_rows=None):
  """The grouped pool (reference.grouped_forward) by the Pallas kernel."""
  x = jnp.asarray(x)
  if x.size == 0:
    return x
  x, groups, x4, g4 = _prepare(x, g, groups)
  out5, lay = _forward_pools(x4, g4, groups, interpret, band_rows)
  return _merged(out5, lay).reshape(x.shape)


def grouped_tangent(x, g, tx, tg, groups, *, interpret=False, band_rows=None):
  """The tangent of grouped_forward (reference.grouped_tangent)."""
  x = jnp.asarray(x)
  if x.size == 0:
    return jnp.zeros_like(x)
  x, groups, x4, g4 = _prepare(x, g, groups)
  tx4 = jnp.broadcast_to(jnp.asarray(tx).astype(x.dtype), x.shape).reshape(
    x4.shape
  )
  tg4 = None
  if g4 is not None and tg is not None:
    tg4 = _guide4(jnp.asarray(tg).astype(x.dtype), x.shape, x4.shape[0])
    tg4 = jnp.broadcast_to(tg4, g4.shape)
  ps = _Pass(
    "tangent",
    x4.shape,
    x4.dtype,
    groups,
    None if g4 is None else g4.shape,
    tg4 is not None,
    band_rows,
  )
  ins, specs = [x4], [ps.x_spec()]
  if g4 is not None:
    ins.append(g4)
    specs.append(ps.g_spec())
  ins.append(tx4)
  specs.append(ps.x_spec())
  if tg4 is not None:
    ins.append(tg4)
    specs.append(ps.g_spec())
  out5, t5 = ps.call(ins, specs, 2, interpret)
  lay = ps.lay
  tm = _members(t5, lay)
  if lay.k == 1:
    return tm[0].reshape(x.shape)
  _, win = _R.merge_members(_members(out5, lay), _valid(lay))
  return _R.pick_member(tm, win).reshape(x.shape)


def grouped_backward(x, g, ct, groups, *, interpret=False, band_rows=None):
  """The VJP of grouped_forward (reference.grouped_backward): (dx, dg)."""
  return forward_backward(
    x, g, ct, groups, interpret=interpret, band_rows=band_rows
  )[1:]


def forward_backward(x, g, ct, groups, *, interpret=False, band_rows=None):
  """(grouped_forward(...), *grouped_backward(...)) from one forward pass."""
  x = jnp.asarray(x)
  if x.size == 0:
    return x, jnp.zeros_like(x), (None if g is None else jnp.zeros_like(g))
  x, groups, x4, g4 = _prepare(x, g, groups)
  out5, lay = _forward_pools(x4, g4, groups, interpret, band_rows)
  out = _merged(out5, lay).reshape(x.shape)
  ct4 = jnp.broadcast_to(jnp.asarray(ct).astype(x.dtype), x.shape).reshape(
    x4.shape
  )
  ps = _Pass(
    "backward",
    x4.shape,
    x4.dtype,
    groups,
    None if g4 is None else g4.shape,
    False,
    band_rows,
  )
  ins, specs = [x4], [ps.x_spec()]
  if g4 is not None:
    ins.append(g4)
    specs.append(ps.g_spec())
  ins.append(ct4)
  specs.append(ps.x_spec())
  if lay.k > 1:
    _, win = _R.merge_members(_members(out5, lay), _valid(lay))
    ins.append(win.astype(jnp.int32))
    specs.append(ps.x_spec())
  ins += [out5, out5]
  specs += [ps.slot_spec(), ps.bnd_spec()]
  res = ps.call(ins, specs, 2 if g4 is not None else 1, interpret)

  def per_member_sum(v5):
    vals = _members(v5, lay)
    acc = vals[0]
    for k in range(1, lay.k):
      acc = jnp.where(jnp.asarray(lay.valid[k]), acc + vals[k], acc)
    return acc.reshape(x.shape)

  dx = per_member_sum(res[0])
  if g is None:
    return out, dx, None
  dg = per_member_sum(res[1])
  gshape = tuple(jnp.shape(g))
  xs = tuple(x.shape)
  gfull = (1,) * (len(xs) - len(gshape)) + gshape
  axes = tuple(
    i for i, (a, bdim) in enumerate(zip(gfull, xs)) if a == 1 and bdim != 1
  )
  if axes:
    cd = _R.compute_dtype(x.dtype)
    dg = jnp.sum(dg.astype(cd), axis=axes, keepdims=True).astype(x.dtype)
  return out, dx, dg.reshape(gshape)
