"""The public ops: input checks and the choice of implementation.

``grouped_landmark_pool`` splits channels into groups and pools each group in
its own direction (or the max of several directions): ONE primitive, one
custom call per pass for the whole array (lmconv_jax/_primitives.py).
``landmark_pool`` is its one-group case. See docs/semantics.md for the
contract.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lmconv_jax import _ffi, _primitives
from lmconv_jax.directions import (
  ALL_QUADRANTS,
  GROUPINGS,
  LEFT_RIGHT,
  TOP_BOTTOM,
  DirectionLike,
  Grouping,
  resolve,
  resolve_grouping,
)

IMPLEMENTATIONS = _primitives.IMPLEMENTATIONS
DTYPES = (jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16)
# The same dtypes by name (the CLI's choices, `info`'s kernel dtypes, errors).
DTYPE_NAMES = tuple(jnp.dtype(d).name for d in DTYPES)

__all__ = [
  "ALL_QUADRANTS",
  "GROUPINGS",
  "IMPLEMENTATIONS",
  "LEFT_RIGHT",
  "TOP_BOTTOM",
  "check_channels",
  "check_guide",
  "check_x",
  "grouped_landmark_pool",
  "landmark_pool",
  "landmark_pool_reference",
  "resolve_grouping",
  "resolve_implementation",
]


# --------------------------------------------------------------------------
# Input checks: every error names what was given, what was expected, the fix.


def check_x(x, where: str) -> jax.Array:
  """x as a jax array of shape (..., H, W, C) and a supported float dtype."""
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if x.ndim < 3:
    raise ValueError(
      f"{where}: x must have shape (..., H, W, C) with at least 3 dims, got "
      f"shape {tuple(x.shape)}. Add the missing axes, e.g. x[..., None] for "
      f"a single channel."
    )
  if x.ndim > 11:
    raise ValueError(
      f"{where}: x has {x.ndim} dims; at most 11 are supported (8 batch "
      f"dims before (H, W, C)). Reshape the batch dims into fewer."
    )
  dtype = jnp.dtype(x.dtype)
  if dtype not in [jnp.dtype(d) for d in DTYPES]:
    raise TypeError(
      f"{where}: x must be {', '.join(DTYPE_NAMES[:-1])} or "
      f"{DTYPE_NAMES[-1]}, got {dtype}. Cast it first, e.g. "
      f"x.astype(jnp.float32)."
    )
  return jnp.asarray(x)


def check_guide(guide, x: jax.Array, where: str) -> Optional[jax.Array]:
  """The guide at x's rank (leading 1s added, NOT broadcast) in x's dtype."""
  if guide is None:
    return None
  guide = jnp.asarray(guide)
  if not (
    jnp.issubdtype(guide.dtype, jnp.floating)
    or jnp.issubdtype(guide.dtype, jnp.integer)
    or guide.dtype == jnp.bool_
  ):
    raise TypeError(
      f"{where}: guide must be real, got dtype {guide.dtype}. Give a float "
      f"guide, e.g. guide.real.astype(x.dtype)."
    )
  # Dim by dim, not np.broadcast_shapes: dims may be symbolic (jax.export),
  # where == says whether they are provably equal.
  gshape, xshape = tuple(guide.shape), tuple(x.shape)
  if len(gshape) > len(xshape) or not all(
    g == 1 or g == d for g, d in zip(gshape[::-1], xshape[::-1])
  ):
    raise ValueError(
      f"{where}: guide of shape {tuple(guide.shape)} does not broadcast to x "
      f"of shape {tuple(x.shape)}. Give a guide per pixel and channel "
      f"(..., H, W, C), per pixel (..., H, W, 1), per channel (C,) or per "
      f"batch (..., 1, 1, 1)."
    )
  if len(gshape) == 2 and gshape == xshape[-3:-1]:
    # Broadcasting aligns trailing dims: an (H, W) guide would be read as
    # (W, C), per column and channel, which is not what (H, W) says.
    raise ValueError(
      f"{where}: a guide of shape {gshape} matches x's (H, W) = {gshape} "
      f"but broadcasts against its trailing (W, C) = {xshape[-2:]}, per "
      f"column and channel. For a guide per pixel add the channel axis: "
      f"guide[..., None] (shape (H, W, 1)); for one per column and channel "
      f"reshape it to (1, W, C)."
    )
  guide = guide.astype(x.dtype)
  return guide.reshape((1,) * (x.ndim - guide.ndim) + tuple(guide.shape))


def check_channels(channels: int, groups: int, where: str) -> None:
  """The one check that C splits into ``groups`` equal groups."""
  if not isinstance(channels, int) and groups > 1:
    raise ValueError(
      f"{where}: the channel count is symbolic ({channels}), but "
      f"{groups} direction groups need a concrete one (each group is a "
      f"static block of C/{groups} channels). Export with a concrete C, "
      f"e.g. jax.export.symbolic_shape('b, 32, 32, 64')."
    )
  if channels % groups:
    raise ValueError(
      f"{where}: {channels} channels do not split into {groups} equal "
      f"groups (one per direction group). Use a channel count that is a "
      f"multiple of {groups}, e.g. {groups * max(1, round(channels / groups))}."
    )


def platform() -> str:
  """The default backend as lmconv_jax names platforms: "cpu", "cuda", ..."""
  return "cuda" if jax.default_backend() == "gpu" else jax.default_backend()


def resolve_implementation(
  implementation: str = "auto", where: str = "lmconv_jax"
) -> str:
  """What ``implementation`` runs on the default backend: "ffi", "pallas" or
  "reference".

  "auto" is decided again, per platform, when a function is lowered (so a
  function traced here lowers and exports for other platforms too); this is
  what it picks for the default backend: our custom calls where this build
  compiled them (cpu, cuda), the Pallas kernels on a TPU, the reference
  elsewhere. "pallas" runs the Pallas TPU kernels on a TPU and in Pallas'
  interpret mode (exact, slow) anywhere else. "ffi" on a platform without
  compiled kernels raises, naming the fix.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"{where}: unknown implementation {implementation!r}; expected one of "
      f"{', '.join(map(repr, IMPLEMENTATIONS))}."
    )
  if implementation in ("reference", "pallas"):
    return implementation
  platform = globals()["platform"]()
  if implementation == "auto" and platform in _primitives.PALLAS_PLATFORMS:
    return "pallas"
  if _ffi.has_kernels(platform):
    return "ffi"
  if implementation == "auto":
    return "reference"
  if platform == "cpu":
    fix = (
      "the compiled CPU extension is missing: build lmconv_jax "
      "(pip install --no-build-isolation -e . in a checkout)"
    )
  elif platform == "cuda":
    fix = (
      "rebuild lmconv_jax where `nvcc` is on PATH (pip install "
      "--no-build-isolation -e .) to get the CUDA kernels"
    )
  elif platform in _primitives.PALLAS_PLATFORMS:
    fix = (
      f"on {platform!r} the kernels are Pallas kernels: use "
      f"implementation='pallas' (or 'auto')"
    )
  else:
    fix = f"lmconv_jax has no kernels for {platform!r}"
  raise NotImplementedError(
    f"{where}: implementation='ffi' has no kernel for platform {platform!r} "
    f"(compiled: {', '.join(_ffi.available_platforms()) or 'none'}); "
    f"{fix}. Or use implementation='auto', 'pallas' or 'reference'; "
    f"`python -m lmconv_jax info` shows what is available."
  )


