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
    t = np.zeros_like(self_) if q is None else (~taken & (out[:, q[0], q[1]] >= m))
    taken |= t
    takes.append((q, t))
  return m, self_, takes


def forward(x, d, g=None):
  """x: (B, H, W, C) float64 numpy; g: None or the same shape."""
  out = np.zeros_like(x)
  for i, j in _order(d, *x.shape[1:3]):
    m, _, _ = _select(x, out, i, j, d)
    out[:, i, j] = m if g is None else g[:, i, j] * m + (1 - g[:, i, j]) * x[:, i, j]
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
