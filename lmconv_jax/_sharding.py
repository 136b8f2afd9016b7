"""How the grouped pool's custom calls are partitioned across devices.

Rationale. Every output pixel depends on a whole quadrant (or octant) of
its image, so H and W must be whole on a device; images (the dims in front
of (H, W, C)) are independent, so they can be split freely. Channels are
independent within a group, but a call pools the whole grouping (group p is
channels [p*C/P, (p+1)*C/P) in its own direction), so a device may hold a
channel slice only when the grouping is a single group (P = 1: a single
direction or one merged group); for P > 1 channels are gathered first,
except on Explicit mesh axes where each shard holds whole groups (below).

Two mechanisms, one rule:

* Under a multi-device ``jit`` (XLA's SPMD partitioner, Shardy) the call is
  wrapped in ``custom_partitioning`` whose rule keeps the leading dims (and,
  for P = 1, channels) sharded and replicates the rest; each device runs
  the plain custom call (``jax.ffi.ffi_call``) on its shard.
* Where Python callbacks cannot run (a module from ``jax.export``) the call
  is marked batch partitionable (``num_batch_dims`` plus a Shardy rule), so
  the module still partitions over leading dims without Python.

On one device, under pmap, and inside shard_map (all axes manual) the call
is the plain custom call: it already runs on per-device data.

Explicit mesh axes, whole groups per shard (``grouped_pool_per_shard``).
With ``AxisType.Explicit`` axes the channel sharding is in x's type at trace
time. When channels are split n ways over Explicit axes (n > 1), H and W are
whole and n divides P, each shard holds P/n whole groups: shard s holds
groups [s*P/n, (s+1)*P/n) and needs no other channel. The pool then runs
inside ``jax.shard_map`` (specs from x's type; the guide's from x's, with its
size-1 dims replicated), each shard pooling its own sub-grouping, picked by
``lax.switch`` on the shard's index (no switch where all sub-groupings are
equal). Differentiation goes through shard_map and the switch to the same
primitives, so forward, tangent and backward are communication-free. A
``lax.switch`` cannot go inside custom_partitioning's per-device function
(XLA lowers the sharding annotations of its branches to a custom call with
no host implementation), hence this hook in front of the primitive rather
than in the partitioning rule. Otherwise (Auto axes, n not dividing P, H or
W sharded, inside shard_map, a vmap over a split dim, whose batching would
gather that dim) the call takes the path above and the channels are
gathered.

The reference under Explicit mesh axes (``reference_per_shard``). Where the
primitives lower to the reference (implementation="reference", or "auto"
without kernels) on operands whose types are split over Explicit axes, the
reference's jnp cannot trace as is: its layout reshapes (the leading dims
merged, the channels split into groups) have no sharding rule there. It runs
inside ``jax.shard_map`` on the layout the custom calls get from the rule
above (leading dims split as x's, channels too for P = 1, H, W and the
channels of P > 1 groups gathered; for the backward, x's dims that a guide
broadcasts over as well, so the guide's gradient is summed on one device).
Each device runs the unsharded reference's ops on its block, so the result
is the unsharded one bit for bit. Without Explicit sharding nothing changes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from lmconv_jax import _jax_compat, reference


def _factor_name(k: int) -> str:
  """Shardy's factor names: i, j, ..., z, then z_1, z_2, ..."""
  letters = "ijklmnopqrstuvwxyz"
  return letters[k] if k < len(letters) else f"z_{k - len(letters) + 1}"


def _operand_factors(avals, x_shape):
  """Factor names per operand: x's dims shared; a guide's size-1 dims and
  the members' K dim get their own factor. Returns (per-operand lists,
  {factor: size}, the extra factors)."""
  r = len(x_shape)
  names = [_factor_name(k) for k in range(r)]
  sizes = dict(zip(names, x_shape))
  extra = []
  lists = []
  for a in avals:
    shape = tuple(a.shape)
    if shape == tuple(x_shape):
      lists.append(list(names))
    elif len(shape) == r + 1:  # members (..., K, H, W, C)
      f = _factor_name(r + len(extra))
      extra.append(f)
      sizes[f] = shape[r - 3]
      lists.append(names[: r - 3] + [f] + names[r - 3 :])
    else:  # the guide: x's rank, each dim x's or 1
      dims = []
      for k, n in enumerate(shape):
        if n == x_shape[k]:
          dims.append(names[k])
        else:
          f = _factor_name(r + len(extra))
          extra.append(f)
          sizes[f] = n
          dims.append(f)
      lists.append(dims)
  return lists, sizes, extra


