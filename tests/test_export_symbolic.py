"""Shape-polymorphic jax.export (issue 36): a symbolic batch for the pools
and the layers, guided and not, on every platform of a multi-platform
export (the kernels' custom calls on CPU, the pure-jnp reference on a
platform without kernels); symbolic H or W: a clear error from the
reference, whose wavefront plan is static."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import lmconv_jax
from lmconv_jax import _ffi

HAS_FFI = _ffi.has_kernels("cpu")
H, W, C = 6, 5, 4
BATCHES = (1, 2, 3)


def models():
  """name -> (fn of x, implementation); guides per channel, per image and
  per pixel, as a model's parameters would be."""
  guide_c = jnp.linspace(0.1, 0.9, C)
  layer = lmconv_jax.LandmarkConv4(8, (3, 3))
  params = layer.init(jax.random.key(0), jnp.zeros((1, H, W, C)))

  def pools(impl):
    def fn(x):
      guide_b = jnp.full(x.shape[:1] + (1, 1, 1), 0.5, x.dtype)
      pool = lambda x, guide_c: (
        lmconv_jax.grouped_landmark_pool(
          x, "left_right", guide_c, implementation=impl
        )
        + lmconv_jax.landmark_pool(x, "I7", guide_b, implementation=impl)
      )
      out, vjp = jax.vjp(pool, x, guide_c)  # the guide's gradient too
      return (out,) + vjp(out)

    return fn

  return {
    "pools_auto": pools("auto"),
    "pools_reference": pools("reference"),
    "layer": lambda x: (
      jax.grad(lambda x: (layer.apply(params, x) ** 2).sum())(x)
      + layer.apply(params, x).sum(-1, keepdims=True)
    ),
  }


def symbolic_x(spec="b, 6, 5, 4"):
  return jax.ShapeDtypeStruct(export.symbolic_shape(spec), np.float32)


@pytest.mark.skipif(not HAS_FFI, reason="CPU extension not built")
def test_symbolic_batch_export_runs_in_a_fresh_process(tmp_path):
  """cpu (the kernels) and rocm (no kernels here: the reference) in one
  module; the fresh process imports only lmconv_jax and runs each at three
  batch sizes; equal, bit for bit, to the direct call."""
  want = {}
  for name, fn in models().items():
    exp = export.export(
      jax.jit(fn),
      platforms=("cpu", "rocm"),
      disabled_checks=lmconv_jax.export_disabled_checks(),
    )(symbolic_x())
    assert "rocm" in exp.platforms
    (tmp_path / f"{name}.bin").write_bytes(exp.serialize())
    for b in BATCHES:
      x = np.random.default_rng(b).normal(size=(b, H, W, C)).astype(np.float32)
      for k, a in enumerate(jax.tree.leaves(jax.jit(fn)(x))):
        want[f"{name}_{b}_{k}"] = np.asarray(a)
  np.savez(tmp_path / "want.npz", **want)
  runner = textwrap.dedent(f"""
      import numpy as np, jax
      from jax import export
      import lmconv_jax                      # registers the kernels
      want = np.load("want.npz")
      for name in {sorted(models())!r}:
        call = export.deserialize(open(name + ".bin", "rb").read()).call
        for b in {BATCHES!r}:
          x = np.random.default_rng(b).normal(size=(b, {H}, {W}, {C}))
          got = jax.tree.leaves(call(x.astype(np.float32)))
          for k, a in enumerate(got):
            np.testing.assert_array_equal(np.asarray(a), want[f"{{name}}_{{b}}_{{k}}"],
                                          err_msg=f"{{name}} {{b}} {{k}}")
      print("OK")
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_ENABLE_X64", None)
  # A hang guard (generous), not a speed bound.
  run = subprocess.run(
    [sys.executable, "-c", runner],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=env,
    timeout=600,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  assert run.stdout.strip().endswith("OK")


def test_reference_exports_a_symbolic_batch_for_a_platform_without_kernels():
  """implementation="auto" exported for a platform without kernels lowers
  to the reference: a symbolic batch traces (no kernels needed here)."""
  exp = export.export(jax.jit(models()["pools_auto"]), platforms=("rocm",))(
    symbolic_x()
  )
  assert "custom_call @lmconv" not in exp.mlir_module()
  assert str(exp.out_avals[0].shape) == "(b, 6, 5, 4)"


@pytest.mark.parametrize(
  "spec,names",
  [("b, h, 5, 4", "H"), ("b, 6, w, 4", "W"), ("b, h, w, 4", "H, W")],
)
def test_reference_names_the_dims_that_must_be_concrete(spec, names):
  """H and W index the reference's static wavefront plan."""
  fn = lambda x: lmconv_jax.landmark_pool(x, "tl", implementation="reference")
  with pytest.raises(
    ValueError,
    match=f"symbolic {names}: .* must be "
    "concrete.*batch dims may stay symbolic",
  ):
    export.export(jax.jit(fn))(symbolic_x(spec))


def test_guide_check_accepts_symbolic_dims_and_rejects_a_wrong_guide():
  """ops.check_guide compares dims one by one (np.broadcast_shapes cannot
  take symbolic ones)."""
  fn = lambda x, g: lmconv_jax.landmark_pool(
    x, "tl", g, implementation="reference"
  )
  (b,) = export.symbolic_shape("b")
  x = jax.ShapeDtypeStruct((b, H, W, C), np.float32)
  for g in ((b, 1, 1, 1), (C,), (H, W, 1), ()):
    exp = export.export(jax.jit(fn))(x, jax.ShapeDtypeStruct(g, np.float32))
    assert str(exp.out_avals[0].shape) == "(b, 6, 5, 4)"
  with pytest.raises(ValueError, match="does not broadcast"):
    export.export(jax.jit(fn))(
      x, jax.ShapeDtypeStruct((2, 1, 1, 1), np.float32)
    )


def test_a_symbolic_channel_count_of_several_groups_is_a_clear_error():
  fn = lambda x: lmconv_jax.grouped_landmark_pool(x, "quadrants")
  with pytest.raises(
    ValueError,
    match="channel count is symbolic .* 4 direction groups need a concrete one",
  ):
    export.export(jax.jit(fn))(symbolic_x("b, 6, 5, c"))
