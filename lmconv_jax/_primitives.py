"""The FFI kernels as JAX primitives: one set of rules for every transformation.

Three primitives, on operands that all have x's shape ``(..., H, W, C)`` and
dtype (the guide is broadcast by lmconv_jax.ops before it gets here):

  pool_p           (x[, g])                  -> out
  pool_tangent_p   (x, [g], out, tx[, tg])   -> tout       linear in (tx, tg)
  pool_backward_p  (x, [g], out, ct)         -> dx[, dg]   pool_tangent_p transposed

* Autodiff: the JVP of ``pool_p`` is ``pool_tangent_p`` (the tangent follows
  the winners of the forward max, docs/semantics.md) and the transpose of
  ``pool_tangent_p`` is ``pool_backward_p``. So ``jvp``, ``linearize``,
  ``jacfwd`` and ``grad``, ``vjp``, ``jacrev`` all come from this one pair of
  rules and agree; reverse mode keeps the residuals of the old custom_vjp
  (x, g and out) and its kernel, so it costs the same.
* vmap: the kernels fold every dim in front of (H, W, C) into their batch, so
  a batch dim there is left where it is (no copy) and one elsewhere is moved
  to the front; an unbatched operand is broadcast. One custom call per pool,
  however deep the vmap nest.
* Lowering: one XLA FFI custom call, ``lmconv_pool_{fwd,tangent,bwd}`` plus
  ``_guided``, with the direction as six int64 attributes. Under a
  multi-device ``jit`` the call is wrapped in ``custom_partitioning`` with the
  Shardy rule ``... h w c -> ... h w c`` (h, w need replication): leading
  dims and channels stay sharded and each device runs the kernel on its
  shard; an H or W sharding is all-gathered first, since every output pixel
  depends on a whole quadrant of the image. Everywhere else (one device,
  pmap, shard_map, ``jax.export``) it is the plain custom call, marked batch
  partitionable (``num_batch_dims`` + a Shardy rule) so that an exported
  module, which cannot carry Python partitioning callbacks, still partitions
  over leading dims without Python. docs/transforms.md has the details.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla
from jax.sharding import NamedSharding, PartitionSpec

from lmconv_jax.directions import Direction

try:  # custom_partitioning needs the device assignment when it is lowered.
  from jax._src import dispatch as _dispatch
  _NEEDS_DEVICES = _dispatch.prim_requires_devices_during_lowering
except (ImportError, AttributeError):  # pragma: no cover - older/newer jax
  _NEEDS_DEVICES = set()

pool_p = Primitive("lmconv_pool")
pool_tangent_p = Primitive("lmconv_pool_tangent")
pool_backward_p = Primitive("lmconv_pool_backward")
pool_backward_p.multiple_results = True

# The FFI target behind each primitive; the guided variant adds "_guided".
TARGETS = {pool_p: "lmconv_pool_fwd", pool_tangent_p: "lmconv_pool_tangent",
           pool_backward_p: "lmconv_pool_bwd"}
PRIMITIVES = tuple(TARGETS)


# --------------------------------------------------------------------------
# The calls lmconv_jax._ffi makes. Operands must already have x's shape.

def _varying_axes(a) -> frozenset:
  """The shard_map axes ``a`` varies over (empty outside shard_map)."""
  t = jax.typeof(a)
  mat = getattr(t, "mat", None)  # this jax: aval.mat.varying; older: aval.vma
  return frozenset(getattr(mat, "varying", None) or getattr(t, "vma", ()) or ())


def _bind(prim, *operands, **params):
  """prim.bind after making every operand vary over the same shard_map axes.

  Inside shard_map a guide (or a tangent) may be replicated while x varies;
  ``pcast`` marks it varying as jax's own ops do, so the output's type is
  right and reverse mode psums the guide's gradient.
  """
  axes = [_varying_axes(o) for o in operands]
  union = frozenset().union(*axes)
  operands = [o if a == union else
              jax.lax.pcast(o, tuple(sorted(union - a)), to="varying")
              for o, a in zip(operands, axes)]
  return prim.bind(*operands, **params)


def pool(x, g: Optional[jax.Array], direction: Direction):
  """out = landmark pool of x in ``direction`` (g None: the unguided kernel)."""
  operands = (x,) if g is None else (x, g)
  return _bind(pool_p, *operands, direction=direction, guided=g is not None,
               local=False)


def pool_tangent(x, g, out, tx, tg, direction: Direction):
  """The tangent of ``out = pool(x, g)`` for tangents tx (and tg if guided)."""
  guided = g is not None
  operands = (x, g, out, tx, tg) if guided else (x, out, tx)
  return _bind(pool_tangent_p, *operands, direction=direction, guided=guided,
               local=False)


def pool_backward(x, g, out, ct, direction: Direction):
  """(dx, dguide) for cotangent ct of ``out = pool(x, g)``; dguide None if g is."""
  guided = g is not None
  operands = (x, g, out, ct) if guided else (x, out, ct)
  grads = _bind(pool_backward_p, *operands, direction=direction, guided=guided,
                local=False)
  return (grads[0], grads[1]) if guided else (grads[0], None)


# --------------------------------------------------------------------------
# Evaluation and abstract evaluation.

def _abstract_eval(prim):
  def rule(*avals, direction, guided, local):
    del direction, local
    x = avals[0]
    for a in avals[1:]:
      assert a.shape == x.shape and a.dtype == x.dtype, (prim, avals)
    out = x.update(weak_type=False)
    if prim is pool_backward_p:
      return [out, out] if guided else [out]
    return out
  return rule


for _p in PRIMITIVES:
  _p.def_impl(functools.partial(xla.apply_primitive, _p))
  _p.def_abstract_eval(_abstract_eval(_p))
  _NEEDS_DEVICES.add(_p)


# --------------------------------------------------------------------------
# Autodiff: JVP of the pool, transpose of its tangent.

def _pool_jvp(primals, tangents, *, direction, guided, local):
  params = dict(direction=direction, guided=guided, local=local)
  out = _bind(pool_p, *primals, **params)
  if all(type(t) is ad.Zero for t in tangents):
    return out, ad.Zero(out.aval.to_tangent_aval())
  # A symbolic zero becomes a real one: the tangent kernel reads every input.
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  x, g = primals[0], (primals[1:] if guided else ())
  tout = _bind(pool_tangent_p, x, *g, out, *tangents, **params)
  return out, tout


def _pool_tangent_transpose(ct, *operands, direction, guided, local):
  n_lin = _n_linear(pool_tangent_p, guided)
  known, linear = operands[:-n_lin], operands[-n_lin:]
  assert not any(ad.is_undefined_primal(v) for v in known), (
      "the pool's tangent is linear in (tx, tg) only")
  nones = [None] * len(known)
  if type(ct) is ad.Zero:
    return nones + [None] * n_lin
  grads = _bind(pool_backward_p, *known, ct, direction=direction,
                guided=guided, local=local)
  return nones + [gr if ad.is_undefined_primal(v) else None
                  for gr, v in zip(grads, linear)]


ad.primitive_jvps[pool_p] = _pool_jvp
ad.primitive_transposes[pool_tangent_p] = _pool_tangent_transpose


def _n_linear(prim, guided: bool) -> int:
  """How many trailing operands ``prim`` is linear in (the rest: x, g, out)."""
  return 2 if prim is pool_tangent_p and guided else 1


def _linear_jvp(prim, what):
  """JVP of pool_tangent_p / pool_backward_p, linear in trailing operands.

  With x, g and out held fixed (their tangents symbolic zeros, as in the
  jvp of a linearized or VJP function) it is the primitive itself applied
  to the tangents. Anything else is a second derivative of the pool.
  """
  def rule(primals, tangents, **params):
    n_lin = _n_linear(prim, params["guided"])
    if not all(type(t) is ad.Zero for t in tangents[:-n_lin]):
      raise NotImplementedError(
          f"lmconv_jax: the FFI pool is differentiable once (forward or "
          f"reverse mode), not twice ({what} depends on x and the guide "
          f"piecewise). For second derivatives use "
          f"implementation='reference', whose derivatives JAX derives itself.")
    out = _bind(prim, *primals, **params)
    lin = tangents[-n_lin:]
    if all(type(t) is ad.Zero for t in lin):
      zero = lambda o: ad.Zero(o.aval.to_tangent_aval())
      return out, ([zero(o) for o in out] if prim.multiple_results
                   else zero(out))
    lin = [ad.instantiate_zeros(t) for t in lin]
    return out, _bind(prim, *primals[:-n_lin], *lin, **params)
  return rule


def _backward_transpose(cts, *operands, direction, guided, local):
  """pool_backward_p is linear in ct; its transpose is the tangent."""
  known, ct = operands[:-1], operands[-1]
  assert ad.is_undefined_primal(ct) and not any(
      ad.is_undefined_primal(v) for v in known)
  if all(type(c) is ad.Zero for c in cts):
    return [None] * len(operands)
  cts = [ad.instantiate_zeros(c) for c in cts]
  tangent = _bind(pool_tangent_p, *known, *cts, direction=direction,
                  guided=guided, local=local)
  return [None] * len(known) + [tangent]


ad.primitive_jvps[pool_tangent_p] = _linear_jvp(pool_tangent_p, "its tangent")
ad.primitive_jvps[pool_backward_p] = _linear_jvp(pool_backward_p,
                                                 "its gradient")
ad.primitive_transposes[pool_backward_p] = _backward_transpose


# --------------------------------------------------------------------------
# vmap: fold the mapped axis into the kernel's batch.

def _batch_rule(prim):
  def rule(args, dims, **params):
    mapped = [(a, d) for a, d in zip(args, dims) if d is not None]
    ref, ref_dim = mapped[0]
    size, rank = ref.shape[ref_dim], ref.ndim
    # Dims in front of (H, W, C) are the kernel's batch already: stay there.
    to = ref_dim if ref_dim < rank - 3 else 0

    def align(a, d):
      if d is None:  # batching.not_mapped
        a = jnp.expand_dims(a, to)
        return jnp.broadcast_to(a, a.shape[:to] + (size,) + a.shape[to + 1:])
      return jnp.moveaxis(a, d, to)

    out = _bind(prim, *[align(a, d) for a, d in zip(args, dims)], **params)
    return out, ([to] * len(out) if prim.multiple_results else to)
  return rule


for _p in PRIMITIVES:
  batching.primitive_batchers[_p] = _batch_rule(_p)


# --------------------------------------------------------------------------
# Lowering.

def direction_attrs(direction: Direction) -> dict:
  """The six int64 attributes of every target (names match cpu.cc)."""
  return dict(row_step=int(direction.row_step),
              col_step=int(direction.col_step),
              n1_row=int(direction.n1[0]), n1_col=int(direction.n1[1]),
              n2_row=int(direction.n2[0]), n2_col=int(direction.n2[1]))


def _factor_name(k: int) -> str:
  """Shardy's factor names: i, j, ..., z, then z_1, z_2, ..."""
  letters = "ijklmnopqrstuvwxyz"
  return letters[k] if k < len(letters) else f"z_{k - len(letters) + 1}"


