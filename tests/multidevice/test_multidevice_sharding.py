"""8 host devices: sharded jit, pmap, shard_map, and exported sharded models.

A pool whose input is sharded over a batch dim or over channels must compile
to one custom call per device with no all-gather, all-to-all or
collective-permute, forward, backward and tangent, and keep the input's
sharding; other layouts (H or W sharded) must still give the right answer.
Every check compares numbers with the unsharded reference.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lmconv_jax
from lmconv_jax import _ffi, _sharding

import inputs

HAS_FFI = _ffi.has_kernels("cpu")
needs_ffi = pytest.mark.skipif(not HAS_FFI, reason="CPU extension not built")
IMPLS = [pytest.param("ffi", marks=needs_ffi), "reference"]
# Whole-group channel shards without collectives (not on jax 0.11: see
# _sharding.PER_SHARD; the answers are checked there all the same).
per_shard = pytest.mark.skipif(
  not _sharding.PER_SHARD, reason="jax < 0.12 gathers (PER_SHARD)"
)
MOVES = ("all-gather", "all-to-all", "collective-permute")
COLLECTIVES = MOVES + ("all-reduce", "reduce-scatter")
X_SHAPE = (8, 5, 6, 4)  # (B, H, W, C)


def make_mesh(kind="Auto"):
  return jax.make_mesh(
    (4, 2), ("data", "model"), axis_types=(getattr(AxisType, kind),) * 2
  )


def found(compiled, names):
  text = compiled.as_text()
  return [n for n in names if n in text]


def lmconv_calls(compiled):
  return compiled.as_text().count('custom_call_target="lmconv_')


def ref_pool(direction):
  return lambda x, g: lmconv_jax.landmark_pool_reference(x, direction, g)


def data(seed=0, shape=X_SHAPE):
  x = inputs.make_x("small_int", shape, seed) + inputs.make_x(
    "relu", shape, seed
  )
  g = np.random.default_rng(seed + 1).uniform(-0.5, 1.5, shape)
  return x, g, inputs.make_ct(shape, seed + 2)


def spec_of(array):
  spec = tuple(array.sharding.spec)
  return spec + (None,) * (array.ndim - len(spec))


# --------------------------------------------------------------------------
# Sharded jit

BATCH_OR_CHANNELS = {
  "batch": P("data"),
  "channels": P(None, None, None, "model"),
  "batch_and_channels": P("data", None, None, "model"),
  "batch_over_both_axes": P(("data", "model")),
}


# Every layout with and without a guide for the kernels; the reference (whose
# compiles are slower) on two layouts with a guide.
CASES = [
  pytest.param("ffi", layout, guided, marks=needs_ffi)
  for layout in BATCH_OR_CHANNELS
  for guided in (False, True)
]
CASES += [
  ("reference", "batch", True),
  ("reference", "batch_and_channels", True),
]


@pytest.mark.x64  # float64 data, float64 tolerances (1e-12)
@pytest.mark.parametrize("impl,layout,guided", CASES)
def test_sharded_jit_over_batch_or_channels_has_no_collectives(
  impl, layout, guided
):
  mesh = make_mesh()
  sharding = NamedSharding(mesh, BATCH_OR_CHANNELS[layout])
  x, g, ct = data()
  g = g if guided else None
  pool = lambda x, g: lmconv_jax.landmark_pool(x, "I6", g, implementation=impl)
  programs = {
    "forward": (lambda x, g, t: pool(x, g), 1),
    "vjp": (lambda x, g, t: jax.vjp(pool, x, g)[1](t), 2),
    "jvp": (lambda x, g, t: jax.jvp(pool, (x, g), (t, t))[1], 2),
  }
  if not guided:
    programs["vjp"] = (
      lambda x, g, t: jax.vjp(lambda x: pool(x, None), x)[1](t),
      2,
    )
    programs["jvp"] = (
      lambda x, g, t: jax.jvp(lambda x: pool(x, None), (x,), (t,))[1],
      2,
    )
  ref = ref_pool("I6")
  want = {
    "forward": ref(x, g),
    "vjp": jax.vjp(ref, x, g)[1](ct)
    if guided
    else jax.vjp(lambda x: ref(x, None), x)[1](ct),
    "jvp": jax.jvp(ref, (x, g), (ct, ct))[1]
    if guided
    else jax.jvp(lambda x: ref(x, None), (x,), (ct,))[1],
  }
  args = [
    jax.device_put(a, sharding) if a is not None else None for a in (x, g, ct)
  ]
  for name, (fn, n_calls) in programs.items():
    compiled = jax.jit(fn).lower(*args).compile()
    assert found(compiled, COLLECTIVES) == [], (name, layout)
    if impl == "ffi":  # one kernel per pool (and one per gradient), per device
      assert lmconv_calls(compiled) == n_calls, (name, compiled.as_text())
    got = compiled(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want[name])):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)
      assert spec_of(a) == spec_of(args[0]), (name, a.sharding)


@needs_ffi
@pytest.mark.x64  # float64 data, float64 tolerances (1e-13)
def test_explicit_mesh_axes_and_vmap_inside_sharded_jit():
  mesh = make_mesh("Explicit")
  x, g, _ = data(3)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None, "model")))
  gs = jax.device_put(g, NamedSharding(mesh, P("data", None, None, "model")))
  pool = lambda x, g: lmconv_jax.landmark_pool(x, "br", g, implementation="ffi")
  compiled = jax.jit(pool).lower(xs, gs).compile()
  assert found(compiled, COLLECTIVES) == []
  np.testing.assert_allclose(compiled(xs, gs), ref_pool("br")(x, g), rtol=1e-13)
  # vmap over H (moved in front) of a batch-sharded array: still local.
  auto = make_mesh()
  xa = jax.device_put(x, NamedSharding(auto, P("data")))
  vf = jax.jit(
    jax.vmap(
      lambda x: lmconv_jax.landmark_pool(
        x[..., None], "tl", implementation="ffi"
      )[..., 0],
      in_axes=1,
      out_axes=1,
    )
  )
  compiled = vf.lower(xa).compile()
  assert found(compiled, COLLECTIVES) == []
  want = np.stack(
    [
      ref_pool("tl")(x[:, k, :, :, None], None)[..., 0]
      for k in range(x.shape[1])
    ],
    axis=1,
  )
  np.testing.assert_array_equal(compiled(xa), want)


OTHER_LAYOUTS = {
  "H": P(None, "data"),
  "W": P(None, None, "model"),
  "batch_and_H": P("model", "data"),
}


@pytest.mark.parametrize(
  "impl,layout",
  [pytest.param("ffi", layout, marks=needs_ffi) for layout in OTHER_LAYOUTS]
  + [("reference", "batch_and_H")],
)
@pytest.mark.x64  # float64 data, float64 tolerances (1e-13)
def test_sharded_over_h_or_w_is_correct(impl, layout):
  """H / W sharding: gathered before the kernel (docs/transforms.md says what
  that costs), the answer is unchanged and the output keeps the sharding."""
  mesh = make_mesh()
  x, g, ct = data(5, (8, 8, 6, 4))
  sharding = NamedSharding(mesh, OTHER_LAYOUTS[layout])
  xs, gs, cts = (jax.device_put(a, sharding) for a in (x, g, ct))
  pool = lambda x, g: lmconv_jax.landmark_pool(x, "I1", g, implementation=impl)
  fwd = jax.jit(pool).lower(xs, gs).compile()
  out = fwd(xs, gs)
  np.testing.assert_allclose(out, ref_pool("I1")(x, g), rtol=1e-13)
  dx, dg = jax.jit(lambda x, g, t: jax.vjp(pool, x, g)[1](t))(xs, gs, cts)
  rdx, rdg = jax.vjp(ref_pool("I1"), x, g)[1](ct)
  np.testing.assert_allclose(dx, rdx, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(dg, rdg, rtol=1e-12, atol=1e-12)
  if impl == "ffi":
    assert spec_of(out) == spec_of(xs)
    assert "all-gather" in found(fwd, MOVES)  # the documented cost


# Two groups, one merged by max: grouping without compiling twelve scans.
GROUPS = (("top_left", "I2"), "east_southeast")


@pytest.mark.x64  # float64 data, float64 tolerances (1e-12)
@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_pool_and_layer_sharded_over_batch(impl):
  mesh = make_mesh()
  x = np.random.default_rng(7).normal(size=(8, 6, 5, 4))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  grouped = jax.jit(
    lambda x: lmconv_jax.grouped_landmark_pool(x, GROUPS, implementation=impl)
  )
  compiled = grouped.lower(xs).compile()
  if impl == "ffi":
    assert found(compiled, COLLECTIVES) == []
  want = lmconv_jax.grouped_landmark_pool(x, GROUPS, implementation=impl)
  np.testing.assert_array_equal(compiled(xs), want)
  # Sharded over channels the groups move between devices, but the answer
  # and the output's sharding are unchanged.
  xc = jax.device_put(x, NamedSharding(mesh, P("data", None, None, "model")))
  out = grouped(xc)
  np.testing.assert_array_equal(out, want)
  assert spec_of(out) == spec_of(xc)
  layer = lmconv_jax.LandmarkConv(
    features=4, kernel_size=(3, 3), directions=GROUPS, implementation=impl
  )
  params = layer.init(jax.random.key(0), x)
  apply = jax.jit(layer.apply)
  compiled = apply.lower(params, xs).compile()
  if impl == "ffi":
    assert found(compiled, MOVES) == []
  np.testing.assert_allclose(
    compiled(params, xs), layer.apply(params, x), rtol=1e-12, atol=1e-12
  )
  loss = lambda p, x: (layer.apply(p, x) ** 2).mean()
  got = jax.jit(jax.grad(loss))(params, xs)
  want = jax.jit(jax.grad(loss))(params, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12),
    got,
    want,
  )


# --------------------------------------------------------------------------
# pmap and shard_map


@pytest.mark.x64  # float64 data, float64 tolerances (1e-12)
@pytest.mark.parametrize("impl", IMPLS)
def test_pmap_forward_and_gradients_equal_single_device(impl):
  x, g, ct = data(9, (8, 2, 5, 6, 3))  # one (2, 5, 6, 3) per device
  pool = lambda x, g: lmconv_jax.landmark_pool(x, "I4", g, implementation=impl)
  loss = lambda x, g: (pool(x, g) * ct[0]).sum()
  out = jax.pmap(pool)(x, g)
  dx, dg = jax.pmap(jax.grad(loss, argnums=(0, 1)))(x, g)
  tout = jax.pmap(lambda x, g, t: jax.jvp(pool, (x, g), (t, t))[1])(x, g, ct)
  ref = ref_pool("I4")

  @jax.jit
  @jax.vmap
  def single_device(x, g, t):
    rloss = lambda x, g: (ref(x, g) * ct[0]).sum()
    return (
      (ref(x, g),)
      + jax.grad(rloss, argnums=(0, 1))(x, g)
      + (jax.jvp(ref, (x, g), (t, t))[1],)
    )

  for got, want in zip((out, dx, dg, tout), single_device(x, g, ct)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.x64  # float64 data, float64 tolerances (1e-13)
@pytest.mark.parametrize("impl", IMPLS)
def test_shard_map_ops_layers_and_replicated_guide(impl):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x = np.random.default_rng(11).normal(size=(8, 5, 6, 4))
  g = np.random.default_rng(12).uniform(0, 1, (4,))  # per channel
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  smap = functools.partial(jax.shard_map, mesh=mesh, out_specs=P("data"))
  kw = dict(implementation=impl)

  got = jax.jit(
    smap(
      lambda x, g: lmconv_jax.landmark_pool(x, "tr", g, **kw),
      in_specs=(P("data"), P()),
    )
  )(xs, g)
  np.testing.assert_allclose(
    got, lmconv_jax.landmark_pool_reference(x, "tr", g), rtol=1e-13
  )
  got = jax.jit(
    smap(
      lambda x: lmconv_jax.grouped_landmark_pool(x, GROUPS, **kw),
      in_specs=P("data"),
    )
  )(xs)
  np.testing.assert_array_equal(
    got, lmconv_jax.grouped_landmark_pool(x, GROUPS, implementation=impl)
  )

  # The guide is replicated while x varies: its gradient is psum'ed.
  def local_grad(x, g):
    return jax.grad(
      lambda g: (lmconv_jax.landmark_pool(x, "tr", g, **kw) ** 2).sum()
    )(g)

  got = jax.jit(
    jax.shard_map(
      local_grad, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()
    )
  )(xs, g)
  want = jax.grad(
    lambda g: (lmconv_jax.landmark_pool_reference(x, "tr", g) ** 2).sum()
  )(g)
  np.testing.assert_allclose(got, want, rtol=1e-11)

  layer = lmconv_jax.LandmarkConv(
    features=3, kernel_size=(3, 3), directions=GROUPS, **kw
  )
  params = layer.init(jax.random.key(0), x)
  got = jax.jit(smap(layer.apply, in_specs=(P(), P("data"))))(params, xs)
  np.testing.assert_allclose(
    got, layer.apply(params, x), rtol=1e-12, atol=1e-12
  )

  model = lmconv_jax.nnx.LandmarkConv(
    4, 3, (3, 3), directions=GROUPS, rngs=nnx.Rngs(0), **kw
  )
  graphdef, state = nnx.split(model)
  apply = lambda state, x: nnx.merge(graphdef, state)(x)
  got = jax.jit(smap(apply, in_specs=(P(), P("data"))))(state, xs)
  np.testing.assert_allclose(got, model(x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# An exported sharded model: no Python partitioning callbacks in the module,
# so a fresh process (which only imports lmconv_jax) partitions it itself.

EXPORTED = """
import numpy as np, jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import lmconv_jax
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
sharding = NamedSharding(mesh, P("data"))
x = np.random.default_rng(0).normal(size=(8, 6, 5, 4)).astype(np.float32)
def model(x):
  pool = lambda x: lmconv_jax.landmark_pool(x, "I5", implementation="ffi")
  out, vjp = jax.vjp(pool, x)
  return out, vjp(out)[0], jax.jvp(pool, (x,), (x,))[1]
