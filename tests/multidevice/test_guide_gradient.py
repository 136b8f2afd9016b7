"""The gradient of a broadcast guide on 8 host devices (issue 36).

Where x is split over a dim the guide broadcasts over, each device's kernel
sums the guide's gradient over its own block only; the library adds the
devices' sums (one all-reduce). Every partitioning: Auto axes (custom
partitioning), Explicit axes (custom partitioning, the per-shard switch of
whole groups, the reference per shard), shard_map and pmap. The data are
small integers and quarter guides in float64, so every sum is exact and the
result must equal one device's to the bit, whatever the order of the sum;
and every device must hold the same bits (replicas that drift apart are the
bug this guards against).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lmconv_jax
from lmconv_jax import _ffi

HAS_FFI = _ffi.has_kernels("cpu")
needs_ffi = pytest.mark.skipif(not HAS_FFI, reason="CPU extension not built")
pytestmark = pytest.mark.x64  # float64: exact sums in any order

B, H, W, C = 8, 4, 3, 4
LAYOUTS = {
  "batch": P("data"),
  "batch_over_two_axes": P(("data", "model")),
  "batch_and_channels": P("data", None, None, "model"),
  "channels": P(None, None, None, "model"),
}
# Broadcast over: everything; all but C; B and C; H, W and C; B only.
GUIDE_SHAPES = [(), (C,), (H, W, 1), (B, 1, 1, 1), (1, H, W, C)]


def exact_data(seed=0):
  """x and the cotangent small integers, guides quarters: float64 sums of
  their products are exact in any order."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-3, 4, (B, H, W, C)).astype(np.float64)
  t = rng.integers(-2, 3, (B, H, W, C)).astype(np.float64)
  guides = [rng.integers(1, 6, s).astype(np.float64) / 4 for s in GUIDE_SHAPES]
  return x, t, guides


def guide_grads(grouping, impl):
  """x, t, guides -> the gradient of each guide (one pool per guide)."""

  def loss(guides, x, t):
    return sum(
      (
        lmconv_jax.grouped_landmark_pool(x, grouping, g, implementation=impl)
        * t
      ).sum()
      for g in guides
    )

  return jax.grad(loss)


def assert_replicas_agree(a, what):
  """Every device holding the same slice of ``a`` holds the same bits."""
  by_index = {}
  for shard in a.addressable_shards:
    key = tuple((s.start, s.stop) for s in shard.index)
    by_index.setdefault(key, []).append(np.asarray(shard.data))
  for key, datas in by_index.items():
    for d in datas[1:]:
      np.testing.assert_array_equal(d, datas[0], err_msg=f"{what} {key}")


def spec_of(a):
  spec = tuple(a.sharding.spec)
  return spec + (None,) * (a.ndim - len(spec))


@functools.lru_cache(maxsize=None)
def one_device(grouping, impl):
  x, t, guides = exact_data()
  return [
    np.asarray(d) for d in jax.jit(guide_grads(grouping, impl))(guides, x, t)
  ]


@needs_ffi
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("grouping", ["tl", "quadrants", "left_right"])
@pytest.mark.parametrize("kind", ["Auto", "Explicit"])
def test_broadcast_guide_gradient_is_summed_over_devices(
  kind, grouping, layout
):
  """Five guide shapes in one jit per case: host arrays under Auto axes,
  replicated over the mesh under Explicit ones (their gradient must come
  back replicated: the guide's type)."""
  mesh = jax.make_mesh(
    (4, 2), ("data", "model"), axis_types=(getattr(AxisType, kind),) * 2
  )
  x, t, guides = exact_data()
  if kind == "Explicit":
    guides = [jax.device_put(g, NamedSharding(mesh, P())) for g in guides]
  sharding = NamedSharding(mesh, LAYOUTS[layout])
  xs, ts = jax.device_put(x, sharding), jax.device_put(t, sharding)
  with jax.set_mesh(mesh):
    got = jax.jit(guide_grads(grouping, "ffi"))(guides, xs, ts)
  for shape, dg, want in zip(GUIDE_SHAPES, got, one_device(grouping, "ffi")):
    what = f"guide {shape}"
    assert dg.shape == shape, what
    np.testing.assert_array_equal(dg, want, err_msg=what)
    assert_replicas_agree(dg, what)
    if kind == "Explicit":  # the guide's type: replicated over the mesh
      assert all(s is None for s in dg.sharding.spec), (what, dg.sharding)


