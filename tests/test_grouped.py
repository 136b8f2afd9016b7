"""The grouped pool is one primitive: one custom call per pass for any
grouping, equal bit for bit to the composition of single pools; "auto"
chosen per platform at lowering (our calls on cpu/cuda, the reference on
tpu), so one traced model lowers and exports for several platforms."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import lmconv_jax
from lmconv_jax import _ffi
from lmconv_jax.directions import GROUPINGS, resolve, resolve_grouping

import emulator  # tests/emulator.py: the targets called directly
import inputs

needs_ffi = pytest.mark.skipif(
  not _ffi.has_kernels("cpu"), reason="the CPU extension is not built"
)
GROUPING_NAMES = tuple(GROUPINGS)
CUSTOM = (
  ("top_left",),
  ("east_northeast", "south_southwest"),
  ("bottom_right", "north_northwest", "west_southwest"),
  ("I8",),
)
DTYPES = ("float32", "bfloat16", "float16")


def _merge(a, b):
  """The merge rule of docs/semantics.md: b wins if greater or NaN."""
  return jnp.where((b > a) | jnp.isnan(b), b, a)


def composed(x, grouping, g, impl):
  """The grouped pool composed from single-direction pools (slice, merge,
  concatenate): what the grouped call must equal bit for bit."""
  groups = resolve_grouping(grouping)
  cg = x.shape[-1] // len(groups)
  outs = []
  for k, members in enumerate(groups):
    xk = x[..., k * cg : (k + 1) * cg]
    gk = None
    if g is not None:
      gk = g if g.shape[-1] == 1 else g[..., k * cg : (k + 1) * cg]
    out = None
    for d in members:
      p = lmconv_jax.landmark_pool(xk, d, gk, implementation=impl)
      out = p if out is None else _merge(out, p)
    outs.append(out)
  return jnp.concatenate(outs, axis=-1)


def _guide(mode, shape, dtype):
  if mode is None:
    return None
  rng = np.random.default_rng(3)
  gshape = {
    "full": shape,
    "channel": shape[-1:],
    "batch": shape[:-3] + (1, 1, 1),
    "column": (1, shape[-2], 1),
  }[mode]
  return jnp.asarray((rng.integers(-1, 4, gshape) / 2).astype(dtype))


GRID = [
  ("float32", guide) for guide in (None, "full", "channel", "batch", "column")
] + [("bfloat16", None), ("float16", "channel")]


@needs_ffi
@pytest.mark.parametrize("grouping", GROUPING_NAMES + ("custom",))
@pytest.mark.parametrize("dtype,guide", GRID)
def test_grouped_call_equals_composed_single_pools(grouping, dtype, guide):
  grouping = CUSTOM if grouping == "custom" else grouping
  shape = (2, 5, 7, 16)
  # Small integers with post-ReLU zeros and a NaN, guides in halves,
  # integer cotangents: every sum is exact, so any order gives the same bits.
  x = jnp.asarray(
    np.maximum(inputs.make_x("small_int", shape), 0)
    + inputs.make_x("small_int", shape, 1)
  ).astype(dtype)
  x = x.at[0, 2, 3, 1].set(jnp.nan)
  ct = jnp.asarray(inputs.make_ct(shape)).astype(dtype)
  g = _guide(guide, shape, dtype)

  def grads(f):
    if g is None:
      out, vjp = jax.vjp(lambda x: f(x, None), x)
      return (out,) + vjp(ct)
    out, vjp = jax.vjp(f, x, g)
    return (out,) + vjp(ct)

  got = grads(
    lambda x, g: lmconv_jax.grouped_landmark_pool(
      x, grouping, g, implementation="ffi"
    )
  )
  if dtype == "float32":
    want = grads(lambda x, g: composed(x, grouping, g, "ffi"))
  else:
    # The halves' sums round in the dtype, so their order matters: the
    # grouped reference sums a merged group's members in the kernels'
    # order (docs/semantics.md); composed pools sum in autodiff's order.
    want = grads(
      lambda x, g: lmconv_jax.grouped_landmark_pool(
        x, grouping, g, implementation="reference"
      )
    )
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(
      np.asarray(a, np.float64), np.asarray(b, np.float64)
    )
  if g is not None:
    assert got[2].shape == g.shape  # the guide's gradient at its shape


@needs_ffi
@pytest.mark.parametrize("grouping", ["octants", "quadrants", "top_bottom"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("guided", [False, True])
def test_both_cpu_schedules_equal_composed_single_pools(
  grouping, batch, guided
):
  """Above the threading threshold the CPU forward sweeps an image's narrow
  groups (octants: 8 float32 channels, under a cache line) together when
  there are images enough for the threads (batch 4), and group by group
  when there are not (batch 1); wider and merged groups always go group by
  group. Every schedule gives the composed single pools' bits, forward and
  backward."""
  shape = (batch, 24, 40, 64)
  x = jnp.asarray(
    np.maximum(inputs.make_x("small_int", shape), 0)
    + inputs.make_x("small_int", shape, 1),
    jnp.float32,
  )
  x = x.at[0, 20, 3, 1].set(jnp.nan)
  ct = jnp.asarray(inputs.make_ct(shape), jnp.float32)
  g = _guide("channel" if guided else None, shape, "float32")

  def grads(f):
    out, vjp = jax.vjp(lambda x: f(x, g), x)
    return (out,) + vjp(ct)

  got = grads(
    lambda x, g: lmconv_jax.grouped_landmark_pool(
      x, grouping, g, implementation="ffi"
    )
  )
  want = grads(lambda x, g: composed(x, grouping, g, "ffi"))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_ffi
@pytest.mark.parametrize(
  "dtype,channels,grouping",
  [
    ("float32", 64, "octants"),
    pytest.param("float64", 32, "octants", marks=pytest.mark.x64),
    ("float32", 32, ("east_northeast",) * 2 + ("south_southwest",) * 2),
    ("bfloat16", 64, ("top_left",) * 2 + ("bottom_right",) * 2),
    ("float16", 64, ("top_right",) * 2 + ("bottom_left",) * 2),
  ],
)
def test_backward_of_a_line_of_groups_swept_together(dtype, channels, grouping):
  """The unguided backward sweeps an item's groups together when they are
  single directions with one scan order (a cache line of narrow groups:
  float32 octants I1 / I2, ...; backward_views), in place for float32 /
  float64 and through a row scratch for the 16-bit types. Its gradient
  equals the reference's bit for bit, and, where sums are exact in any
  order, the composed single pools'."""
  shape = (2, 9, 13, channels)
  x = jnp.asarray(
    np.maximum(inputs.make_x("small_int", shape), 0)
    + inputs.make_x("small_int", shape, 1)
  ).astype(dtype)
  x = x.at[1, 4, 6, 3].set(jnp.nan)
  ct = jnp.asarray(inputs.make_ct(shape)).astype(dtype)

  def grad(f):
    return jax.vjp(f, x)[1](ct)[0]

  got = grad(
    lambda x: lmconv_jax.grouped_landmark_pool(
      x, grouping, implementation="ffi"
    )
  )
  want = grad(
    lambda x: lmconv_jax.grouped_landmark_pool(
      x, grouping, implementation="reference"
    )
  )
  assert got.dtype == x.dtype
  np.testing.assert_array_equal(
    np.asarray(got, np.float64), np.asarray(want, np.float64)
  )
  if dtype in ("float32", "float64"):
    np.testing.assert_array_equal(
      np.asarray(got),
      np.asarray(grad(lambda x: composed(x, grouping, None, "ffi"))),
    )