def batch_partitionable_attrs(ctx) -> dict:
  """Marks the call as partitionable over the dims in front of (H, W, C).

  XLA's batch partitioner (``jax.ffi.register_ffi_target_as_batch_partitionable``)
  reads ``num_batch_dims``; Shardy needs the same fact as a sharding rule:
  leading dims are free factors, h, w and c (and a guide's broadcast dims)
  must be replicated. Only where every operand has x's leading dims.
  """
  avals = list(ctx.avals_in) + list(ctx.avals_out)
  x_shape = tuple(avals[0].shape)
  if not all(isinstance(d, int) for a in avals for d in a.shape):
    return {}  # symbolic shapes (shape-polymorphic export): no rule
  nb = len(x_shape) - 3
  if any(tuple(a.shape[:nb]) != x_shape[:nb] for a in avals):
    return {}  # a guide broadcast over leading dims: replicate (correct)
  lists, sizes, extra = _operand_factors(avals, x_shape)
  n_in = len(ctx.avals_in)
  fmt = lambda dims: "[" + ", ".join(dims) + "]"
  ins = ", ".join(fmt(d) for d in lists[:n_in])
  outs = ", ".join(fmt(d) for d in lists[n_in:])
  names = [_factor_name(k) for k in range(len(x_shape))]
  replicated = names[nb:] + extra
  sz = ", ".join(f"{n}={s}" for n, s in sizes.items())
  rule = (
    f"#sdy.op_sharding_rule<({ins})->({outs}) {{{sz}}} "
    f"need_replication={{{', '.join(replicated)}}}>"
  )
  return {
    "mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": str(nb)}),
    "sdy.sharding_rule": mlir.ir.Attribute.parse(rule),
  }


def partitioned_by_jax(ctx) -> bool:
  """True where XLA's SPMD partitioner will split this call across devices.

  Not for export (a serialized module cannot call back into Python), not on
  one device, and not where every mesh axis is manual (shard_map) or the
  computation is replicated per device (pmap): there the plain call already
  runs on per-device data.
  """
  if _jax_compat.lowering_for_export(ctx):
    return False
  manual, mesh_axes, num_devices = _jax_compat.lowering_devices(ctx)
  if manual is not None:  # shard_map
    return set(manual) != set(mesh_axes)
  return num_devices > 1  # jit


def _sharding_like(mesh, spec, x_rank: int, shape, keep_channels: bool):
  """An operand's sharding from x's: leading dims as x, the rest replicated
  (channels kept when ``keep_channels``); size-1 dims replicated."""
  nb = x_rank - 3
  lead = list(spec[:nb])
  channels = spec[x_rank - 1] if keep_channels else None
  if len(shape) == x_rank + 1:  # members
    full = lead + [None, None, None, channels]
  else:
    full = lead + [None, None, channels]
  full = [s if n != 1 else None for s, n in zip(full, shape)]
  return NamedSharding(mesh, PartitionSpec(*full))


def broadcast_axes(x_spec, x_shape, g_shape) -> tuple:
  """The mesh axes that split x (``x_spec``, the layout it is pooled on)
  along a dim the guide broadcasts over (size 1 in ``g_shape``): the axes the
  guide's gradient must be summed over. In mesh-spec order, each once."""
  axes = []
  for s, n, m in zip(x_spec, x_shape, g_shape):
    if s is not None and m == 1 and n != 1:
      axes += [
        a
        for a in (s if isinstance(s, (tuple, list)) else (s,))
        if a not in axes
      ]
  return tuple(axes)


def sum_guide_gradient(dg, axes):
  """dg (one device's part of a broadcast guide's gradient) summed over the
  mesh ``axes`` (manual here): one all-reduce, in the compute dtype (float32
  for the half types, rounded once more), so every device gets the same
  bits. The caller runs it outside any conditional."""
  if not axes:
    return dg
  cd = reference.compute_dtype(dg.dtype)
  return jax.lax.psum(dg.astype(cd), axes).astype(dg.dtype)


def _explicit_context() -> bool:
  """Whether the mesh in context (jax.set_mesh) has Explicit axes."""
  types = getattr(jax.sharding.get_abstract_mesh(), "axis_types", None) or ()
  return jax.sharding.AxisType.Explicit in types