"""


@needs_ffi
def test_exported_sharded_model_partitions_in_a_fresh_process(tmp_path):
  from jax import export

  scope = {}
  exec(EXPORTED, scope)
  model, sharding, x = scope["model"], scope["sharding"], scope["x"]
  targets = _ffi.build_info()["cpu"]["targets"]
  exported = export.export(
    jax.jit(model, in_shardings=sharding, out_shardings=sharding),
    disabled_checks=[
      export.DisabledSafetyCheck.custom_call(t) for t in targets
    ],
  )(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))
  assert exported.nr_devices == 8
  assert "CustomSPMDPartitioning" not in exported.mlir_module()
  (tmp_path / "model.bin").write_bytes(exported.serialize())
  np.savez(tmp_path / "want.npz", *[np.asarray(a) for a in jax.jit(model)(x)])
  runner = EXPORTED + textwrap.dedent(f"""
      from jax import export
      blob = open({str(tmp_path / "model.bin")!r}, 'rb').read()
      call = jax.jit(export.deserialize(blob).call)
      xs = jax.device_put(x, sharding)
      compiled = call.lower(xs).compile()
      text = compiled.as_text()
      bad = [c for c in ("all-gather", "all-to-all", "collective-permute")
             if c in text]
      assert not bad, bad
      want = np.load({str(tmp_path / "want.npz")!r})
      for k, a in enumerate(compiled(xs)):
        assert a.sharding.spec == P("data"), a.sharding
        np.testing.assert_array_equal(np.asarray(a), want[f"arr_{{k}}"])
      print("OK")
      """)
  run = subprocess.run(
    [sys.executable, "-c", runner],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=dict(os.environ),
    timeout=300,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  assert run.stdout.startswith("OK")


# --------------------------------------------------------------------------
# Explicit mesh axes (issue 14): grouped pools on channel-sharded inputs,
# C / P not divisible by the mesh axis, forward and backward, both
# implementations (the reference runs per shard, _sharding.reference_per_shard).


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
  "grouping,c",
  [("quadrants", 12), ("top_bottom", 6), ("all_quadrants", 6), ("octants", 8)],
)
@pytest.mark.parametrize(
  "spec",
  [P("data"), P(None, None, None, "model"), P("data", None, None, "model")],
)
def test_grouped_pools_with_explicit_mesh_axes(grouping, c, spec, impl):
  mesh = make_mesh("Explicit")
  x = inputs.make_x("small_int", (4, 6, 5, c)).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  f = lambda x, impl: lmconv_jax.grouped_landmark_pool(
    x, grouping, implementation=impl
  )
  loss = lambda x, impl: (f(x, impl) ** 2).sum()
  want = f(x, "reference"), jax.grad(loss)(x, "reference")
  with jax.set_mesh(mesh):
    out = jax.jit(lambda x: f(x, impl))(xs)
    grad = jax.jit(jax.grad(lambda x: loss(x, impl)))(xs)
  np.testing.assert_array_equal(out, want[0])
  np.testing.assert_array_equal(grad, want[1])
  assert spec_of(out) == spec_of(xs)
  assert spec_of(grad) == spec_of(xs)


# Channels split n ways over Explicit axes with n | P: each shard holds whole
# groups and pools them alone (shard_map, lax.switch on the shard's index),
# so forward, tangent and gradient have no collectives and equal the
# unsharded result bit for bit.
WHOLE_GROUPS = [
  ("quadrants", 8, P(None, None, None, "model")),  # n = 2
  ("quadrants", 4, P("data", None, None, "model")),  # n = 2, batch too
  ("quadrants", 12, P(None, None, None, "data")),  # n = 4, C/P = 3
  ("octants", 8, P(None, None, None, ("data", "model"))),  # n = 8, two axes
  ("octants", 16, P(None, None, None, ("model", "data"))),  # minor first
  ("top_bottom", 4, P("data", None, None, "model")),  # merged groups
  (GROUPS, 4, P(None, None, None, "model")),  # K differs between shards
  (("tl", "tl", "br", "br"), 8, P(None, None, None, "model")),  # no switch
]


def explicit_data(c, spec, seed=5, mesh=None, shape=(4, 6, 5)):
  """x (float32), a per-pixel guide and a cotangent, unsharded and placed."""
  mesh = make_mesh("Explicit") if mesh is None else mesh
  shape = tuple(shape) + (c,)
  x = inputs.make_x("small_int", shape, seed).astype(np.float32)
  g = (
    np.random.default_rng(seed + 1).uniform(-0.5, 1.5, shape).astype(np.float32)
  )
  t = inputs.make_ct(shape, seed + 2).astype(np.float32)
  return (x, g, t), [
    jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, g, t)
  ]


# Every case for the kernels; the reference (slower to compile) on three.
WHOLE_GROUP_CASES = [
  pytest.param("ffi", *case, marks=needs_ffi) for case in WHOLE_GROUPS
]
WHOLE_GROUP_CASES += [("reference", *WHOLE_GROUPS[k]) for k in (1, 3, 6)]


@per_shard
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("impl,grouping,c,spec", WHOLE_GROUP_CASES)
def test_explicit_axes_whole_groups_per_shard_have_no_collectives(
  impl, grouping, c, spec, guided
):
  mesh = make_mesh("Explicit")
  (x, g, t), (xs, gs, ts) = explicit_data(c, spec)
  if not guided:
    g = gs = None
  pool = lambda x, g: lmconv_jax.grouped_landmark_pool(
    x, grouping, g, implementation=impl
  )
  wrt = (0, 1) if guided else 0
  programs = {
    "forward": pool,
    "grad": jax.grad(lambda x, g, t: (pool(x, g) * t).sum(), wrt),
  }
  if not guided:
    programs["jvp"] = lambda x, g, t: jax.jvp(lambda x: pool(x, g), (x,), (t,))[
      1
    ]
  for name, fn in programs.items():
    args = (x, g) if name == "forward" else (x, g, t)
    sharded = (xs, gs) if name == "forward" else (xs, gs, ts)
    want = jax.jit(fn)(*args)  # one device, unsharded
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(*sharded).compile()
    assert found(compiled, COLLECTIVES) == [], (name, compiled.as_text())
    got = compiled(*sharded)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=name)
      assert spec_of(a) == spec_of(xs), (name, a.sharding)
  # Outside jit too.
  np.testing.assert_array_equal(pool(xs, gs), jax.jit(pool)(x, g))


@per_shard
@needs_ffi
@pytest.mark.parametrize("kind", ["channel", "batch", "scalar"])
@pytest.mark.parametrize("grouping", ["quadrants", GROUPS])
def test_explicit_axes_whole_groups_with_broadcast_guides(grouping, kind):
  """Guides of lower rank stay at their size (each shard gets its slice or
  all of it); only the guide's gradient, summed over a sharded dim, needs an
  all-reduce. Rounding of that sum aside, the unsharded result."""
  mesh = make_mesh("Explicit")
  spec = P("data", None, None, "model")
  (x, _, t), (xs, _, ts) = explicit_data(8, spec)
  rng = np.random.default_rng(9)
  g, g_spec = {
    "channel": (rng.uniform(-0.5, 1.5, (8,)), P("model")),
    "batch": (rng.uniform(-0.5, 1.5, (4, 1, 1, 1)), P("data")),
    "scalar": (np.float32(0.75), P()),
  }[kind]
  g = np.asarray(g, np.float32)
  gs = jax.device_put(g, NamedSharding(mesh, g_spec))
  pool = lambda x, g: lmconv_jax.grouped_landmark_pool(
    x, grouping, g, implementation="ffi"
  )
  grad = jax.grad(lambda x, g, t: (pool(x, g) * t).sum(), (0, 1))
  with jax.set_mesh(mesh):
    forward = jax.jit(pool).lower(xs, gs).compile()
    backward = jax.jit(grad).lower(xs, gs, ts).compile()
  assert found(forward, COLLECTIVES) == []
  assert found(backward, MOVES) == []
  # One all-reduce (the guide's gradient over the axes it is replicated on),
  # outside the per-shard switch: one in each branch had the devices of two
  # branches wait on different all-reduces (a deadlock on jax 0.12.1's CPU
  # runtime; _sharding.grouped_pool_per_shard).
  assert backward.as_text().count(" all-reduce(") == 1
  np.testing.assert_array_equal(forward(xs, gs), jax.jit(pool)(x, g))
  (dx, dg), (want_dx, want_dg) = backward(xs, gs, ts), jax.jit(grad)(x, g, t)
  np.testing.assert_array_equal(dx, want_dx)
  np.testing.assert_allclose(dg, want_dg, rtol=1e-5)
  assert dg.shape == g.shape


def three_devices():
  return jax.make_mesh(
    (3,), ("c",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:3]
  )


# n does not divide P (a shard would hold part of a group), or H / W split.
PARTIAL_GROUPS = [
  ("top_bottom", 8, P(None, None, None, "data"), None),  # n = 4, P = 2
  (
    "quadrants",
    24,
    P(None, None, None, ("data", "model")),
    None,
  ),  # n = 8, P = 4
  (
    (("tl",), ("br",), ("tr", "bl")),
    6,
    P("data", None, None, "model"),
    None,
  ),  # n = 2, P = 3
  ("quadrants", 12, P(None, None, None, "c"), three_devices),  # n = 3, P = 4
  ("quadrants", 8, P(None, "data", None, "model"), None),  # H split
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grouping,c,spec,mesh", PARTIAL_GROUPS)
def test_explicit_axes_partial_groups_are_gathered(
  grouping, c, spec, mesh, impl
):
  """n does not divide P (a shard would hold part of a group) or H is split:
  the channels (and H) are gathered (the documented cost) and the answer is
  unchanged, bit for bit, forward, gradient (with a guide) and tangent."""
  mesh = make_mesh("Explicit") if mesh is None else mesh()
  (x, g, t), (xs, gs, ts) = explicit_data(c, spec, mesh=mesh, shape=(4, 8, 5))
  pool = lambda x, g=None: lmconv_jax.grouped_landmark_pool(
    x, grouping, g, implementation=impl
  )
  programs = {
    "forward": (pool, (x,), (xs,)),
    "grad": (
      jax.grad(lambda x, g, t: (pool(x, g) * t).sum(), (0, 1)),
      (x, g, t),
      (xs, gs, ts),
    ),
    "jvp": (lambda x, t: jax.jvp(pool, (x,), (t,))[1], (x, t), (xs, ts)),
  }
  for name, (fn, args, sharded) in programs.items():
    want = jax.jit(fn)(*args)  # one device, unsharded
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(*sharded).compile()
    got = compiled(*sharded)
    if name == "forward":
      assert "all-gather" in found(compiled, MOVES)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=name)
      assert spec_of(a) == spec_of(xs), (name, a.sharding)


@per_shard
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
  "cls,c",
  [(lmconv_jax.nnx.LandmarkConv4, 8), (lmconv_jax.nnx.LandmarkConv8, 16)],
)
def test_explicit_axes_layer_on_channel_sharded_input(cls, c, impl):
  """A layer whose input channels (and its kernel's) are split over "model":
  the pool moves nothing; the convolution's sum over the split channels is
  the one all-reduce. (flax.linen's nn.Conv has no out_sharding: see the
  linen test below.)"""
  mesh = make_mesh("Explicit")
  (x, _, _), (xs, _, _) = explicit_data(c, P("data", None, None, "model"))
  model = cls(c, 4, (3, 3), implementation=impl, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  apply = lambda state, x, out=None: nnx.merge(graphdef, state)(
    x, out_sharding=out
  )
  loss = lambda state, x, out=None: (apply(state, x, out) ** 2).mean()
  ss = jax.tree.map(
    lambda a: jax.device_put(
      a, NamedSharding(mesh, P(None, None, "model") if a.ndim == 4 else P())
    ),
    state,
  )
  with jax.set_mesh(mesh):
    forward = (
      jax.jit(lambda s, x: apply(s, x, P("data"))).lower(ss, xs).compile()
    )
    backward = (
      jax.jit(jax.grad(lambda s, x: loss(s, x, P("data")), (0, 1)))
      .lower(ss, xs)
      .compile()
    )
  assert found(forward, MOVES) == [] and found(backward, MOVES) == []
  assert lmconv_calls(forward) >= (impl == "ffi")
  np.testing.assert_allclose(
    forward(ss, xs), jax.jit(apply)(state, x), rtol=1e-5, atol=1e-5
  )
  got, want = backward(ss, xs), jax.jit(jax.grad(loss, (0, 1)))(state, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    got,
    want,
  )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
  "cls,c",
  [(lmconv_jax.linen.LandmarkConv4, 8), (lmconv_jax.linen.LandmarkConv8, 16)],
)
def test_explicit_axes_linen_layer_on_channel_sharded_input(cls, c, impl):
  """flax.linen's nn.Conv has no out_sharding, so the linen layers gather
  the pooled channels before the convolution: the forward equals the
  unsharded layer's and the output is split over the batch as x is. (Not
  the gradient: a plain linen nn.Conv's weight gradient under Explicit
  batch sharding fails in flax itself, asking for out_sharding; the NNX
  layers, above, train.)"""
  mesh = make_mesh("Explicit")
  (x, _, _), (xs, _, _) = explicit_data(c, P("data", None, None, "model"))
  model = cls(4, (3, 3), implementation=impl)
  params = model.init(jax.random.key(0), x)
  with jax.set_mesh(mesh):
    y = jax.jit(model.apply)(params, xs)
  assert spec_of(y)[0] == "data", y.sharding
  np.testing.assert_allclose(
    y, jax.jit(model.apply)(params, x), rtol=1e-5, atol=1e-5
  )


@per_shard
@needs_ffi
def test_explicit_axes_whole_groups_under_vmap():
  """vmap over a whole dim: still per shard, no collectives. vmap over a dim
  split across devices: the whole-grouping path (it keeps that dim split
  and gathers the channels), same answer."""
  mesh = make_mesh("Explicit")
  x = inputs.make_x("small_int", (2, 4, 6, 5, 8), 4).astype(np.float32)
  xs = jax.device_put(
    x, NamedSharding(mesh, P(None, "data", None, None, "model"))
  )
  pool = lambda x: lmconv_jax.grouped_landmark_pool(
    x, GROUPS * 2, implementation="ffi"
  )
  for axes, moves in ((0, []), (1, ["all-gather"])):
    fn = jax.vmap(pool, in_axes=axes, out_axes=axes)
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(xs).compile()
    assert found(compiled, MOVES) == moves, axes
    np.testing.assert_array_equal(compiled(xs), jax.jit(fn)(x))


# Exported with Explicit channel sharding: the per-shard split (n | P) is a
# shard_map in the traced program, so the exported module keeps it (no
# collectives); other layouts gather the channels before each kernel, as
# docs/multidevice.md says. The round trip (serialize, deserialize, call)
# gives the unexported result.
EXPORTED_EXPLICIT = [
  ("quadrants", P("data", None, None, "model"), []),  # n = 2 | 4
  ("top_bottom", P(None, None, None, "data"), ["all-gather"]),  # n = 4, P = 2
]


@per_shard
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grouping,spec,moves", EXPORTED_EXPLICIT)
def test_exported_explicit_channel_sharding(grouping, spec, moves, impl):
  from jax import export

  mesh = make_mesh("Explicit")
  (x, _, _), (xs, _, _) = explicit_data(8, spec)
  pool = lambda x: lmconv_jax.grouped_landmark_pool(
    x, grouping, implementation=impl
  )

  def model(x):
    out, vjp = jax.vjp(pool, x)
    return out, vjp(out)[0], jax.jvp(pool, (x,), (x,))[1]

  with jax.set_mesh(mesh):
    exported = export.export(
      jax.jit(model), disabled_checks=lmconv_jax.export_disabled_checks()
    )(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=xs.sharding))
    call = jax.jit(export.deserialize(exported.serialize()).call)
    compiled = call.lower(xs).compile()
    got, unexported = compiled(xs), jax.jit(model)(xs)
  assert "CustomSPMDPartitioning" not in exported.mlir_module()
  assert found(compiled, MOVES) == moves
  for a, b, c in zip(got, unexported, jax.jit(model)(x)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert spec_of(a) == spec_of(xs), a.sharding


@pytest.mark.parametrize(
  "spec",
  [
    P(None, None, None, "data"),  # n = 4, P = 2
    P("data"),
  ],
)
@pytest.mark.parametrize(
  "platform,kernel", [("rocm", None), ("tpu", "tpu_custom_call")]
)
def test_explicit_axes_auto_on_a_platform_without_ffi_kernels(
  spec, platform, kernel
):
  """implementation="auto" lowers to the reference where this build has no
  kernels (rocm) and to the Pallas kernels on a TPU (both exported from the
  CPU devices), under Explicit axes too: gradient of a grouped pool whose
  shards hold part of a group."""
  from jax import export

  mesh = make_mesh("Explicit")
  x = jax.ShapeDtypeStruct(
    (4, 6, 5, 8), np.float32, sharding=NamedSharding(mesh, spec)
  )
  grad = jax.grad(
    lambda x: (
      lmconv_jax.grouped_landmark_pool(x, "top_bottom", implementation="auto")
      ** 2
    ).sum()
  )
  with jax.set_mesh(mesh):
    exported = export.export(jax.jit(grad), platforms=(platform,))(x)
  text = exported.mlir_module()
  assert "custom_call @lmconv_pool" not in text  # no custom call of ours
  assert (kernel in text) if kernel else "stablehlo.custom_call" not in text
  assert exported.out_avals[0].shape == x.shape
