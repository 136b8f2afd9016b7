"""lmconv_jax.lbylnet: LBYLNet's six landmark blocks and PConv2d4/8, exactly.

The checks run against a re-statement of LBYLNet's code written here from
its source (svip-lab/LBYLNet, core/models/context/module.py: LandmarkP1,
P2, P2x, P4, P4x, P8 and its ``convolution`` module; hbb1/landmarkconv,
lib/layers/conv{4,8}.py: PConv2d4/8 and the pools), in numpy, NCHW, with
PyTorch's OIHW weights, BatchNorm2d (eps 1e-5, momentum 0.1, running_var
updated with the unbiased variance) and each block's own sequence of
branch calls, pools (our reference pools, by the original's aliases) and
``torch.max`` merges. No PyTorch: the state_dicts are dicts of numpy arrays
under LBYLNet's key names.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import lmconv_jax
from lmconv_jax import lbylnet

EPS, MOMENTUM = 1e-5, 0.1  # torch.nn.BatchNorm2d's defaults


# --------------------------------------------------------------------------
# The re-statement of LBYLNet (NCHW, numpy).


def conv2d(
  x,
  w,
  stride=(1, 1),
  padding=((0, 0), (0, 0)),
  dilation=(1, 1),
  groups=1,
  bias=None,
):
  """torch.nn.functional.conv2d: NCHW input, OIHW weight, zero padding."""
  n, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
  oh = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
  ow = (wd + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
  out = np.zeros((n, o, oh, ow), np.result_type(x, w))
  og = o // groups
  for g in range(groups):
    for i in range(kh):
      for j in range(kw):
        r0, c0 = i * dilation[0], j * dilation[1]
        patch = xp[
          :,
          g * cg : (g + 1) * cg,
          r0 : r0 + stride[0] * (oh - 1) + 1 : stride[0],
          c0 : c0 + stride[1] * (ow - 1) + 1 : stride[1],
        ]
        out[:, g * og : (g + 1) * og] += np.einsum(
          "nchw,oc->nohw", patch, w[g * og : (g + 1) * og, :, i, j]
        )
  if bias is not None:
    out += bias[None, :, None, None]
  return out


def pool(x, alias):
  """landmarkconv's pool ``alias`` (``tr``, ``I5``, ...), guide all ones."""
  y = lmconv_jax.landmark_pool(
    jnp.asarray(x.transpose(0, 2, 3, 1)), alias, implementation="reference"
  )
  return np.asarray(y).transpose(0, 3, 1, 2)


class TorchModule:
  """A state_dict with PyTorch's BatchNorm2d and Conv2d semantics."""

  def __init__(self, state_dict, train):
    self.sd = {k: np.array(v) for k, v in state_dict.items()}
    self.train = train
    self.calls = {}

  def bn(self, key, x):
    self.calls[key] = self.calls.get(key, 0) + 1
    w, b = self.sd[f"{key}.weight"], self.sd[f"{key}.bias"]
    if self.train:
      mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
      n = x.size // x.shape[1]
      for name, stat in (
        ("running_mean", mean),
        ("running_var", var * n / (n - 1)),
      ):  # unbiased
        self.sd[f"{key}.{name}"] = (1 - MOMENTUM) * self.sd[
          f"{key}.{name}"
        ] + MOMENTUM * stat
    else:
      mean, var = self.sd[f"{key}.running_mean"], self.sd[f"{key}.running_var"]
    c = lambda v: v[None, :, None, None]
    return (x - c(mean)) / np.sqrt(c(var) + EPS) * c(w) + c(b)

  def conv(self, key, x, pad):
    return conv2d(x, self.sd[key], padding=((pad, pad), (pad, pad)))

  def convolution(self, key, x):
    """LBYLNet's ``convolution(3, inp, out)``: 3x3 conv (no bias), BN, ReLU."""
    return np.maximum(
      self.bn(f"{key}.bn", self.conv(f"{key}.conv.weight", x, 1)), 0
    )


