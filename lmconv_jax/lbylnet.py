"""LBYLNet's landmark blocks and landmark convolutions, with their weights.

For users of LBYLNet ("Look Before You Leap", CVPR 2021, svip-lab/LBYLNet)
and of its ``landmarkconv`` release (hbb1/landmarkconv): the six landmark
blocks of LBYLNet's ``core/models/context/module.py`` (``LandmarkP1``,
``P2``, ``P2x``, ``P4``, ``P4x``, ``P8``) and the ``PConv2d4`` / ``PConv2d8``
layers, as Flax layers that compute the same functions, and converters from
their PyTorch ``state_dict`` to Flax variables. No PyTorch is needed: the
converters take any mapping of key to array (numpy arrays, or anything
``np.asarray`` reads), e.g. ``{k: v.numpy() for k, v in
model.state_dict().items()}``.

Three lines port a block (docs/lbylnet.md)::

  block = lbylnet.landmark_block("P4")                 # dim 256, mapdim 128
  variables = lbylnet.convert_state_dict(state_dict, "P4",
                                         prefix="context_block.")
  y = block.apply(variables, x_nhwc, train=False)      # NCHW -> NHWC first

What matches exactly: the forward pass, in eval and in train mode (the same
function, to rounding). What cannot match (docs/lbylnet.md, "What differs"):

* ties: LBYLNet merges pools with ``torch.max``, which splits the gradient
  of two equal maxima half and half; here it goes wholly to the first
  member (docs/semantics.md). Same forward; gradients differ only where two
  different pixels hold exactly equal maxima.
* BatchNorm bookkeeping in training: PyTorch updates ``running_var`` with
  the unbiased batch variance (Flax: the biased one), and LBYLNet's P1, P2,
  P2x and P4x call their branch conv-BN 2-4 times per forward, so their
  branch statistics move 2-4 times per step (here once).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from lmconv_jax import linen as _linen
from lmconv_jax import nnx as _nnx
from lmconv_jax.directions import LBYLNET_GROUPINGS

__all__ = [
  "BLOCKS",
  "convert_pconv_state_dict",
  "convert_state_dict",
  "grouping",
  "landmark_block",
  "load_nnx",
  "nnx_landmark_block",
  "pconv",
  "random_state_dict",
]

#: LBYLNet's block names, in the short form this module takes.
BLOCKS = ("P1", "P2", "P2x", "P4", "P4x", "P8")

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
# Flax's name for each BatchNorm2d tensor: (collection, name).
_BN_TO_FLAX = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


def _block(name, where: str) -> str:
  """``"P4"``, ``"LandmarkP4"`` (LBYLNet's config value) -> ``"P4"``."""
  if isinstance(name, str):
    short = name[len("Landmark") :] if name.startswith("Landmark") else name
    if short in BLOCKS:
      return short
  raise ValueError(
    f"{where}: unknown LBYLNet block {name!r}. Expected one of "
    f"{', '.join(map(repr, BLOCKS))} (or LBYLNet's class name, e.g. "
    f"'LandmarkP4', the 'context' value of its configs)."
  )


def grouping(name: str) -> str:
  """The grouping name of LBYLNet's block ``name``, e.g. ``"lbylnet_p4"``.

  Group k is the block's branch ``p{k+1}_conv1``, pooled in LBYLNet's
  directions, in its channel order (``lmconv_jax.directions.
  LBYLNET_GROUPINGS``).

  Example:
    >>> from lmconv_jax import lbylnet
    >>> lbylnet.grouping("P2x")
    'lbylnet_p2x'
  """
  return f"lbylnet_{_block(name, 'grouping').lower()}"


def _num_branches(name: str) -> int:
  return len(LBYLNET_GROUPINGS[grouping(name)])


def _check_block_kwargs(kwargs, where: str) -> None:
  fixed = sorted(
    set(kwargs)
    & {
      "features",
      "branch_features",
      "directions",
      "in_features",
      "out_features",
    }
  )
  if fixed:
    raise TypeError(
      f"{where}: {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} "
      f"set by the block name, dim and mapdim; got {fixed[0]}="
      f"{kwargs[fixed[0]]!r}. Pass dim=... and mapdim=..., or build "
      f"lmconv_jax.LandmarkBlock yourself with directions=grouping(name)."
    )


def landmark_block(
  name: str, dim: int = 256, mapdim: int = 128, **kwargs
) -> _linen.LandmarkBlock:
  """LBYLNet's ``Landmark{name}(dim, mapdim)`` as a linen LandmarkBlock.

  The block computes what LBYLNet's block computes, on NHWC inputs of
  ``dim`` channels (transpose LBYLNet's NCHW with ``x.transpose(0, 2, 3,
  1)``); load LBYLNet's weights with :func:`convert_state_dict`. BatchNorm
  is LBYLNet's (epsilon 1e-5, PyTorch momentum 0.1 = Flax momentum 0.9).

  Args:
    name: ``"P1"``, ``"P2"``, ``"P2x"``, ``"P4"``, ``"P4x"`` or ``"P8"``
      (or LBYLNet's class name, ``"LandmarkP4"``, ...).
    dim: input and output channels (LBYLNet's ``joint_out_dim``, 256 in
      the released configs).
    mapdim: channels of each direction branch (LBYLNet's ``ctx_dim``, 128).
    **kwargs: any other :class:`lmconv_jax.LandmarkBlock` field
      (``implementation``, ``dtype``, ``axis_name``, ...).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lmconv_jax import lbylnet
    >>> block = lbylnet.landmark_block("P4", dim=8, mapdim=4)
    >>> block.directions
    'lbylnet_p4'
    >>> x = jnp.ones((1, 5, 5, 8))
    >>> variables = block.init(jax.random.key(0), x, train=False)
    >>> block.apply(variables, x, train=False).shape
    (1, 5, 5, 8)
  """
  _check_block_kwargs(kwargs, "lbylnet.landmark_block")
  return _linen.LandmarkBlock(
    features=dim, branch_features=mapdim, directions=grouping(name), **kwargs
  )


def nnx_landmark_block(
  name: str, dim: int = 256, mapdim: int = 128, *, rngs, **kwargs
) -> _nnx.LandmarkBlock:
  """The NNX twin of :func:`landmark_block` (``dim`` in and out channels).

  Load LBYLNet's weights with ``load_nnx(block, convert_state_dict(...))``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lmconv_jax import lbylnet
    >>> block = lbylnet.nnx_landmark_block("P2", dim=8, mapdim=4,
    ...                                    rngs=nnx.Rngs(0))
    >>> block.branch_conv.kernel.shape   # 2 branches of 4
    (3, 3, 8, 8)
  """
  _check_block_kwargs(kwargs, "lbylnet.nnx_landmark_block")
  return _nnx.LandmarkBlock(
    dim,
    dim,
    branch_features=mapdim,
    directions=grouping(name),
    rngs=rngs,
    **kwargs,
  )


# --------------------------------------------------------------------------
# state_dict conversion.


def _items(state_dict, prefix: str, where: str, anchor: str):
  """The state_dict's entries under ``prefix``, keyed without it."""
  if not isinstance(state_dict, Mapping):
    raise TypeError(
      f"{where}: state_dict must be a mapping of key to array (e.g. "
      f"{{k: v.numpy() for k, v in module.state_dict().items()}}), got "
      f"{type(state_dict).__name__}."
    )
  if not isinstance(prefix, str):
    raise TypeError(f"{where}: prefix must be a str, got {prefix!r}.")
  if prefix and not prefix.endswith("."):
    prefix += "."
  items = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise TypeError(f"{where}: state_dict keys must be str, got {key!r}.")
    if key.startswith(prefix):
      items[key[len(prefix) :]] = value
  if not items:
    raise ValueError(
      f"{where}: no key of the state_dict ({len(state_dict)} keys) starts "
      f"with prefix={prefix!r}.{_prefix_hint(state_dict, anchor)}"
    )
  return items, prefix


def _prefix_hint(state_dict, anchor: str) -> str:
  found = sorted(
    {
      k[: -len(anchor)]
      for k in state_dict
      if isinstance(k, str) and k.endswith(anchor)
    }
  )
  if not found:
    return f" No key ends in {anchor!r}: is this the right state_dict?"
  return (
    f" Keys ending in {anchor!r} have the prefixes "
    f"{', '.join(map(repr, found[:5]))}: pass prefix=... to pick one."
  )


def _as_array(value, key: str, where: str) -> np.ndarray:
  try:
    return np.asarray(value)
  except Exception as e:  # name the key, keep the cause
    raise TypeError(
      f"{where}: cannot read {key!r} as an array ({type(e).__name__}: {e}). "
      f"Pass numpy arrays, e.g. {{k: v.detach().cpu().numpy() for k, v in "
      f"module.state_dict().items()}}."
    ) from e


def _check_keys(
  items,
  expected: Mapping[str, tuple],
  optional: Sequence[str],
  prefix: str,
  where: str,
  hint: str = "",
) -> dict:
  """Arrays for every expected key; one error listing every problem."""
  problems, arrays = [], {}
  for key, shape in expected.items():
    if key not in items:
      problems.append(f"missing key {prefix + key!r} (expected shape {shape})")
      continue
    a = _as_array(items[key], prefix + key, where)
    if a.shape != shape:
      problems.append(
        f"key {prefix + key!r} has shape {a.shape}, expected {shape}"
      )
    arrays[key] = a
  for key in items:
    if key not in expected and key not in optional:
      shape = getattr(items[key], "shape", None)
      problems.append(
        f"unexpected key {prefix + key!r}"
        + (f" (shape {tuple(shape)})" if shape is not None else "")
      )
  if problems:
    shown = "; ".join(problems[:12])
    more = f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(
      f"{where}: the state_dict does not match ({len(problems)} "
      f"problem{'s' if len(problems) > 1 else ''}): {shown}{more}.{hint}"
    )
  return arrays


def _int_dim(items, key: str, axis: int, prefix: str, where: str):
  if key not in items:
    return None
  shape = np.shape(_as_array(items[key], prefix + key, where))
  return int(shape[axis]) if len(shape) > axis else None


def _branch_hint(items, name: str, p: int) -> str:
  found = sorted(
    {int(m.group(1)) for k in items if (m := re.match(r"p(\d+)_conv1\.", k))}
  )
  if not found or len(found) == p:
    return ""
  fits = [b for b in BLOCKS if _num_branches(b) == len(found)]
  which = f" (LBYLNet's {' or '.join(fits)})" if fits else ""
  return (
    f" Block {name!r} has {p} branch{'es' if p > 1 else ''} "
    f"p1_conv1 ... p{p}_conv1; the state_dict has {len(found)}{which}: "
    f"is name right?"
  )


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def convert_state_dict(
  state_dict: Mapping[str, Any],
  name: str,
  prefix: str = "",
  *,
  dim: Optional[int] = None,
  mapdim: Optional[int] = None,
) -> dict:
  """LBYLNet's block ``state_dict`` -> the variables of :func:`landmark_block`.

  Every key is accounted for: ``p{k}_conv1.conv.weight`` and
  ``p{k}_conv1.bn.*`` (the branches, concatenated in the block's group
  order into ``branch_conv`` / ``branch_norm``), ``p_conv1`` / ``p_bn1``
  (``pool_conv`` / ``pool_norm``), ``conv1`` / ``bn1`` (the skip,
  ``skip_conv`` / ``skip_norm``), ``conv2.conv`` / ``conv2.bn``
  (``out_conv`` / ``out_norm``). Kernels go from PyTorch's OIHW to Flax's
  HWIO; BatchNorm's ``weight``, ``bias``, ``running_mean``,
  ``running_var`` become ``scale``, ``bias`` (params) and ``mean``, ``var``
  (batch_stats); ``num_batches_tracked`` is read and ignored. A missing,
  unexpected or wrongly shaped key is an error that names it.

  Args:
    state_dict: a mapping of LBYLNet's keys to arrays (numpy arrays or
      anything ``np.asarray`` takes). Arrays keep their dtype.
    name: the block, ``"P1"`` ... ``"P8"`` or ``"LandmarkP4"`` etc.
    prefix: the block's key prefix in the enclosing model, e.g.
      ``"context_block."`` for LBYLNet's model; keys outside it are ignored,
      keys under it must be exactly the block's.
    dim, mapdim: the block's sizes, to check; by default read from
      ``conv1.weight`` and ``p1_conv1.conv.weight``.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of numpy arrays, for
    ``landmark_block(name, dim, mapdim).apply(variables, x, train=...)``.

  Example:
    >>> import numpy as np
    >>> from lmconv_jax import lbylnet
    >>> sd = lbylnet.random_state_dict("P2", dim=8, mapdim=4)
    >>> sorted(sd)[:3]
    ['bn1.bias', 'bn1.num_batches_tracked', 'bn1.running_mean']
    >>> v = lbylnet.convert_state_dict(sd, "P2")
    >>> v["params"]["branch_conv"]["kernel"].shape   # p1, p2 branches
    (3, 3, 8, 8)
    >>> v["batch_stats"]["pool_norm"]["var"].shape
    (8,)
  """
  where = "lbylnet.convert_state_dict"
  block = _block(name, where)
  p = _num_branches(block)
  items, prefix = _items(state_dict, prefix, where, "p_conv1.weight")
  d, m = dim, mapdim
  for key in ("conv1.weight", "conv2.conv.weight", "p_conv1.weight"):
    d = _int_dim(items, key, 0, prefix, where) if d is None else d
  for k in range(1, p + 1):
    m = (
      _int_dim(items, f"p{k}_conv1.conv.weight", 0, prefix, where)
      if m is None
      else m
    )
  if d is None or m is None:
    keys = (
      "conv1.weight, conv2.conv.weight, p_conv1.weight"
      if d is None
      else f"p1_conv1.conv.weight ... p{p}_conv1.conv.weight"
    )
    raise ValueError(
      f"{where}({block!r}): cannot read the block's sizes: the state_dict "
      f"under prefix={prefix!r} has none of {keys} (its keys start "
      f"{', '.join(map(repr, sorted(items)[:4]))}). Is this LBYLNet's "
      f"Landmark{block} state_dict, and the prefix right?"
      f"{_prefix_hint(items, 'p_conv1.weight')}"
    )
  expected, optional, norms = {}, [], {}

  def bn(key, n, flax_name):
    for f in _BN_FIELDS:
      expected[f"{key}.{f}"] = (n,)
    optional.append(f"{key}.num_batches_tracked")
    norms.setdefault(flax_name, []).append(key)

  convs = {}
  for k in range(1, p + 1):
    expected[f"p{k}_conv1.conv.weight"] = (m, d, 3, 3)
    convs.setdefault("branch_conv", []).append(f"p{k}_conv1.conv.weight")
    bn(f"p{k}_conv1.bn", m, "branch_norm")
  expected["p_conv1.weight"] = (d, p * m, 3, 3)
  convs["pool_conv"] = ["p_conv1.weight"]
  bn("p_bn1", d, "pool_norm")
  expected["conv1.weight"] = (d, d, 1, 1)
  convs["skip_conv"] = ["conv1.weight"]
  bn("bn1", d, "skip_norm")
  expected["conv2.conv.weight"] = (d, d, 3, 3)
  convs["out_conv"] = ["conv2.conv.weight"]
  bn("conv2.bn", d, "out_norm")

  arrays = _check_keys(
    items,
    expected,
    optional,
    prefix,
    f"{where}({block!r})",
    _branch_hint(items, block, p),
  )
  variables = {"params": {}, "batch_stats": {}}
  for flax_name, keys in convs.items():
    variables["params"][flax_name] = {
      "kernel": np.concatenate(
        [_oihw_to_hwio(arrays[k]) for k in keys], axis=-1
      )
    }
  for flax_name, keys in norms.items():
    for f in _BN_FIELDS:
      collection, leaf = _BN_TO_FLAX[f]
      variables[collection].setdefault(flax_name, {})[leaf] = np.concatenate(
        [arrays[f"{k}.{f}"] for k in keys]
      )
  return variables


def load_nnx(
  block: _nnx.LandmarkBlock, variables: Mapping
) -> _nnx.LandmarkBlock:
  """Writes linen-layout ``variables`` (from :func:`convert_state_dict`)
  into the NNX ``block`` in place, and returns it.

  Example:
    >>> from flax import nnx
    >>> from lmconv_jax import lbylnet
    >>> v = lbylnet.convert_state_dict(
    ...     lbylnet.random_state_dict("P4", dim=8, mapdim=2), "P4")
    >>> block = lbylnet.load_nnx(
    ...     lbylnet.nnx_landmark_block("P4", 8, 2, rngs=nnx.Rngs(0)), v)
    >>> var = v["batch_stats"]["out_norm"]["var"]
    >>> bool((block.out_norm.var[...] == var).all())
    True
  """
  from flax import nnx

  where = "lbylnet.load_nnx"
  state = nnx.state(block)
  pure = nnx.to_pure_dict(state)
  problems = []
  for sub, leaves in pure.items():
    for leaf, current in leaves.items():
      collection = "batch_stats" if leaf in ("mean", "var") else "params"
      try:
        value = np.asarray(variables[collection][sub][leaf])
      except (KeyError, TypeError):
        problems.append(
          f"missing {collection}/{sub}/{leaf} (expected shape "
          f"{tuple(current.shape)})"
        )
        continue
      if value.shape != tuple(current.shape):
        problems.append(
          f"{collection}/{sub}/{leaf} has shape {value.shape}, "
          f"the block expects {tuple(current.shape)}"
        )
      leaves[leaf] = value
  if problems:
    raise ValueError(
      f"{where}: the variables do not fit the block: {'; '.join(problems)}. "
      f"Build the block with the dim and mapdim of the state_dict."
    )
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(block, state)
  return block


# --------------------------------------------------------------------------
# PConv2d4 / PConv2d8.


def _pair(v, what: str, where: str) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return int(v), int(v)
  if (
    isinstance(v, (tuple, list))
    and len(v) == 2
    and all(
      isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in v
    )
  ):
    return int(v[0]), int(v[1])
  raise ValueError(
    f"{where}: {what} must be an int or a pair of ints, as in "
    f"torch.nn.Conv2d, got {what}={v!r}."
  )


def pconv(
  p: int,
  in_channels: int,
  out_channels: int,
  kernel_size: Union[int, tuple[int, int]],
  stride: Union[int, tuple[int, int]] = 1,
  padding: Union[int, tuple[int, int], str] = 0,
  dilation: Union[int, tuple[int, int]] = 1,
  groups: int = 1,
  bias: bool = True,
  padding_mode: str = "zeros",
  **kwargs,
) -> _linen.LandmarkConv:
  """landmarkconv's ``PConv2d{p}(...)`` (``torch.nn.Conv2d`` arguments) as a
  linen :class:`lmconv_jax.LandmarkConv4` (p = 4) or ``LandmarkConv8``.

  The arguments map to ``nn.Conv`` fields: ``out_channels`` ->
  ``features``, ``kernel_size`` -> ``(kh, kw)``, ``stride`` -> ``strides``,
  ``padding`` p -> ``((p, p), (p, p))`` (PyTorch pads 0 by default, Flax
  ``'SAME'``), ``'same'`` / ``'valid'`` -> PyTorch's padding written out /
  ``'VALID'``, ``dilation`` -> ``kernel_dilation``, ``groups`` ->
  ``feature_group_count``, ``bias`` -> ``use_bias``. ``in_channels`` is
  checked (a multiple of p; Flax infers it from the input). The input is
  NHWC. Load the weights with :func:`convert_pconv_state_dict`.

  (The released ``PConv2d4`` cannot run - its pools are called without
  their ``guide`` - and ``PConv2d8.forward`` returns None; these layers
  compute what they were written to: pool the p channel chunks, tl, tr,
  bl, br or I1 ... I8, then the convolution.)

  Example:
    >>> from lmconv_jax import lbylnet
    >>> layer = lbylnet.pconv(4, 8, 16, 3, padding=1)
    >>> type(layer).__name__, layer.kernel_size, layer.padding
    ('LandmarkConv4', (3, 3), ((1, 1), (1, 1)))
  """
  where = "lbylnet.pconv"
  if p not in (4, 8):
    raise ValueError(
      f"{where}: p must be 4 (PConv2d4) or 8 (PConv2d8), got p={p!r}."
    )
  if padding_mode != "zeros":
    raise ValueError(
      f"{where}: only padding_mode='zeros' (PyTorch's default) maps to a "
      f"Flax padding, got padding_mode={padding_mode!r}. For circular "
      f"padding build lmconv_jax.LandmarkConv{p}(..., padding='CIRCULAR') "
      f"yourself ('CIRCULAR' pads (k - 1) // 2 low, k // 2 high)."
    )
  if in_channels % p:
    raise ValueError(
      f"{where}: in_channels={in_channels} is not a multiple of {p}; "
      f"PConv2d{p} chunks the channels into {p} direction groups and this "
      f"layer needs them equal. Use {in_channels // p * p or p} or "
      f"{(in_channels // p + 1) * p} channels."
    )
  kh, kw = _pair(kernel_size, "kernel_size", where)
  dh, dw = _pair(dilation, "dilation", where)
  if isinstance(padding, str):
    if padding == "valid":
      pads = "VALID"
    elif padding == "same":
      pads = []
      for k, d in ((kh, dh), (kw, dw)):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))  # as PyTorch pads
      pads = tuple(pads)
    else:
      raise ValueError(
        f"{where}: padding must be an int, a pair, 'same' or "
        f"'valid', as in torch.nn.Conv2d, got {padding!r}."
      )
  else:
    ph, pw = _pair(padding, "padding", where)
    pads = ((ph, ph), (pw, pw))
  cls = _linen.LandmarkConv4 if p == 4 else _linen.LandmarkConv8
  return cls(
    features=out_channels,
    kernel_size=(kh, kw),
    strides=_pair(stride, "stride", where),
    padding=pads,
    kernel_dilation=(dh, dw),
    feature_group_count=groups,
    use_bias=bias,
    **kwargs,
  )