@needs_ffi
@pytest.mark.parametrize(
  "dtype,shape,grouping,guide",
  [
    ("float32", (2, 9, 13, 64), "quadrants", None),
    ("float32", (2, 9, 13, 64), "quadrants", "channel"),
    ("float32", (4, 17, 19, 64), "quadrants", None),  # threads share images
    (
      "float32",
      (1, 40, 33, 128),
      "quadrants",
      None,
    ),  # fewer images than threads
    pytest.param(
      "float64", (2, 9, 13, 32), "quadrants", None, marks=pytest.mark.x64
    ),
    ("bfloat16", (2, 9, 13, 128), "quadrants", None),
    ("float16", (2, 9, 13, 128), "quadrants", "full"),
    (
      "float32",
      (2, 9, 13, 96),
      (
        "top_left",
        "bottom_left",
        "top_right",
        "bottom_right",
        "bottom_left",
        "top_left",
      ),
      None,
    ),
    ("float32", (2, 9, 13, 32), ("bottom_right", "top_left"), None),  # alone
    ("float32", (4, 17, 19, 64), "octants", None),  # lines of two, one order
    pytest.param(
      "float64", (2, 9, 13, 32), "octants", None, marks=pytest.mark.x64
    ),
    ("bfloat16", (2, 9, 13, 64), "octants", None),  # a line, two row orders
    ("float16", (2, 9, 13, 128), "octants", None),
  ],
)
def test_groups_of_one_row_order_swept_together(dtype, shape, grouping, guide):
  """Single-direction groups of whole cache lines (quadrants of float32),
  or lines of narrow groups of one row order (octants of float32), are swept
  an image at a time, the groups of one row order together: forward_views,
  and, unguided, backward_views with an item per (image, row order).
  Forward and gradient equal the reference's bit for bit, and, where sums
  are exact in any order, the composed single pools'."""
  x = jnp.asarray(
    np.maximum(inputs.make_x("small_int", shape), 0)
    + inputs.make_x("small_int", shape, 1)
  ).astype(dtype)
  x = x.at[0, 4, 6, 3].set(jnp.nan).at[-1, 2, 5, shape[-1] - 1].set(jnp.nan)
  g = _guide(guide, shape, dtype)
  ct = jnp.asarray(inputs.make_ct(shape)).astype(dtype)

  def run(f):
    out, vjp = jax.vjp(f, x)
    return (out,) + vjp(ct)

  got = run(
    lambda x: lmconv_jax.grouped_landmark_pool(
      x, grouping, g, implementation="ffi"
    )
  )
  want = run(
    lambda x: lmconv_jax.grouped_landmark_pool(
      x, grouping, g, implementation="reference"
    )
  )
  for a, b in zip(got, want):
    assert a.dtype == x.dtype
    np.testing.assert_array_equal(
      np.asarray(a, np.float64), np.asarray(b, np.float64)
    )
  if dtype in ("float32", "float64"):
    for a, b in zip(got, run(lambda x: composed(x, grouping, g, "ffi"))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _count(text, pattern):
  return len(re.findall(pattern, text))


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
@pytest.mark.parametrize("grouping", GROUPING_NAMES + ("custom",))
@pytest.mark.parametrize("guided", [False, True])
def test_fwd_bwd_is_two_custom_calls_and_no_concatenate(
  platform, grouping, guided
):
  if not _ffi.has_kernels(platform):
    pytest.skip(f"no {platform} kernels in this build")
  grouping = CUSTOM if grouping == "custom" else grouping
  x = jnp.ones((2, 6, 5, 16))
  g = jnp.full((16,), 0.5) if guided else None
  loss = lambda x, g: jnp.sum(
    lmconv_jax.grouped_landmark_pool(x, grouping, g, implementation="ffi") ** 2
  )
  args = (0, 1) if guided else 0
  text = (
    jax.jit(jax.grad(loss, argnums=args))
    .trace(x, g)
    .lower(lowering_platforms=(platform,))
    .as_text()
  )
  calls = re.findall(
    r'custom_call_target = "(lmconv_[a-z_]+)"', text
  ) or re.findall(r"stablehlo.custom_call @(lmconv_[a-z_]+)", text)
  suffix = "_guided" if guided else ""
  assert sorted(calls) == sorted(
    [f"lmconv_pool_fwd{suffix}", f"lmconv_pool_bwd{suffix}"]
  ), calls
  assert _count(text, r"concatenate") == 0
  assert _count(text, r"stablehlo.slice") == 0


def test_inference_saves_no_member_pools():
  """Merged groups save their member pools only when differentiated."""
  x = jnp.ones((2, 4, 4, 4))
  f = lambda x: lmconv_jax.grouped_landmark_pool(x, "all_quadrants")
  jaxpr = jax.make_jaxpr(f)(x)
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "lmconv_pool"]
  assert eqn.outvars[1].aval.shape == (2, 0, 4, 4, 4)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: f(x).sum()))(x)
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "lmconv_pool"]
  assert eqn.outvars[1].aval.shape == (2, 4, 4, 4, 4)