# Each block's forward, as LBYLNet writes it: the branch each of its pools
# reads (p{k}_conv1, called once per pool), the pools, and what it
# concatenates (lists of pools merged by torch.max, in its order).
SOURCE = {
  "P1": dict(
    branches=[1, 1, 1, 1], pools=["tr", "tl", "bl", "br"], cat=[[0, 1, 2, 3]]
  ),  # max(max(p1, p2), max(p3, p4))
  "P2": dict(
    branches=[1, 1, 2, 2], pools=["tr", "tl", "bl", "br"], cat=[[0, 1], [2, 3]]
  ),
  "P2x": dict(
    branches=[1, 2, 2, 1], pools=["tr", "tl", "bl", "br"], cat=[[0, 3], [1, 2]]
  ),
  "P4": dict(
    branches=[1, 2, 3, 4],
    pools=["tr", "tl", "bl", "br"],
    cat=[[0], [1], [2], [3]],
  ),
  "P4x": dict(
    branches=[1, 2, 2, 3, 3, 4, 4, 1],
    pools=["I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8"],
    cat=[[0, 7], [1, 2], [3, 4], [5, 6]],
  ),
  "P8": dict(
    branches=[1, 2, 3, 4, 5, 6, 7, 8],
    pools=["I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8"],
    cat=[[k] for k in range(8)],
  ),
}


def lbylnet_forward(name, state_dict, x, train):
  """LBYLNet's Landmark{name}.forward(x) on NCHW x; (output, module)."""
  src, mod = SOURCE[name], TorchModule(state_dict, train)
  pools = [
    pool(mod.convolution(f"p{b}_conv1", x), alias)
    for b, alias in zip(src["branches"], src["pools"])
  ]
  merged = []
  for members in src["cat"]:
    out = pools[members[0]]
    for k in members[1:]:
      out = np.maximum(out, pools[k])  # torch.max(a, b)
    merged.append(out)
  pool_feat = np.concatenate(merged, axis=1)
  p_bn1 = mod.bn("p_bn1", mod.conv("p_conv1.weight", pool_feat, 1))
  bn1 = mod.bn("bn1", mod.conv("conv1.weight", x, 0))
  relu1 = np.maximum(p_bn1 + bn1, 0)
  return mod.convolution("conv2", relu1), mod


def _nchw(seed, shape, dtype):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _ours(name, variables, x_nchw, train, dim, mapdim):
  block = lbylnet.landmark_block(name, dim, mapdim, implementation="reference")
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  if train:
    y, updates = jax.jit(
      lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
  else:
    y, updates = (
      jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x),
      None,
    )
  return np.asarray(y).transpose(0, 3, 1, 2), updates


# --------------------------------------------------------------------------
# The six blocks compute LBYLNet's functions.

DIM, MAPDIM = 16, 8


