"""The compiled kernels: loading and registration.

The nanobind modules ``_lmconv_cpu`` (always built) and ``_lmconv_cuda`` (built
where nvcc was found) each hand over a dict {target name: FFI handler
capsule}, registered here once, at import, under the names of
lmconv_jax/_primitives.py (TARGET_NAMES), together with the primitives'
lowerings for every platform. Each target is also registered as batch
partitionable, so that a module exported with jax.export partitions over
leading dims in any process that imported lmconv_jax.
"""

from __future__ import annotations

import warnings

import jax

from lmconv_jax import _primitives

_MODULES = {}  # platform ("cpu" / "cuda") -> compiled module
_IMPORT_ERRORS = {}  # platform -> why it is missing

try:
  from lmconv_jax import _lmconv_cpu
except ImportError as e:
  _IMPORT_ERRORS["cpu"] = f"{type(e).__name__}: {e}"
else:
  _MODULES["cpu"] = _lmconv_cpu

try:  # built only where nvcc was found
  from lmconv_jax import _lmconv_cuda
except ImportError as e:
  _IMPORT_ERRORS["cuda"] = f"{type(e).__name__}: {e}"
else:
  _MODULES["cuda"] = _lmconv_cuda

if "cpu" not in _MODULES:
  warnings.warn(
    f"lmconv_jax: the compiled CPU kernels are missing "
    f"({_IMPORT_ERRORS['cpu']}), so every pool runs the pure-jnp reference "
    f"(about 10x slower on CPU). Fix: build the package "
    f"(pip install --no-build-isolation -e . in a checkout, or "
    f"pip install lmconv-jax), and do not import lmconv_jax from a source "
    f"tree that shadows the installed package.",
    stacklevel=2,
  )

# jax's platform names for register_ffi_target.
_XLA_PLATFORM = {"cpu": "cpu", "cuda": "CUDA"}

for _platform, _module in _MODULES.items():
  for _name, _capsule in _module.registrations().items():
    jax.ffi.register_ffi_target(
      _name, _capsule, platform=_XLA_PLATFORM[_platform]
    )
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)

_primitives.register_lowerings(
  {p: tuple(m.registrations()) for p, m in _MODULES.items()}
)

TARGET_NAMES = _primitives.TARGET_NAMES


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
      info[platform] = {
        "built": False,
        "error": _IMPORT_ERRORS.get(platform, ""),
      }
    else:
      info[platform] = {
        "built": True,
        "file": module.__file__,
        "targets": sorted(module.registrations()),
        **dict(module.build_info()),
      }
  return info


def export_disabled_checks() -> list:
  """The ``disabled_checks`` that ``jax.export`` needs for our custom calls.

  Example: ``jax.export.export(jax.jit(f),
  disabled_checks=lmconv_jax.export_disabled_checks())(x)``. The process that
  loads the exported module must ``import lmconv_jax`` (it registers them).

  The two mistakes, and jax's words for them (README.md, "jax.export"):
  exporting without these checks raises ``ValueError: Cannot serialize code
  with custom calls whose targets have no compatibility guarantees`` with
  the MLIR of each ``lmconv_pool_*`` call; calling the exported module in a
  process that never imported lmconv_jax fails in XLA with ``NOT_FOUND: No
  FFI handler registered for lmconv_pool_fwd on a platform Host`` (or the
  GPU's platform). Neither error passes through lmconv_jax's code, so
  neither can carry a note from it.
  """
  from jax import export

  return [export.DisabledSafetyCheck.custom_call(name) for name in TARGET_NAMES]
