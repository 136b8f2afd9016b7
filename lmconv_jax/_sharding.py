"""How the grouped pool's custom calls are partitioned across devices.

Rationale. Every output pixel depends on a whole quadrant (or octant) of
its image, so H and W must be whole on a device; images (the dims in front
of (H, W, C)) are independent, so they can be split freely. Channels are
independent within a group, but a call pools the whole grouping (group p is
channels [p*C/P, (p+1)*C/P) in its own direction), so a device may hold a
channel slice only when the grouping is a single group (P = 1: a single
direction or one merged group); for P > 1 channels are gathered first.

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
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

try:  # custom_partitioning needs the device assignment when it is lowered.
  from jax._src import dispatch as _dispatch
  _NEEDS_DEVICES = _dispatch.prim_requires_devices_during_lowering
except (ImportError, AttributeError) as e:  # fail loudly: no silent fallback
  raise ImportError(
      f"lmconv_jax needs jax._src.dispatch.prim_requires_devices_during_lowering"
      f" (jax {jax.__version__} lacks it); install a supported jax "
      f"(see pyproject.toml).") from e


def needs_devices_during_lowering(prim) -> None:
  _NEEDS_DEVICES.add(prim)


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
      lists.append(names[:r - 3] + [f] + names[r - 3:])
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
  rule = (f"#sdy.op_sharding_rule<({ins})->({outs}) {{{sz}}} "
          f"need_replication={{{', '.join(replicated)}}}>")
  return {"mhlo.frontend_attributes":
              mlir.ir_attribute({"num_batch_dims": str(nb)}),
          "sdy.sharding_rule": mlir.ir.Attribute.parse(rule)}


def partitioned_by_jax(ctx) -> bool:
  """True where XLA's SPMD partitioner will split this call across devices.

  Not for export (a serialized module cannot call back into Python), not on
  one device, and not where every mesh axis is manual (shard_map) or the
  computation is replicated per device (pmap): there the plain call already
  runs on per-device data.
  """
  if ctx.module_context.lowering_parameters.for_export:
    return False
  axis_context = ctx.module_context.axis_context
  manual = getattr(axis_context, "manual_axes", None)
  if manual is not None:  # shard_map (SPMDAxisContext)
    return set(manual) != set(axis_context.mesh.axis_names)
  return getattr(axis_context, "num_devices", 1) > 1  # jit (ShardingContext)


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


@functools.lru_cache(maxsize=None)
def _partitioned_call(ffi_call, prim, groups, guided: bool, in_shapes,
                      out_shapes, extra: tuple):
  """``ffi_call(prim, operands, groups, guided)`` (the plain custom call) per
  device, wrapped in custom_partitioning, for operands of ``in_shapes`` (x
  first) and results of ``out_shapes``."""
  single_group = len(groups) == 1

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
    return mesh, per_device, results, args

  names = [_factor_name(k) for k in range(r)]

  class _Shape:  # what _operand_factors reads
    def __init__(self, shape):
      self.shape = shape

  lists, _, own_factors = _operand_factors(
      [_Shape(s) for s in in_shapes + out_shapes], x_shape)
  n_in = len(in_shapes)
  rule = (", ".join(" ".join(d) for d in lists[:n_in]) + " -> " +
          ", ".join(" ".join(d) for d in lists[n_in:]))
  replicate = names[r - 3:r - 1] + ([] if single_group else names[r - 1:])
  call.def_partition(partition=partition, sharding_rule=rule,
                     need_replication_factors=tuple(replicate + own_factors))
  return call


def partitioned_lowering(ffi_call, prim, ctx, operands, groups, guided: bool,
                         **extra):
  """Lowers the custom call of ``prim`` under custom_partitioning."""
  in_shapes = tuple(tuple(a.shape) for a in ctx.avals_in)
  out_shapes = tuple(tuple(a.shape) for a in ctx.avals_out)
  call = _partitioned_call(ffi_call, prim, groups, guided, in_shapes,
                           out_shapes, tuple(sorted(extra.items())))
  return mlir.lower_fun(call, multiple_results=prim.multiple_results)(
      ctx, *operands)