@pytest.mark.parametrize("guided", [False, True])
def test_merged_residual_is_winner_codes_unguided_member_pools_guided(guided):
  """Differentiated, an unguided merged group saves one uint8 winner code
  per member and element (a quarter of float32 member pools); a guided one
  its member pools in x's dtype (dguide needs each member's max)."""
  x = jnp.ones((2, 4, 4, 4))
  g = jnp.full((4,), 0.5) if guided else None
  f = lambda x: lmconv_jax.grouped_landmark_pool(x, "all_quadrants", g).sum()
  jaxpr = jax.make_jaxpr(jax.grad(f))(x)
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "lmconv_pool"]
  aval = eqn.outvars[1].aval
  assert aval.shape == (2, 4, 4, 4, 4)
  assert aval.dtype == (x.dtype if guided else jnp.uint8)


@needs_ffi
@pytest.mark.parametrize("grouping", ["top_bottom", "all_quadrants", CUSTOM])
@pytest.mark.parametrize("kind", ["relu", "small_int", "constant", "nan"])
def test_winner_codes_name_the_merge_winner_once(grouping, kind):
  """Bit 2 of member k's code is set where member k won its group's merge
  (the first of the largest, a later NaN wins), exactly once per element;
  a single-direction group's slots are not part of the residual."""
  shape = (2, 5, 6, 12)
  x = inputs.make_x("small_int" if kind == "nan" else kind, shape)
  if kind == "nan":
    x[np.random.default_rng(5).random(shape) < 0.1] = np.nan
  x = jnp.asarray(x, jnp.float32)
  _, codes = emulator.forward(x, None, grouping, emulated=False)
  codes = np.asarray(codes)
  groups = resolve_grouping(grouping)
  assert codes.dtype == np.uint8
  assert codes.shape == shape[:1] + (max(map(len, groups)),) + shape[1:]
  cg = shape[-1] // len(groups)
  for k, members in enumerate(groups):
    if len(members) == 1:
      continue
    blk = slice(k * cg, (k + 1) * cg)
    pools = [
      np.asarray(lmconv_jax.landmark_pool(x[..., blk], d)) for d in members
    ]
    best, win = pools[0], np.zeros(pools[0].shape, int)
    for m, pm in enumerate(pools[1:], 1):
      take = (pm > best) | np.isnan(pm)
      best, win = np.where(take, pm, best), np.where(take, m, win)
    won = (codes[:, : len(members), ..., blk] & 4) != 0  # (B, K, H, W, cg)
    np.testing.assert_array_equal(won.sum(axis=1), 1)
    np.testing.assert_array_equal(np.argmax(won, axis=1), win)
    assert (codes[:, : len(members), ..., blk] < 8).all()  # bits 0-2 only


