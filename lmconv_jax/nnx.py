"""Flax NNX layers: the twins of ``lmconv_jax.linen``'s, over the same core.

``LandmarkConv`` subclasses ``flax.nnx.Conv``: the same constructor
(``in_features, out_features, kernel_size, strides, *, ..., rngs``), the same
``kernel`` / ``bias`` parameters, and the pool of the linen layer in front
(``lmconv_jax._layers.pool_inputs``); ``LandmarkBlock`` runs the linen block's
data flow (``lmconv_jax._layers.landmark_block``) over NNX sub-layers. Given
the same parameters, linen and NNX layers compute the same function.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import PaddingLike

from lmconv_jax import _layers
from lmconv_jax.ops import Grouping

Array = jax.Array

__all__ = ["LandmarkBlock", "LandmarkConv", "LandmarkConv4", "LandmarkConv8"]


_default_kernel_init = nnx.nn.linear.default_kernel_init
# nnx.Conv's keyword fields and defaults, as this Flax has them: the layers
# below spell every field out (so that help() and IDEs show them) with
# nnx.Conv's own defaults, and pass on those this Flax's nnx.Conv takes.
_CONV_FIELDS = inspect.signature(nnx.Conv.__init__).parameters
_NO_METADATA = types.MappingProxyType({})


def _conv_default(name: str, fallback: Any) -> Any:
  field = _CONV_FIELDS.get(name)
  return fallback if field is None else field.default


def _conv_kwargs(layer: str, **fields) -> dict:
  """The fields nnx.Conv takes; one it does not take must be at its default."""
  kwargs = {}
  for name, value in fields.items():
    if name in _CONV_FIELDS:
      kwargs[name] = value
    elif value is not _MISSING_DEFAULTS.get(name, value):
      raise TypeError(
        f"{layer}: this Flax's nnx.Conv has no field {name!r}, so "
        f"{name}={value!r} cannot be honoured; leave it at its default or "
        f"upgrade flax."
      )
  return kwargs


_MISSING_DEFAULTS = {
  "conv_general_dilated": jax.lax.conv_general_dilated,
  "promote_dtype": None,
  "preferred_element_type": None,
  "kernel_metadata": _NO_METADATA,
  "bias_metadata": _NO_METADATA,
}
_CONV_GENERAL_DILATED = _conv_default(
  "conv_general_dilated", jax.lax.conv_general_dilated
)
_PROMOTE_DTYPE = _conv_default("promote_dtype", None)
_BIAS_INIT = _conv_default("bias_init", nnx.initializers.zeros_init())


def _frozen(directions: Grouping) -> Grouping:
  """Lists to tuples, so that the grouping is a static NNX attribute."""
  if isinstance(directions, (list, tuple)):
    return tuple(_frozen(d) for d in directions)
  return directions


class LandmarkConv(nnx.Conv):
  """A grouped landmark pool followed by ``flax.nnx.Conv``.

  The NNX twin of :class:`lmconv_jax.linen.LandmarkConv`: the input's C
  channels are split into P equal groups in the order of ``directions``,
  each group is replaced by its landmark pool, and ``nnx.Conv`` mixes the
  result. Construct it exactly like ``nnx.Conv``: every field of
  ``nnx.Conv``, with its name, order and default, is in the signature and
  passed on; ``in_features`` must be a multiple of P.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lmconv_jax
    >>> layer = lmconv_jax.nnx.LandmarkConv(2, 1, (1, 1),
    ...                                     directions="left_right",
    ...                                     use_bias=False,
    ...                                     kernel_init=nnx.initializers.ones,
    ...                                     rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias
    ((1, 1, 2, 1), None)
    >>> x = jnp.zeros((1, 3, 3, 2), jnp.float32).at[0, 1, 1, :].set(1.)
    >>> layer(x)[0, ..., 0]   # pixels seeing (1, 1) to the left / right
    Array([[1., 2., 1.],
           [1., 2., 1.],
           [1., 2., 1.]], dtype=float32)

  Attributes:
    kernel: the ``nnx.Param`` kernel, shape ``(kh, kw, in_features //
      feature_group_count, out_features)``.
    bias: the ``nnx.Param`` bias, shape ``(out_features,)``, or None.
    in_features, out_features, kernel_size, strides, padding, input_dilation,
    kernel_dilation, feature_group_count, use_bias, mask, dtype, param_dtype,
    precision: as in ``nnx.Conv``.
    directions: the grouping: ``"quadrants"`` (P = 4), ``"octants"``
      (P = 8), ``"top_bottom"`` / ``"left_right"`` (P = 2),
      ``"all_quadrants"`` (P = 1) or a sequence of directions / tuples of
      directions merged by max.
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``, for the pool.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: Union[int, Sequence[int]],
    strides: Union[None, int, Sequence[int]] = 1,
    *,
    padding: PaddingLike = "SAME",
    input_dilation: Union[None, int, Sequence[int]] = 1,
    kernel_dilation: Union[None, int, Sequence[int]] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    mask: Optional[Array] = None,
    dtype: Optional[Any] = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    kernel_init: Callable[..., Array] = _default_kernel_init,
    bias_init: Callable[..., Array] = _BIAS_INIT,
    conv_general_dilated: Callable[..., Array] = (_CONV_GENERAL_DILATED),
    promote_dtype: Any = _PROMOTE_DTYPE,
    preferred_element_type: Optional[Any] = None,
    directions: Grouping = "quadrants",
    implementation: str = "auto",
    rngs: nnx.Rngs,
    kernel_metadata: Any = _NO_METADATA,
    bias_metadata: Any = _NO_METADATA,
  ):
    layer = type(self).__name__
    _layers.check_kernel_size(kernel_size, layer)
    _layers.check_channels(
      f"in_features={in_features}", in_features, directions, layer
    )
    kwargs = _conv_kwargs(
      layer,
      padding=padding,
      input_dilation=input_dilation,
      kernel_dilation=kernel_dilation,
      feature_group_count=feature_group_count,
      use_bias=use_bias,
      mask=mask,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      conv_general_dilated=conv_general_dilated,
      promote_dtype=promote_dtype,
      preferred_element_type=preferred_element_type,
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
    )
    super().__init__(
      in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs
    )
    self.directions = _frozen(directions)
    self.implementation = implementation

  def __call__(
    self, inputs: Array, guide: Optional[Array] = None, *, out_sharding=None
  ) -> Array:
    """Pools ``inputs`` (..., H, W, C) in its direction groups, then convolves.

    Args:
      inputs: NHWC input, ``(*batch_dims, H, W, in_features)``.
      guide: None (a plain max) or an array broadcastable to ``inputs``.
      out_sharding: as in ``nnx.Conv``.
    """
    c = jnp.shape(inputs)[-1] if jnp.ndim(inputs) else None
    if c is not None and c != self.in_features:
      raise ValueError(
        f"{type(self).__name__}: the input has {c} channels, but "
        f"in_features={self.in_features}. Pass inputs of shape "
        f"(..., H, W, {self.in_features}) or build the layer with "
        f"in_features={c}."
      )
    pooled = _layers.pool_inputs(
      inputs,
      guide,
      directions=self.directions,
      implementation=self.implementation,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      layer=type(self).__name__,
    )
    if out_sharding is None:
      return super().__call__(pooled)
    return super().__call__(pooled, out_sharding=out_sharding)


