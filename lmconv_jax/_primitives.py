"""The grouped landmark pool as JAX primitives: one set of rules for every
transformation and every platform.

Three primitives. ``groups`` is a tuple of P groups, each a tuple of
Directions (several: merged by max, ties to the first listed); x is
``(..., H, W, C)``; the guide g has x's rank with each dim x's or 1 (it is
never broadcast to x's size); ``members`` is ``(..., K, H, W, C)`` with K the
most members of a group when K > 1, else ``(..., 0, H, W, C)``: the merged
groups' residual, which the forward writes and the derivatives read. Without
a guide it is uint8 winner codes (landmark_pool.h: per member and element,
the route of its max and whether it won the merge), so the derivatives read
neither x nor any pool; with a guide it is each member's pool (x's dtype:
dguide = (m - x) G needs it).

  pool_p           (x[, g])                          -> out, members
  pool_tangent_p   (x, [g], out, members, tx[, tg])  -> tout     linear in tx, tg
  pool_backward_p  (x, [g], out, members, ct)        -> dx[, dg] its transpose

* Autodiff: the JVP of ``pool_p`` is ``pool_tangent_p`` (the tangent follows
  the winners of the forward max, docs/semantics.md) and the transpose of
  ``pool_tangent_p`` is ``pool_backward_p``, so forward and reverse mode come
  from one pair of rules and agree on ties.
* vmap: the kernels fold every dim in front of (H, W, C) into their batch, so
  a mapped dim there stays where it is and one elsewhere is moved to the
  front; an unmapped guide gets a size-1 dim (no broadcast). One custom call
  per pass however deep the vmap nest.
* Lowering, per platform (``implementation``): on a platform whose kernels
  this build compiled ("cpu", "cuda"), "ffi" and "auto" lower to one XLA FFI
  custom call per pass, ``lmconv_pool_{fwd,tangent,bwd}[_guided]``, with the
  grouping as two int64-array attributes; everywhere else (TPU, ROCm, a
  build without nvcc) and always for "reference", they lower to the pure-jnp
  reference (lmconv_jax/reference.py), so one traced function lowers and
  exports for several platforms at once. "ffi" on a platform without kernels
  is an error. Multi-device partitioning is lmconv_jax/_sharding.py.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla
from jax.sharding import NamedSharding, PartitionSpec

from lmconv_jax import _jax_compat, _sharding, reference

pool_p = Primitive("lmconv_pool")
pool_p.multiple_results = True
pool_tangent_p = Primitive("lmconv_pool_tangent")
pool_backward_p = Primitive("lmconv_pool_backward")
pool_backward_p.multiple_results = True

# The FFI target behind each primitive; the guided variant adds "_guided".
TARGETS = {
  pool_p: "lmconv_pool_fwd",
  pool_tangent_p: "lmconv_pool_tangent",
  pool_backward_p: "lmconv_pool_bwd",
}
PRIMITIVES = tuple(TARGETS)
TARGET_NAMES = tuple(
  name + suffix for name in TARGETS.values() for suffix in ("", "_guided")
)
IMPLEMENTATIONS = ("auto", "reference", "ffi", "pallas")
# Where "auto" runs the Pallas kernels (elsewhere "pallas" is interpret mode),
# and the dtypes Mosaic compiles them for (float16 and float64 get the
# reference there).
PALLAS_PLATFORMS = ("tpu",)
PALLAS_TPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def max_members(groups) -> int:
  """K: the most directions merged in one group."""
  return max(len(g) for g in groups)


def members_shape(x_shape, groups, saved: bool = True) -> tuple:
  """The residual's shape: (..., K, H, W, C) if saved (K > 1), else K = 0."""
  k = max_members(groups)
  k = k if k > 1 and saved else 0
  return tuple(x_shape[:-3]) + (k,) + tuple(x_shape[-3:])


def members_dtype(x_dtype, guided: bool):
  """The residual's dtype: the member pools' (x's) guided, else the codes'."""
  return jnp.dtype(x_dtype) if guided else jnp.dtype(jnp.uint8)


def grouping_attrs(groups) -> dict:
  """The two int64-array attributes of every target (names in handlers.inc)."""
  return dict(
    group_sizes=np.array([len(g) for g in groups], np.int64),
    directions=np.array(
      [
        v
        for g in groups
        for d in g
        for v in (d.row_step, d.col_step, d.n1[0], d.n1[1], d.n2[0], d.n2[1])
      ],
      np.int64,
    ),
  )


# --------------------------------------------------------------------------
# Binding.


