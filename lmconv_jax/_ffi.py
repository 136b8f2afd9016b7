"""The XLA FFI kernels: loading, registration, and the calls that reach them.

The compiled modules ``_lmconv_cpu`` (always built) and ``_lmconv_cuda`` (built
where nvcc was found) each hand over a dict of FFI handlers, registered here
once, at import, together with the lowerings of the JAX primitives that call
them (lmconv_jax/_primitives.py). ``pool_forward``, ``pool_tangent`` and
``pool_backward`` bind those primitives and check nothing beyond asserts:
lmconv_jax.ops validates inputs. The primitives carry the rules for every
transformation (grad, jvp, vmap, sharding; docs/transforms.md).

Targets (one handler each, dispatching on dtype: float32, float64, float16,
bfloat16), with the direction passed as six int64 attributes:

  lmconv_pool_fwd             (x)                  -> out
  lmconv_pool_fwd_guided      (x, g)               -> out
  lmconv_pool_tangent         (x, out, tx)         -> tout
  lmconv_pool_tangent_guided  (x, g, out, tx, tg)  -> tout
  lmconv_pool_bwd             (x, out, ct)         -> dx
  lmconv_pool_bwd_guided      (x, g, out, ct)      -> dx, dguide

Each is also registered as batch partitionable, so that a module exported
with jax.export partitions over leading dims in any process that imported
lmconv_jax.
"""

from __future__ import annotations

import importlib
from typing import Optional

import jax

from lmconv_jax import _primitives
from lmconv_jax.directions import Direction

_MODULES = {}  # platform ("cpu" / "cuda") -> compiled module
_IMPORT_ERRORS = {}  # platform -> why it is missing

# A missing module is not an error: without the CPU one ops.py falls back to
# the reference; without the CUDA one this is a CPU-only build.
for _platform in ("cpu", "cuda"):
  try:
    _MODULES[_platform] = importlib.import_module(
        f"lmconv_jax._lmconv_{_platform}")
  except ImportError as e:
    _IMPORT_ERRORS[_platform] = f"{type(e).__name__}: {e}"

# jax's platform names for register_ffi_target.
_XLA_PLATFORM = {"cpu": "cpu", "cuda": "CUDA"}

for _platform, _module in _MODULES.items():
  for _name, _capsule in _module.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule,
                                platform=_XLA_PLATFORM[_platform])
# The primitives lower on every platform, also one without kernels here (so
# that jax.export can target it); only a compiled module's targets are checked.
for _platform in _XLA_PLATFORM:
  _module = _MODULES.get(_platform)
  _primitives.register_lowerings(
      _platform, None if _module is None else _module.registrations())


def has_kernels(platform: str) -> bool:
  """True if the kernels for ``platform`` ("cpu" or "cuda") were compiled."""
  return platform in _MODULES


def available_platforms() -> tuple[str, ...]:
  """The platforms with compiled kernels, e.g. ("cpu",) or ("cpu", "cuda")."""
  return tuple(p for p in ("cpu", "cuda") if p in _MODULES)


def build_info() -> dict:
  """What was compiled, with which nanobind and jaxlib headers, and why a
  module is missing."""
  info = {"jax": jax.__version__, "platforms": available_platforms()}
  for platform in ("cpu", "cuda"):
    module = _MODULES.get(platform)
    if module is None:
      info[platform] = {"built": False,
                        "error": _IMPORT_ERRORS.get(platform, "")}
    else:
      details = dict(module.build_info()) if hasattr(module,
                                                     "build_info") else {}
      info[platform] = {"built": True, "file": module.__file__,
                        "targets": sorted(module.registrations()), **details}
  if ("cuda" not in _MODULES and _EMULATOR is not None
      and not _EMULATOR.build_info()["cuda_compiled"]):
    info["cuda"]["error"] = (
        "not compiled: CMake found no CUDA compiler (nvcc) when lmconv_jax "
        "was built")
  return info


# Python ints become int64 attributes; names match cpu.cc's DirectionAttrs.
_direction_attrs = _primitives.direction_attrs