@functools.lru_cache(maxsize=None)
def _partitioned_call(
  ffi_call, prim, groups, guided: bool, in_shapes, out_shapes, extra: tuple
):
  """``ffi_call(prim, operands, groups, guided)`` (the plain custom call) per
  device, wrapped in custom_partitioning, for operands of ``in_shapes`` (x
  first) and results of ``out_shapes``.

  The guided backward's second result is the guide's gradient, summed by
  the kernel over the guide's broadcast dims on the device's own block:
  where x is split along one of those dims, each device holds a partial sum,
  so the per-device function adds them (``sum_guide_gradient``)."""
  single_group = len(groups) == 1
  # A result shaped like the guide (the backward's; pool_p's second result
  # is the members, rank + 1) is the guide's gradient.
  summed = guided and len(out_shapes) == 2 and out_shapes[1] == in_shapes[1]

  def per_device(*operands):
    return ffi_call(prim, operands, groups, guided, **dict(extra))

  call = custom_partitioning(per_device)
  x_shape = in_shapes[0]
  r = len(x_shape)

  def partition(mesh, arg_shapes, result_shape):
    # Shardy has already made the operands agree (the rule says so); the
    # result's sharding is the one it chose for the whole op.
    first = jax.tree.leaves(result_shape)[0]
    spec = getattr(first.sharding, "spec", None)
    spec = tuple(spec or ()) + (None,) * (r - len(spec or ()))
    shard = lambda shape: _sharding_like(mesh, spec, r, shape, single_group)
    results = jax.tree.map(lambda s: shard(s.shape), result_shape)
    args = tuple(shard(s.shape) for s in arg_shapes)
    axes = broadcast_axes(args[0].spec, x_shape, in_shapes[1]) if summed else ()
    if not axes:
      return mesh, per_device, results, args
    if _explicit_context():
      # Traced under Explicit axes, a psum here gets sharding annotations
      # that XLA rejects in this module; x's broadcast dims are gathered
      # instead, so each device sums the whole gradient itself. (Rare:
      # Explicit axes reach this path only under a vmap over a split dim.)
      spec = tuple(
        None if m == 1 and k != 1 else s
        for s, k, m in zip(spec, x_shape, in_shapes[1])
      )
      results = jax.tree.map(lambda s: shard(s.shape), result_shape)
      args = tuple(shard(s.shape) for s in arg_shapes)
      return mesh, per_device, results, args

    def per_device_summed(*operands):
      dx, dg = per_device(*operands)
      return dx, sum_guide_gradient(dg, axes)

    return mesh, per_device_summed, results, args

  names = [_factor_name(k) for k in range(r)]

  class _Shape:  # what _operand_factors reads
    def __init__(self, shape):
      self.shape = shape

  lists, _, own_factors = _operand_factors(
    [_Shape(s) for s in in_shapes + out_shapes], x_shape
  )
  n_in = len(in_shapes)
  rule = (
    ", ".join(" ".join(d) for d in lists[:n_in])
    + " -> "
    + ", ".join(" ".join(d) for d in lists[n_in:])
  )
  replicate = names[r - 3 : r - 1] + ([] if single_group else names[r - 1 :])
  call.def_partition(
    partition=partition,
    sharding_rule=rule,
    need_replication_factors=tuple(replicate + own_factors),
  )
  return call


def partitioned_lowering(
  ffi_call, prim, ctx, operands, groups, guided: bool, **extra
):
  """Lowers the custom call of ``prim`` under custom_partitioning."""
  in_shapes = tuple(tuple(a.shape) for a in ctx.avals_in)
  out_shapes = tuple(tuple(a.shape) for a in ctx.avals_out)
  call = _partitioned_call(
    ffi_call,
    prim,
    groups,
    guided,
    in_shapes,
    out_shapes,
    tuple(sorted(extra.items())),
  )
  return mlir.lower_fun(call, multiple_results=prim.multiple_results)(
    ctx, *operands
  )


# --------------------------------------------------------------------------
# Explicit mesh axes: whole groups per channel shard (module docstring).


