"""Flax linen layers: the landmark convolution and the LBYLNet landmark block.

``LandmarkConv`` is ``flax.linen.Conv`` with a grouped landmark pool in front
of it (docs/semantics.md, "Grouped pools and the convolution"): it has every
field of ``nn.Conv`` with the same name, order and default, and the same
parameters (``kernel``, ``bias``), so it drops in wherever ``nn.Conv`` goes
and an ``nn.Conv``'s weights load unchanged. ``LandmarkConv4`` (P = 4
quadrants, the original ``PConv2d4``) and ``LandmarkConv8`` (P = 8 octants,
``PConv2d8``) only change the default grouping.

The functional core (input checks, the pool in front of the convolution,
the block's data flow) is ``lmconv_jax._layers``, shared with
``lmconv_jax.nnx``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import PaddingLike

from lmconv_jax import _layers, _sharding
from lmconv_jax.ops import Grouping

Array = jax.Array

__all__ = ["LandmarkBlock", "LandmarkConv", "LandmarkConv4", "LandmarkConv8"]


# --------------------------------------------------------------------------
# The layers.


class LandmarkConv(nn.Conv):
  """A grouped landmark pool followed by ``flax.linen.Conv``.

  The input's C channels are split into P equal groups, in the order of
  ``directions``; each group is replaced by its landmark pool (the running
  max over its region, or the max of several regions for a merged group) and
  an ordinary convolution mixes the result. Everything after the pool is
  ``nn.Conv``: the same fields, the same ``kernel`` / ``bias`` parameters,
  NHWC inputs with any leading batch dims (or none). The pool sees the image
  before the convolution pads it.

  Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from lmconv_jax import LandmarkConv
    >>> layer = LandmarkConv(features=1, kernel_size=(1, 1),
    ...                      directions="top_bottom", use_bias=False,
    ...                      kernel_init=nn.initializers.ones)
    >>> x = jnp.zeros((1, 3, 3, 2), jnp.float32).at[0, 1, 1, :].set(1.)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'kernel': (1, 1, 2, 1)}}
    >>> layer.apply(variables, x)[0, ..., 0]   # sees (1, 1) above / below
    Array([[1., 1., 1.],
           [2., 2., 2.],
           [1., 1., 1.]], dtype=float32)

  Attributes:
    features: number of convolution filters.
    kernel_size: the 2-D kernel shape ``(kh, kw)``.
    strides: an int or a pair, the inter-window strides (default: 1).
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``, an int,
      or a pair of ``(low, high)`` pairs, exactly as in ``nn.Conv``.
    input_dilation: an int or a pair, the input dilation (default: 1).
    kernel_dilation: an int or a pair, the kernel ("atrous") dilation.
    feature_group_count: splits the convolution's input features into
      groups (independent of the pool's direction groups).
    use_bias: whether to add a bias to the output (default: True).
    mask: optional mask for the kernel, of the kernel's shape.
    dtype: the dtype of the computation, pool and convolution (default:
      infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    precision: numerical precision of the convolution (``jax.lax.Precision``).
    kernel_init: initializer for the convolutional kernel.
    bias_init: initializer for the bias.
    promote_dtype: as in ``nn.Conv``.
    directions: the grouping: ``"quadrants"`` (P = 4), ``"octants"``
      (P = 8), ``"top_bottom"`` or ``"left_right"`` (P = 2, pairs of
      quadrants merged by max), ``"all_quadrants"`` (P = 1), or a sequence
      whose items are a direction or a tuple of directions merged by max
      (see :func:`lmconv_jax.grouped_landmark_pool`). The input channels
      must be a multiple of P.
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``, passed to the
      pool.
  """

  directions: Grouping = "quadrants"
  implementation: str = "auto"

  @nn.compact
  def __call__(self, inputs: Array, guide: Optional[Array] = None) -> Array:
    """Pools ``inputs`` (..., H, W, C) in its direction groups, then convolves.

    Args:
      inputs: NHWC input, ``(*batch_dims, H, W, C)``; C a multiple of P.
      guide: None (a plain max) or an array broadcastable to ``inputs``;
        each pixel of the pool blends ``g * max + (1 - g) * x``.

    Returns:
      The convolved data, as ``nn.Conv`` returns it.
    """
    layer = _layers.layer_name(self)
    _layers.check_kernel_size(self.kernel_size, layer)
    pooled = _layers.pool_inputs(
      inputs,
      guide,
      directions=self.directions,
      implementation=self.implementation,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      layer=layer,
    )
    return super().__call__(_sharding.whole_channels(pooled))


class LandmarkConv4(LandmarkConv):
  """The P = 4 landmark convolution (the original ``PConv2d4``).

  Channels split into four groups pooled over the top-left, top-right,
  bottom-left and bottom-right quadrant of each pixel, in that order, then
  ``nn.Conv``. See :class:`LandmarkConv` for everything else.

  Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from lmconv_jax import LandmarkConv4
    >>> layer = LandmarkConv4(features=1, kernel_size=(1, 1),
    ...                       kernel_init=nn.initializers.ones)
    >>> x = jnp.zeros((1, 3, 3, 4), jnp.float32).at[0, 1, 1, :].set(1.)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'bias': (1,), 'kernel': (1, 1, 4, 1)}}
    >>> layer.apply(variables, x)[0, ..., 0]   # quadrants that see (1, 1)
    Array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]], dtype=float32)

  Attributes:
    features, kernel_size, strides, padding, input_dilation, kernel_dilation,
    feature_group_count, use_bias, mask, dtype, param_dtype, precision,
    kernel_init, bias_init, promote_dtype: as in ``nn.Conv``.
    directions: ``"quadrants"``.
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``.
  """

  directions: Grouping = "quadrants"


class LandmarkConv8(LandmarkConv):
  """The P = 8 landmark convolution (the original ``PConv2d8``).

  Channels split into eight groups pooled over the octants I1 ... I8
  (``lmconv_jax.OCTANTS``), in that order, then ``nn.Conv``. See
  :class:`LandmarkConv` for everything else.

  Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from lmconv_jax import LandmarkConv8
    >>> layer = LandmarkConv8(features=1, kernel_size=(1, 1), use_bias=False,
    ...                       kernel_init=nn.initializers.ones)
    >>> x = jnp.zeros((1, 3, 3, 8), jnp.float32).at[0, 1, 1, :].set(1.)
    >>> y = layer.apply(layer.init(jax.random.key(0), x), x)
    >>> y[0, ..., 0]   # octants that see (1, 1): boundary rays belong to two
    Array([[2., 2., 2.],
           [2., 8., 2.],
           [2., 2., 2.]], dtype=float32)

  Attributes:
    features, kernel_size, strides, padding, input_dilation, kernel_dilation,
    feature_group_count, use_bias, mask, dtype, param_dtype, precision,
    kernel_init, bias_init, promote_dtype: as in ``nn.Conv``.
    directions: ``"octants"``.
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``.
  """

  directions: Grouping = "octants"


class LandmarkBlock(nn.Module):
  """The LBYLNet landmark feature block (``LandmarkP4`` and friends).

  With P direction groups, ``m = branch_features``, ``act = activation``
  (ReLU) and ``norm`` (BatchNorm)::

    branches = act(norm(conv3x3(x, P * m)))        # P branches of m channels
    y = norm(LandmarkConv(branches, features, 3x3)) # pool branches, conv
    y = act(y + norm(conv1x1(x, features)))         # skip
    out = act(norm(conv3x3(y, features)))

  The P branch convolutions of the original (one 3x3 conv-BN-ReLU per
  direction group) are computed as one convolution with P * m outputs:
  output channels ``k*m : (k+1)*m`` are branch k, and BatchNorm is per
  channel, so this is the same function with one kernel instead of P.
  Branch k is pooled in direction group k (merged groups by max, as in
  LBYLNet's P1, P2, P2x and P4x). With an ``"lbylnet_*"`` grouping and the
  defaults the block computes LBYLNet's block of that name; what cannot
  match (gradient ties, which ``torch.max`` splits; BatchNorm's running
  statistics in training) is in docs/lbylnet.md. The convolutions have no
  bias when a normalisation follows them; the output has ``features``
  channels at the input's resolution.

  ``train`` is required, as ``nn.BatchNorm``'s ``use_running_average``:
  ``train=False`` normalises with the running averages (inference),
  ``train=True`` with the batch's statistics, and updates the running
  averages in the ``batch_stats`` collection, so it needs
  ``mutable=['batch_stats']``.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from lmconv_jax import LandmarkBlock
    >>> block = LandmarkBlock(features=8)
    >>> x = jnp.ones((2, 6, 6, 3), jnp.float32)
    >>> variables = block.init(jax.random.key(0), x, train=False)
    >>> sorted(variables)
    ['batch_stats', 'params']
    >>> sorted(variables['params'])  # doctest: +NORMALIZE_WHITESPACE
    ['branch_conv', 'branch_norm', 'out_conv', 'out_norm',
     'pool_conv', 'pool_norm', 'skip_conv', 'skip_norm']
    >>> variables['params']['branch_conv']['kernel'].shape   # 4 branches of 4
    (3, 3, 3, 16)
    >>> y, updates = block.apply(variables, x, train=True,
    ...                          mutable=['batch_stats'])
    >>> y.shape, sorted(updates)
    ((2, 6, 6, 8), ['batch_stats'])
    >>> block.apply(variables, x, train=False).shape          # inference
    (2, 6, 6, 8)

  Attributes:
    features: output channels (LBYLNet's ``dim``).
    branch_features: channels of each direction branch (LBYLNet's
      ``mapdim``); default ``features // 2``, the ratio of the released
      LBYLNet configs (dim 256, ctx_dim 128). ``features // P`` gives a
      cheaper block whose pooled tensor has ``features`` channels.
    directions: the grouping, as in :class:`LandmarkConv` (default
      ``"quadrants"``: tl, tr, bl, br). LBYLNet's blocks concatenate their
      groups in their own order, which their checkpoints learned:
      ``"lbylnet_p4"`` is ``LandmarkP4`` (tr, tl, bl, br), and
      ``"lbylnet_p1"``, ``"lbylnet_p2"``, ``"lbylnet_p2x"``,
      ``"lbylnet_p4x"``, ``"lbylnet_p8"`` the others;
      :func:`lmconv_jax.lbylnet.landmark_block` builds them and
      :func:`lmconv_jax.lbylnet.convert_state_dict` loads their weights
      (docs/lbylnet.md). ``"quadrants"`` and ``"left_right"`` are *not*
      ``LandmarkP4`` and ``LandmarkP2x``: same regions, other order.
    implementation: ``"auto"``, ``"ffi"`` or ``"reference"``, for the pool.
    momentum: BatchNorm decay of the running averages (default 0.9, PyTorch's
      momentum 0.1 as the original used).
    epsilon: the normalisation's epsilon (default 1e-5, as PyTorch).
    axis_name: BatchNorm ``axis_name`` for statistics across devices.
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    precision: numerical precision of the convolutions.
    kernel_init: initializer for the convolution kernels (default: as
      ``nn.Conv``).
    padding: padding of the three 3x3 convolutions (the 1x1 skip needs
      none): ``'SAME'`` (zeros, LBYLNet's; default), ``'CIRCULAR'`` (the
      image wraps around, for data on a torus), ``'REFLECT'``, or ``1``.
      Paddings that change H or W are refused (the skip is added). The pool
      itself never wraps: it sees the image before the convolution pads it.
    norm: the normalisation after each convolution: ``"batch"``
      (``nn.BatchNorm``, LBYLNet's; default), ``"layer"`` (``nn.LayerNorm``
      with ``epsilon``), None (none; the convolutions get a bias), or a
      factory called as ``norm(name=...)`` that returns a linen module
      called on one array (e.g. ``functools.partial(nn.GroupNorm,
      num_groups=8)``; an ``nn.BatchNorm`` it returns gets
      ``use_running_average=not train``).
    activation: the nonlinearity where LBYLNet has ReLU (default
      ``nn.relu``).
  """

  features: int
  branch_features: Optional[int] = None
  directions: Grouping = "quadrants"
  implementation: str = "auto"
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable[..., Array] = nn.linear.default_kernel_init
  padding: PaddingLike = "SAME"
  norm: Union[str, Callable[..., nn.Module], None] = "batch"
  activation: Callable[[Array], Array] = nn.relu

  @nn.compact
  def __call__(self, x: Array, train: Optional[bool] = None) -> Array:
    """Applies the block to NHWC ``x``.

    Args:
      x: ``(*batch_dims, H, W, C)``.
      train: required. False: normalise with the running averages
        (inference; nothing is written). True: with the batch's statistics,
        updating the running averages (apply with
        ``mutable=['batch_stats']``).
    """
    layer = _layers.layer_name(self)
    if train is None:
      raise TypeError(
        f"{layer}: train is required (as nn.BatchNorm's "
        f"use_running_average): pass train=False for inference (running "
        f"averages) or train=True for training (batch statistics; apply "
        f"with mutable=['batch_stats'])."
      )
    _layers.check_norm(self.norm, layer)
    padding = _layers.check_block_padding(self.padding, layer)
    p = _layers.num_groups(self.directions, layer)
    m = _layers.branch_features(self.features, self.branch_features)
    common = dict(
      use_bias=self.norm is None,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      kernel_init=self.kernel_init,
    )
    layers = {
      "branch_conv": nn.Conv(
        p * m, (3, 3), padding=padding, name="branch_conv", **common
      ),
      "pool_conv": LandmarkConv(
        self.features,
        (3, 3),
        padding=padding,
        name="pool_conv",
        directions=self.directions,
        implementation=self.implementation,
        **common,
      ),
      "skip_conv": nn.Conv(
        self.features, (1, 1), padding="VALID", name="skip_conv", **common
      ),
      "out_conv": nn.Conv(
        self.features, (3, 3), padding=padding, name="out_conv", **common
      ),
    }
    if self.norm is not None:
      for stage in ("branch", "pool", "skip", "out"):
        layers[f"{stage}_norm"] = self._norm_layer(
          f"{stage}_norm", train, layer
        )
    return _layers.landmark_block(x, layers, self.activation)

  def _norm_layer(self, name: str, train: bool, layer: str):
    """The normalisation ``name``, as a one-argument callable."""
    if self.norm == "batch":
      module = nn.BatchNorm(
        momentum=self.momentum,
        epsilon=self.epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        axis_name=self.axis_name,
        name=name,
      )
    elif self.norm == "layer":
      module = nn.LayerNorm(
        epsilon=self.epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )
    else:
      module = self.norm(name=name)
    if not isinstance(module, nn.BatchNorm):
      return module
    if (
      train
      and not self.is_initializing()
      and not self.is_mutable_collection("batch_stats")
    ):
      raise ValueError(
        f"{layer}: train=True normalises with the batch's statistics and "
        f"updates the running averages in the 'batch_stats' collection, "
        f"which this apply cannot write. For inference pass train=False; "
        f"to train, apply with mutable=['batch_stats'] and keep the "
        f"returned batch_stats."
      )
    return lambda v: module(v, use_running_average=not train)