def convert_pconv_state_dict(
  state_dict: Mapping[str, Any], prefix: str = ""
) -> dict:
  """``PConv2d4`` / ``PConv2d8``'s state_dict -> the variables of :func:`pconv`.

  ``weight`` (OIHW) becomes ``kernel`` (HWIO) and ``bias`` (if present)
  stays ``bias``; any other key under ``prefix`` is an error naming it.

  Example:
    >>> import numpy as np
    >>> from lmconv_jax import lbylnet
    >>> sd = {"weight": np.zeros((16, 8, 3, 3)), "bias": np.zeros(16)}
    >>> v = lbylnet.convert_pconv_state_dict(sd)
    >>> v["params"]["kernel"].shape
    (3, 3, 8, 16)
  """
  where = "lbylnet.convert_pconv_state_dict"
  items, prefix = _items(state_dict, prefix, where, "weight")
  if "weight" not in items:
    _check_keys(
      items,
      {"weight": "(out_channels, in_channels // groups, kh, kw)"},
      ("bias",),
      prefix,
      where,
    )
  w = _as_array(items["weight"], prefix + "weight", where)
  if w.ndim != 4:
    raise ValueError(
      f"{where}: key {prefix + 'weight'!r} has shape "
      f"{w.shape}, expected 4 dims (out_channels, in_channels "
      f"// groups, kh, kw)."
    )
  expected = {"weight": w.shape}
  if "bias" in items:
    expected["bias"] = (w.shape[0],)
  arrays = _check_keys(items, expected, (), prefix, where)
  params = {"kernel": _oihw_to_hwio(arrays["weight"])}
  if "bias" in arrays:
    params["bias"] = arrays["bias"]
  return {"params": params}


