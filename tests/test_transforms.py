"""Every JAX transformation, on both implementations: vmap, forward-mode AD,
jax.export, and (in a subprocess with 8 host devices) pmap, shard_map and
sharded jit.

Forward mode is checked against an independent tangent oracle written from
docs/semantics.md (the tangent follows the winners of the forward max, with
the backward's tie rule); reverse mode must be its exact transpose.
"""

import functools
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import lmconv_jax
from lmconv_jax import OCTANTS, QUADRANTS, _ffi
from lmconv_jax.directions import resolve

import inputs
import spec_oracle

ALL = QUADRANTS + OCTANTS
HAS_FFI = _ffi.has_kernels("cpu")
IMPLS = [
  pytest.param(
    "ffi",
    marks=pytest.mark.skipif(
      not HAS_FFI, reason="the CPU extension is not built"
    ),
  ),
  "reference",
]
REPO = pathlib.Path(__file__).resolve().parents[1]


def pool_fn(impl, direction):
  return functools.partial(
    lmconv_jax.landmark_pool, direction=direction, implementation=impl
  )


def tie_heavy(shape, seed=0):
  """Small integers along the first axis' kinds: ties everywhere."""
  return inputs.stacked_kinds(shape, seed)


def tangent_oracle(x, d, g, tx, tg):
  """docs/semantics.md's forward pass with the tangent riding along.

  t[p] = s * t_winner + (1 - s) * tx[p] + (m[p] - x[p]) * tg[p], where the
  winner is chosen with the backward's precedence (self, n1, n2) and t_winner
  is tx[p], t[p + n1], t[p + n2], or 0 if nobody wins (NaN).
  """
  out = spec_oracle.forward(x, d, g)
  t = np.zeros_like(x)
  for i, j in spec_oracle._order(d, *x.shape[1:3]):
    m, self_, takes = spec_oracle._select(x, out, i, j, d)
    win = np.where(self_, tx[:, i, j], 0.0)
    for q, taken in takes:
      if q is not None:
        win = np.where(taken, t[:, q[0], q[1]], win)
    if g is None:
      t[:, i, j] = win
    else:
      s = g[:, i, j]
      t[:, i, j] = (
        s * win + (1 - s) * tx[:, i, j] + (m - x[:, i, j]) * tg[:, i, j]
      )
  return out, t


def custom_calls(text: str, target: str) -> int:
  """How many custom calls to ``target`` (exactly) a StableHLO text holds."""
  return text.count(f"@{target}(")


# --------------------------------------------------------------------------
# vmap

INNER = (2, 5, 6, 3)  # (B, H, W, C) of one mapped slice
N_MAPPED = 3


def mapped_stack(axis, seed=0):
  xs = [tie_heavy(INNER[1:], seed + k)[: INNER[0]] for k in range(N_MAPPED)]
  return np.stack(xs, axis=axis)


def per_slice(f, axis, *arrays_and_axes):
  """np.stack([f(slice k of each array)], axis): the unbatched answer."""
  outs = []
  for k in range(N_MAPPED):
    args = [
      a if ax is None else np.take(a, k, axis=ax) for a, ax in arrays_and_axes
    ]
    outs.append(np.asarray(f(*args)))
  return np.stack(outs, axis=axis)