# --------------------------------------------------------------------------
# Public API.


def grouped_landmark_pool(
  x: jax.Array,
  directions: Grouping,
  guide: Optional[jax.Array] = None,
  *,
  implementation: str = "auto",
) -> jax.Array:
  """Splits channels into ``len(directions)`` groups and pools each group.

  One primitive for the whole array: one custom call per pass (forward,
  backward, tangent), with no slice or concatenate of x around it.

  Args:
    x: float array of shape ``(..., H, W, C)``; C must be a multiple of the
      number of groups.
    directions: a grouping name - ``"quadrants"`` (P = 4, the original
      PConv2d4: top_left, top_right, bottom_left, bottom_right),
      ``"octants"`` (P = 8, PConv2d8: I1 ... I8), ``"top_bottom"`` and
      ``"left_right"`` (P = 2, LBYLNet: each group the max of two quadrant
      pools), ``"all_quadrants"`` (P = 1, the max of all four) - or a
      sequence whose items are a direction or a tuple of directions merged
      by max (ties go to the first listed).
    guide: None or an array broadcastable to ``x`` (per pixel, per channel
      ``(C,)``, per batch ``(..., 1, 1, 1)``, ...). It reaches the kernels
      at its own shape; its gradient comes back at that shape.
    implementation: ``"ffi"`` (our XLA custom call), ``"pallas"`` (our
      Pallas TPU kernels; interpret mode off a TPU), ``"reference"`` (pure
      jnp) or ``"auto"`` (per platform, at lowering: our custom calls where
      this build compiled them, the Pallas kernels on a TPU, the reference
      elsewhere).

  Example:
    >>> import jax.numpy as jnp, lmconv_jax
    >>> x = jnp.arange(16.).reshape(1, 2, 2, 4)
    >>> lmconv_jax.grouped_landmark_pool(x, "quadrants").shape
    (1, 2, 2, 4)
  """
  where = "grouped_landmark_pool"
  groups = resolve_grouping(directions)
  resolve_implementation(implementation, where)
  x = check_x(x, where)
  g = check_guide(guide, x, where)
  check_channels(x.shape[-1], len(groups), where)
  return _primitives.grouped_pool(x, g, groups, implementation)