def random_state_dict(
  name: str, dim: int = 256, mapdim: int = 128, seed: int = 0, dtype=np.float32
) -> dict:
  """Random arrays under the key names and shapes of LBYLNet's block
  ``name`` (what ``{k: v.numpy() for k, v in LandmarkP4(dim, mapdim)
  .state_dict().items()}`` holds), for trying the converters out.

  Example:
    >>> from lmconv_jax import lbylnet
    >>> sd = lbylnet.random_state_dict("P1", dim=8, mapdim=4)
    >>> len(sd), sd["p_conv1.weight"].shape
    (24, (8, 4, 3, 3))
  """
  block = _block(name, "lbylnet.random_state_dict")
  rng = np.random.default_rng(seed)
  p = _num_branches(block)
  sd = {}

  def conv(key, o, i, k):
    sd[key] = (rng.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)).astype(
      dtype
    )

  def bn(key, n):
    sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, n).astype(dtype)
    sd[f"{key}.bias"] = rng.normal(0.0, 0.1, n).astype(dtype)
    sd[f"{key}.running_mean"] = rng.normal(0.0, 0.1, n).astype(dtype)
    sd[f"{key}.running_var"] = rng.uniform(0.5, 1.5, n).astype(dtype)
    sd[f"{key}.num_batches_tracked"] = np.array(100, np.int64)

  for k in range(1, p + 1):
    conv(f"p{k}_conv1.conv.weight", mapdim, dim, 3)
    bn(f"p{k}_conv1.bn", mapdim)
  conv("p_conv1.weight", dim, p * mapdim, 3)
  bn("p_bn1", dim)
  conv("conv1.weight", dim, dim, 1)
  bn("bn1", dim)
  conv("conv2.conv.weight", dim, dim, 3)
  bn("conv2.bn", dim)
  return sd