def _batch_partitionable_attrs(ctx) -> dict:
  """Marks the call as partitionable over the dims in front of (H, W, C).

  XLA's batch partitioner (``jax.ffi.register_ffi_target_as_batch_partitionable``)
  reads ``num_batch_dims``; Shardy needs the same fact as a sharding rule:
  leading dims are free factors, h, w and c must be replicated.
  """
  avals = list(ctx.avals_in) + list(ctx.avals_out)
  shape = avals[0].shape
  if not all(isinstance(d, int) for d in shape):
    return {}  # symbolic shapes (shape-polymorphic export): no rule
  nb = len(shape) - 3
  names = [_factor_name(k) for k in range(len(shape))]
  one = "[" + ", ".join(names) + "]"
  sizes = ", ".join(f"{n}={s}" for n, s in zip(names, shape))
  rule = (f"#sdy.op_sharding_rule<({', '.join([one] * len(ctx.avals_in))})"
          f"->({', '.join([one] * len(ctx.avals_out))}) {{{sizes}}} "
          f"need_replication={{{', '.join(names[nb:])}}}>")
  return {"mhlo.frontend_attributes":
              mlir.ir_attribute({"num_batch_dims": str(nb)}),
          "sdy.sharding_rule": mlir.ir.Attribute.parse(rule)}