def _layers():
  return {
    "LandmarkConv4": lmconv_jax.LandmarkConv4(8, (3, 3)),
    "LandmarkConv8": lmconv_jax.LandmarkConv8(8, (3, 3)),
    "LandmarkConv(top_bottom)": lmconv_jax.LandmarkConv(
      8, (3, 3), directions="top_bottom"
    ),
    "LandmarkBlock": lmconv_jax.LandmarkBlock(8),
  }


def _on_tpu(text):
  """The TPU lowering runs our Pallas kernels: tpu_custom_calls, no XLA
  custom call of ours and no reference scan (a stablehlo.while)."""
  return (
    "tpu_custom_call" in text
    and "lmconv_pool" not in text
    and "stablehlo.while" not in text
  )


@pytest.mark.parametrize("name", list(_layers()))
def test_tpu_lowering_of_every_layer_is_our_pallas_kernels(name):
  layer = _layers()[name]
  x = jnp.ones((2, 8, 8, 8))
  train = {"train": True} if isinstance(layer, lmconv_jax.LandmarkBlock) else {}
  params = layer.init(jax.random.key(0), x, **train)
  apply = lambda p, x: (
    layer.apply(p, x, mutable=["batch_stats"], **train)[0]
    if "batch_stats" in p
    else layer.apply(p, x)
  )
  for fn in (apply, jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2))):
    text = (
      jax.jit(fn).trace(params, x).lower(lowering_platforms=("tpu",)).as_text()
    )
    assert _on_tpu(text), name