def _typed_sharding(a):
  """(mesh, spec padded with None to a's rank, mesh axis types) of a's
  sharding type; (None, all None, ()) where its type carries none."""
  sharding = getattr(jax.typeof(a), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  spec = tuple(getattr(sharding, "spec", None) or ())
  spec += (None,) * (jnp.ndim(a) - len(spec))
  return mesh, spec, tuple(getattr(mesh, "axis_types", None) or ())


def _vmapped_over_a_sharded_dim(x) -> bool:
  """Whether a vmap (at any depth) maps x over a dim split across devices.

  x's type is then per example and shard_map's batching would gather that
  dim; the path above keeps it split (and gathers the channels instead)."""
  for dim, val in _jax_compat.vmap_levels(x):
    if isinstance(dim, int) and _typed_sharding(val)[1][dim] is not None:
      return True
  return False


# jax/jaxlib 0.11's CPU runtime crashes (a segfault, in the compiled
# program) on the per-shard path (lax.switch over our custom calls inside
# shard_map); there whole-group channel shards take the gathering path.
PER_SHARD = tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 12)


def _explicit_layout(x, g, groups):
  """(mesh, x's spec, the layout x is pooled on, channel axes, n) for the
  per-shard path under Explicit mesh axes, or None (then the primitive is
  bound for the whole array and custom_partitioning splits it).

  The layout is x's spec with H and W gathered, and the channels gathered
  where their n shards would hold part of a group (P > 1, n not dividing
  P). Taken where the channels are split n > 1 ways in whole groups (each
  shard pools its own groups), or where a guide broadcasts over a dim the
  layout splits (its gradient is then summed by shard_map's transpose of
  the guide's cast to varying: one all-reduce, outside the switch)."""
  if not PER_SHARD:
    return None
  mesh, spec, axis_types = _typed_sharding(x)
  explicit = jax.sharding.AxisType.Explicit
  if not axis_types or any(t != explicit for t in axis_types):
    return None  # Auto axes (the partitioner decides) or inside shard_map
  if _vmapped_over_a_sharded_dim(x) or (
    g is not None and _vmapped_over_a_sharded_dim(g)
  ):
    return None
  r, p = x.ndim, len(groups)
  layout = list(spec)
  layout[r - 3] = layout[r - 2] = None
  channels = spec[r - 1]
  axes = (
    ()
    if channels is None
    else tuple(channels)
    if isinstance(channels, (tuple, list))
    else (channels,)
  )
  n = math.prod(mesh.shape[a] for a in axes)
  if p > 1 and p % n:
    layout[r - 1], axes, n = None, (), 1
  whole_groups = p > 1 and n > 1
  summed = g is not None and broadcast_axes(layout, x.shape, jnp.shape(g))
  if not (whole_groups or summed):
    return None
  if not whole_groups:
    axes, n = (), 1  # one sub-grouping: no switch
  return mesh, spec, tuple(layout), axes, n


def grouped_pool_per_shard(pool, x, g, groups):
  """``pool(x, g, groups)`` run per shard under Explicit mesh axes
  (``_explicit_layout`` says where); None elsewhere (the caller then binds
  the primitive for the whole grouping).

  ``pool(x, g, sub_groups)`` binds the primitive; g is None or has x's rank
  with each dim x's or 1 (it stays at its own shape).
  """
  found = _explicit_layout(x, g, groups)
  if found is None:
    return None
  mesh, spec, layout, axes, n = found
  per = len(groups) // n
  subs = [tuple(groups[s * per : (s + 1) * per]) for s in range(n)]
  unique = list(dict.fromkeys(subs))
  x_spec = PartitionSpec(*layout)
  # A no-op where x is laid out so already; else H, W (and channels that
  # would split a group) are gathered: the documented cost.
  operands, specs = (
    [jax.sharding.reshard(x, NamedSharding(mesh, x_spec))],
    [x_spec],
  )
  if g is not None:
    g_spec = PartitionSpec(
      *[
        s if gn == xn else None
        for s, gn, xn in zip(layout, jnp.shape(g), x.shape)
      ]
    )
    # A no-op where g is sharded so already; a replicated guide: each
    # device slices its part (no traffic).
    operands.append(jax.sharding.reshard(g, NamedSharding(mesh, g_spec)))
    specs.append(g_spec)

  def per_shard(x, g=None):
    if g is not None:
      # The guide, replicated over the axes that split x along its
      # broadcast dims, is cast to varying here, once: the transpose of that
      # cast is the psum of its gradient, one all-reduce outside the switch
      # (one per branch deadlocked jax/jaxlib 0.12.1's CPU runtime, whose
      # rendezvous is per instruction).
      g = _jax_compat.vary(g, x)
    if len(unique) == 1:
      return pool(x, g, unique[0])
    index = jnp.asarray([unique.index(s) for s in subs], jnp.int32)[
      jax.lax.axis_index(axes)
    ]
    branches = [
      functools.partial(lambda sub, x, g: pool(x, g, sub), sub)
      for sub in unique
    ]
    return jax.lax.switch(index, branches, x, g)

  out = jax.shard_map(
    per_shard, mesh=mesh, in_specs=tuple(specs), out_specs=x_spec
  )(*operands)
  return jax.sharding.reshard(out, NamedSharding(mesh, PartitionSpec(*spec)))