def _partitioned_by_jax(ctx) -> bool:
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


_H_W_C = "... h w c"


def _einsum_rule(n_in: int, n_out: int) -> str:
  return ", ".join([_H_W_C] * n_in) + " -> " + ", ".join([_H_W_C] * n_out)


def _keep_batch_and_channels(mesh, sharding, ndim: int):
  """The operand's sharding with H and W replicated (leading dims, C kept)."""
  spec = getattr(sharding, "spec", None)
  if spec is None:  # not a NamedSharding: replicate (correct, not fast)
    return NamedSharding(mesh, PartitionSpec())
  spec = tuple(spec) + (None,) * (ndim - len(spec))
  return NamedSharding(mesh, PartitionSpec(*spec[:-3], None, None, spec[-1]))


@functools.lru_cache(maxsize=None)
def _partitioned_call(prim, direction: Direction, guided: bool, n_in: int):
  """``prim`` wrapped in custom_partitioning: per-device calls on shards."""
  params = dict(direction=direction, guided=guided, local=True)

  def per_device(*operands):
    return prim.bind(*operands, **params)

  call = custom_partitioning(per_device)

  def partition(mesh, arg_shapes, result_shape):
    # Shardy has already made the operands agree (the rule says so); the
    # result's sharding is the one it chose for the whole op.
    first = jax.tree.leaves(result_shape)[0]
    sharding = _keep_batch_and_channels(mesh, first.sharding, len(first.shape))
    results = jax.tree.map(lambda _: sharding, result_shape)
    return mesh, per_device, results, (sharding,) * len(arg_shapes)

  n_out = 2 if prim is pool_backward_p and guided else 1
  call.def_partition(partition=partition,
                     sharding_rule=_einsum_rule(n_in, n_out),
                     need_replication_factors=("h", "w"))
  return call