@pytest.mark.parametrize("guided", [False, True])
def test_tpu_lowering_of_the_ops(guided):
  x = jnp.ones((2, 6, 5, 8))
  g = jnp.full((8,), 0.5) if guided else None
  for grouping in GROUPING_NAMES:
    f = lambda x, g: jnp.sum(lmconv_jax.grouped_landmark_pool(x, grouping, g))
    for fn in (f, jax.grad(f, argnums=(0, 1) if guided else 0)):
      text = (
        jax.jit(fn).trace(x, g).lower(lowering_platforms=("tpu",)).as_text()
      )
      assert _on_tpu(text), grouping
    tangent = lambda x: jax.jvp(lambda x: f(x, g), (x,), (x,))[1]
    text = (
      jax.jit(tangent).trace(x).lower(lowering_platforms=("tpu",)).as_text()
    )
    assert _on_tpu(text), grouping


def test_ffi_refuses_tpu_with_a_clear_error():
  x = jnp.ones((1, 4, 4, 4))
  f = lambda x: lmconv_jax.grouped_landmark_pool(
    x, "quadrants", implementation="ffi"
  )
  with pytest.raises(
    NotImplementedError, match="no kernels for platform 'tpu'.*pallas"
  ):
    jax.jit(f).trace(x).lower(lowering_platforms=("tpu",))


def test_reference_never_emits_our_custom_calls():
  x = jnp.ones((1, 4, 4, 4))
  f = lambda x: jnp.sum(
    lmconv_jax.grouped_landmark_pool(
      x, "top_bottom", implementation="reference"
    )
  )
  for platform in ("cpu", "cuda", "tpu"):
    text = (
      jax.jit(jax.grad(f))
      .trace(x)
      .lower(lowering_platforms=(platform,))
      .as_text()
    )
    assert "lmconv_" not in text


@needs_ffi
def test_multi_platform_export_of_a_model_round_trips():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = lmconv_jax.LandmarkConv4(8, (3, 3))(x)
      x = nn.relu(x)
      return lmconv_jax.LandmarkConv(8, (3, 3), directions="top_bottom")(x)

  model = Model()
  x = jnp.asarray(inputs.make_x("random", (2, 8, 8, 8)), jnp.float32)
  params = model.init(jax.random.key(0), x)
  exp = export.export(
    jax.jit(model.apply),
    platforms=("cpu", "cuda", "tpu"),
    disabled_checks=lmconv_jax.export_disabled_checks(),
  )(params, x)
  assert exp.platforms == ("cpu", "cuda", "tpu")
  text = exp.mlir_module()
  assert "lmconv_pool_fwd" in text  # the cpu (and cuda) variant
  restored = export.deserialize(exp.serialize())
  np.testing.assert_array_equal(
    restored.call(params, x), jax.jit(model.apply)(params, x)
  )


def test_auto_on_a_platform_without_kernels_is_the_reference(monkeypatch):
  """A build without kernels for the platform: "auto" lowers to the reference."""
  x = jnp.asarray(inputs.make_x("small_int", (1, 4, 5, 8)), jnp.float32)
  f = jax.jit(lambda x: lmconv_jax.grouped_landmark_pool(x, "octants"))
  want = lmconv_jax.grouped_landmark_pool(
    x, "octants", implementation="reference"
  )
  np.testing.assert_array_equal(f(x), want)


def test_direction_objects_outside_the_table_work_in_both():
  d = lmconv_jax.Direction("custom", "c", 1, 1, (-1, 1), (-1, 0), "")
  x = jnp.array([[0.0, 5.0], [0.0, 0.0]])[None, ..., None]
  for impl in ("reference",) + (("ffi",) if _ffi.has_kernels("cpu") else ()):
    out = lmconv_jax.landmark_pool(x, d, implementation=impl)
    np.testing.assert_array_equal(out[0, ..., 0], [[0.0, 5.0], [5.0, 5.0]])
  with pytest.raises(ValueError, match="must differ"):
    lmconv_jax.landmark_pool(
      x, lmconv_jax.Direction("bad", "b", 1, 1, (-1, 0), (-1, 0), "")
    )


def test_grouping_errors_name_the_fix():
  x = jnp.ones((1, 4, 4, 8))
  with pytest.raises(ValueError, match="got None"):
    lmconv_jax.grouped_landmark_pool(x, None)
  gen = (d for d in ("top_left", "top_right"))
  assert lmconv_jax.grouped_landmark_pool(x, gen).shape == x.shape
  with pytest.raises(ValueError, match="multiple of 3"):
    lmconv_jax.grouped_landmark_pool(x, ("tl", "tr", "bl"))