def whole_channels(y):
  """y with its channel dim gathered where it is split over Explicit axes.

  For flax.linen's ``nn.Conv``, which has no ``out_sharding``: under
  Explicit axes JAX will not contract a dim split across devices without
  one, so the linen layers gather the pooled channels before the
  convolution (the NNX layers take ``out_sharding`` instead and gather
  nothing). Unchanged (no trace change) elsewhere."""
  mesh, spec, types = _typed_sharding(y)
  if spec[-1] is None or jax.sharding.AxisType.Explicit not in types:
    return y
  return jax.sharding.reshard(
    y, NamedSharding(mesh, PartitionSpec(*spec[:-1], None))
  )


# --------------------------------------------------------------------------
# Explicit mesh axes: the reference lowering, any layout (module docstring).


def _explicit_mesh(operands):
  """(mesh, its Explicit axis names) where some operand's type is split over
  Explicit mesh axes; else None (then nothing changes)."""
  explicit = jax.sharding.AxisType.Explicit
  for a in operands:
    mesh, spec, types = _typed_sharding(a)
    if any(s is not None for s in spec) and explicit in types:
      return mesh, tuple(
        n for n, t in zip(mesh.axis_names, types) if t == explicit
      )
  return None


def reference_per_shard(
  fn, operands, out_like, *, single_group: bool, summed_guide=None
):
  """``fn(*operands)`` (the reference's jnp: a tuple of results, result k
  shaped like ``operands[out_like[k]]``), per shard where an operand is
  split over Explicit mesh axes; otherwise ``fn(*operands)`` unchanged.

  The reference's layout reshapes (merging the leading dims, splitting the
  channels into groups) have no sharding rule under Explicit axes, so it
  runs inside ``jax.shard_map`` on local blocks, on the layout the custom
  calls get (``_sharding_like``): x's leading dims stay split (and the
  channels for a single group), H, W and the channels of P > 1 groups are
  gathered; a guide's size-1 dims are replicated. Operands from anywhere (a
  host array, an unplaced or replicated jnp array, sharded) are placed so.
  ``summed_guide`` (the backward's guide, ``operands[out_like[k]]`` for its
  gradient's k): where x is split along a dim the guide broadcasts over,
  each device sums its block and one all-reduce adds the devices' sums, as
  the custom calls' path does (``sum_guide_gradient``). Results take their
  operand's sharding (replicated over the mesh for an operand that had
  none). Everything else is the unsharded reference's ops on each block:
  the same numbers bit for bit; the guide's gradient differs from one
  device's only in the order of its sum.
  """
  found = _explicit_mesh(operands)
  if found is None:
    return fn(*operands)
  mesh, axes = found
  x = operands[0]
  r = x.ndim
  spec = _typed_sharding(x)[1]
  specs = tuple(
    _sharding_like(mesh, spec, r, jnp.shape(a), single_group).spec
    for a in operands
  )
  placed = [
    jax.sharding.reshard(a, NamedSharding(mesh, s))
    for a, s in zip(operands, specs)
  ]
  sums = {}
  if summed_guide is not None:
    g_axes = broadcast_axes(specs[0], x.shape, jnp.shape(summed_guide))
    sums = {
      k: g_axes for k, i in enumerate(out_like) if operands[i] is summed_guide
    }

  def per_shard(*blocks):
    outs = fn(*blocks)
    return tuple(
      sum_guide_gradient(o, sums[k]) if k in sums else o
      for k, o in enumerate(outs)
    )

  outs = jax.shard_map(
    per_shard,
    mesh=mesh,
    in_specs=specs,
    out_specs=tuple(specs[i] for i in out_like),
    axis_names=set(axes),
  )(*placed)
  return tuple(_back_to(o, operands[i]) for o, i in zip(outs, out_like))


def _back_to(y, like):
  """y resharded to like's sharding type; unchanged (replicated over y's
  mesh, which is what an operand with no mesh is) where like has none."""
  sharding = jax.typeof(like).sharding
  if not getattr(getattr(sharding, "mesh", None), "axis_names", ()):
    return y
  return jax.sharding.reshard(y, sharding)