def landmark_pool(
  x: jax.Array,
  direction: DirectionLike,
  guide: Optional[jax.Array] = None,
  *,
  implementation: str = "auto",
) -> jax.Array:
  """Directional landmark pool (a running max over a region) of ``x``.

  The one-group case of :func:`grouped_landmark_pool`.

  Args:
    x: float array of shape ``(..., H, W, C)`` (NHWC, any leading batch dims).
    direction: a name from :data:`QUADRANTS` or :data:`OCTANTS` (e.g.
      ``"top_left"``, ``"east_northeast"``), an original alias (``"tl"``,
      ``"I1"``) or a valid :class:`Direction`.
    guide: None (all ones: the output is the max over the pixel's region) or
      an array broadcastable to ``x``; each pixel blends
      ``g * max + (1 - g) * x``. Its gradient is summed over broadcast dims.
    implementation: ``"ffi"``, ``"pallas"``, ``"reference"`` or ``"auto"``,
      as in :func:`grouped_landmark_pool`.

  Returns:
    An array with the shape and dtype of ``x``.

  Example:
    >>> import jax.numpy as jnp, lmconv_jax
    >>> x = jnp.array([[1., 0.], [0., 2.]])[..., None]
    >>> lmconv_jax.landmark_pool(x, "top_left")[..., 0].tolist()
    [[1.0, 1.0], [1.0, 2.0]]
  """
  where = "landmark_pool"
  groups = ((resolve(direction),),)
  resolve_implementation(implementation, where)
  x = check_x(x, where)
  g = check_guide(guide, x, where)
  return _primitives.grouped_pool(x, g, groups, implementation)


def landmark_pool_reference(
  x: jax.Array, direction: DirectionLike, guide: Optional[jax.Array] = None
) -> jax.Array:
  """Pure-jnp landmark pool of ``x`` (shape (..., H, W, C)) in ``direction``.

  ``landmark_pool(..., implementation="reference")``: the same primitive as
  the kernels (its JVP is ``reference.grouped_tangent``, its transpose
  ``reference.grouped_backward``, the contract's formulas literally),
  lowered to lmconv_jax/reference.py's jnp on every platform, never to a
  custom call. ``guide`` is None (all ones) or an array broadcastable to
  ``x``.
  """
  return landmark_pool(x, direction, guide, implementation="reference")