def test_custom_partitioning_adds_one_all_reduce_per_broadcast_guide():
  """Batch split, a per-channel guide: the guide's gradient is the one
  collective, one all-reduce (not in a conditional), and none without a
  guide that broadcasts over the batch."""
  if not HAS_FFI:
    pytest.skip("CPU extension not built")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x, t, guides = exact_data()
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  texts = {}
  for name, g in (("channel", guides[1]), ("per_image", guides[3])):
    grad = jax.grad(
      lambda g, x: lmconv_jax.landmark_pool(
        x, "tl", g, implementation="ffi"
      ).sum()
    )
    texts[name] = jax.jit(grad).lower(g, xs).compile().as_text()
  assert texts["channel"].count(" all-reduce(") == 1, texts["channel"]
  assert "conditional" not in texts["channel"]
  assert "all-reduce" not in texts["per_image"], texts["per_image"]


# The reference under Explicit axes runs per shard (_sharding.
# reference_per_shard): guides from anywhere, forward and backward.
def guide_from(where, g, mesh):
  if where == "numpy":
    return g
  if where == "jnp":
    return jnp.asarray(g)
  spec = (
    P() if where == "replicated" else P(*(["data"] + [None] * (g.ndim - 1)))
  )
  return jax.device_put(g, NamedSharding(mesh, spec))