class _FixedGrouping(LandmarkConv):
  """A LandmarkConv whose grouping is the subclass's ``_grouping``.

  Constructed like ``nnx.Conv``, without ``directions``.
  """

  _grouping: ClassVar[str]

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: Union[int, Sequence[int]],
    strides: Union[None, int, Sequence[int]] = 1,
    *,
    padding: PaddingLike = "SAME",
    input_dilation: Union[None, int, Sequence[int]] = 1,
    kernel_dilation: Union[None, int, Sequence[int]] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    mask: Optional[Array] = None,
    dtype: Optional[Any] = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    kernel_init: Callable[..., Array] = _default_kernel_init,
    bias_init: Callable[..., Array] = _BIAS_INIT,
    conv_general_dilated: Callable[..., Array] = (_CONV_GENERAL_DILATED),
    promote_dtype: Any = _PROMOTE_DTYPE,
    preferred_element_type: Optional[Any] = None,
    implementation: str = "auto",
    rngs: nnx.Rngs,
    kernel_metadata: Any = _NO_METADATA,
    bias_metadata: Any = _NO_METADATA,
  ):
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      padding=padding,
      input_dilation=input_dilation,
      kernel_dilation=kernel_dilation,
      feature_group_count=feature_group_count,
      use_bias=use_bias,
      mask=mask,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      conv_general_dilated=conv_general_dilated,
      promote_dtype=promote_dtype,
      preferred_element_type=preferred_element_type,
      directions=self._grouping,
      implementation=implementation,
      rngs=rngs,
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
    )


