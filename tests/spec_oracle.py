"""An independent oracle: docs/semantics.md transcribed line by line in numpy.

Loops over pixels in scan order (vectorised over batch and channel only), so
it is slow and only for small inputs; it shares no code with the package.
"""

import numpy as np


def _order(d, h, w):
  rows = range(h) if d.row_step > 0 else range(h - 1, -1, -1)
  cols = range(w) if d.col_step > 0 else range(w - 1, -1, -1)
  return [(i, j) for i in rows for j in cols]


def _neighbour(out, i, j, off):
  h, w = out.shape[1:3]
  ii, jj = i + off[0], j + off[1]
  if 0 <= ii < h and 0 <= jj < w:
    return (ii, jj)
  return None


def _select(x, out, i, j, d):
  """m and the winner masks (self, take1, take2) at pixel (i, j)."""
  xp = x[:, i, j]
  m = xp.copy()
  nan = np.isnan(xp)
  for off in (d.n1, d.n2):
    q = _neighbour(out, i, j, off)
    if q is not None:
      v = out[:, q[0], q[1]]
      nan |= np.isnan(v)
      m = np.where(v > m, v, m)
  m = np.where(nan, np.nan, m)
  self_ = xp >= m
  takes = []
  taken = self_.copy()
  for off in (d.n1, d.n2):
    q = _neighbour(out, i, j, off)
    t = (
      np.zeros_like(self_)
      if q is None
      else (~taken & (out[:, q[0], q[1]] >= m))
    )
    taken |= t
    takes.append((q, t))
  return m, self_, takes


def forward(x, d, g=None):
  """x: (B, H, W, C) float64 numpy; g: None or the same shape."""
  out = np.zeros_like(x)
  for i, j in _order(d, *x.shape[1:3]):
    m, _, _ = _select(x, out, i, j, d)
    out[:, i, j] = (
      m if g is None else g[:, i, j] * m + (1 - g[:, i, j]) * x[:, i, j]
    )
  return out


def backward(x, d, g, ct):
  """Returns (dx, dguide); g may be None (then dguide is None)."""
  out = forward(x, d, g)
  s_all = np.ones_like(x) if g is None else g
  G = ct.astype(np.float64).copy()
  dx = np.zeros_like(x)
  dg = np.zeros_like(x)
  for i, j in reversed(_order(d, *x.shape[1:3])):
    m, self_, takes = _select(x, out, i, j, d)
    s = s_all[:, i, j]
    gp = G[:, i, j]
    dx[:, i, j] = (s * self_ + (1 - s)) * gp
    dg[:, i, j] = (m - x[:, i, j]) * gp
    for q, t in takes:
      if q is not None:
        G[:, q[0], q[1]] += s * t * gp
  return dx, (None if g is None else dg)


# --------------------------------------------------------------------------
# The full contract, bit for bit: every dtype (float16/bfloat16 computed in
# float32, outputs stored before a neighbour reads them), the flush rule of
# docs/semantics.md (x and guide subnormals read as signed zeros), grouped
# and merged pools, broadcast guides, the tangent. Arrays are numpy arrays
# in their storage dtype (ml_dtypes.bfloat16 for bfloat16), shape (B,H,W,C).

import ml_dtypes

_HALVES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

# The contract computes with inf and NaN on purpose (inf - inf, 0 * inf, a
# NaN cotangent summed in): numpy's "invalid value" warnings about that are
# noise, so the literal arithmetic below runs under this errstate, and only it.
_contract_arithmetic = np.errstate(invalid="ignore")


def compute_dtype(dtype):
  dtype = np.dtype(dtype)
  return np.dtype(np.float32) if dtype in _HALVES else dtype


def flush(v):
  """Subnormals of v's dtype (float32/float64) read as zeros of their sign."""
  tiny = np.finfo(v.dtype).tiny
  return np.where(np.abs(v) < tiny, np.copysign(np.zeros_like(v), v), v)


@_contract_arithmetic
def _literal(d, x, g, tx=None, tg=None):
  """One pool, forward (and tangent): returns (out stored, t stored or None,
  per-pixel records for the backward). x, g, tx, tg in the storage dtype;
  g None means g = 1 (no multiply)."""
  sd = x.dtype
  cd = compute_dtype(sd)
  xl = flush(x.astype(cd))
  gl = None if g is None else flush(g.astype(cd))
  outc = np.zeros(x.shape, cd)  # outputs as stored, read as cd
  t = np.zeros(x.shape, cd)
  recs = {}
  one = cd.type(1)
  for i, j in _order(d, *x.shape[1:3]):
    m, self_, takes = _select(xl, outc, i, j, d)
    if gl is None:
      o = m
    else:
      s = gl[:, i, j]
      o = s * m + (one - s) * xl[:, i, j]
    outc[:, i, j] = o.astype(sd).astype(cd)
    recs[(i, j)] = (m, self_, takes)
    if tx is not None:
      (q1, t1), (q2, t2) = takes
      win = np.zeros(m.shape, cd)
      if q2 is not None:
        win = np.where(t2, t[:, q2[0], q2[1]], win)
      if q1 is not None:
        win = np.where(t1, t[:, q1[0], q1[1]], win)
      txp = tx[:, i, j].astype(cd)
      win = np.where(self_, txp, win)
      if gl is None:
        t[:, i, j] = win
      else:
        s = gl[:, i, j]
        t[:, i, j] = (
          s * win + (one - s) * txp + (m - xl[:, i, j]) * tg[:, i, j].astype(cd)
        )
  tout = None if tx is None else t.astype(sd)
  return outc.astype(sd), tout, recs, xl, gl


