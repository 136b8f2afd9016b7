"""Every read of a JAX internal, in one place.

The rest of the package reaches JAX's private state (abstract values'
varying mesh axes, the lowering context, vmap tracers, the dispatch hook of
custom_partitioning) only through these functions. Each fails loudly, naming
the jax version and what is missing, when a jax upgrade moves what it reads;
none falls back silently. Supported range: pyproject.toml.
"""

from __future__ import annotations

import jax
from jax import lax


def _moved(what: str) -> RuntimeError:
  return RuntimeError(
    f"lmconv_jax: jax {jax.__version__} no longer has {what}, which "
    f"lmconv_jax reads (lmconv_jax/_jax_compat.py); install a supported jax "
    f"(see pyproject.toml) or update lmconv_jax."
  )


try:  # custom_partitioning needs the device assignment when it is lowered.
  from jax._src import dispatch as _dispatch

  _NEEDS_DEVICES = _dispatch.prim_requires_devices_during_lowering
except (ImportError, AttributeError) as e:  # fail loudly: no silent fallback
  raise ImportError(
    f"lmconv_jax needs jax._src.dispatch.prim_requires_devices_during_lowering"
    f" (jax {jax.__version__} lacks it); install a supported jax "
    f"(see pyproject.toml)."
  ) from e


def needs_devices_during_lowering(prim) -> None:
  """Tells jax that ``prim``'s lowering needs the device assignment."""
  _NEEDS_DEVICES.add(prim)


# --------------------------------------------------------------------------
# shard_map typing: the manual mesh axes a value varies over.


def varying_axes(v) -> frozenset:
  """The manual mesh axes (shard_map) ``v`` varies over; empty outside
  shard_map. jax 0.12 keeps them in ``aval.mat.varying``, jax 0.11 in
  ``aval.vma``."""
  aval = jax.typeof(v)
  mat = getattr(aval, "mat", None)
  if mat is not None:
    if not hasattr(mat, "varying"):
      raise _moved("ShapedArray.mat.varying")
    return frozenset(mat.varying or ())
  if not hasattr(aval, "vma"):
    raise _moved("ShapedArray.mat.varying (0.12) or ShapedArray.vma (0.11)")
  return frozenset(aval.vma or ())


def vary(z, *inputs):
  """z, typed as varying over every manual mesh axis (shard_map) that any of
  ``inputs`` varies over; a no-op outside shard_map. Values unchanged, no
  data moved (a scan carry or a switch operand keeps its type)."""
  axes = frozenset().union(
    *(varying_axes(v) for v in inputs if v is not None)
  ) - varying_axes(z)
  if axes:
    z = lax.pcast(z, tuple(sorted(axes)), to="varying")
  return z


def shape_dtype_like(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A result type of ``shape`` and ``dtype`` that varies over the manual
  mesh axes ``like`` varies over (pallas_call's out_shape in shard_map)."""
  mat = getattr(jax.typeof(like), "mat", None)
  if mat is None:
    raise _moved("ShapedArray.mat (the manual axis type)")
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# --------------------------------------------------------------------------
# The lowering context of a primitive's lowering rule.


def lowering_for_export(ctx) -> bool:
  """Whether this lowering is for ``jax.export`` (no Python at run time)."""
  try:
    return bool(ctx.module_context.lowering_parameters.for_export)
  except AttributeError as e:
    raise _moved(
      "LoweringRuleContext.module_context.lowering_parameters.for_export"
    ) from e


def lowering_devices(ctx) -> tuple:
  """(manual axes or None, mesh axis names or (), device count) of the
  lowering: manual axes are set inside shard_map (SPMDAxisContext); under a
  sharded jit (ShardingContext) only the device count is."""
  try:
    axis_context = ctx.module_context.axis_context
  except AttributeError as e:
    raise _moved("LoweringRuleContext.module_context.axis_context") from e
  manual = getattr(axis_context, "manual_axes", None)
  if manual is not None:
    return frozenset(manual), tuple(axis_context.mesh.axis_names), None
  return None, (), getattr(axis_context, "num_devices", 1)


# --------------------------------------------------------------------------
# vmap tracers.


def vmap_levels(x):
  """For each vmap around ``x`` (innermost first): (the mapped dim or None,
  the value one level in). Empty outside vmap."""
  while hasattr(x, "batch_dim") and hasattr(x, "val"):  # a BatchTracer
    yield x.batch_dim, x.val
    x = x.val