class LandmarkConv4(_FixedGrouping):
  """The P = 4 landmark convolution (the original ``PConv2d4``), NNX.

  Channels split into the top-left, top-right, bottom-left and bottom-right
  quadrant groups, in that order, then ``nnx.Conv``.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lmconv_jax
    >>> layer = lmconv_jax.nnx.LandmarkConv4(4, 1, (1, 1),
    ...                                      kernel_init=nnx.initializers.ones,
    ...                                      rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias.shape
    ((1, 1, 4, 1), (1,))
    >>> x = jnp.zeros((1, 3, 3, 4), jnp.float32).at[0, 1, 1, :].set(1.)
    >>> layer(x)[0, ..., 0]
    Array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]], dtype=float32)

  Attributes:
    kernel, bias, and the ``nnx.Conv`` attributes: as in :class:`LandmarkConv`.
    directions: ``"quadrants"``.
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``.
  """

  _grouping = "quadrants"


class LandmarkConv8(_FixedGrouping):
  """The P = 8 landmark convolution (the original ``PConv2d8``), NNX.

  Channels split into the octant groups I1 ... I8 (``lmconv_jax.OCTANTS``),
  in that order, then ``nnx.Conv``.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lmconv_jax
    >>> layer = lmconv_jax.nnx.LandmarkConv8(8, 1, (1, 1), use_bias=False,
    ...                                      kernel_init=nnx.initializers.ones,
    ...                                      rngs=nnx.Rngs(0))
    >>> x = jnp.zeros((1, 3, 3, 8), jnp.float32).at[0, 1, 1, :].set(1.)
    >>> layer(x)[0, ..., 0]
    Array([[2., 2., 2.],
           [2., 8., 2.],
           [2., 2., 2.]], dtype=float32)

  Attributes:
    kernel, bias, and the ``nnx.Conv`` attributes: as in :class:`LandmarkConv`.
    directions: ``"octants"``.
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``.
  """

  _grouping = "octants"