@pytest.mark.parametrize(
  "dtype", [pytest.param("float64", marks=pytest.mark.x64), "float32"]
)
@pytest.mark.parametrize("name", lbylnet.BLOCKS)
def test_block_matches_lbylnet_eval_and_train(name, dtype):
  sd = lbylnet.random_state_dict(name, DIM, MAPDIM, seed=1, dtype=dtype)
  variables = lbylnet.convert_state_dict(sd, name)
  x = _nchw(2, (2, DIM, 6, 7), dtype)
  tol = (
    dict(rtol=1e-10, atol=1e-10)
    if dtype == "float64"
    else dict(rtol=1e-4, atol=1e-4)
  )
  for train in (False, True):
    want, mod = lbylnet_forward(name, sd, x, train)
    got, updates = _ours(name, variables, x, train, DIM, MAPDIM)
    assert got.dtype == np.dtype(dtype)
    assert float(np.abs(want).max()) > 0.1  # not all ReLU'd away
    np.testing.assert_allclose(got, want, **tol, err_msg=f"train={train}")
  # Training: the same batch statistics, other bookkeeping. LBYLNet moves a
  # BatchNorm's running averages once per call (its branch BN 4x in P1, 2x
  # in P2, P2x, P4x) with the unbiased variance; Flax once, biased.
  n = x.shape[0] * x.shape[2] * x.shape[3]
  stats = updates["batch_stats"]
  for key, flax_name in _norms(name):
    calls = mod.calls[key[0]]
    assert all(mod.calls[k] == calls for k in key)
    assert calls == (
      len(SOURCE[name]["branches"]) // _branches(name)
      if flax_name == "branch_norm"
      else 1
    )
    decay = (1 - MOMENTUM) ** calls
    for torch_name, flax_leaf, factor in (
      ("running_mean", "mean", 1.0),
      ("running_var", "var", n / (n - 1)),
    ):
      before = np.concatenate([sd[f"{k}.{torch_name}"] for k in key])
      after = np.concatenate([mod.sd[f"{k}.{torch_name}"] for k in key])
      batch_stat = (after - decay * before) / (1 - decay) / factor
      np.testing.assert_allclose(
        stats[flax_name][flax_leaf],
        (1 - MOMENTUM) * before + MOMENTUM * batch_stat,
        **tol,
        err_msg=f"{flax_name}.{flax_leaf}",
      )


def _branches(name):
  return len(SOURCE[name]["cat"])


def _norms(name):
  """(LBYLNet's BatchNorm keys, concatenated in order; our norm's name)."""
  return [
    (
      tuple(f"p{k}_conv1.bn" for k in range(1, _branches(name) + 1)),
      "branch_norm",
    ),
    (("p_bn1",), "pool_norm"),
    (("bn1",), "skip_norm"),
    (("conv2.bn",), "out_norm"),
  ]


# Where each pool of the original looks, in the geometry of docs/semantics.md
# (u: rows up from the pixel, v: columns right), written independently of the
# direction table: a region contains the pixels at (u, v) offsets for which
# the predicate holds (boundary rays belong to both neighbouring octants).
REGIONS = {
  "tl": lambda u, v: (u >= 0) & (v <= 0),
  "tr": lambda u, v: (u >= 0) & (v >= 0),
  "bl": lambda u, v: (u <= 0) & (v <= 0),
  "br": lambda u, v: (u <= 0) & (v >= 0),
  "I1": lambda u, v: (0 <= u) & (u <= v),  # east .. north-east
  "I2": lambda u, v: (0 <= v) & (v <= u),  # north-east .. north
  "I3": lambda u, v: (0 <= -v) & (-v <= u),  # north .. north-west
  "I4": lambda u, v: (0 <= u) & (u <= -v),  # north-west .. west
  "I5": lambda u, v: (0 <= -v) & (-v <= -u),  # south .. south-west
  "I6": lambda u, v: (0 <= -u) & (-u <= -v),  # west .. south-west
  "I7": lambda u, v: (0 <= v) & (v <= -u),  # south-east .. south
  "I8": lambda u, v: (0 <= -u) & (-u <= v),  # east .. south-east
}


