"""The Flax layers: LandmarkConv{,4,8} and LandmarkBlock, linen and NNX.

A landmark convolution must be exactly "grouped landmark pool, then nn.Conv"
with nn.Conv's fields and parameters; the NNX twins must compute the same
function as the linen ones for the same parameters.
"""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lmconv_jax
import lmconv_jax.linen
import lmconv_jax.nnx
from lmconv_jax import (
  LandmarkBlock,
  LandmarkConv,
  LandmarkConv4,
  LandmarkConv8,
  grouped_landmark_pool,
)
from lmconv_jax import _ffi
from lmconv_jax.ops import platform as _platform

F32 = jnp.float32
ones = nn.initializers.ones


def _normal(shape, seed=0, dtype=F32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _impulse(channels, size=3):
  """One bright pixel in the middle of a size x size image, every channel."""
  c = size // 2
  return jnp.zeros((1, size, size, channels), F32).at[0, c, c, :].set(1.0)


def _pool_then_conv(conv_kwargs, directions, params, x, guide=None):
  """What a landmark convolution must equal: the op, then a plain nn.Conv.

  Both sides use implementation="auto": the FFI kernels where built.
  """
  pooled = grouped_landmark_pool(x, directions, guide)
  return nn.Conv(**conv_kwargs).apply(params, pooled)


# --------------------------------------------------------------------------
# Exact numbers with `ones` initialisers.


def test_ones_kernel_sums_the_four_quadrant_maxima():
  # Every channel holds [[1, 2], [3, 4]]: the top-left, top-right, bottom-left
  # and bottom-right maxima are [[1,2],[3,4]], [[2,2],[4,4]], [[3,4],[3,4]],
  # [[4,4],[4,4]]; a 1x1 ones kernel sums them, the ones bias adds 1.
  x = jnp.broadcast_to(
    jnp.array([[1.0, 2.0], [3.0, 4.0]], F32)[None, :, :, None], (1, 2, 2, 4)
  )
  layer = LandmarkConv4(1, (1, 1), kernel_init=ones, bias_init=ones)
  y = layer.apply(layer.init(jax.random.key(0), x), x)
  np.testing.assert_array_equal(y[0, ..., 0], [[11.0, 13.0], [15.0, 17.0]])
  # A 3x3 'SAME' window covers the whole 2x2 image: 10 + 12 + 14 + 16 + 1.
  layer = LandmarkConv4(1, (3, 3), kernel_init=ones, bias_init=ones)
  y = layer.apply(layer.init(jax.random.key(0), x), x)
  np.testing.assert_array_equal(y[0, ..., 0], [[53.0, 53.0], [53.0, 53.0]])


@pytest.mark.parametrize(
  "cls, channels, expected",
  [
    # How many of the P regions of each pixel contain the centre pixel.
    (LandmarkConv4, 4, [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]),
    # Each of the 8 rays from the centre bounds two octants.
    (LandmarkConv8, 8, [[2.0, 2.0, 2.0], [2.0, 8.0, 2.0], [2.0, 2.0, 2.0]]),
  ],
)
def test_impulse_is_seen_by_the_regions_that_contain_it(
  cls, channels, expected
):
  x = _impulse(channels)
  layer = cls(1, (1, 1), use_bias=False, kernel_init=ones)
  y = layer.apply(layer.init(jax.random.key(0), x), x)
  np.testing.assert_array_equal(y[0, ..., 0], expected)


@pytest.mark.parametrize(
  "directions, expected",
  [
    # The union of all four quadrants is the whole image.
    ("all_quadrants", [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
    # Top half-plane (rows <= i) plus bottom half-plane (rows >= i).
    ("top_bottom", [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]),
    ("left_right", [[1.0, 2.0, 1.0], [1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]),
  ],
)
def test_merged_groupings_pool_the_union_of_their_regions(directions, expected):
  x = _impulse(len(lmconv_jax.GROUPINGS[directions]))
  layer = LandmarkConv(
    1, (1, 1), directions=directions, use_bias=False, kernel_init=ones
  )
  y = layer.apply(layer.init(jax.random.key(0), x), x)
  np.testing.assert_array_equal(y[0, ..., 0], expected)


# --------------------------------------------------------------------------
# The layer is the grouped pool followed by nn.Conv, with nn.Conv's tree.


@pytest.mark.parametrize(
  "cls, directions, channels",
  [
    (LandmarkConv4, "quadrants", 4),
    (LandmarkConv8, "octants", 8),
    (LandmarkConv, "top_bottom", 4),
    (LandmarkConv, "left_right", 2),
    (LandmarkConv, "all_quadrants", 3),
    (LandmarkConv, ("top_left", ("bottom_left", "bottom_right")), 4),
  ],
)
def test_equals_grouped_pool_then_nn_conv(cls, directions, channels):
  x = _normal((2, 5, 6, channels))
  kwargs = dict(features=3, kernel_size=(3, 3))
  layer = (
    cls(**kwargs)
    if cls is not LandmarkConv
    else cls(**kwargs, directions=directions)
  )
  params = nn.Conv(**kwargs).init(jax.random.key(1), x)
  np.testing.assert_array_equal(
    layer.apply(params, x), _pool_then_conv(kwargs, directions, params, x)
  )


def test_parameter_tree_is_nn_convs():
  x = _normal((2, 5, 5, 8))
  for kwargs in (
    dict(features=6, kernel_size=(3, 3)),
    dict(features=4, kernel_size=(1, 3), use_bias=False, feature_group_count=2),
  ):
    ours = LandmarkConv8(**kwargs).init(jax.random.key(3), x)
    theirs = nn.Conv(**kwargs).init(jax.random.key(3), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_fields_mirror_nn_conv():
  names = lambda cls: [
    f for f in cls.__dataclass_fields__ if f not in ("parent", "name")
  ]
  conv = names(nn.Conv)
  for cls in (LandmarkConv, LandmarkConv4, LandmarkConv8):
    assert names(cls)[: len(conv)] == conv
    assert names(cls)[len(conv) :] == ["directions", "implementation"]
    for f in conv:
      assert (
        cls.__dataclass_fields__[f].default
        is nn.Conv.__dataclass_fields__[f].default
      ), f
  assert LandmarkConv4.directions == "quadrants"
  assert LandmarkConv8.directions == "octants"


MASK = np.tril(np.ones((3, 3, 4, 6), np.float32))


@pytest.mark.parametrize(
  "options",
  [
    dict(strides=2),
    dict(strides=(1, 2)),
    dict(padding="VALID"),
    dict(padding="CIRCULAR"),
    dict(padding="REFLECT"),
    dict(padding=((1, 0), (0, 2))),
    dict(padding=1),
    dict(input_dilation=2, padding=((1, 1), (0, 1))),
    dict(kernel_dilation=(2, 1)),
    dict(feature_group_count=2),
    dict(use_bias=False),
    dict(mask=MASK),
    dict(precision=jax.lax.Precision.HIGHEST),
  ],
  ids=lambda o: "-".join(f"{k}={v!r}"[:24] for k, v in o.items()),
)
def test_nn_conv_options_apply_after_the_pool(options):
  x = _normal((2, 5, 6, 4))
  kwargs = dict(features=6, kernel_size=(3, 3), **options)
  params = nn.Conv(**kwargs).init(jax.random.key(2), x)
  layer = LandmarkConv4(**kwargs)
  assert jax.tree.map(
    jnp.shape, layer.init(jax.random.key(2), x)
  ) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(
    layer.apply(params, x), _pool_then_conv(kwargs, "quadrants", params, x)
  )


@pytest.mark.parametrize("x_dtype", [F32, jnp.bfloat16])
def test_bfloat16_dtype_and_param_dtype(x_dtype):
  x = _normal((2, 5, 5, 8)).astype(x_dtype)
  kwargs = dict(
    features=4, kernel_size=(3, 3), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
  )
  layer = LandmarkConv8(**kwargs)
  params = layer.init(jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  y = layer.apply(params, x)
  assert y.dtype == jnp.bfloat16
  # Pooling in bfloat16 equals pooling, then casting: rounding is monotone.
  np.testing.assert_array_equal(
    y.astype(F32), _pool_then_conv(kwargs, "octants", params, x).astype(F32)
  )


def test_leading_batch_dims_and_no_batch_dim():
  layer = LandmarkConv4(3, (3, 3), strides=(2, 1))
  x = _normal((2, 3, 5, 5, 4))
  params = layer.init(jax.random.key(0), x)
  y = layer.apply(params, x)
  assert y.shape == (2, 3, 3, 5, 3)
  np.testing.assert_allclose(
    y.reshape(6, 3, 5, 3), layer.apply(params, x.reshape(6, 5, 5, 4)), rtol=1e-6
  )
  np.testing.assert_allclose(layer.apply(params, x[0, 0]), y[0, 0], rtol=1e-6)


def test_guide_is_passed_to_the_pool():
  x = _normal((2, 4, 4, 4))
  kwargs = dict(features=2, kernel_size=(3, 3))
  params = nn.Conv(**kwargs).init(jax.random.key(0), x)
  layer = LandmarkConv4(**kwargs)
  for guide in (
    jnp.array([0.0, 0.25, 0.5, 1.0], F32),
    jax.random.uniform(jax.random.key(5), x.shape, F32),
  ):
    y = layer.apply(params, x, guide)
    np.testing.assert_array_equal(
      y, _pool_then_conv(kwargs, "quadrants", params, x, guide)
    )
  assert not np.allclose(
    layer.apply(params, x, jnp.zeros(4, F32)), layer.apply(params, x)
  )


def test_jit_grad_vmap():
  layer = LandmarkConv8(4, (3, 3))
  kwargs = dict(features=4, kernel_size=(3, 3))
  x = _normal((2, 4, 5, 8))
  params = layer.init(jax.random.key(0), x)

  np.testing.assert_allclose(
    jax.jit(layer.apply)(params, x),
    layer.apply(params, x),
    rtol=1e-6,
    atol=1e-6,
  )

  def loss(params, x):
    return jnp.sum(jnp.sin(layer.apply(params, x)))

  def expected_loss(params, x):
    return jnp.sum(jnp.sin(_pool_then_conv(kwargs, "octants", params, x)))

  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(expected_loss, argnums=(0, 1)))(params, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
    got,
    want,
  )
  assert float(jnp.abs(got[1]).sum()) > 0

  xs = _normal((3, 2, 4, 5, 8), seed=1)
  vmapped = jax.vmap(layer.apply, in_axes=(None, 0))(params, xs)
  np.testing.assert_allclose(
    vmapped, layer.apply(params, xs), rtol=1e-5, atol=1e-6
  )


# --------------------------------------------------------------------------
# Errors.


def test_channels_not_divisible_by_groups_is_a_clear_error():
  x = _normal((1, 4, 4, 12))
  with pytest.raises(ValueError) as info:
    LandmarkConv8(4, (3, 3)).init(jax.random.key(0), x)
  message = str(info.value)
  for part in (
    "LandmarkConv8",
    "12 channels",
    "8 equal groups",
    "multiple of 8",
    "8 or 16",
    "1x1 convolution",
  ):
    assert part in message, (part, message)
  with pytest.raises(
    ValueError,
    match=r"LandmarkConv4: in_features=6.*"
    r"multiple of 4.*4 or 8",
  ):
    lmconv_jax.nnx.LandmarkConv4(6, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"LandmarkConv: in_features=3.*"
    r"multiple of 2.*2 or 4",
  ):
    lmconv_jax.nnx.LandmarkConv(
      3, 4, (3, 3), directions="top_bottom", rngs=nnx.Rngs(0)
    )


def test_kernel_size_must_be_two_dimensional():
  x = _normal((1, 4, 4, 4))
  with pytest.raises(
    ValueError,
    match=r"LandmarkConv4: kernel_size must be "
    r"a pair.*got kernel_size=3.*\(3, 3\)",
  ):
    LandmarkConv4(4, 3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="kernel_size must be a pair"):
    lmconv_jax.nnx.LandmarkConv4(4, 4, (3,), rngs=nnx.Rngs(0))


def test_op_errors_name_the_layer():
  x = _normal((1, 4, 4, 4))
  with pytest.raises(ValueError, match=r"LandmarkConv4: .*'bogus'"):
    LandmarkConv4(4, (3, 3), implementation="bogus").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"LandmarkConv4: .*guide of shape"):
    LandmarkConv4(4, (3, 3)).init(jax.random.key(0), x, jnp.ones(3, F32))
  with pytest.raises(
    ValueError,
    match=r"LandmarkConv: Unknown grouping "
    r"'diagonal'.*'quadrants'",
  ):
    LandmarkConv(4, (3, 3), directions="diagonal").init(jax.random.key(0), x)


# --------------------------------------------------------------------------
# NNX.


def _nnx_twin(cls, linen_params, in_features, **kwargs):
  """The NNX layer holding the linen layer's parameters."""
  p = linen_params["params"]
  init = lambda v: lambda *_: v
  if "bias" in p:
    kwargs["bias_init"] = init(p["bias"])
  return cls(
    in_features,
    kwargs.pop("features"),
    kwargs.pop("kernel_size"),
    kernel_init=init(p["kernel"]),
    rngs=nnx.Rngs(0),
    **kwargs,
  )


@pytest.mark.parametrize(
  "linen_cls, nnx_cls, channels, options",
  [
    (LandmarkConv4, lmconv_jax.nnx.LandmarkConv4, 4, {}),
    (
      LandmarkConv8,
      lmconv_jax.nnx.LandmarkConv8,
      8,
      dict(strides=2, padding="CIRCULAR"),
    ),
    (
      LandmarkConv,
      lmconv_jax.nnx.LandmarkConv,
      4,
      dict(directions="left_right", use_bias=False, kernel_dilation=2),
    ),
  ],
)
def test_linen_and_nnx_agree_on_output_and_gradients(
  linen_cls, nnx_cls, channels, options
):
  kwargs = dict(features=3, kernel_size=(3, 3), **options)
  x = _normal((2, 5, 6, channels))
  layer = linen_cls(**kwargs)
  params = layer.init(jax.random.key(0), x)
  twin = _nnx_twin(nnx_cls, params, channels, **kwargs)
  np.testing.assert_array_equal(twin(x), layer.apply(params, x))

  grads = jax.grad(
    lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1)
  )(params, x)
  graphdef, state = nnx.split(twin)
  twin_grads = jax.grad(
    lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2), argnums=(0, 1)
  )(state, x)
  np.testing.assert_array_equal(twin_grads[1], grads[1])
  pure = nnx.to_pure_dict(twin_grads[0])
  assert set(pure) == set(grads[0]["params"])
  for name, g in grads[0]["params"].items():
    np.testing.assert_array_equal(pure[name], g)


def test_nnx_parameters_are_nnx_convs():
  ours = lmconv_jax.nnx.LandmarkConv8(
    8, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(7)
  )
  theirs = nnx.Conv(8, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(7))
  a = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  b = nnx.to_pure_dict(nnx.state(theirs, nnx.Param))
  assert set(a) == set(b) == {"kernel", "bias"}
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert isinstance(ours, nnx.Conv)


def test_nnx_jit_and_guide():
  layer = lmconv_jax.nnx.LandmarkConv4(4, 2, (3, 3), rngs=nnx.Rngs(0))
  x = _normal((2, 4, 4, 4))
  guide = jnp.array([1.0, 0.5, 0.0, 1.0], F32)
  y = nnx.jit(lambda m, x, g: m(x, g))(layer, x, guide)
  np.testing.assert_allclose(y, layer(x, guide), rtol=1e-6, atol=1e-6)
  with pytest.raises(
    ValueError,
    match=r"LandmarkConv4: the input has 8 "
    r"channels, but in_features=4",
  ):
    layer(_normal((2, 4, 4, 8)))


# --------------------------------------------------------------------------
# LandmarkBlock.


def _bn_eval(v, eps=1e-5):
  """BatchNorm with fresh statistics (mean 0, var 1), scale 1, bias 0."""
  return v / jnp.sqrt(1.0 + eps)


def test_block_is_the_lbylnet_data_flow():
  block = LandmarkBlock(8, branch_features=2)
  x = _normal((2, 5, 5, 3))
  variables = block.init(jax.random.key(0), x, train=False)
  p = variables["params"]
  conv = lambda name, features, k, v: nn.Conv(
    features, (k, k), use_bias=False
  ).apply({"params": p[name]}, v)
  branches = jax.nn.relu(_bn_eval(conv("branch_conv", 8, 3, x)))
  pooled = grouped_landmark_pool(branches, "quadrants")
  y = jax.nn.relu(
    _bn_eval(conv("pool_conv", 8, 3, pooled))
    + _bn_eval(conv("skip_conv", 8, 1, x))
  )
  want = jax.nn.relu(_bn_eval(conv("out_conv", 8, 3, y)))
  np.testing.assert_allclose(
    block.apply(variables, x, train=False), want, rtol=1e-5, atol=1e-6
  )
  assert p["branch_conv"]["kernel"].shape == (3, 3, 3, 4 * 2)
  assert p["pool_conv"]["kernel"].shape == (3, 3, 8, 8)
  assert "bias" not in p["pool_conv"]


@pytest.mark.parametrize(
  "directions, p", [("all_quadrants", 1), ("top_bottom", 2), ("octants", 8)]
)
def test_block_branches_follow_the_grouping(directions, p):
  block = LandmarkBlock(4, directions=directions)  # branch_features = 2
  x = _normal((1, 4, 4, 3))
  y, variables = jax.eval_shape(
    lambda k: block.init_with_output(k, x, train=False), jax.random.key(0)
  )
  assert variables["params"]["branch_conv"]["kernel"].shape == (3, 3, 3, 2 * p)
  assert y.shape == (1, 4, 4, 4)


def test_block_train_updates_batch_stats_eval_does_not():
  block = LandmarkBlock(4, branch_features=1)
  x = _normal((2, 4, 4, 4))
  variables = block.init(jax.random.key(0), x, train=False)
  _, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
  branch = nn.Conv(4, (3, 3), use_bias=False).apply(
    {"params": variables["params"]["branch_conv"]}, x
  )
  np.testing.assert_allclose(
    updates["batch_stats"]["branch_norm"]["mean"],
    0.1 * branch.mean(axis=(0, 1, 2)),
    rtol=1e-5,
    atol=1e-7,
  )
  with pytest.raises(
    ValueError,
    match=r"LandmarkBlock: train=True .*"
    r"'batch_stats' collection, which this apply cannot "
    r"write. For inference pass train=False; to train, "
    r"apply with mutable=\['batch_stats'\]",
  ):
    block.apply(variables, x, train=True)  # must be mutable to train
  block.apply(variables, x, train=False)  # eval needs nothing mutable


def test_block_train_is_required():
  block = LandmarkBlock(4, branch_features=1)
  x = _normal((1, 4, 4, 4))
  message = (
    r"LandmarkBlock: train is required \(as nn.BatchNorm's "
    r"use_running_average\): pass train=False for inference"
  )
  with pytest.raises(TypeError, match=message):
    block.init(jax.random.key(0), x)
  variables = block.init(jax.random.key(0), x, train=False)
  with pytest.raises(TypeError, match=message):
    block.apply(variables, x)
  with pytest.raises(TypeError, match=message):
    block.apply(variables, x, mutable=["batch_stats"])


def _block_by_hand(variables, x, padding, activation, norm):
  """The block's data flow written out, eval mode, for the given options."""
  p, stats = variables["params"], variables.get("batch_stats", {})

  def conv_norm(name, v, k, pad, directions=None):
    kernel = p[f"{name}_conv"]["kernel"]
    if directions is not None:
      v = grouped_landmark_pool(v, directions)
    v = nn.Conv(
      kernel.shape[-1],
      (k, k),
      padding=pad,
      use_bias="bias" in p[f"{name}_conv"],
    ).apply({"params": p[f"{name}_conv"]}, v)
    if norm == "batch":
      s = stats[f"{name}_norm"]
      v = (v - s["mean"]) / jnp.sqrt(s["var"] + 1e-5)
      v = v * p[f"{name}_norm"]["scale"] + p[f"{name}_norm"]["bias"]
    elif norm == "layer":
      mean = v.mean(-1, keepdims=True)
      var = ((v - mean) ** 2).mean(-1, keepdims=True)
      v = (v - mean) / jnp.sqrt(var + 1e-5)
      v = v * p[f"{name}_norm"]["scale"] + p[f"{name}_norm"]["bias"]
    return v

  branches = activation(conv_norm("branch", x, 3, padding))
  y = activation(
    conv_norm("pool", branches, 3, padding, "quadrants")
    + conv_norm("skip", x, 1, "VALID")
  )
  return activation(conv_norm("out", y, 3, padding))


def _perturb(variables, seed=1):
  """Non-trivial parameters and statistics (init's are zeros and ones)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree,
    [
      v + 0.3 * jax.random.uniform(k, v.shape, v.dtype)
      for v, k in zip(leaves, keys)
    ],
  )


@pytest.mark.parametrize(
  "options",
  [
    dict(padding="CIRCULAR"),
    dict(padding="reflect", activation=nn.gelu),
    dict(padding=1, norm="layer"),
    dict(padding=((1, 1), (1, 1)), norm=None, activation=jnp.tanh),
  ],
  ids=lambda o: "-".join(
    f"{k}={getattr(v, '__name__', v)!r}"[:24] for k, v in o.items()
  ),
)
@pytest.mark.x64
def test_block_padding_norm_and_activation(options):
  block = LandmarkBlock(
    8, branch_features=2, implementation="reference", **options
  )
  x = _normal((2, 5, 6, 3), dtype=jnp.float64)
  variables = jax.tree.map(
    lambda v: v.astype(jnp.float64),
    _perturb(block.init(jax.random.key(0), x, train=False)),
  )
  norm = options.get("norm", "batch")
  padding = options["padding"]
  padding = padding.upper() if isinstance(padding, str) else padding
  want = _block_by_hand(
    variables, x, padding, options.get("activation", jax.nn.relu), norm
  )
  got = block.apply(variables, x, train=False)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
  assert ("batch_stats" in variables) == (norm == "batch")
  assert ("bias" in variables["params"]["out_conv"]) == (norm is None)
  if isinstance(padding, str) and padding != "SAME":
    # The convolutions' padding matters: not the zero-padded block.
    same = LandmarkBlock(
      8,
      branch_features=2,
      implementation="reference",
      **{**options, "padding": "SAME"},
    )
    assert not np.allclose(
      same.apply(variables, x, train=False), want, atol=1e-3
    )


def test_block_norm_factory_and_errors():
  import functools

  x = _normal((2, 4, 4, 4))
  block = LandmarkBlock(
    8,
    branch_features=2,
    implementation="reference",
    norm=functools.partial(nn.GroupNorm, num_groups=2),
  )
  variables = block.init(jax.random.key(0), x, train=False)
  assert set(variables) == {"params"}
  assert block.apply(variables, x, train=True).shape == (2, 4, 4, 8)
  with pytest.raises(
    ValueError,
    match=r"LandmarkBlock: padding='VALID' does "
    r"not keep the resolution.*'SAME'.*'CIRCULAR'",
  ):
    LandmarkBlock(8, padding="VALID").init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r"LandmarkBlock: padding=2 does not"):
    LandmarkBlock(8, padding=2).init(jax.random.key(0), x, train=False)
  with pytest.raises(
    ValueError,
    match=r"LandmarkBlock: norm='group' is not "
    r"a normalisation.*'batch'.*'layer'.*None.*GroupNorm",
  ):
    LandmarkBlock(8, norm="group").init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r"LandmarkBlock: padding='VALID'"):
    lmconv_jax.nnx.LandmarkBlock(4, 8, padding="VALID", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"LandmarkBlock: norm='instance'"):
    lmconv_jax.nnx.LandmarkBlock(4, 8, norm="instance", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "options",
  [
    dict(padding="CIRCULAR", norm="layer", activation=jax.nn.gelu),
    dict(norm=None),
  ],
  ids=["circular-layer-gelu", "no-norm"],
)
def test_linen_and_nnx_blocks_agree_on_options(options):
  x = _normal((2, 4, 5, 3))
  block = LandmarkBlock(
    4, branch_features=2, implementation="reference", **options
  )
  variables = _perturb(block.init(jax.random.key(0), x, train=False))
  twin = lmconv_jax.nnx.LandmarkBlock(
    3,
    4,
    branch_features=2,
    implementation="reference",
    rngs=nnx.Rngs(1),
    **options,
  )
  state = nnx.state(twin)
  pure = nnx.to_pure_dict(state)
  assert set(pure) == set(variables["params"])
  for name, sub in pure.items():
    for leaf in sub:
      sub[leaf] = variables["params"][name][leaf]
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(twin, state)
  np.testing.assert_allclose(
    twin(x, train=False),
    block.apply(variables, x, train=False),
    rtol=1e-6,
    atol=1e-6,
  )


def test_linen_and_nnx_blocks_agree():
  x = _normal((2, 4, 4, 3))
  block = LandmarkBlock(4, branch_features=2, directions="top_bottom")
  variables = block.init(jax.random.key(0), x, train=False)
  twin = lmconv_jax.nnx.LandmarkBlock(
    3, 4, branch_features=2, directions="top_bottom", rngs=nnx.Rngs(1)
  )
  state = nnx.state(twin)
  pure = nnx.to_pure_dict(state)
  for name, sub in pure.items():
    for leaf in sub:
      collection = "batch_stats" if leaf in ("mean", "var") else "params"
      sub[leaf] = variables[collection][name][leaf]
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(twin, state)

  np.testing.assert_array_equal(
    twin(x, train=False), block.apply(variables, x, train=False)
  )
  y, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(twin(x, train=True), y)
  np.testing.assert_array_equal(
    twin.out_norm.mean[...], updates["batch_stats"]["out_norm"]["mean"]
  )
  twin.eval()
  np.testing.assert_array_equal(
    twin(x), block.apply({**variables, **updates}, x, train=False)
  )


def test_nnx_signatures_show_every_field():
  """No **kwargs: help() and IDEs show nnx.Conv's fields, in its order."""
  import inspect

  conv = inspect.signature(nnx.Conv.__init__).parameters
  for cls in (
    lmconv_jax.nnx.LandmarkConv,
    lmconv_jax.nnx.LandmarkConv4,
    lmconv_jax.nnx.LandmarkConv8,
    lmconv_jax.nnx.LandmarkBlock,
  ):
    ours = inspect.signature(cls.__init__).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in ours.values()), cls
  for cls in (
    lmconv_jax.nnx.LandmarkConv,
    lmconv_jax.nnx.LandmarkConv4,
    lmconv_jax.nnx.LandmarkConv8,
  ):
    ours = inspect.signature(cls.__init__).parameters
    assert [n for n in ours if n in conv] == list(conv), cls
    for name, p in conv.items():
      assert ours[name].kind == p.kind, (cls, name)
      assert ours[name].default is p.default or (
        ours[name].default == p.default
      ), (cls, name)
  block = inspect.signature(lmconv_jax.nnx.LandmarkBlock.__init__).parameters
  linen = [
    f
    for f in LandmarkBlock.__dataclass_fields__
    if f not in ("parent", "name", "features")
  ]
  assert set(linen) <= set(block), set(linen) - set(block)
  # A field passed by keyword reaches nnx.Conv.
  layer = lmconv_jax.nnx.LandmarkConv4(
    4, 2, (3, 3), padding="VALID", use_bias=False, rngs=nnx.Rngs(0)
  )
  assert layer.padding == "VALID" and layer.bias is None
  assert layer(_normal((1, 5, 5, 4))).shape == (1, 3, 3, 2)


# --------------------------------------------------------------------------
# Training: a few optax steps, both implementations, the same trajectory.


class _TinyNet(nn.Module):
  implementation: str

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = LandmarkBlock(8, branch_features=2, implementation=self.implementation)(
      x, train=train
    )
    return nn.Dense(1)(x.mean(axis=(1, 2)))[:, 0]


_TRAJECTORIES = {}


def _trajectory(implementation, steps=6):
  """Losses and final params of `steps` Adam steps, cached per back end."""
  if implementation in _TRAJECTORIES:
    return _TRAJECTORIES[implementation]
  x = _normal((4, 6, 6, 2))
  target = x[..., 0].max(axis=(1, 2)) - x[..., 1].mean(axis=(1, 2))
  model = _TinyNet(implementation)
  variables = model.init(jax.random.key(0), x, train=False)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(3e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      pred, updates = model.apply(
        {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
      )
      return jnp.mean((pred - target) ** 2), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  losses = []
  for _ in range(steps):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  _TRAJECTORIES[implementation] = (np.array(losses), params)
  return _TRAJECTORIES[implementation]


def test_optax_steps_reduce_the_loss_reference():
  losses, _ = _trajectory("reference")
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_optax_trajectory_ffi_matches_reference():
  platform = _platform()
  if not _ffi.has_kernels(platform):
    pytest.skip(
      f"the FFI kernels for {platform!r} are not built "
      f"(lmconv_jax._ffi.has_kernels({platform!r}) is False)"
    )
  ref_losses, ref_params = _trajectory("reference")
  losses, params = _trajectory("ffi")
  assert losses[-1] < 0.5 * losses[0], losses
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
    params,
    ref_params,
  )


# --------------------------------------------------------------------------
# Docs.


@pytest.mark.parametrize(
  "module", [lmconv_jax.linen, lmconv_jax.nnx], ids=lambda m: m.__name__
)
def test_docstring_examples_run(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
  for cls in (
    module.LandmarkConv,
    module.LandmarkConv4,
    module.LandmarkConv8,
    module.LandmarkBlock,
  ):
    assert "Attributes:" in cls.__doc__ and ">>>" in cls.__doc__, cls