def _like(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def pool_forward(x, guide: Optional[jax.Array], direction: Direction):
  """out = landmark pool of x (shape (..., H, W, C)) in ``direction``.

  ``guide`` is None (g = 1, a fast path that reads no guide) or an array of
  exactly x's shape and dtype. Differentiable in both modes, batchable and
  shardable: the call is the primitive ``lmconv_pool``.
  """
  assert x.ndim >= 3, x.shape
  if guide is not None:
    assert guide.shape == x.shape and guide.dtype == x.dtype, (guide, x)
  return _primitives.pool(x, guide, direction)


def pool_tangent(x, guide: Optional[jax.Array], out, tx, tguide,
                 direction: Direction):
  """The tangent of ``out = pool_forward(x, guide)`` along (tx, tguide).

  It follows the winners of the forward max with the backward's tie rule;
  ``tguide`` is None when ``guide`` is.
  """
  assert out.shape == x.shape == tx.shape, (x.shape, out.shape, tx.shape)
  return _primitives.pool_tangent(x, guide, out, tx, tguide, direction)


def pool_backward(x, guide: Optional[jax.Array], out, ct,
                  direction: Direction):
  """(dx, dguide) for cotangent ``ct`` of ``out = pool_forward(x, guide)``.

  dguide is None when guide is None. The kernel recomputes each pixel's max
  from x and out, so nothing else is needed from the forward pass.
  """
  assert out.shape == x.shape == ct.shape, (x.shape, out.shape, ct.shape)
  if guide is not None:
    assert guide.shape == x.shape, (guide.shape, x.shape)
  return _primitives.pool_backward(x, guide, out, ct, direction)


# --------------------------------------------------------------------------
# The CPU emulation of the CUDA kernels (for tests; xla_ffi/emulate.cc). Its
# targets, lmconv_emu_pool_{fwd,bwd,tangent}[_guided] on platform "cpu", run
# the CUDA kernel bodies for every block and thread of the launch the CUDA
# handler would make, phase by phase. Always built, GPU or not.

try:
  _EMULATOR = importlib.import_module("lmconv_jax._lmconv_cuda_emu")
except ImportError as e:
  _EMULATOR = None
  _IMPORT_ERRORS["cuda_emulator"] = f"{type(e).__name__}: {e}"
else:
  for _name, _capsule in _EMULATOR.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

# The CUDA handler plans for its GPU's multiprocessor count; an H100 has 132.
_H100_MULTIPROCESSORS = 132


def _emulated_cuda_call(kind, operands, direction, guided, n_out,
                        multiprocessors, order):
  target = f"lmconv_emu_pool_{kind}" + ("_guided" if guided else "")
  x = operands[0]
  call = jax.ffi.ffi_call(target, (_like(x),) * n_out,
                          vmap_method="broadcast_all")
  return call(*operands, **_direction_attrs(direction),
              multiprocessors=int(multiprocessors), order=int(order))


def _emulated_pool_forward(x, guide, direction: Direction, *,
                           multiprocessors=_H100_MULTIPROCESSORS, order=0):
  """pool_forward computed by the CPU emulation of the CUDA kernel.

  ``multiprocessors`` is the GPU's (more split channels into more blocks);
  ``order=1`` runs the blocks and threads of each phase in reverse.
  """
  operands = (x,) if guide is None else (x, guide)
  (out,) = _emulated_cuda_call("fwd", operands, direction, guide is not None,
                               1, multiprocessors, order)
  return out


def _emulated_pool_backward(x, guide, out, ct, direction: Direction, *,
                            multiprocessors=_H100_MULTIPROCESSORS, order=0):
  """pool_backward computed by the CPU emulation of the CUDA kernel."""
  if guide is None:
    (dx,) = _emulated_cuda_call("bwd", (x, out, ct), direction, False, 1,
                                multiprocessors, order)
    return dx, None
  dx, dguide = _emulated_cuda_call("bwd", (x, guide, out, ct), direction,
                                   True, 2, multiprocessors, order)
  return dx, dguide


def _emulated_pool_tangent(x, guide, out, tx, tguide, direction: Direction,
                           *, multiprocessors=_H100_MULTIPROCESSORS, order=0):
  """pool_tangent computed by the CPU emulation of the CUDA kernel."""
  operands = ((x, out, tx) if guide is None
              else (x, guide, out, tx, tguide))
  (tout,) = _emulated_cuda_call("tangent", operands, direction,
                                guide is not None, 1, multiprocessors, order)
  return tout


def _cuda_launch_plan(direction: Direction, shape, backward=False,
                      multiprocessors=_H100_MULTIPROCESSORS,
                      tangent=False) -> dict:
  """The launch the CUDA handler makes for x of ``shape`` (..., H, W, C)."""
  *lead, h, w, c = shape
  batch = 1
  for n in lead:
    batch *= n
  return dict(_EMULATOR.launch_plan(
      **_direction_attrs(direction), batch=batch, height=h, width=w,
      channels=c, backward=backward, multiprocessors=multiprocessors,
      tangent=tangent))


# Every FFI target name, in the order of the module docstring.
TARGET_NAMES = tuple(name + suffix
                     for name in _primitives.TARGETS.values()
                     for suffix in ("", "_guided"))


def export_disabled_checks() -> list:
  """The ``disabled_checks`` that ``jax.export`` needs for our custom calls.

  Example: ``jax.export.export(jax.jit(f),
  disabled_checks=lmconv_jax.export_disabled_checks())(x)``. The process that
  loads the exported module must ``import lmconv_jax`` (it registers them).
  """
  from jax import export
  return [export.DisabledSafetyCheck.custom_call(name) for name in TARGET_NAMES]

