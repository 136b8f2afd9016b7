"""Test helpers: the CUDA kernels' CPU emulation, and the CPU kernels, called
directly through their grouped FFI targets (not through the package's
primitives).

The emulator module ``lmconv_jax._lmconv_cuda_emu`` (xla_ffi/emulate.cc) runs
the CUDA kernel bodies on the CPU for every block and thread of the launch the
CUDA handler would make. Its targets ``lmconv_emu_pool_*`` are registered here
(platform "cpu"), not by the package. The CPU targets ``lmconv_pool_*`` are
the ones ``import lmconv_jax`` registers.

Operands (xla_ffi/handlers.inc):
  pool_fwd[_guided]      (x[, g])                      -> out, members
  pool_tangent[_guided]  (x[, g], out, members, tx[, tg]) -> tout
  pool_bwd[_guided]      (x[, g], out, members, ct)    -> dx[, dg]
with attributes group_sizes (int64[P]) and directions (int64[6 * sum]); the
emulator also takes multiprocessors and order (a bit set: 1 reverse the
blocks and threads of each phase, 2 run the race and bounds detector, 4 plant
a race, 8 plant an out-of-bounds read).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lmconv_jax  # registers the CPU targets lmconv_pool_*
from lmconv_jax import _ffi  # noqa: F401
from lmconv_jax import _primitives
from lmconv_jax._primitives import members_dtype

try:
  from lmconv_jax import _lmconv_cuda_emu as EMULATOR
except ImportError:  # built without the emulator (LMCONV_EMULATOR=OFF)
  EMULATOR = None

if EMULATOR is not None:
  for _name, _capsule in EMULATOR.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

REVERSE, CHECK, PLANT_RACE, PLANT_OUT_OF_BOUNDS = 1, 2, 4, 8


def resolve_groups(groups):
  """A tuple of tuples of Directions, from a grouping name or sequence."""
  resolve = getattr(lmconv_jax, "directions").resolve_grouping
  return resolve(groups)


def grouping_attrs(groups):
  """The targets' attributes, as the package's primitives pass them."""
  return _primitives.grouping_attrs(resolve_groups(groups))


def guide_at_rank(guide, x):
  """The guide at x's rank, 1s where broadcast ((C,) -> (1, ..., 1, C))."""
  if guide is None:
    return None
  guide = jnp.asarray(guide, x.dtype)
  return guide.reshape((1,) * (x.ndim - guide.ndim) + guide.shape)


def _members_shape(groups, x, saved=True):
  """(..., K, H, W, C) for K > 1 (member k of image b at (b*K + k)*H*W*C),
  else, or when the forward does not save them (inference), (..., 0, H, W,
  C). Its dtype is members_dtype's: uint8 winner codes without a guide, the
  member pools (x's dtype) with one."""
  k = max(len(g) for g in resolve_groups(groups))
  return x.shape[:-3] + (k if k > 1 and saved else 0,) + x.shape[-3:]


def _attrs(groups, emulated, multiprocessors, order):
  a = grouping_attrs(groups)
  if emulated:
    a["multiprocessors"] = np.int64(multiprocessors)
    a["order"] = np.int64(order)
  return a


def _target(name, guided, emulated):
  return (
    ("lmconv_emu_" if emulated else "lmconv_")
    + name
    + ("_guided" if guided else "")
  )


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def forward(
  x, guide, groups, *, emulated, multiprocessors=132, order=0, save_members=True
):
  """(out, members) of the grouped pool; save_members=False: the forward
  for inference (members empty; merged groups merge as they go)."""
  x = jnp.asarray(x)
  g = guide_at_rank(guide, x)
  call = jax.ffi.ffi_call(
    _target("pool_fwd", g is not None, emulated),
    (
      _sds(x.shape, x.dtype),
      _sds(
        _members_shape(groups, x, save_members),
        members_dtype(x.dtype, g is not None),
      ),
    ),
  )
  args = (x,) if g is None else (x, g)
  return call(*args, **_attrs(groups, emulated, multiprocessors, order))


