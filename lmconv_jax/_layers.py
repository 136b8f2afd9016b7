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
        f"as in nn.Conv).")


def check_channels(given: str, channels: int, directions: Grouping,
                   layer: str) -> None:
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
        f"it), or choose a grouping with fewer groups.")


def pool_dtype(x: Array, dtype, param_dtype):
  """The dtype the pool runs in: the layer's computation dtype, as nn.Conv's."""
  if dtype is not None:
    return jnp.dtype(dtype)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.dtype
  return jnp.result_type(x.dtype, param_dtype)   # integers: as promote_dtype


def pool_inputs(inputs, guide, *, directions: Grouping, implementation: str,
                dtype, param_dtype, layer: str) -> Array:
  """The grouped landmark pool in front of a convolution; errors name the layer.

  The pool runs in the convolution's computation dtype. With no guide that
  is the same as pooling first and casting after, since rounding is
  monotone and the pool is a max.
  """
  x = jnp.asarray(inputs)
  if x.ndim < 3:
    raise ValueError(
        f"{layer}: inputs must be NHWC, shape (..., H, W, C) with any leading "
        f"batch dims, got shape {tuple(x.shape)}.")
  c = x.shape[-1]
  check_channels(f"the input has {c} channels", c, directions, layer)
  x = x.astype(pool_dtype(x, dtype, param_dtype))
  try:
    return grouped_landmark_pool(x, directions, guide,
                                 implementation=implementation)
  except (ValueError, TypeError) as e:
    raise type(e)(f"{layer}: {e}") from e


def landmark_block(x: Array, layers: Mapping[str, Callable[..., Array]],
                   use_running_average: Optional[bool]) -> Array:
  """The LBYLNet landmark block's data flow, for linen and NNX sub-layers alike.

  ``layers`` maps the sub-layer names to callables: ``branch_conv`` (one
  3x3 convolution whose P output-channel groups are the P branches),
  ``pool_conv`` (a LandmarkConv: pool each branch in its directions, then
  3x3), ``skip_conv`` (1x1), ``out_conv`` (3x3), each followed by the
  BatchNorm ``<name>_norm``.
  """
  def conv_bn(name, v):
    return layers[f"{name}_norm"](layers[f"{name}_conv"](v),
                                  use_running_average=use_running_average)

  branches = jax.nn.relu(conv_bn("branch", x))
  y = jax.nn.relu(conv_bn("pool", branches) + conv_bn("skip", x))
  return jax.nn.relu(conv_bn("out", y))


def branch_features(features: int, branch_features: Optional[int]) -> int:
  if branch_features is None:
    return max(1, features // 2)
  return branch_features


def layer_name(module) -> str:
  name = getattr(module, "name", None)
  cls = type(module).__name__
  return f"{cls} {name!r}" if isinstance(name, str) and name != cls else cls