def _bind(prim, *operands, **params):
  """prim.bind after making every operand vary over the same shard_map axes.

  Inside shard_map a guide (or a tangent) may be replicated while x varies;
  ``pcast`` marks it varying as jax's own ops do, so the output's type is
  right and reverse mode psums the guide's gradient.
  """
  axes = [_jax_compat.varying_axes(o) for o in operands]
  union = frozenset().union(*axes)
  operands = [
    o
    if a == union
    else jax.lax.pcast(o, tuple(sorted(union - a)), to="varying")
    for o, a in zip(operands, axes)
  ]
  return prim.bind(*operands, **params)


def grouped_pool(x, g, groups, implementation: str):
  """out of the grouped pool (g None: the unguided kernel). Inputs checked.

  Channels split over Explicit mesh axes in whole groups: each shard pools
  its own groups under shard_map (_sharding.grouped_pool_per_shard)."""
  out = _sharding.grouped_pool_per_shard(
    functools.partial(_grouped_pool, implementation=implementation),
    x,
    g,
    groups,
  )
  return _grouped_pool(x, g, groups, implementation) if out is None else out


def _grouped_pool(x, g, groups, implementation: str):
  operands = (x,) if g is None else (x, g)
  out, _ = _bind(
    pool_p,
    *operands,
    groups=groups,
    guided=g is not None,
    implementation=implementation,
    save_members=False,
  )
  return out


# --------------------------------------------------------------------------
# Abstract evaluation.