def _lowering(prim, platform: str, targets: Optional[frozenset]):
  def rule(ctx, *operands, direction, guided, local):
    target = TARGETS[prim] + ("_guided" if guided else "")
    if targets is not None and target not in targets:
      raise NotImplementedError(
          f"lmconv_jax: the {platform} kernels have no target {target!r} "
          f"(compiled: {', '.join(sorted(targets))}); rebuild lmconv_jax "
          f"(pip install --no-build-isolation -e .) or use "
          f"implementation='reference'.")
    if not local and _partitioned_by_jax(ctx):
      call = _partitioned_call(prim, direction, guided, len(operands))
      return mlir.lower_fun(call, multiple_results=prim.multiple_results)(
          ctx, *operands)
    lower = jax.ffi.ffi_lowering(
        target, extra_attributes=_batch_partitionable_attrs(ctx) or None)
    return lower(ctx, *operands, **direction_attrs(direction))
  return rule


def register_lowerings(platform: str, targets=None) -> None:
  """Lowers the primitives on ``platform`` ("cpu", "cuda") to the FFI targets.

  Called by lmconv_jax._ffi for every platform: with ``targets``, the names
  this build compiled for it (lowering a primitive whose target is missing
  raises, naming the fix); with None (no kernels for that platform here),
  lowering still works, so that jax.export can target a platform this build
  cannot run, and the loading process must provide the kernels.
  """
  if targets is not None:
    targets = frozenset(targets)
    for name in targets:
      jax.ffi.register_ffi_target_as_batch_partitionable(name)
  for prim in PRIMITIVES:
    mlir.register_lowering(prim, _lowering(prim, platform, targets),
                           platform=platform)