@pytest.mark.parametrize("name", lbylnet.BLOCKS)
def test_one_hot_probe_pins_each_groups_region(name):
  """Output channel k of a probe block is "group k's region holds the one
  hot pixel": identity branches, p_conv1 picks group k, no skip."""
  dim, h, w, src = 8, 7, 7, (3, 2)
  p = _branches(name)
  sd = lbylnet.random_state_dict(name, dim, 1, dtype=np.float32)
  for key in list(sd):
    if key.endswith((".weight", ".bias", "running_mean", "running_var")):
      sd[key] = np.zeros_like(sd[key])
    if key.endswith(("bn.weight", "bn1.weight", "running_var")):
      sd[key] = np.ones_like(sd[key])
  for k in range(1, p + 1):
    sd[f"p{k}_conv1.conv.weight"][0, 0, 1, 1] = 1.0  # input channel 0
  for k in range(p):
    sd["p_conv1.weight"][k, k, 1, 1] = 1.0  # group k -> channel k
  sd["conv2.conv.weight"][:, :, 1, 1] = np.eye(dim)
  x = np.zeros((1, h, w, dim), np.float32)
  x[0, src[0], src[1], 0] = 1.0
  block = lbylnet.landmark_block(name, dim, 1, implementation="reference")
  y = np.asarray(
    block.apply(lbylnet.convert_state_dict(sd, name), x, train=False)
  )
  rows, cols = np.mgrid[:h, :w]
  u, v = rows - src[0], src[1] - cols  # the pixel seen from (i, j)
  for k, members in enumerate(SOURCE[name]["cat"]):
    aliases = [SOURCE[name]["pools"][m] for m in members]
    want = np.zeros((h, w), bool)
    for alias in aliases:
      want |= REGIONS[alias](u, v)
    np.testing.assert_array_equal(
      y[0, ..., k] > 0.5, want, err_msg=f"{name} group {k}: {aliases}"
    )
    assert want.sum() < h * w or len(aliases) == 4
  np.testing.assert_array_equal(y[0, ..., p:], 0.0)


def test_groupings_by_name_and_the_released_block():
  assert lmconv_jax.directions.resolve_grouping("lbylnet_p4") != (
    lmconv_jax.directions.resolve_grouping("quadrants")
  )
  for name in lbylnet.BLOCKS:
    assert lbylnet.grouping(name) == lbylnet.grouping(f"Landmark{name}")
    groups = lmconv_jax.directions.resolve_grouping(lbylnet.grouping(name))
    src = SOURCE[name]
    assert [[d.alias for d in g] for g in groups] == [
      [src["pools"][m] for m in members] for members in src["cat"]
    ]
  # The released configs: LandmarkP4(256, mapdim=128), 3,017,216 parameters,
  # and a state_dict of that size converts to the block's exact tree.
  block = lbylnet.landmark_block("P4")
  x = jax.ShapeDtypeStruct((1, 16, 16, 256), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: block.init(jax.random.key(0), x, train=False), x
  )
  assert (
    sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
    == 3_017_216
  )
  converted = lbylnet.convert_state_dict(lbylnet.random_state_dict("P4"), "P4")
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(
    np.shape, converted
  )


def test_nnx_block_matches_linen():
  name, dim, mapdim = "P2x", 8, 4
  sd = lbylnet.random_state_dict(name, dim, mapdim, seed=3)
  variables = lbylnet.convert_state_dict(sd, name)
  block = lbylnet.nnx_landmark_block(
    name, dim, mapdim, implementation="reference", rngs=nnx.Rngs(0)
  )
  assert lbylnet.load_nnx(block, variables) is block
  x = _nchw(4, (2, 5, 6, dim), np.float32)
  linen = lbylnet.landmark_block(name, dim, mapdim, implementation="reference")
  run = nnx.jit(lambda block, x, train: block(x, train=train), static_argnums=2)
  np.testing.assert_allclose(
    run(block, x, False),
    linen.apply(variables, x, train=False),
    rtol=1e-5,
    atol=1e-5,
  )
  want, updates = linen.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(run(block, x, True), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    block.branch_norm.var[...],
    updates["batch_stats"]["branch_norm"]["var"],
    rtol=1e-6,
  )
  with pytest.raises(
    ValueError,
    match=r"lbylnet.load_nnx: .*branch_conv/"
    r"kernel has shape \(3, 3, 8, 8\), the block expects "
    r"\(3, 3, 8, 16\)",
  ):
    lbylnet.load_nnx(
      lbylnet.nnx_landmark_block(name, dim, 8, rngs=nnx.Rngs(0)), variables
    )


