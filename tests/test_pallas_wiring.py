"""implementation="pallas": the Pallas TPU kernels behind the primitives.

On a CPU "pallas" runs the kernels in Pallas' interpret mode, so every rule
of the primitives (jit, grad, jvp, vmap, export) is checked here against the
reference bit for bit; lowering for "tpu" (Pallas' front end, no TPU needed)
checks that a TPU gets our kernels and no reference scan. The kernels' own
grid of cases is tests/test_pallas_tpu.py; the TPU compiler's check is
scripts/tpu_compile_check.sh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmconv_jax
from lmconv_jax import _ffi, ops

import inputs

SHAPE = (2, 5, 4, 8)


def _pool(impl, grouping, guided):
  def f(x, g):
    return lmconv_jax.grouped_landmark_pool(
      x, grouping, g if guided else None, implementation=impl
    )

  return f


def _inputs(dtype=jnp.float32):
  x = jnp.asarray(inputs.stacked_kinds(SHAPE), dtype)
  g = jnp.asarray(np.linspace(0.1, 0.9, SHAPE[-1]), dtype)
  ct = jnp.asarray(inputs.make_ct(x.shape), dtype)
  return x, g, ct


def _bits(a):
  a = np.asarray(a)
  return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def test_pallas_is_an_implementation_everywhere():
  assert "pallas" in lmconv_jax.IMPLEMENTATIONS
  assert ops.resolve_implementation("pallas") == "pallas"
  with pytest.raises(ValueError, match="'pallas'"):
    ops.resolve_implementation("mosaic")


# The wiring (custom_vjp / jvp through the Pallas call), one case per kind
# of kernel: single directions unguided, octants guided, a merged group
# guided (test_pallas_tpu.py checks every grouping's kernels).
@pytest.mark.parametrize(
  "grouping, guided",
  [("quadrants", False), ("octants", True), ("top_bottom", True)],
)
def test_interpret_mode_equals_reference_forward_grad_jvp(grouping, guided):
  x, g, ct = _inputs()
  got, want = (
    _pool("pallas", grouping, guided),
    _pool("reference", grouping, guided),
  )
  np.testing.assert_array_equal(
    _bits(jax.jit(got)(x, g)), _bits(jax.jit(want)(x, g))
  )
  if guided:
    vjp = lambda f: jax.jit(lambda x, g, ct: jax.vjp(f, x, g)[1](ct))
  else:
    vjp = lambda f: jax.jit(
      lambda x, g, ct: jax.vjp(lambda x: f(x, g), x)[1](ct)
    )
  (dx, *dg), (want_dx, *want_dg) = vjp(got)(x, g, ct), vjp(want)(x, g, ct)
  np.testing.assert_array_equal(_bits(dx), _bits(want_dx))
  for a, b in zip(dg, want_dg):  # a broadcast guide: the sum's order is XLA's
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
  tx = jnp.asarray(inputs.make_ct(x.shape, seed=5), x.dtype)
  jvp = lambda f: jax.jit(
    lambda x, tx: jax.jvp(lambda x: f(x, g), (x,), (tx,))[1]
  )
  np.testing.assert_array_equal(_bits(jvp(got)(x, tx)), _bits(jvp(want)(x, tx)))


def test_vmap_of_pallas_equals_reference():
  x, g, _ = _inputs()
  xs = jnp.stack([x, -x, x * 2])
  f = lambda impl: jax.jit(
    jax.vmap(
      lambda x: lmconv_jax.grouped_landmark_pool(
        x, "quadrants", g, implementation=impl
      ),
      in_axes=0,
    )
  )
  np.testing.assert_array_equal(
    _bits(f("pallas")(xs)), _bits(f("reference")(xs))
  )


def _tpu_text(f, *args):
  return jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_layer_training_step_on_tpu_is_our_kernels_and_no_reference_scan(impl):
  x, _, _ = _inputs()
  layer = lmconv_jax.LandmarkConv4(
    features=4, kernel_size=(3, 3), implementation=impl
  )
  params = layer.init(jax.random.key(0), x)

  def step(params, x):
    return jax.grad(
      lambda p, x: (layer.apply(p, x) ** 2).sum(), argnums=(0, 1)
    )(params, x)

  text = _tpu_text(step, params, x)
  assert "tpu_custom_call" in text
  assert "stablehlo.while" not in text  # the reference is a lax.scan
  ref = _tpu_text(
    lambda x: lmconv_jax.grouped_landmark_pool(
      x, "quadrants", implementation="reference"
    ),
    x,
  )
  assert "tpu_custom_call" not in ref and "stablehlo.while" in ref


def test_vmap_keeps_one_kernel_per_pass_on_tpu():
  x, g, _ = _inputs()
  f = lambda x: lmconv_jax.grouped_landmark_pool(
    x, "octants", g, implementation="pallas"
  )
  one = _tpu_text(f, x).count("tpu_custom_call")
  nested = _tpu_text(jax.vmap(jax.vmap(f)), jnp.stack([jnp.stack([x] * 2)] * 3))
  assert one >= 1 and nested.count("tpu_custom_call") == one


def test_export_for_cpu_and_tpu_runs_on_cpu():
  x, g, _ = _inputs()
  platforms = ("cpu", "tpu") + (("cuda",) if _ffi.has_kernels("cuda") else ())
  f = jax.jit(lambda x, g: lmconv_jax.grouped_landmark_pool(x, "quadrants", g))
  exp = jax.export.export(
    f, platforms=platforms, disabled_checks=lmconv_jax.export_disabled_checks()
  )(x, g)
  back = jax.export.deserialize(exp.serialize())
  np.testing.assert_array_equal(_bits(back.call(x, g)), _bits(f(x, g)))
  assert "tpu_custom_call" in exp.mlir_module()


def test_ffi_on_tpu_names_the_pallas_fix():
  x, _, _ = _inputs()
  with pytest.raises(NotImplementedError, match="pallas"):
    _tpu_text(
      lambda x: lmconv_jax.landmark_pool(x, "tl", implementation="ffi"), x
    )


@pytest.mark.parametrize("dtype", [jnp.float16])
def test_a_dtype_without_a_tpu_kernel_warns_and_runs_the_reference(dtype):
  x = jnp.ones((1, 4, 4, 4), dtype)
  f = lambda impl: (
    lambda x: lmconv_jax.landmark_pool(x, "tl", implementation=impl)
  )
  with pytest.warns(UserWarning, match="no TPU kernel for float16"):
    text = _tpu_text(f("auto"), x)
  assert "tpu_custom_call" not in text and "stablehlo.while" in text
  with pytest.raises(
    NotImplementedError, match="cast x to float32 or bfloat16"
  ):
    _tpu_text(f("pallas"), x)


def test_a_symbolic_batch_on_tpu_exports_through_the_reference():
  (b,) = jax.export.symbolic_shape("b")
  x = jax.ShapeDtypeStruct((b, 6, 5, 8), jnp.float32)
  f = lambda impl: jax.jit(
    lambda x: lmconv_jax.grouped_landmark_pool(
      x, "quadrants", implementation=impl
    )
  )
  with pytest.warns(UserWarning, match="symbolic shape"):
    exp = jax.export.export(
      f("auto"),
      platforms=("cpu", "tpu"),
      disabled_checks=lmconv_jax.export_disabled_checks(),
    )(x)
  xs = jnp.asarray(inputs.stacked_kinds((3, 6, 5, 8))[0], jnp.float32)
  np.testing.assert_array_equal(exp.call(xs), f("reference")(xs))
  with pytest.raises(NotImplementedError, match="export with concrete dims"):
    jax.export.export(f("pallas"), platforms=("tpu",))(x)
