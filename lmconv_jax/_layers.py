"""The layers' functional core, one home for linen and NNX alike.

Input checks and the pool in front of a convolution, and the LBYLNet block's
data flow: ``lmconv_jax.linen`` and ``lmconv_jax.nnx`` both import these;
neither re-implements them.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from lmconv_jax.ops import Grouping, grouped_landmark_pool, resolve_grouping

Array = jax.Array


def num_groups(directions: Grouping, layer: str) -> int:
  try:
    return len(resolve_grouping(directions))
  except ValueError as e:
    raise ValueError(f"{layer}: {e}") from e


def check_kernel_size(kernel_size, layer: str) -> None:
  """The pool is 2-D, so the convolution must be (an int is 1-D in Flax)."""
  size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  if len(size) != 2:
    raise ValueError(
      f"{layer}: kernel_size must be a pair (kh, kw) for a 2-D landmark "
      f"convolution over NHWC inputs, got kernel_size={kernel_size!r}. "
      f"Pass e.g. kernel_size=(3, 3) (an int means a 1-D kernel in Flax, "
      f"as in nn.Conv)."
    )


def check_channels(
  given: str, channels: int, directions: Grouping, layer: str
) -> None:
  """Raises a layer-level error when the channels do not split into P groups."""
  p = num_groups(directions, layer)
  if channels % p:
    lower, upper = (channels // p) * p, (channels // p + 1) * p
    options = f"{lower} or {upper}" if lower else f"{upper}"
    raise ValueError(
      f"{layer}: {given}, but directions={directions!r} "
      f"splits the channels into {p} equal groups (one per direction group), "
      f"so the channel count must be a multiple of {p}. Fix: give the layer "
      f"{options} input channels (e.g. with a 1x1 convolution in front of "
      f"it), or choose a grouping with fewer groups."
    )


def pool_dtype(x: Array, dtype, param_dtype):
  """The dtype the pool runs in: the layer's computation dtype, as nn.Conv's."""
  if dtype is not None:
    return jnp.dtype(dtype)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.dtype
  return jnp.result_type(x.dtype, param_dtype)  # integers: as promote_dtype


def pool_inputs(
  inputs,
  guide,
  *,
  directions: Grouping,
  implementation: str,
  dtype,
  param_dtype,
  layer: str,
) -> Array:
  """The grouped landmark pool in front of a convolution; errors name the layer.

  The pool runs in the convolution's computation dtype. With no guide that
  is the same as pooling first and casting after, since rounding is
  monotone and the pool is a max.
  """
  x = jnp.asarray(inputs)
  if x.ndim < 3:
    raise ValueError(
      f"{layer}: inputs must be NHWC, shape (..., H, W, C) with any leading "
      f"batch dims, got shape {tuple(x.shape)}."
    )
  c = x.shape[-1]
  check_channels(f"the input has {c} channels", c, directions, layer)
  x = x.astype(pool_dtype(x, dtype, param_dtype))
  try:
    return grouped_landmark_pool(
      x, directions, guide, implementation=implementation
    )
  except (ValueError, TypeError) as e:
    raise type(e)(f"{layer}: {e}") from e


def landmark_block(
  x: Array,
  layers: Mapping[str, Callable[..., Array]],
  activation: Callable[[Array], Array],
) -> Array:
  """The LBYLNet landmark block's data flow, for linen and NNX sub-layers alike.

  ``layers`` maps the sub-layer names to one-argument callables:
  ``branch_conv`` (one 3x3 convolution whose P output-channel groups are
  the P branches), ``pool_conv`` (a LandmarkConv: pool each branch in its
  directions, then 3x3), ``skip_conv`` (1x1), ``out_conv`` (3x3), each
  followed by its normalisation ``<name>_norm`` where there is one (the
  caller binds the train / eval mode). ``activation`` is applied where
  LBYLNet applies ReLU.
  """

  def conv_norm(name, v):
    v = layers[f"{name}_conv"](v)
    norm = layers.get(f"{name}_norm")
    return v if norm is None else norm(v)

  branches = activation(conv_norm("branch", x))
  y = activation(conv_norm("pool", branches) + conv_norm("skip", x))
  return activation(conv_norm("out", y))


NORMS = ("batch", "layer", None)


def check_norm(norm, layer: str) -> None:
  """``norm`` is a known name, None, or a callable factory."""
  if norm in NORMS or (callable(norm) and not isinstance(norm, str)):
    return
  raise ValueError(
    f"{layer}: norm={norm!r} is not a normalisation this block knows. Give "
    f"'batch' (BatchNorm, LBYLNet's; statistics in batch_stats), 'layer' "
    f"(LayerNorm), None (no normalisation; the convolutions get a bias), "
    f"or a factory of a normalisation layer (e.g. functools.partial("
    f"nn.GroupNorm, num_groups=8) in linen, functools.partial("
    f"nnx.GroupNorm, num_groups=8) in NNX)."
  )


_SAME_SIZE_PADDINGS = ("SAME", "CIRCULAR", "REFLECT")


def check_block_padding(padding, layer: str):
  """The 3x3 convolutions' padding, which must keep H and W.

  Returns it as nn.Conv takes it (a string upper-cased).
  """
  if isinstance(padding, str) and padding.upper() in _SAME_SIZE_PADDINGS:
    return padding.upper()
  explicit = padding
  if isinstance(padding, int) and not isinstance(padding, bool):
    explicit = ((padding, padding), (padding, padding))
  try:
    ok = tuple(tuple(int(e) for e in p) for p in explicit) == ((1, 1), (1, 1))
  except (TypeError, ValueError):
    ok = False
  if ok:
    return padding
  raise ValueError(
    f"{layer}: padding={padding!r} does not keep the resolution of the 3x3 "
    f"convolutions, and the block adds its pooled path to a 1x1 skip of the "
    f"input, so both must have the input's H and W. Give 'SAME' (zeros, "
    f"LBYLNet's), 'CIRCULAR' (wrap around the image), 'REFLECT', or 1 / "
    f"((1, 1), (1, 1))."
  )


def branch_features(features: int, branch_features: Optional[int]) -> int:
  if branch_features is None:
    return max(1, features // 2)
  return branch_features


def layer_name(module) -> str:
  name = getattr(module, "name", None)
  cls = type(module).__name__
  return f"{cls} {name!r}" if isinstance(name, str) and name != cls else cls