@_contract_arithmetic
def _literal_backward(d, x, g, ct):
  """One pool's (dx, dguide) by the contract's formulas, in its order."""
  sd = x.dtype
  cd = compute_dtype(sd)
  _, _, recs, xl, gl = _literal(d, x, g)
  G = ct.astype(cd).copy()
  dx = np.zeros(x.shape, sd)
  dg = np.zeros(x.shape, sd)
  one = cd.type(1)
  for i, j in reversed(_order(d, *x.shape[1:3])):
    m, self_, takes = recs[(i, j)]
    gp = G[:, i, j].copy()
    if gl is None:  # g = 1: the whole G to the one winner
      dx[:, i, j] = np.where(self_, gp, cd.type(0)).astype(sd)
      for q, tk in takes:
        if q is not None:
          G[:, q[0], q[1]] += np.where(tk, gp, cd.type(0))
      continue
    s = gl[:, i, j]
    selff = self_.astype(cd)
    (q1, k1), (q2, k2) = takes
    take1 = (one - selff) * k1.astype(cd)
    take2 = (one - selff) * (one - take1) * k2.astype(cd)
    dx[:, i, j] = ((s * selff + (one - s)) * gp).astype(sd)
    dg[:, i, j] = ((m - xl[:, i, j]) * gp).astype(sd)
    if q1 is not None:
      G[:, q1[0], q1[1]] += s * take1 * gp
    if q2 is not None:
      G[:, q2[0], q2[1]] += s * take2 * gp
  return dx, (None if g is None else dg)


def _blocks(x, groups):
  p = len(groups)
  cg = x.shape[-1] // p
  return [slice(k * cg, (k + 1) * cg) for k in range(p)]


def _winners(outs):
  """The first-listed-wins merge of member outputs: (merged, winner index)."""
  out = outs[0]
  win = np.zeros(out.shape, np.int64)
  for k, v in enumerate(outs[1:], start=1):
    a, b = out.astype(np.float64), v.astype(np.float64)
    c = (b > a) | np.isnan(b)
    out = np.where(c, v, out)
    win = np.where(c, k, win)
  return out, win


def _full_guide(g, x):
  return None if g is None else np.broadcast_to(g, x.shape).astype(x.dtype)


def grouped_forward(x, g, groups):
  """groups: tuple of tuples of Directions; g None or broadcastable to x."""
  gf = _full_guide(g, x)
  out = np.zeros(x.shape, x.dtype)
  for members, blk in zip(groups, _blocks(x, groups)):
    gk = None if gf is None else gf[..., blk]
    outs = [_literal(d, x[..., blk], gk)[0] for d in members]
    out[..., blk] = _winners(outs)[0]
  return out


def grouped_tangent(x, g, tx, tg, groups):
  gf = _full_guide(g, x)
  tgf = (
    None
    if g is None
    else (
      np.zeros(x.shape, x.dtype)
      if tg is None
      else np.broadcast_to(tg, x.shape).astype(x.dtype)
    )
  )
  tout = np.zeros(x.shape, x.dtype)
  for members, blk in zip(groups, _blocks(x, groups)):
    gk = None if gf is None else gf[..., blk]
    tgk = None if tgf is None else tgf[..., blk]
    res = [_literal(d, x[..., blk], gk, tx[..., blk], tgk) for d in members]
    _, win = _winners([r[0] for r in res])
    t = res[0][1]
    for k, r in enumerate(res[1:], start=1):
      t = np.where(win == k, r[1], t)
    tout[..., blk] = t
  return tout


@_contract_arithmetic
def grouped_backward(x, g, ct, groups):
  """(dx, dg): members get the cotangent where they won; their dx (dguide)
  are summed in member order in the storage dtype; a broadcast guide's
  gradient is summed over its broadcast dims (float32 for halves)."""
  sd = x.dtype
  gf = _full_guide(g, x)
  dx = np.zeros(x.shape, sd)
  dg = np.zeros(x.shape, sd)
  for members, blk in zip(groups, _blocks(x, groups)):
    gk = None if gf is None else gf[..., blk]
    xk = x[..., blk]
    outs = [_literal(d, xk, gk)[0] for d in members]
    _, win = _winners(outs)
    ctk = ct[..., blk].astype(sd)
    for k, d in enumerate(members):
      ctm = ctk if len(members) == 1 else np.where(win == k, ctk, sd.type(0))
      dxk, dgk = _literal_backward(d, xk, gk, ctm)
      dx[..., blk] = dxk if k == 0 else dx[..., blk] + dxk
      if g is not None:
        dg[..., blk] = dgk if k == 0 else dg[..., blk] + dgk
  if g is None:
    return dx, None
  axes = tuple(
    i for i, (a, b) in enumerate(zip(np.shape(g), x.shape)) if a == 1 and b != 1
  )
  if axes:
    dg = dg.astype(compute_dtype(sd)).sum(axis=axes, keepdims=True).astype(sd)
  return dx, dg.reshape(np.shape(g))


def assert_same_bits(got, want, err_msg=""):
  """Equal dtype, shape, NaN positions, and bits (sign of zero included)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype, (got.dtype, want.dtype, err_msg)
  assert got.shape == want.shape, (got.shape, want.shape, err_msg)
  gn, wn = np.isnan(got.astype(np.float64)), np.isnan(want.astype(np.float64))
  np.testing.assert_array_equal(gn, wn, err_msg=f"NaN positions {err_msg}")
  u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[
    got.dtype.itemsize
  ]
  gb, wb = got.view(u)[~gn], want.view(u)[~wn]
  if not np.array_equal(gb, wb):
    bad = np.flatnonzero(gb != wb)[:5]
    raise AssertionError(
      f"{len(np.flatnonzero(gb != wb))} values differ {err_msg}: got "
      f"{got[~gn][bad]} want {want[~wn][bad]}"
    )