class LandmarkBlock(nnx.Module):
  """The LBYLNet landmark feature block, NNX.

  The NNX twin of :class:`lmconv_jax.linen.LandmarkBlock` (same sub-layer
  names, same data flow, same function for the same parameters)::

    branches = act(norm(conv3x3(x, P * m)))        # P branches of m channels
    y = norm(LandmarkConv(branches, out_features, 3x3))
    y = act(y + norm(conv1x1(x, out_features)))
    out = act(norm(conv3x3(y, out_features)))

  BatchNorm follows NNX's conventions: the running statistics are
  ``nnx.BatchStat`` variables, ``block.eval()`` / ``block.train()`` switch
  them, and ``block(x, train=...)`` overrides the mode for one call.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lmconv_jax
    >>> block = lmconv_jax.nnx.LandmarkBlock(3, 8, rngs=nnx.Rngs(0))
    >>> block.branch_conv.kernel.shape   # P = 4 branches of 4 channels
    (3, 3, 3, 16)
    >>> x = jnp.ones((2, 6, 6, 3), jnp.float32)
    >>> block(x, train=True).shape
    (2, 6, 6, 8)
    >>> block.eval()
    >>> block(x).shape
    (2, 6, 6, 8)

  Attributes:
    branch_conv, branch_norm, pool_conv, pool_norm, skip_conv, skip_norm,
    out_conv, out_norm: the sub-layers (``pool_conv`` is a
      :class:`LandmarkConv`; the ``*_norm`` are None with ``norm=None``).
    in_features: input channels.
    out_features: output channels (LBYLNet's ``dim``).
    branch_features: channels per direction branch (LBYLNet's ``mapdim``);
      default ``out_features // 2`` as in the released LBYLNet configs.
    directions: the grouping (default ``"quadrants"``: tl, tr, bl, br);
      LBYLNet's blocks are the ``"lbylnet_*"`` groupings, in their channel
      order (``"lbylnet_p4"`` is ``LandmarkP4``, not ``"quadrants"``), and
      :func:`lmconv_jax.lbylnet.nnx_landmark_block` builds them
      (docs/lbylnet.md).
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``, for the pool.
    padding: padding of the three 3x3 convolutions: ``'SAME'`` (zeros,
      LBYLNet's; default), ``'CIRCULAR'``, ``'REFLECT'`` or ``1``, as in
      the linen block.
    norm: ``"batch"`` (``nnx.BatchNorm``, LBYLNet's; default), ``"layer"``
      (``nnx.LayerNorm``), None (none; the convolutions get a bias), or a
      factory called as ``norm(num_features, rngs=rngs)`` (e.g.
      ``functools.partial(nnx.GroupNorm, num_groups=8)``).
    activation: the nonlinearity where LBYLNet has ReLU (default
      ``nnx.relu``).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    branch_features: Optional[int] = None,
    directions: Grouping = "quadrants",
    implementation: str = "auto",
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    use_running_average: bool = False,
    axis_name: Optional[str] = None,
    dtype: Optional[Any] = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    kernel_init: Callable[..., Array] = _default_kernel_init,
    padding: PaddingLike = "SAME",
    norm: Union[str, Callable[..., nnx.Module], None] = "batch",
    activation: Callable[[Array], Array] = nnx.relu,
    rngs: nnx.Rngs,
  ):
    layer = type(self).__name__
    _layers.check_norm(norm, layer)
    padding = _layers.check_block_padding(padding, layer)
    p = _layers.num_groups(directions, layer)
    m = _layers.branch_features(out_features, branch_features)
    common = dict(
      use_bias=norm is None,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      rngs=rngs,
    )
    self.branch_conv = nnx.Conv(
      in_features, p * m, (3, 3), padding=padding, **common
    )
    self.pool_conv = LandmarkConv(
      p * m,
      out_features,
      (3, 3),
      padding=padding,
      directions=directions,
      implementation=implementation,
      **common,
    )
    self.skip_conv = nnx.Conv(
      in_features, out_features, (1, 1), padding="VALID", **common
    )
    self.out_conv = nnx.Conv(
      out_features, out_features, (3, 3), padding=padding, **common
    )

    def make_norm(n):
      if norm == "batch":
        return nnx.BatchNorm(
          n,
          momentum=momentum,
          epsilon=epsilon,
          dtype=dtype,
          param_dtype=param_dtype,
          axis_name=axis_name,
          use_running_average=use_running_average,
          rngs=rngs,
        )
      if norm == "layer":
        return nnx.LayerNorm(
          n, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
      if norm is None:
        return None
      return norm(n, rngs=rngs)

    self.branch_norm = make_norm(p * m)
    self.pool_norm = make_norm(out_features)
    self.skip_norm = make_norm(out_features)
    self.out_norm = make_norm(out_features)
    self.in_features = in_features
    self.out_features = out_features
    self.branch_features = m
    self.directions = _frozen(directions)
    self.implementation = implementation
    self.activation = activation

  def __call__(self, x: Array, train: Optional[bool] = None) -> Array:
    """Applies the block to NHWC ``x``.

    Args:
      x: ``(*batch_dims, H, W, in_features)``.
      train: True uses and updates the batch statistics, False uses the
        running averages, None (default) follows the mode set by
        ``block.train()`` / ``block.eval()``.
    """
    use_running_average = None if train is None else not train
    layers = {}
    for stage in ("branch", "pool", "skip", "out"):
      layers[f"{stage}_conv"] = getattr(self, f"{stage}_conv")
      norm = getattr(self, f"{stage}_norm")
      if isinstance(norm, nnx.BatchNorm):
        layers[f"{stage}_norm"] = lambda v, norm=norm: norm(
          v, use_running_average=use_running_average
        )
      elif norm is not None:
        layers[f"{stage}_norm"] = norm
    return _layers.landmark_block(x, layers, self.activation)