REF_TR = jax.jit(lambda x: lmconv_jax.landmark_pool_reference(x, "top_right"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("axis", [0, 1, 2, 3, 4])
def test_vmap_any_axis_equals_unbatched(impl, axis):
  x = mapped_stack(axis)
  f = pool_fn(impl, "top_right")
  got = jax.jit(jax.vmap(f, in_axes=axis, out_axes=axis))(x)
  want = per_slice(REF_TR, axis, (x, axis))
  np.testing.assert_array_equal(got, want)


@pytest.mark.x64  # float64 tolerances (1e-13)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("guide_axis", [None, 0, 3])
def test_vmap_guide_mapped_or_not(impl, guide_axis):
  x = mapped_stack(1)
  rng = np.random.default_rng(4)
  if guide_axis is None:
    g = rng.uniform(-0.5, 1.5, INNER)
  else:
    g = np.moveaxis(rng.uniform(-0.5, 1.5, (N_MAPPED,) + INNER), 0, guide_axis)
  f = lambda x, g: lmconv_jax.landmark_pool(x, "I5", g, implementation=impl)
  got = jax.jit(jax.vmap(f, in_axes=(1, guide_axis), out_axes=2))(x, g)
  want = per_slice(
    jax.jit(lambda x, g: lmconv_jax.landmark_pool_reference(x, "I5", g)),
    2,
    (x, 1),
    (g, guide_axis),
  )
  np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.x64  # float64 tolerances (1e-12)
@pytest.mark.parametrize("impl", IMPLS)
def test_nested_vmap_with_grad(impl):
  x = np.stack([mapped_stack(2, seed=s) for s in range(2)], axis=4)  # 2 maps
  g = np.random.default_rng(5).uniform(0, 1, INNER[1:])

  def loss(x, g):
    return (
      lmconv_jax.landmark_pool(x, "bl", g, implementation=impl) ** 2
    ).sum()

  f = jax.vmap(
    jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(2, None)),
    in_axes=(4, None),
  )
  dx, dg = jax.jit(f)(x, g)
  r = jax.jit(
    jax.grad(
      lambda x, g: (lmconv_jax.landmark_pool_reference(x, "bl", g) ** 2).sum(),
      argnums=(0, 1),
    )
  )
  for a in range(2):
    for b in range(N_MAPPED):
      xs = np.take(np.take(x, a, axis=4), b, axis=2)
      rdx, rdg = r(xs, g)
      np.testing.assert_allclose(dx[a, b], rdx, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(dg[a, b], rdg, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not HAS_FFI, reason="the CPU extension is not built")
@pytest.mark.parametrize("axis", [0, 1, 4])
def test_vmap_is_one_custom_call_per_pool(axis):
  """No `sequential` fallback: the mapped axis is folded into the kernel's
  batch, and a mapped axis in front of (H, W, C) is not even transposed."""
  x = mapped_stack(axis)
  g = np.ones(INNER)
  f = lambda x, g: lmconv_jax.landmark_pool(x, "I2", g, implementation="ffi")
  vf = jax.vmap(f, in_axes=(axis, None), out_axes=axis)
  text = jax.jit(vf).lower(x, g).as_text()
  assert custom_calls(text, "lmconv_pool_fwd_guided") == 1
  assert "while" not in text
  if axis < x.ndim - 3:
    assert "transpose" not in text
  vjp = jax.vmap(
    lambda x, g, ct: jax.vjp(f, x, g)[1](ct), in_axes=(axis, None, axis)
  )
  text = jax.jit(vjp).lower(x, g, x).as_text()
  assert custom_calls(text, "lmconv_pool_fwd_guided") == 1
  assert custom_calls(text, "lmconv_pool_bwd_guided") == 1
  assert "while" not in text
  jvp = jax.vmap(
    lambda x, tx: jax.jvp(lambda x: f(x, g), (x,), (tx,)), in_axes=(axis, axis)
  )
  text = jax.jit(jvp).lower(x, x).as_text()
  assert custom_calls(text, "lmconv_pool_tangent_guided") == 1
  assert "while" not in text


@pytest.mark.x64  # float64 tolerances (1e-12)
@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_of_layer(impl):
  x = np.random.default_rng(6).normal(size=(3, 2, 5, 4, 8))
  layer = lmconv_jax.LandmarkConv(
    features=2,
    kernel_size=(3, 3),
    directions=("top_left", "I3"),
    implementation=impl,
  )
  params = layer.init(jax.random.key(0), x[:, :, 0])
  got = jax.jit(jax.vmap(layer.apply, in_axes=(None, 2), out_axes=2))(params, x)
  apply = jax.jit(layer.apply)
  want = np.stack([apply(params, x[:, :, k]) for k in range(5)], axis=2)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# Forward-mode AD


def tangents(shape, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(-3, 4, shape).astype(np.float64)


@pytest.mark.x64  # against the float64 oracle, to 1e-14
@pytest.mark.parametrize("guide_mode", ["none", "full", "per_channel"])
@pytest.mark.parametrize("direction", ALL)
def test_jvp_equals_tangent_oracle(direction, guide_mode):
  """Both implementations' jvp equal the SPEC tangent, ties and NaN included."""
  d = resolve(direction)
  x = tie_heavy((4, 5, 3))
  x[3, 2, 2, 1] = np.nan
  g = inputs.make_guide(guide_mode, x.shape, tie_heavy=True)
  gfull = None if g is None else np.broadcast_to(g, x.shape)
  tx, tg = tangents(x.shape, 7), tangents(x.shape, 8)
  tgp = None if g is None else tangents(g.shape, 8)
  tgfull = None if g is None else np.broadcast_to(tgp, x.shape)
  want_out, want_t = tangent_oracle(x, d, gfull, tx, tgfull)
  for impl in ("ffi", "reference") if HAS_FFI else ("reference",):
    pool = pool_fn(impl, direction)
    if g is None:
      out, t = jax.jvp(lambda x: pool(x), (x,), (tx,))
      np.testing.assert_array_equal(t, want_t, err_msg=impl)
    else:
      out, t = jax.jvp(lambda x, g: pool(x, guide=g), (x, g), (tx, tgp))
      np.testing.assert_allclose(
        t, want_t, rtol=1e-12, atol=1e-12, err_msg=impl
      )
    np.testing.assert_allclose(out, want_out, rtol=1e-14, atol=1e-14)


# The reference's scans compile slowly: one direction for it (its tangents
# are also checked against the oracle above, for every direction).
@pytest.mark.x64  # float64 tolerances (1e-14)
@pytest.mark.parametrize(
  "impl,direction",
  [
    pytest.param(
      "ffi",
      d,
      marks=pytest.mark.skipif(
        not HAS_FFI, reason="the CPU extension is not built"
      ),
    )
    for d in ("top_left", "bottom_right", "I1", "I6")
  ]
  + [("reference", "I1")],
)
def test_jacfwd_is_transpose_of_jacrev_with_ties(impl, direction):
  """Forward and reverse mode route a tie to the same single winner."""
  x = inputs.make_x("small_int", (1, 4, 3, 2), seed=3)
  g = inputs.make_guide("full", x.shape, tie_heavy=True)
  for guide in (None, g):
    f = lambda x: lmconv_jax.landmark_pool(
      x, direction, guide, implementation=impl
    )
    jf, jr = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    np.testing.assert_allclose(jf, jr, rtol=1e-14, atol=1e-14)
    if guide is None:  # 0/1 entries: each output has exactly one winner
      flat = np.asarray(jf).reshape(x.size, x.size)
      assert set(np.unique(flat)) <= {0.0, 1.0}
      np.testing.assert_array_equal(flat.sum(axis=1), 1.0)
  fg = lambda g: lmconv_jax.landmark_pool(x, direction, g, implementation=impl)
  np.testing.assert_allclose(
    jax.jacfwd(fg)(g), jax.jacrev(fg)(g), rtol=1e-14, atol=1e-14
  )


@pytest.mark.x64  # float64 tolerances (1e-13)
@pytest.mark.parametrize("impl", IMPLS)
def test_linearize_and_jvp_of_guide_only(impl):
  x = tie_heavy((5, 4, 3))
  g = inputs.make_guide("per_channel", x.shape)
  f = lambda x, g: lmconv_jax.landmark_pool(x, "I8", g, implementation=impl)
  tx, tg = tangents(x.shape, 1), tangents(g.shape, 2)
  out, f_lin = jax.linearize(f, x, g)
  out2, t = jax.jvp(f, (x, g), (tx, tg))
  np.testing.assert_array_equal(out, out2)
  np.testing.assert_allclose(f_lin(tx, tg), t, rtol=1e-13, atol=1e-13)
  # Only one input moving: the other's tangent is a symbolic zero.
  _, tx_only = jax.jvp(lambda x: f(x, g), (x,), (tx,))
  _, tg_only = jax.jvp(lambda g: f(x, g), (g,), (tg,))
  np.testing.assert_allclose(tx_only + tg_only, t, rtol=1e-12, atol=1e-12)
  ref = lambda x, g: lmconv_jax.landmark_pool_reference(x, "I8", g)
  np.testing.assert_allclose(
    t, jax.jvp(ref, (x, g), (tx, tg))[1], rtol=1e-12, atol=1e-12
  )
  # The linear map transposes to the VJP, and the VJP is linear in turn.
  ct = tangents(x.shape, 3)
  vjp = jax.vjp(f, x, g)[1]
  for a, b in zip(jax.linear_transpose(f_lin, tx, tg)(ct), vjp(ct)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(
    jax.jvp(vjp, (ct,), (tx,))[1][0], vjp(tx)[0], rtol=1e-12, atol=1e-12
  )


@pytest.mark.parametrize(
  "impl,direction",
  [
    pytest.param(
      "ffi",
      d,
      marks=pytest.mark.skipif(
        not HAS_FFI, reason="the CPU extension is not built"
      ),
    )
    for d in ("top_right", "I3")
  ]
  + [("reference", "I3")],
)
@pytest.mark.x64  # check_grads in float64
def test_check_grads_both_modes(impl, direction):
  x = inputs.make_x("random", (1, 4, 5, 2), seed=11)
  g = inputs.make_guide("full", x.shape, seed=12)
  pool = pool_fn(impl, direction)
  check_grads(lambda x: pool(x), (x,), order=1, modes=("fwd", "rev"))
  check_grads(
    lambda x, g: pool(x, guide=g), (x, g), order=1, modes=("fwd", "rev")
  )


@pytest.mark.skipif(not HAS_FFI, reason="the CPU extension is not built")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_jvp_low_precision_dtypes(dtype):
  dt = jnp.dtype(dtype)
  x = jnp.asarray(tie_heavy((5, 6, 3)), dt)
  g = jnp.asarray(np.random.default_rng(3).uniform(0, 1, x.shape), dt)
  tx = jnp.asarray(tangents(x.shape, 4), dt)
  tg = jnp.asarray(tangents(x.shape, 5) / 4, dt)
  for guide, tguide in ((None, None), (g, tg)):
    res = {}
    for impl in ("ffi", "reference"):
      if guide is None:
        res[impl] = jax.jvp(pool_fn(impl, "bottom_left"), (x,), (tx,))
      else:
        res[impl] = jax.jvp(
          lambda x, g: lmconv_jax.landmark_pool(
            x, "bottom_left", g, implementation=impl
          ),
          (x, guide),
          (tx, tguide),
        )
    (out, t), (rout, rt) = res["ffi"], res["reference"]
    assert t.dtype == dt
    if guide is None:  # tangents are copied, never rounded
      np.testing.assert_array_equal(t, rt)
    else:  # float32 accumulation, one rounding at the end in both
      eps = float(jnp.finfo(dt).eps)
      rt32 = np.asarray(rt, np.float32)
      tol = 4 * eps * max(1.0, float(np.max(np.abs(rt32))))
      np.testing.assert_allclose(
        np.asarray(t, np.float32), rt32, rtol=0, atol=tol
      )


def test_second_order_ffi_says_what_to_do():
  if not HAS_FFI:
    pytest.skip("the CPU extension is not built")
  x = tie_heavy((3, 3, 2))
  f = lambda x: (
    lmconv_jax.landmark_pool(x, "tl", x, implementation="ffi") ** 2
  ).sum()
  with pytest.raises(NotImplementedError, match="implementation='reference'"):
    jax.hessian(f)(x)


# --------------------------------------------------------------------------
# jax.export: serialize here, run in a fresh process.

EXPORT_MODEL = """
import jax, jax.numpy as jnp, numpy as np
import lmconv_jax

layer = lmconv_jax.LandmarkConv(features=4, kernel_size=(3, 3),
                                directions="quadrants", implementation="ffi")

@jax.jit
def model(params, x, g):
  def loss(params, x):
    y = layer.apply(params, x)
    z = lmconv_jax.landmark_pool(y, "I7", implementation="ffi")
    w = lmconv_jax.landmark_pool(x, "bottom_right", g, implementation="ffi")
    r = lmconv_jax.landmark_pool(x[..., :2], "I2", implementation="reference")
    return (z ** 2).mean() + (w ** 2).mean() + (r ** 2).mean(), z
  (l, z), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
  tz = jax.jvp(lambda x: lmconv_jax.landmark_pool(x, "top_left", g,
                                                  implementation="ffi"),
               (x,), (jnp.ones_like(x),))[1]
  tr = jax.jvp(lambda x: lmconv_jax.landmark_pool(x, "I2",
                                                  implementation="reference"),
               (x[..., :2],), (x[..., 2:4],))[1]
  return l, z, grads, tz, tr
"""

# The targets docs/multidevice.md tells users to name in `disabled_checks`.
DOCUMENTED_TARGETS = (
  "lmconv_pool_fwd",
  "lmconv_pool_fwd_guided",
  "lmconv_pool_tangent",
  "lmconv_pool_tangent_guided",
  "lmconv_pool_bwd",
  "lmconv_pool_bwd_guided",
)


@pytest.mark.skipif(not HAS_FFI, reason="the CPU extension is not built")
def test_export_needs_the_documented_custom_call_checks_disabled():
  from jax import export

  assert sorted(DOCUMENTED_TARGETS) == sorted(
    _ffi.build_info()["cpu"]["targets"]
  )
  assert sorted(DOCUMENTED_TARGETS) == sorted(_ffi.TARGET_NAMES)
  f = jax.jit(lambda x: lmconv_jax.landmark_pool(x, "tl", implementation="ffi"))
  x = jnp.ones((2, 3, 3, 1), jnp.float32)
  with pytest.raises(ValueError, match="lmconv_pool_fwd"):
    export.export(f)(x)
  checks = [
    export.DisabledSafetyCheck.custom_call(name) for name in DOCUMENTED_TARGETS
  ]
  np.testing.assert_array_equal(
    export.export(f, disabled_checks=checks)(x).call(x), f(x)
  )
  helper = lmconv_jax.export_disabled_checks()
  assert sorted(map(str, helper)) == sorted(map(str, checks))
  np.testing.assert_array_equal(
    export.export(f, disabled_checks=helper)(x).call(x), f(x)
  )


@pytest.mark.skipif(not HAS_FFI, reason="the CPU extension is not built")
def test_export_serialize_and_run_in_a_fresh_process(tmp_path):
  """A jitted model with a layer, pools of both implementations, gradients
  and tangents, exported and run where only lmconv_jax was imported."""
  from jax import export

  scope = {}
  exec(EXPORT_MODEL, scope)
  x = jnp.asarray(
    np.random.default_rng(0).normal(size=(2, 7, 6, 8)), jnp.float32
  )
  g = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (8,)), jnp.float32)
  params = scope["layer"].init(jax.random.key(0), x)
  args = (params, x, g)
  checks = [
    export.DisabledSafetyCheck.custom_call(name) for name in DOCUMENTED_TARGETS
  ]
  exported = export.export(scope["model"], disabled_checks=checks)(*args)
  (tmp_path / "model.bin").write_bytes(exported.serialize())
  leaves, _ = jax.tree.flatten(args)
  np.savez(tmp_path / "args.npz", *[np.asarray(a) for a in leaves])
  want = jax.tree.leaves(scope["model"](*args))
  np.savez(tmp_path / "want.npz", *[np.asarray(w) for w in want])
  runner = textwrap.dedent(f"""
      import numpy as np, jax
      from jax import export
      import lmconv_jax          # registers the FFI targets; nothing else
      exported = export.deserialize(open("model.bin", "rb").read())
      npz = np.load("args.npz")
      leaves = [npz[f"arr_{{k}}"] for k in range(len(npz.files))]
      args = jax.tree.unflatten(exported.in_tree, leaves)[0]
      got = jax.tree.leaves(exported.call(*args))
      want = np.load("want.npz")
      assert len(got) == len(want.files), (len(got), len(want.files))
      for k, a in enumerate(got):
        np.testing.assert_array_equal(np.asarray(a), want[f"arr_{{k}}"])
      print("OK", len(got))
      """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run(
    [sys.executable, "-c", runner],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=env,
    timeout=300,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  assert run.stdout.startswith("OK")


# --------------------------------------------------------------------------
# Multi-device: a separate pytest run with 8 host devices.


def _start_multidevice_suite():
  """tests/multidevice in a pytest subprocess with 8 host devices, its
  output in a temporary file (read by the test)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  log = tempfile.TemporaryFile(mode="w+")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      str(REPO / "tests" / "multidevice"),
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
    text=True,
    cwd=REPO,
    env=env,
  )
  proc.log = log
  return proc


@pytest.mark.background.with_args(_start_multidevice_suite)
def test_multidevice_suite_with_8_host_devices(background):
  """pmap, shard_map, sharded jit (HLO grepped for collectives), exported
  sharded models: tests/multidevice, which needs XLA_FLAGS set before jax is
  imported, hence the subprocess. It starts at collection and runs beside
  the rest of the session (tests/conftest.py: background)."""
  try:
    background.wait(timeout=900)
  except subprocess.TimeoutExpired:
    background.kill()
    background.wait()
  background.log.seek(0)
  stdout = background.log.read()
  background.log.close()
  assert background.returncode == 0, stdout[-9000:]
  assert " passed" in stdout, stdout
  # Nothing skips, except on jax 0.11 the per-shard (no-collective) checks.
  from lmconv_jax import _sharding

  assert _sharding.PER_SHARD is ("skipped" not in stdout), stdout