# --------------------------------------------------------------------------
# PConv2d4 / PConv2d8.


def pconv_forward(p, sd, x, stride, padding, dilation, groups):
  """PConv2d{p}.forward as written: chunk in p, pool each, Conv2d."""
  aliases = (
    ["tl", "tr", "bl", "br"] if p == 4 else [f"I{k}" for k in range(1, 9)]
  )
  chunks = np.split(x, p, axis=1)  # torch.chunk, equal sizes
  pooled = np.concatenate([pool(c, a) for c, a in zip(chunks, aliases)], 1)
  return conv2d(
    pooled, sd["weight"], stride, padding, dilation, groups, sd.get("bias")
  )


@pytest.mark.parametrize(
  "p, args, torch_pads",
  [
    (4, dict(kernel_size=3, padding=1), ((1, 1), (1, 1))),
    (4, dict(kernel_size=(2, 3), padding="same"), ((0, 1), (1, 1))),
    (
      8,
      dict(
        kernel_size=3,
        stride=2,
        padding=(1, 0),
        dilation=(1, 2),
        groups=2,
        bias=False,
      ),
      ((1, 1), (0, 0)),
    ),
    (8, dict(kernel_size=1), ((0, 0), (0, 0))),
  ],
  ids=["p4-pad1", "p4-same", "p8-stride-dilation-groups", "p8-1x1"],
)
def test_pconv_matches_the_original(p, args, torch_pads):
  cin, cout = 8, 6
  layer = lbylnet.pconv(p, cin, cout, **args)
  kh, kw = layer.kernel_size
  rng = np.random.default_rng(5)
  sd = {
    "weight": rng.standard_normal(
      (cout, cin // args.get("groups", 1), kh, kw)
    ).astype(np.float32)
  }
  if args.get("bias", True):
    sd["bias"] = rng.standard_normal(cout).astype(np.float32)
  x = _nchw(6, (2, cin, 7, 6), np.float32)
  stride = layer.strides
  want = pconv_forward(
    p, sd, x, stride, torch_pads, layer.kernel_dilation, args.get("groups", 1)
  )
  variables = lbylnet.convert_pconv_state_dict(
    {"conv.w." + k: v for k, v in sd.items()}, "conv.w"
  )
  got = layer.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(
    np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4
  )


def test_pconv_errors():
  with pytest.raises(ValueError, match=r"p must be 4 \(PConv2d4\) or 8.*p=2"):
    lbylnet.pconv(2, 8, 8, 3)
  with pytest.raises(
    ValueError,
    match=r"in_channels=6 is not a multiple of "
    r"4.*4 or 8 channels",
  ):
    lbylnet.pconv(4, 6, 8, 3)
  with pytest.raises(
    ValueError,
    match=r"padding_mode='zeros'.*got "
    r"padding_mode='circular'.*'CIRCULAR'",
  ):
    lbylnet.pconv(4, 8, 8, 3, padding_mode="circular")
  with pytest.raises(
    ValueError,
    match=r"kernel_size must be an int or a pair"
    r".*kernel_size=\(3, 3, 3\)",
  ):
    lbylnet.pconv(8, 8, 8, (3, 3, 3))
  with pytest.raises(
    ValueError,
    match=r"unexpected key 'gates' \(shape "
    r"\(4, 2\)\)",
  ):
    lbylnet.convert_pconv_state_dict(
      {"weight": np.zeros((4, 8, 3, 3)), "gates": np.zeros((4, 2))}
    )
  with pytest.raises(
    ValueError,
    match=r"key 'bias' has shape \(3,\), "
    r"expected \(4,\)",
  ):
    lbylnet.convert_pconv_state_dict(
      {"weight": np.zeros((4, 8, 3, 3)), "bias": np.zeros(3)}
    )
  with pytest.raises(ValueError, match=r"missing key 'weight'"):
    lbylnet.convert_pconv_state_dict({"bias": np.zeros(3)})


# --------------------------------------------------------------------------
# The converter's errors name the key, the shape given and the one expected.


def test_convert_state_dict_errors():
  sd = lbylnet.random_state_dict("P4", 8, 4)
  where = r"lbylnet.convert_state_dict\('P4'\): the state_dict does not match"
  missing = {k: v for k, v in sd.items() if k != "p_bn1.running_var"}
  with pytest.raises(
    ValueError,
    match=where + r" \(1 problem\): missing key "
    r"'p_bn1.running_var' \(expected shape \(8,\)\)",
  ):
    lbylnet.convert_state_dict(missing, "P4")
  extra = {**sd, "p5_conv1.conv.weight": np.zeros((4, 8, 3, 3))}
  with pytest.raises(
    ValueError,
    match=r"unexpected key 'p5_conv1.conv.weight'"
    r" \(shape \(4, 8, 3, 3\)\)",
  ):
    lbylnet.convert_state_dict(extra, "P4")
  wrong = {**sd, "p2_conv1.conv.weight": np.zeros((4, 8, 1, 1))}
  with pytest.raises(
    ValueError,
    match=r"key 'p2_conv1.conv.weight' has shape "
    r"\(4, 8, 1, 1\), expected \(4, 8, 3, 3\)",
  ):
    lbylnet.convert_state_dict(wrong, "P4")
  # A P4 state_dict read as P2: the branches say which block it is.
  with pytest.raises(
    ValueError,
    match=r"'P2'.*unexpected key "
    r"'p3_conv1.conv.weight'.*the state_dict has 4 "
    r"\(LBYLNet's P4 or P4x\)",
  ):
    lbylnet.convert_state_dict(sd, "P2")
  with pytest.raises(ValueError, match=r"expected \(16, 16, 1, 1\)"):
    lbylnet.convert_state_dict(sd, "P4", dim=16)
  # Prefixes: the enclosing model's keys, the block's under context_block.
  model = {
    "visual.conv.weight": np.zeros(3),
    **{f"context_block.{k}": v for k, v in sd.items()},
  }
  ok = lbylnet.convert_state_dict(model, "LandmarkP4", prefix="context_block")
  np.testing.assert_array_equal(
    ok["params"]["skip_conv"]["kernel"][0, 0], sd["conv1.weight"][:, :, 0, 0].T
  )
  with pytest.raises(
    ValueError,
    match=rf"no key of the state_dict "
    rf"\({len(model)} keys\) starts with prefix='context.'"
    r".*prefixes "
    r"'context_block.'",
  ):
    lbylnet.convert_state_dict(model, "P4", prefix="context")
  with pytest.raises(
    ValueError,
    match=r"cannot read the block's sizes.*"
    r"prefix=''.*prefixes 'context_block.'",
  ):
    lbylnet.convert_state_dict(model, "P4")
  with pytest.raises(
    ValueError,
    match=r"unknown LBYLNet block 'P3'.*'P1', "
    r"'P2', 'P2x', 'P4', 'P4x', 'P8'.*'LandmarkP4'",
  ):
    lbylnet.convert_state_dict(sd, "P3")
  with pytest.raises(
    TypeError,
    match=r"state_dict must be a mapping.*got "
    r"list",
  ):
    lbylnet.convert_state_dict(list(sd.items()), "P4")
  with pytest.raises(
    TypeError,
    match=r"branch_features is set by the block "
    r"name, dim and mapdim",
  ):
    lbylnet.landmark_block("P4", branch_features=3)
  # num_batches_tracked is optional and ignored; values keep their dtype.
  bare = {k: v for k, v in sd.items() if "num_batches" not in k}
  a, b = (lbylnet.convert_state_dict(s, "P4") for s in (sd, bare))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert a["params"]["pool_conv"]["kernel"].dtype == np.float32