@pytest.mark.parametrize(
  "grouping,layout,where",
  [
    ("tl", "batch_and_channels", "numpy"),
    ("tl", "batch", "jnp"),
    ("quadrants", "batch", "replicated"),
    ("top_bottom", "channels", "sharded"),
  ],
)
def test_reference_under_explicit_axes_takes_guides_from_anywhere(
  grouping, layout, where
):
  mesh = jax.make_mesh(
    (4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2
  )
  x, t, _ = exact_data(1)
  # Per image (split with the batch where "sharded") and per channel.
  gb = np.random.default_rng(2).integers(1, 6, (B, 1, 1, 1)) / 4
  gc = np.random.default_rng(3).integers(1, 6, (C,)) / 4
  sharding = NamedSharding(mesh, LAYOUTS[layout])
  xs, ts = jax.device_put(x, sharding), jax.device_put(t, sharding)
  gs = [
    guide_from(where, gb, mesh),
    guide_from("replicated" if where == "sharded" else where, gc, mesh),
  ]
  pool = lambda x, g: lmconv_jax.grouped_landmark_pool(
    x, grouping, g, implementation="reference"
  )
  grads = jax.grad(
    lambda gs, x, t: sum((pool(x, g) * t).sum() for g in gs), (0, 1)
  )
  with jax.set_mesh(mesh):
    out = jax.jit(pool)(xs, gs[0])
    (dgb, dgc), dx = jax.jit(grads)(gs, xs, ts)
  want_out = jax.jit(pool)(x, gb)
  (want_b, want_c), want_dx = jax.jit(grads)([gb, gc], x, t)
  np.testing.assert_array_equal(out, want_out)
  np.testing.assert_array_equal(dx, want_dx)
  for got, want, g in ((dgb, want_b, gs[0]), (dgc, want_c, gs[1])):
    np.testing.assert_array_equal(got, want)
    assert_replicas_agree(got, where)
    if where in ("replicated", "sharded"):  # the guide's own sharding
      assert spec_of(got) == spec_of(g), (got.sharding, g.sharding)


@pytest.mark.parametrize(
  "impl", [pytest.param("ffi", marks=needs_ffi), "reference"]
)
def test_shard_map_and_pmap_sum_a_replicated_guides_gradient(impl):
  """shard_map: a guide replicated while x is split gets the devices' sum
  (the transpose of the cast to varying). pmap: an unmapped guide's
  gradient is what jax gives any jnp function there (a jnp twin says
  whether pmap sums it); a psum inside gives the whole batch's."""
  x, t, guides = exact_data(4)
  g = guides[1]  # per channel
  pool = lambda x, g: lmconv_jax.landmark_pool(x, "I6", g, implementation=impl)
  grad = jax.grad(lambda g, x, t: (pool(x, g) * t).sum())
  want = np.asarray(jax.jit(grad)(g, x, t))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  smap = jax.shard_map(
    grad, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
  )
  got = jax.jit(smap)(g, x, t)
  np.testing.assert_array_equal(got, want)
  assert_replicas_agree(got, "shard_map")

  x1, t1 = x.reshape(8, 1, H, W, C), t.reshape(8, 1, H, W, C)
  summed = jax.pmap(
    lambda g, x, t: jax.lax.psum(grad(g, x, t), "i"),
    axis_name="i",
    in_axes=(None, 0, 0),
  )(g, x1, t1)
  for k in range(8):
    np.testing.assert_array_equal(summed[k], want)
  per_device = jax.pmap(grad, in_axes=(None, 0, 0))(g, x1, t1)
  twin = jax.pmap(
    jax.grad(lambda g, x, t: (g * x * t).sum()), in_axes=(None, 0, 0)
  )(g, x1, t1)
  own = [np.asarray(jax.jit(grad)(g, x1[k], t1[k])) for k in range(8)]
  pmap_sums = np.array_equal(twin[0], (x * t).sum((0, 1, 2)))
  for k in range(8):
    np.testing.assert_array_equal(per_device[k], want if pmap_sums else own[k])


# jax 0.11's Pallas interpreter cannot run under Explicit axes (its
# dynamic_update_slice mixes sharded and unsharded types); 0.12's can.
_JAX_0_11 = tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 12)


@pytest.mark.parametrize(
  "kind,layout",
  [
    ("Auto", "batch"),
    pytest.param(
      "Explicit",
      "batch_and_channels",
      marks=pytest.mark.skipif(
        _JAX_0_11, reason="jax 0.11's Pallas interpret mode, Explicit axes"
      ),
    ),
  ],
)
def test_pallas_kernels_sharded_equal_one_device(kind, layout):
  """implementation="pallas" (interpret mode on these CPU devices) under a
  sharded jit: the same rules as the custom calls, the same exact sums."""
  mesh = jax.make_mesh(
    (4, 2), ("data", "model"), axis_types=(getattr(AxisType, kind),) * 2
  )
  x, t, guides = exact_data()
  guides = guides[1:2]  # (C,): broadcast over the split batch
  want = jax.jit(guide_grads("quadrants", "reference"))(guides, x, t)
  if kind == "Explicit":
    guides = [jax.device_put(g, NamedSharding(mesh, P())) for g in guides]
  sharding = NamedSharding(mesh, LAYOUTS[layout])
  xs, ts = jax.device_put(x, sharding), jax.device_put(t, sharding)
  with jax.set_mesh(mesh):
    fn = jax.jit(guide_grads("quadrants", "pallas"))
    got = fn(guides, xs, ts)
    hlo = fn.lower(guides, xs, ts).compile().as_text()
  for dg, w in zip(got, want):
    np.testing.assert_array_equal(dg, w)
    assert_replicas_agree(dg, "pallas")
  if kind == "Auto":  # custom partitioning: a kernel per shard, one psum
    assert hlo.count(" all-reduce(") == 1 and " all-gather(" not in hlo
