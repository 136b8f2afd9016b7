"""A small workload of every CUDA kernel, for compute-sanitizer.

scripts/gpu_check.sh runs it as

  compute-sanitizer --tool memcheck  python scripts/gpu_sanitize_case.py
  compute-sanitizer --tool racecheck python scripts/gpu_sanitize_case.py

It calls, on the --platform device (gpu by default) with implementation="ffi":
every direction, forward, backward (vjp) and tangent (jvp), with and without
a guide, in float32 and bfloat16 (float64 and float16 too unless --quick);
every grouping of grouped_landmark_pool; and a LandmarkConv8 layer's forward
and gradient. Shapes are small but give several blocks, channel chunks and
phases (odd sizes, a non-square image, channels above one chunk). Each result
is compared with the same call on the CPU (our CPU kernels); the script
exits 1 on a mismatch and prints one line per group of checks.

XLA's memory pool would hide an out-of-bounds access inside it from memcheck,
so before jax is imported the script asks for one allocation per buffer
(XLA_PYTHON_CLIENT_ALLOCATOR=platform) and no CUDA graphs.

  python scripts/gpu_sanitize_case.py --platform cpu   # smoke test, no GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lmconv_jax  # noqa: E402

SHAPES = ((2, 7, 9, 5), (1, 13, 10, 40))
GROUPINGS = (
  "quadrants",
  "octants",
  "top_bottom",
  "left_right",
  "all_quadrants",
)
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-2, "bfloat16": 5e-2}


def pools(x, g, tx, ct):
  """(out, dx, dg, tangent) of every direction: one jit for all."""
  res = {}
  for name in lmconv_jax.DIRECTIONS:
    if g is None:
      f = lambda x, name=name: lmconv_jax.landmark_pool(
        x, name, implementation="ffi"
      )
      out, vjp = jax.vjp(f, x)
      (dx,) = vjp(ct)
      _, tout = jax.jvp(f, (x,), (tx,))
      res[name] = (out, dx, tout)
    else:
      f = lambda x, g, name=name: lmconv_jax.landmark_pool(
        x, name, g, implementation="ffi"
      )
      out, vjp = jax.vjp(f, x, g)
      dx, dg = vjp(ct)
      _, tout = jax.jvp(f, (x, g), (tx, 0.5 * tx))
      res[name] = (out, dx, dg, tout)
  return res


def grouped(x, ct):
  res = {}
  for grouping in GROUPINGS:
    f = lambda x, grouping=grouping: lmconv_jax.grouped_landmark_pool(
      x, grouping, implementation="ffi"
    )
    out, vjp = jax.vjp(f, x)
    res[grouping] = (out,) + vjp(ct)
  return res


def layer(x):
  conv = lmconv_jax.LandmarkConv8(
    features=8, kernel_size=(3, 3), implementation="ffi"
  )
  params = conv.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(conv.apply(p, x) ** 2)
  return (conv.apply(params, x),) + jax.grad(loss, argnums=(0, 1))(params, x)


def compare(label, got, want, dtype) -> float:
  """Max abs difference scaled by the values' size; raises on mismatch."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a = np.asarray(
      jnp.asarray(a, jnp.float64 if dtype == "float64" else jnp.float32)
    )
    b = np.asarray(jnp.asarray(b, a.dtype))
    if a.shape != b.shape:
      raise AssertionError(f"{label}: shape {a.shape} != {b.shape}")
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    diff = float(np.max(np.abs(a - b), initial=0.0)) / scale
    if not np.isfinite(diff) or diff > TOL[dtype]:
      raise AssertionError(
        f"{label}: differs from the CPU by {diff:.3g} (tolerance {TOL[dtype]})"
      )
    worst = max(worst, diff)
  return worst


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--platform", default="gpu", choices=("gpu", "cpu"))
  p.add_argument(
    "--quick",
    action="store_true",
    help="float32 and bfloat16 only (else float64, float16 too)",
  )
  a = p.parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  device = jax.devices(a.platform)[0]
  cpu = jax.devices("cpu")[0]
  dtypes = (
    ("float32", "bfloat16")
    if a.quick
    else ("float32", "bfloat16", "float64", "float16")
  )
  shapes = SHAPES
  print(
    f"gpu_sanitize_case: {device.platform} {device}, jax {jax.__version__}",
    flush=True,
  )
  t0 = time.perf_counter()
  failures = 0
  rng = np.random.default_rng(0)
  for shape in shapes:
    for dtype in dtypes:
      dt = jnp.dtype(dtype)
      # Integers in a small range: many ties, so every tie rule runs.
      x = rng.integers(-4, 5, shape).astype(np.float32)
      g = rng.uniform(0, 1, shape).astype(np.float32)
      tx = rng.standard_normal(shape).astype(np.float32)
      ct = rng.standard_normal(shape).astype(np.float32)
      host = [jnp.asarray(v, dt) for v in (x, g, tx, ct)]
      for guided in (False, True):
        label = f"{shape} {dtype} {'guided' if guided else 'g=1'}"
        run = jax.jit(
          lambda x, g, tx, ct, guided=guided: pools(
            x, g if guided else None, tx, ct
          )
        )
        try:
          got = jax.device_get(run(*jax.device_put(host, device)))
          want = jax.device_get(run(*jax.device_put(host, cpu)))
          d = compare(label, got, want, dtype)
          print(
            f"  ok   pools   {label}: 12 directions fwd/bwd/jvp, max "
            f"rel diff {d:.2g}",
            flush=True,
          )
        except Exception as e:
          failures += 1
          print(f"  FAIL pools   {label}: {type(e).__name__}: {e}", flush=True)
    if shape[-1] % 8 == 0:
      dtype = "float32"
      xs = jnp.asarray(rng.standard_normal(shape), jnp.float32)
      cts = jnp.asarray(rng.standard_normal(shape), jnp.float32)
      for name, fn, args in (
        ("grouped", grouped, (xs, cts)),
        ("layer", layer, (xs,)),
      ):
        try:
          run = jax.jit(fn)
          got = jax.device_get(run(*jax.device_put(args, device)))
          want = jax.device_get(run(*jax.device_put(args, cpu)))
          d = compare(name, got, want, dtype)
          print(
            f"  ok   {name:7s} {shape} float32: max rel diff {d:.2g}",
            flush=True,
          )
        except Exception as e:
          failures += 1
          print(
            f"  FAIL {name:7s} {shape}: {type(e).__name__}: {e}", flush=True
          )
  print(
    f"gpu_sanitize_case: {'FAILED' if failures else 'ok'} "
    f"({failures} failed) in {time.perf_counter() - t0:.1f} s",
    flush=True,
  )
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