def tangent(
  x,
  guide,
  groups,
  out,
  members,
  tx,
  tguide=None,
  *,
  emulated,
  multiprocessors=132,
  order=0,
):
  """tout: the tangent of the grouped pool along tx (and tguide)."""
  x = jnp.asarray(x)
  g = guide_at_rank(guide, x)
  call = jax.ffi.ffi_call(
    _target("pool_tangent", g is not None, emulated), _sds(x.shape, x.dtype)
  )
  if g is None:
    args = (x, out, members, jnp.asarray(tx, x.dtype))
  else:
    args = (
      x,
      g,
      out,
      members,
      jnp.asarray(tx, x.dtype),
      guide_at_rank(tguide, x),
    )
  return call(*args, **_attrs(groups, emulated, multiprocessors, order))


def backward(
  x, guide, groups, out, members, ct, *, emulated, multiprocessors=132, order=0
):
  """(dx, dguide): dguide at the guide's own shape (at x's rank), or None."""
  x = jnp.asarray(x)
  g = guide_at_rank(guide, x)
  ct = jnp.asarray(ct, x.dtype)
  if g is None:
    call = jax.ffi.ffi_call(
      _target("pool_bwd", False, emulated), _sds(x.shape, x.dtype)
    )
    dx = call(
      x, out, members, ct, **_attrs(groups, emulated, multiprocessors, order)
    )
    return dx, None
  call = jax.ffi.ffi_call(
    _target("pool_bwd", True, emulated),
    (_sds(x.shape, x.dtype), _sds(g.shape, x.dtype)),
  )
  return tuple(
    call(
      x, g, out, members, ct, **_attrs(groups, emulated, multiprocessors, order)
    )
  )


def emulated_forward(
  x, guide, groups, *, multiprocessors=132, order=0, save_members=True
):
  """(out, members) from the emulated CUDA forward kernel."""
  return forward(
    x,
    guide,
    groups,
    emulated=True,
    multiprocessors=multiprocessors,
    order=order,
    save_members=save_members,
  )


def emulated_tangent(
  x,
  guide,
  groups,
  out,
  members,
  tx,
  tguide=None,
  *,
  multiprocessors=132,
  order=0,
):
  """tout from the emulated CUDA tangent kernel."""
  return tangent(
    x,
    guide,
    groups,
    out,
    members,
    tx,
    tguide,
    emulated=True,
    multiprocessors=multiprocessors,
    order=order,
  )


def emulated_backward(
  x, guide, groups, out, members, ct, *, multiprocessors=132, order=0
):
  """(dx, dguide) from the emulated CUDA backward kernel(s)."""
  return backward(
    x,
    guide,
    groups,
    out,
    members,
    ct,
    emulated=True,
    multiprocessors=multiprocessors,
    order=order,
  )


def launch_plan(
  groups,
  shape,
  pass_="forward",
  *,
  multiprocessors=132,
  guide_shape=None,
  saved_members=True,
):
  """The CUDA launch(es) of one grouped call, as the CUDA handler plans them:
  blocks, threads, phases, workspace, lanes, launches (2 for a guided
  backward with a broadcast guide: the reduction), each direction's sweep."""
  a = grouping_attrs(groups)
  shape = tuple(int(s) for s in shape)
  if guide_shape is not None:
    guide_shape = tuple(int(s) for s in guide_shape)
    guide_shape = (1,) * (len(shape) - len(guide_shape)) + guide_shape
  return EMULATOR.launch_plan(
    [int(v) for v in a["group_sizes"]],
    [int(v) for v in a["directions"]],
    list(shape),
    pass_,
    int(multiprocessors),
    guide_shape,
    bool(saved_members),
  )


def cpu_plan(
  groups,
  shape,
  pass_="forward",
  *,
  threads,
  dtype="float32",
  guide_shape=None,
  saved_members=True,
):
  """The CPU kernels' plan of one grouped call for `threads` threads
  (xla_ffi/cpu_plan.h: plan_cpu): the traversal ('kind') and its work items
  (items, items_per_image, block, whole_groups, nblocks, swept_together)."""
  a = grouping_attrs(groups)
  shape = tuple(int(s) for s in shape)
  if guide_shape is not None:
    guide_shape = tuple(int(s) for s in guide_shape)
    guide_shape = (1,) * (len(shape) - len(guide_shape)) + guide_shape
  return EMULATOR.cpu_plan(
    [int(v) for v in a["group_sizes"]],
    [int(v) for v in a["directions"]],
    list(shape),
    pass_,
    int(threads),
    jnp.dtype(dtype).itemsize,
    guide_shape,
    bool(saved_members),
  )
