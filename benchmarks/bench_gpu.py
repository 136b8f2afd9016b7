"""GPU benchmark: the CUDA kernels against a copy and the jitted reference.

For each shape and op it times, under jit, the forward pass and forward +
backward (jax.grad of sum(out * ct)) of:

* ``ffi``: lmconv_jax with implementation="ffi" (our CUDA kernels),
* ``reference``: the same op with implementation="reference" (lax scans),

next to a same-size device-to-device copy (``x + c``, c a traced zero) in the
same run. Ops: the P = 4 and P = 8 grouped pools (``"quadrants"``,
``"octants"``) and single directions (a quadrant; a row-wise and a
column-wise octant). Shapes: LBYLNet's (64, 32, 32, 128) and a large
(32, 128, 128, 256), float32.

Each timing runs the op ``--chain`` times back to back inside one jit (each
call consuming the last one's output) and divides, so the per-call time holds
no host dispatch. Effective bandwidth is the bytes the op must move (each
operand read once, each result written once: forward 2 arrays, forward +
backward 6) over its time; ``vs copy`` divides it by the copy's bandwidth.
The targets: >= 50% of copy bandwidth at the large shape, >= 10x faster than
the reference at the LBYLNet shape. ``model us`` is what docs/benchmarks.md's
model predicts for the call on an H100 (``--model`` prints it per kernel).

  python benchmarks/bench_gpu.py                      # on a machine with a GPU
  python benchmarks/bench_gpu.py --markdown gpu.md --json gpu.json
  python benchmarks/bench_gpu.py --model        # the model alone, no GPU needed
  python benchmarks/bench_gpu.py --platform cpu --quick   # smoke test, no GPU
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lmconv_jax
from lmconv_jax import _ffi
from lmconv_jax.benchmark import write_outputs
from lmconv_jax.directions import DIRECTIONS

SHAPES = {"lbylnet": (64, 32, 32, 128), "large": (32, 128, 128, 256)}
QUICK_SHAPES = {"lbylnet": (2, 8, 8, 16), "large": (2, 16, 16, 32)}
OPS = ("quadrants", "octants", "top_left", "north_northwest", "east_northeast")
COPY_TBPS = 2.6       # achievable H100 copy bandwidth assumed by the model
PHASE_US = 1.0        # one phase: a DRAM round trip plus a block barrier


def op_fn(op: str, implementation: str) -> Callable:
  if op in ("quadrants", "octants"):
    return lambda x: lmconv_jax.grouped_landmark_pool(
        x, op, implementation=implementation)
  return lambda x: lmconv_jax.landmark_pool(
      x, op, implementation=implementation)


def chained(f: Callable, n: int, backward: bool) -> Callable:
  """jit of n calls of f (or of its vjp) in a row, each fed the last output."""
  def fwd_bwd(x, ct):
    return jax.vjp(f, x)[1](ct)[0]   # the backward kernel reads out: both run

  def run(x, ct):
    for _ in range(n):
      x = fwd_bwd(x, ct) if backward else f(x)
    return x
  return jax.jit(run)


def copy_chain(n: int) -> Callable:
  def run(x, c):
    for _ in range(n):   # the barrier keeps XLA from fusing n copies into one
      x = lax.optimization_barrier(x + c)
    return x
  return jax.jit(run)


def timed(fn: Callable, args: Sequence, repeats: int) -> float:
  """Median seconds of fn(*args) after a warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def kernel_model(name: str, shape, backward: bool, guided: bool,
                 multiprocessors: int = 132) -> dict:
  """docs/benchmarks.md's model of one kernel launch on a GPU (H100 default).

  Bytes: each operand read once and each result written once from DRAM
  (forward x [, g] -> out; backward x [, g], out, ct -> dx [, dg]); the
  neighbours' values and the backward's ring come from L2. Time: the larger
  of bytes / COPY_TBPS and the latency chain: waves x (sum over phases of
  the batches of kBatch pixels a thread loads one after the other) x
  PHASE_US; 2 blocks fit per multiprocessor.
  """
  d = DIRECTIONS[name]
  plan = _ffi._cuda_launch_plan(d, shape, backward, multiprocessors)
  h, w, per_batch = plan["view_height"], plan["view_width"], \
      plan["pixels_per_batch"]
  if plan["skew"] == 0:
    batches = plan["phases"] * -(-w // per_batch)
  else:
    s = plan["skew"]
    k = np.arange(h)
    batches = 0
    for phase in range(plan["phases"]):
      n = int(np.sum((phase - s * k >= 0) & (phase - s * k < w)))
      batches += -(-n // per_batch)
  waves = -(-plan["blocks"] // (2 * multiprocessors))
  arrays = (4 if backward else 2) + (2 if guided and backward else
                                     1 if guided else 0)
  nbytes = arrays * 4 * int(np.prod(shape))
  bw_us = nbytes / (COPY_TBPS * 1e12) * 1e6
  lat_us = waves * batches * PHASE_US
  return dict(plan, waves=waves, batches=batches, bytes=nbytes, bw_us=bw_us,
              latency_us=lat_us, model_us=max(bw_us, lat_us))


def model_us(op: str, shape, backward: bool, multiprocessors: int) -> dict:
  """The model of one call of an op (g = 1): its launches, bytes and time.

  Grouped pools also pay XLA's channel slices and concatenation (about 2
  copies of x forward, 4 more backward, at COPY_TBPS).
  """
  groups = {"quadrants": lmconv_jax.QUADRANTS,
            "octants": lmconv_jax.OCTANTS}.get(op, (op,))
  *lead, h, w, c = shape
  group_shape = (*lead, h, w, c // len(groups))
  launches, moved, us = 0, 0, 0.0
  for name in groups:
    for bwd in ((False, True) if backward else (False,)):
      m = kernel_model(name, group_shape, bwd, False, multiprocessors)
      launches += m["launches"]
      moved += m["bytes"]
      us += m["model_us"]
  if len(groups) > 1:
    copies = 2 * 4 * int(np.prod(shape)) * (6 if backward else 2)
    us += copies / (COPY_TBPS * 1e12) * 1e6
  return dict(launches=launches, model_bytes=moved, model_us=us)


def model_table(multiprocessors: int = 132) -> str:
  """The per-kernel model as a markdown table, as docs/benchmarks.md has it."""
  lines = ["| shape | kernel | blocks x threads | phases | waves | batches "
           "| MB moved | bytes-bound us | latency-bound us | model us |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  cases = [("lbylnet", SHAPES["lbylnet"], 1), ("lbylnet P=4 group",
                                               SHAPES["lbylnet"], 4),
           ("lbylnet P=8 group", SHAPES["lbylnet"], 8),
           ("large", SHAPES["large"], 1)]
  for label, (b, h, w, c), groups in cases:
    shape = (b, h, w, c // groups)
    names = {1: ("top_left", "north_northwest", "east_northeast"),
             4: ("top_left",), 8: ("north_northwest", "east_northeast")}
    for name in names[groups]:
      for bwd, guided in ((False, False), (True, False), (False, True),
                          (True, True)):
        if guided and groups > 1:
          continue
        m = kernel_model(name, shape, bwd, guided, multiprocessors)
        kernel = (f"{name} {'bwd' if bwd else 'fwd'}"
                  f"{' guided' if guided else ''}")
        lines.append(
            f"| {label} {shape} | {kernel} | {m['blocks']} x {m['threads']} "
            f"| {m['phases']} | {m['waves']} | {m['batches']} "
            f"| {m['bytes'] / 1e6:.0f} | {m['bw_us']:.0f} "
            f"| {m['latency_us']:.0f} | {m['model_us']:.0f} |")
  return "\n".join(lines) + "\n"


def run(shapes: dict, ops: Sequence[str], device, chain: int, repeats: int,
        reference: Sequence[str], multiprocessors: int) -> list[dict]:
  """reference: the shape names at which to time the reference too."""
  rows = []
  for shape_name, shape in shapes.items():
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                       device)
    ct = jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                        device)
    nbytes = x.size * 4
    copy_s = timed(copy_chain(chain), (x, jnp.zeros((), x.dtype)),
                   repeats) / chain
    copy_gbps = 2 * nbytes / copy_s / 1e9
    for op in ops:
      for backward in (False, True):
        row = dict(shape=shape_name, dims=list(shape), op=op,
                   pass_="fwd+bwd" if backward else "forward",
                   copy_us=copy_s * 1e6, copy_gbps=copy_gbps)
        moved = nbytes * (6 if backward else 2)
        impls = ("ffi", "reference") if shape_name in reference else ("ffi",)
        for impl in impls:
          fn = chained(op_fn(op, impl), chain if impl == "ffi" else 1,
                       backward)
          s = timed(fn, (x, ct), repeats if impl == "ffi" else 3)
          s /= chain if impl == "ffi" else 1
          row[f"{impl}_us"] = s * 1e6
          row[f"{impl}_gbps"] = moved / s / 1e9
        row["ffi_vs_copy"] = row["ffi_gbps"] / copy_gbps
        if "reference" in impls:
          row["speedup"] = row["reference_us"] / row["ffi_us"]
        row.update(model_us(op, shape, backward, multiprocessors))
        rows.append(row)
        print(f"  {shape_name} {op} {row['pass_']}: ffi "
              f"{row['ffi_us']:.1f} us", file=sys.stderr)
  return rows


def markdown(rows: list[dict], info: dict) -> str:
  def num(v, fmt=".3g"):
    return "" if v is None else format(v, fmt)
  lines = [f"{info['device']} ({info['multiprocessors']} SMs), jax "
           f"{info['jax']}, {info['date']}; float32; each time is the median "
           f"per call of {info['chain']} chained calls.\n",
           "| shape | op | pass | FFI us | FFI GB/s | vs copy | reference us "
           "| speed-up | launches | model us |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['shape']} {tuple(r['dims'])} | {r['op']} | {r['pass_']} "
        f"| {num(r['ffi_us'])} | {r['ffi_gbps']:.0f} | {r['ffi_vs_copy']:.2f} "
        f"| {num(r.get('reference_us'))} | {num(r.get('speedup'), '.1f')} "
        f"| {r['launches']} | {r['model_us']:.0f} |")
  copy = {r["shape"]: (r["copy_us"], r["copy_gbps"]) for r in rows}
  for name, (us, gbps) in copy.items():
    lines.append(f"\nCopy at {name}: {us:.1f} us, {gbps:.0f} GB/s.")
  return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> list[str]:
  """The issue's targets, checked on the rows."""
  out = []
  for r in rows:
    if r["shape"] == "large":
      ok = r["ffi_vs_copy"] >= 0.5
      out.append(f"{'PASS' if ok else 'MISS'} large {r['op']} {r['pass_']}: "
                 f"{r['ffi_vs_copy']:.0%} of copy bandwidth (target 50%)")
    if r["shape"] == "lbylnet" and "speedup" in r:
      ok = r["speedup"] >= 10
      out.append(f"{'PASS' if ok else 'MISS'} lbylnet {r['op']} {r['pass_']}:"
                 f" {r['speedup']:.1f}x the reference (target 10x)")
  return out


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--platform", default="gpu",
                 help="gpu (default) or cpu, for a smoke test of the script")
  p.add_argument("--quick", action="store_true",
                 help="tiny shapes and few repeats (checks the script runs)")
  p.add_argument("--ops", default=",".join(OPS))
  p.add_argument("--chain", type=int, default=10)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--reference", default="lbylnet",
                 help="shapes at which to time the (slow) reference too: "
                      "comma-separated from lbylnet,large, or none")
  p.add_argument("--model", action="store_true",
                 help="print the per-kernel model for an H100 and exit "
                      "(needs no GPU)")
  p.add_argument("--markdown", metavar="FILE")
  p.add_argument("--json", metavar="FILE")
  a = p.parse_args(argv)
  if a.model:
    print(model_table())
    return []
  try:
    device = jax.devices(a.platform)[0]
  except RuntimeError:
    print(f"bench_gpu: no {a.platform} device visible to JAX; nothing to "
          f"measure (use --platform cpu --quick to check the script).")
    return []
  if a.platform == "gpu" and not _ffi.has_kernels("cuda"):
    sys.exit("bench_gpu: the CUDA kernels are not built; see "
             "`python -m lmconv_jax info`.")
  shapes = QUICK_SHAPES if a.quick else SHAPES
  chain, repeats = (2, 3) if a.quick else (a.chain, a.repeats)
  multiprocessors = getattr(device, "core_count", None) or 132
  with jax.default_device(device):
    rows = run(shapes, a.ops.split(","), device, chain, repeats,
               a.reference.split(","), multiprocessors)
  info = dict(device=getattr(device, "device_kind", str(device)),
              multiprocessors=multiprocessors, jax=jax.__version__,
              date=datetime.date.today().isoformat(), chain=chain)
  table = markdown(rows, info)
  print(table)
  if a.platform != "gpu":
    print("(a smoke test off the GPU: these numbers say nothing about the "
          "targets)")
  print("\n".join(verdict(rows)))
  write_outputs(table, rows, info, a.markdown, a.json)
  return rows


if __name__ == "__main__":
  main()