def _members_sharding(x):
  """The members' sharding type: x's, with the K dim unsharded."""
  sharding = getattr(x, "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or not hasattr(sharding, "mesh"):
    return sharding
  spec = tuple(spec) + (None,) * (x.ndim - len(spec))
  nb = x.ndim - 3
  return NamedSharding(
    sharding.mesh, PartitionSpec(*spec[:nb], None, *spec[nb:])
  )


def _pool_abstract(*avals, groups, guided, implementation, save_members):
  del implementation
  x = avals[0]
  members = x.update(
    shape=members_shape(x.shape, groups, save_members),
    dtype=members_dtype(x.dtype, guided),
    weak_type=False,
    sharding=_members_sharding(x),
  )
  return [x.update(weak_type=False), members]


def _tangent_abstract(*avals, groups, guided, implementation):
  del groups, guided, implementation
  return avals[0].update(weak_type=False)


def _backward_abstract(*avals, groups, guided, implementation):
  del groups, implementation
  x = avals[0].update(weak_type=False)
  return [x, avals[1].update(weak_type=False)] if guided else [x]


for _p, _rule in (
  (pool_p, _pool_abstract),
  (pool_tangent_p, _tangent_abstract),
  (pool_backward_p, _backward_abstract),
):
  _p.def_impl(functools.partial(xla.apply_primitive, _p))
  _p.def_abstract_eval(_rule)
  _jax_compat.needs_devices_during_lowering(_p)


# --------------------------------------------------------------------------
# Autodiff: JVP of the pool, transpose of its tangent.


def _zero(aval):
  return ad.Zero(aval.to_tangent_aval())


def _pool_jvp(primals, tangents, *, save_members, **params):
  # Differentiated: the merged groups' residual (winner codes, or the
  # member pools with a guide) is saved for the tangent and backward kernels.
  del save_members
  out, members = _bind(pool_p, *primals, **params, save_members=True)
  zero_members = _zero(jax.typeof(members))
  if all(type(t) is ad.Zero for t in tangents):
    return (out, members), (_zero(jax.typeof(out)), zero_members)
  # A symbolic zero becomes a real one: the tangent kernel reads every input.
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  x, g = primals[0], primals[1:]
  tout = _bind(pool_tangent_p, x, *g, out, members, *tangents, **params)
  # members is a residual of our own rules, not differentiated further.
  return (out, members), (tout, zero_members)


def _n_linear(prim, guided: bool) -> int:
  """How many trailing operands ``prim`` is linear in (the rest are known)."""
  return 2 if prim is pool_tangent_p and guided else 1


def _pool_tangent_transpose(ct, *operands, groups, guided, implementation):
  n_lin = _n_linear(pool_tangent_p, guided)
  known, linear = operands[:-n_lin], operands[-n_lin:]
  assert not any(ad.is_undefined_primal(v) for v in known), (
    "the pool's tangent is linear in (tx, tg) only"
  )
  nones = [None] * len(known)
  if type(ct) is ad.Zero:
    return nones + [None] * n_lin
  grads = _bind(
    pool_backward_p,
    *known,
    ct,
    groups=groups,
    guided=guided,
    implementation=implementation,
  )
  return nones + [
    gr if ad.is_undefined_primal(v) else None for gr, v in zip(grads, linear)
  ]


def _linear_jvp(prim, what):
  """JVP of pool_tangent_p / pool_backward_p, linear in trailing operands.

  With x, g, out and members held fixed (their tangents symbolic zeros, as
  in the jvp of a linearized or VJP function) it is the primitive itself
  applied to the tangents. Anything else is a second derivative of the pool.
  """

  def rule(primals, tangents, **params):
    n_lin = _n_linear(prim, params["guided"])
    if not all(type(t) is ad.Zero for t in tangents[:-n_lin]):
      if params["implementation"] == "reference":
        # A second derivative: JAX differentiates the reference's jnp.
        fn = functools.partial(_reference_rule(prim), **params)
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        return jax.jvp(fn, tuple(primals), tuple(tangents))
      raise NotImplementedError(
        f"lmconv_jax: the {params['implementation']!r} pool is "
        f"differentiable once (forward or reverse mode), not twice ({what} depends on x and the guide "
        f"piecewise). For second derivatives use "
        f"implementation='reference', whose derivatives of the pool's "
        f"derivatives JAX derives itself."
      )
    out = _bind(prim, *primals, **params)
    lin = tangents[-n_lin:]
    if all(type(t) is ad.Zero for t in lin):
      return out, (
        [_zero(jax.typeof(o)) for o in out]
        if prim.multiple_results
        else _zero(jax.typeof(out))
      )
    lin = [ad.instantiate_zeros(t) for t in lin]
    return out, _bind(prim, *primals[:-n_lin], *lin, **params)

  return rule


def _backward_transpose(cts, *operands, groups, guided, implementation):
  """pool_backward_p is linear in ct; its transpose is the tangent."""
  known, ct = operands[:-1], operands[-1]
  assert ad.is_undefined_primal(ct) and not any(
    ad.is_undefined_primal(v) for v in known
  )
  if all(type(c) is ad.Zero for c in cts):
    return [None] * len(operands)
  cts = [ad.instantiate_zeros(c) for c in cts]
  tangent = _bind(
    pool_tangent_p,
    *known,
    *cts,
    groups=groups,
    guided=guided,
    implementation=implementation,
  )
  return [None] * len(known) + [tangent]


ad.primitive_jvps[pool_p] = _pool_jvp
ad.primitive_transposes[pool_tangent_p] = _pool_tangent_transpose
ad.primitive_jvps[pool_tangent_p] = _linear_jvp(pool_tangent_p, "its tangent")
ad.primitive_jvps[pool_backward_p] = _linear_jvp(
  pool_backward_p, "its gradient"
)
ad.primitive_transposes[pool_backward_p] = _backward_transpose


# --------------------------------------------------------------------------
# vmap: fold the mapped axis into the kernel's batch.


def _operand_kinds(prim, guided: bool) -> tuple:
  """What each operand is: "x" (x's shape), "g" (the guide's), "m" (members)."""
  g = ("g",) if guided else ()
  if prim is pool_p:
    return ("x",) + g
  if prim is pool_tangent_p:
    return ("x",) + g + ("x", "m", "x") + g
  return ("x",) + g + ("x", "m", "x")


def _batch_rule(prim):
  def rule(args, dims, **params):
    kinds = _operand_kinds(prim, params["guided"])
    ref, ref_dim = next(
      (a, d) for a, d, k in zip(args, dims, kinds) if d is not None and k != "m"
    )
    size = ref.shape[ref_dim]
    # Dims in front of (H, W, C) are the kernel's batch already: stay there
    # (the guide has x's rank, so the rule is the same for every operand).
    to = ref_dim if ref_dim < ref.ndim - 3 else 0
    # An unmapped guide gets a size-1 dim (it broadcasts), unless the guide
    # and its tangent must agree in shape (one of them is mapped) or the
    # guide's gradient must come back per mapped element (the backward).
    full_guides = prim is pool_backward_p or any(
      d is not None for d, k in zip(dims, kinds) if k == "g"
    )

    def align(a, d, kind):
      if d is None:  # batching.not_mapped
        a = jnp.expand_dims(a, to)
        if kind == "g" and not full_guides:
          return a  # a size-1 dim: the guide broadcasts
        return jnp.broadcast_to(a, a.shape[:to] + (size,) + a.shape[to + 1 :])
      return jnp.moveaxis(a, d, to)

    outs = _bind(
      prim, *[align(a, d, k) for a, d, k in zip(args, dims, kinds)], **params
    )
    if prim is pool_p:
      return outs, [to, to]
    if prim is pool_backward_p:
      return outs, [to] * len(outs)
    return outs, to

  return rule


for _p in PRIMITIVES:
  batching.primitive_batchers[_p] = _batch_rule(_p)


# --------------------------------------------------------------------------
# Lowering: the reference anywhere, our custom call where compiled.


def _passes_rule(prim, forward, tangent, backward):
  """The primitive from three jnp-traceable passes with reference.py's
  signatures (``grouped_forward(x, g, groups)``, ``grouped_tangent(x, g,
  tx, tg, groups)``, ``grouped_backward(x, g, ct, groups)``): the pure-jnp
  reference, or the Pallas kernels. The derivatives recompute the forward,
  so the "members" residual is zeros. Under Explicit mesh axes it runs per
  shard (_sharding.reference_per_shard)."""

  def fn(*operands, groups, guided, implementation, save_members=False):
    del implementation
    run = functools.partial(
      _sharding.reference_per_shard, single_group=len(groups) == 1
    )
    if prim is pool_p:
      x = operands[0]
      (out,) = run(
        lambda x, *g: (forward(x, g[0] if g else None, groups),),
        operands[: 1 + guided],
        (0,),
      )
      return [
        out,
        jnp.zeros(
          members_shape(x.shape, groups, save_members),
          members_dtype(x.dtype, guided),
        ),
      ]
    if prim is pool_tangent_p:
      if guided:
        x, g, _, _, tx, tg = operands
        return run(
          lambda x, g, tx, tg: (tangent(x, g, tx, tg, groups),),
          (x, g, tx, tg),
          (0,),
        )[0]
      x, _, _, tx = operands
      return run(
        lambda x, tx: (tangent(x, None, tx, None, groups),), (x, tx), (0,)
      )[0]
    if guided:
      x, g, _, _, ct = operands
      return list(
        run(
          lambda x, g, ct: backward(x, g, ct, groups),
          (x, g, ct),
          (0, 1),
          summed_guide=g,
        )
      )
    x, _, _, ct = operands
    return list(
      run(lambda x, ct: backward(x, None, ct, groups)[:1], (x, ct), (0,))
    )

  return fn


def _reference_rule(prim):
  """The primitive as pure jnp (reference.py), for mlir.lower_fun."""
  return _passes_rule(
    prim,
    reference.grouped_forward,
    reference.grouped_tangent,
    reference.grouped_backward,
  )


def _pallas_rule(prim, interpret):
  """The primitive through the Pallas TPU kernels (lmconv_jax/_pallas_tpu.py);
  ``interpret``: False on a TPU, else Pallas' interpret mode (any platform,
  exact and slow)."""
  from lmconv_jax import _pallas_tpu  # pallas is imported only when used

  kw = dict(interpret=interpret)
  return _passes_rule(
    prim,
    functools.partial(_pallas_tpu.grouped_forward, **kw),
    functools.partial(_pallas_tpu.grouped_tangent, **kw),
    functools.partial(_pallas_tpu.grouped_backward, **kw),
  )


def pallas_call(
  prim, operands, groups, guided, save_members=False, *, interpret=False
):
  """The Pallas kernels behind ``prim`` as a plain function of its operands:
  what each device runs inside a partitioned call (as ``ffi_call``). Under
  jit: custom_partitioning takes no closed-over constants (the kernels'
  static tables), and a jitted call keeps them inside."""
  return jax.jit(
    functools.partial(
      _pallas_rule(prim, interpret),
      groups=groups,
      guided=guided,
      implementation="pallas",
      save_members=save_members,
    )
  )(*operands)


def _ffi_call_lowering(prim, ctx, *operands, groups, guided):
  target = TARGETS[prim] + ("_guided" if guided else "")
  lower = jax.ffi.ffi_lowering(
    target, extra_attributes=_sharding.batch_partitionable_attrs(ctx) or None
  )
  return lower(ctx, *operands, **grouping_attrs(groups))


def ffi_call(prim, operands, groups, guided, save_members=False):
  """The custom call behind ``prim`` as a jax.ffi.ffi_call (no primitive):
  what each device runs inside a partitioned call."""
  target = TARGETS[prim] + ("_guided" if guided else "")
  x = operands[0]
  like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  if prim is pool_p:
    results = (
      like(x),
      jax.ShapeDtypeStruct(
        members_shape(x.shape, groups, save_members),
        members_dtype(x.dtype, guided),
      ),
    )
  elif prim is pool_tangent_p:
    results = like(x)
  else:
    results = (like(x), like(operands[1])) if guided else (like(x),)
  return jax.ffi.ffi_call(target, results)(*operands, **grouping_attrs(groups))


def _no_pallas_kernel(x_aval, on_tpu: bool):
  """None where the Pallas kernels compile for x on this platform, else
  (what, the fix): Mosaic has no float64 and no float16 vector loads, and
  the kernels' grid and blocks are static (a symbolic dim of jax.export)."""
  if not all(isinstance(d, int) for d in x_aval.shape):
    return (
      f"the symbolic shape {tuple(map(str, x_aval.shape))} (the "
      f"kernels' grid and blocks are static)",
      "export with concrete dims",
    )
  dtype = jnp.dtype(x_aval.dtype)
  if on_tpu and dtype not in PALLAS_TPU_DTYPES:  # interpret mode: any dtype
    return (
      f"{dtype} (Mosaic does not compile it: TPUs have no float64 and "
      f"no float16 vector loads)",
      "cast x to float32 or bfloat16",
    )
  return None


def _lowering(prim, platform: str, compiled: bool):
  reference_lowering = mlir.lower_fun(
    _reference_rule(prim), multiple_results=prim.multiple_results
  )
  on_tpu = platform in PALLAS_PLATFORMS

  def rule(ctx, *operands, groups, guided, implementation, **extra):
    params = dict(
      groups=groups, guided=guided, implementation=implementation, **extra
    )
    if implementation == "pallas" or (implementation == "auto" and on_tpu):
      interpret = not on_tpu
      why = _no_pallas_kernel(ctx.avals_in[0], on_tpu)
      if why is not None:
        if implementation == "pallas":
          raise NotImplementedError(
            f"lmconv_jax: implementation='pallas' has no kernel for "
            f"{why[0]}; {why[1]}, or use implementation='auto' or "
            f"'reference' (the pure-jnp reference)."
          )
        warnings.warn(
          f"lmconv_jax: no TPU kernel for {why[0]}; the landmark pool runs "
          f"the pure-jnp reference there ({why[1]} for the Pallas "
          f"kernels).",
          stacklevel=2,
        )
        return reference_lowering(ctx, *operands, **params)
      if _sharding.partitioned_by_jax(ctx):
        return _sharding.partitioned_lowering(
          functools.partial(pallas_call, interpret=interpret),
          prim,
          ctx,
          operands,
          groups,
          guided,
          **extra,
        )
      return mlir.lower_fun(
        _pallas_rule(prim, interpret), multiple_results=prim.multiple_results
      )(ctx, *operands, **params)
    if implementation == "reference" or (
      implementation == "auto" and not compiled
    ):
      return reference_lowering(ctx, *operands, **params)
    if not compiled:
      raise NotImplementedError(
        f"lmconv_jax: implementation='ffi' has no kernels for platform "
        f"{platform!r} in this build; use implementation='auto' (which "
        f"lowers to {'the Pallas kernels' if on_tpu else 'the pure-jnp reference'} "
        f"there), 'pallas' or 'reference'."
      )
    if _sharding.partitioned_by_jax(ctx):
      return _sharding.partitioned_lowering(
        ffi_call, prim, ctx, operands, groups, guided, **extra
      )
    return _ffi_call_lowering(
      prim, ctx, *operands, groups=groups, guided=guided
    )

  return rule


def register_lowerings(compiled_platforms) -> None:
  """Lowers the primitives on every platform.

  ``compiled_platforms``: {platform ("cpu", "cuda"): the target names this
  build compiled for it}. Those platforms get our custom calls; every other
  platform, including one jax names later (a default rule), the reference.
  """
  for prim in PRIMITIVES:
    mlir.register_lowering(prim, _lowering(prim, "any", compiled=False))
    for platform in ("cpu", "cuda", "rocm", "tpu"):
      names = compiled_platforms.get(platform)
      if names is not None:
        missing = [t for t in TARGET_NAMES if t not in names]
        if missing:
          raise ImportError(
            f"lmconv_jax: the {platform} extension lacks targets {missing}; "
            f"it is stale: rebuild lmconv_jax "
            f"(pip install --no-build-isolation -e .)."
          )
      mlir.register_lowering(
        prim, _lowering(prim, platform, names is not None), platform=platform
      )
