"""Sequential depth of the pure-jnp reference (issue 12), pinned on its jaxprs.

Depth = the sum of scan lengths in the jaxpr, nested scans multiplied. One
pass (forward, backward, tangent) of any grouping takes at most H + W - 1
steps: all groups advance in the same steps. grouped_backward recomputes
the forward, so it is two passes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmconv_jax import reference as R
from lmconv_jax.directions import DIRECTIONS, GROUPINGS, resolve_grouping

import fuzz

H, W = 48, 40


def _subjaxprs(params):
  for v in params.values():
    for item in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def depth(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    inner = sum(depth(j) for j in _subjaxprs(eqn.params))
    if eqn.primitive.name == "scan":
      total += eqn.params["length"] * max(1, inner)
    elif eqn.primitive.name == "while":
      raise AssertionError("an unbounded loop in the reference")
    else:
      total += inner
  return total


def _depths(groups, h=H, w=W):
  x = jnp.zeros((1, h, w, len(groups)), jnp.float32)
  g = jnp.zeros((1, 1, 1, len(groups)), jnp.float32)
  fwd = depth(
    jax.make_jaxpr(lambda x, g: R.grouped_forward(x, g, groups))(x, g).jaxpr
  )
  bwd = depth(
    jax.make_jaxpr(lambda x, g, ct: R.grouped_backward(x, g, ct, groups))(
      x, g, x
    ).jaxpr
  )
  tan = depth(
    jax.make_jaxpr(lambda x, g, t, tg: R.grouped_tangent(x, g, t, tg, groups))(
      x, g, x, g
    ).jaxpr
  )
  return fwd, bwd, tan


def _kind_steps(d, h=H, w=W):
  v1 = (d.n1[0] * d.row_step, d.n1[1] * d.col_step)
  v2 = (d.n2[0] * d.row_step, d.n2[1] * d.col_step)
  if v1[1] == v2[1] == -1:
    return w  # depends on the previous column
  if v1[0] == v2[0] == -1:
    return h  # depends on the previous row
  if (-1, 1) in (v1, v2):
    return 2 * (h - 1) + w  # skew-2 wavefront (no table direction)
  return h + w - 1  # quadrant wavefront


def test_every_valid_direction_one_pass_each():
  """All 48 valid directions at once: each pass is the longest member's."""
  groups = tuple((d,) for d in fuzz.VALID_DIRECTIONS)
  fwd, bwd, tan = _depths(groups)
  longest = max(_kind_steps(d) for d in fuzz.VALID_DIRECTIONS)
  assert longest == 2 * (H - 1) + W
  assert (fwd, bwd, tan) == (longest, 2 * longest, longest)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_table_direction_depth(name):
  d = DIRECTIONS[name]
  steps = _kind_steps(d)
  assert steps <= H + W - 1
  assert steps == (
    H + W - 1 if d.is_quadrant else (W if d.n1[1] == d.n2[1] else H)
  )
  assert _depths(((d,),)) == (steps, 2 * steps, steps)


@pytest.mark.parametrize("name", list(GROUPINGS))
def test_grouping_depth_is_one_pass(name):
  groups = resolve_grouping(name)
  want = max(_kind_steps(d) for g in groups for d in g)
  assert want <= H + W - 1
  assert _depths(groups) == (want, 2 * want, want)
  if name == "octants":  # row and column octants share the steps
    assert want == max(H, W)


def test_merged_mixed_kinds_share_steps_non_square():
  groups = fuzz.ALL_GROUPS[48:]  # merged groups mixing quadrants, octants
  for h, w in ((H, W), (W, H), (3, 17)):
    want = h + w - 1
    assert _depths(groups, h, w) == (want, 2 * want, want)
