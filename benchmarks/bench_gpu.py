"""GPU benchmark: the CUDA kernels against their peers on the same GPU.

For each shape, dtype and op it times, forward and forward + backward
(the vjp of the op applied to a random cotangent), these implementations
when they apply:

* ``ffi``: lmconv_jax with implementation="ffi" (our CUDA kernels),
* ``reference``: the same call with implementation="reference" (lax scans),
* ``cummax``: ``lax.cummax`` over H, then over W, jitted, and its jax.grad:
  the g = 1 quadrant a JAX user would write (single quadrants only),
* ``torch``: ``torch.cummax`` twice with its autograd backward (what mmcv's
  CornerPool does), when torch is importable and sees a GPU (quadrants only),
* ``copy``: a same-size device-to-device copy (``x + c``, c a traced zero),
  the bandwidth yardstick.

Ops: a single quadrant (``top_left``) and the grouped pools ``quadrants``,
``octants``, ``top_bottom``, ``all_quadrants`` (and, with ``--ops``, an
octant, ``north_northwest``). Shapes: (32, 16, 16, 128), LBYLNet's (64, 32, 32, 128)
and (32, 128, 128, 256); float32 and bfloat16.

Timing: each JAX timing runs the op ``--chain`` times back to back inside
one jit (each call consuming the last one's output) and divides, so the
per-call time holds no host dispatch; the median of ``--repeats`` runs.
torch runs eagerly (as a PyTorch user would), timed with CUDA events over
``--chain`` calls. Bandwidth is the bytes the op must move (each operand
read once, each result written once: forward 2 arrays, forward + backward 6)
over its time, the same bytes for every implementation of an op;
``vs copy`` divides it by the copy's bandwidth; ``x <peer>`` is the peer's
time over ours (above 1: we are faster).

  python benchmarks/bench_gpu.py                          # on a GPU
  python benchmarks/bench_gpu.py --markdown gpu.md --json gpu.json
  python benchmarks/bench_gpu.py --platform cpu --quick   # smoke test, no GPU
  python benchmarks/bench_gpu.py --model    # docs/benchmarks.md's model

Exit codes: 0 measured; 3 no device of the platform (nothing measured, as
scripts/gpu_check.sh's "no GPU"); 2 bad arguments (argparse).

Uses the public API only (landmark_pool, grouped_landmark_pool,
implementation=...); importing it needs no GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

# JAX takes 75% of the GPU at its first use by default; leave room for torch.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lmconv_jax
from lmconv_jax.benchmark import markdown_table

SHAPES = {
  "small": (32, 16, 16, 128),
  "lbylnet": (64, 32, 32, 128),
  "large": (32, 128, 128, 256),
}
QUICK_SHAPES = {"tiny": (2, 8, 8, 16)}
DTYPES = ("float32", "bfloat16")
SINGLE = ("top_left", "north_northwest")
GROUPED = ("quadrants", "octants", "top_bottom", "all_quadrants")
OPS = SINGLE + GROUPED
DEFAULT_OPS = ("top_left",) + GROUPED
PEERS = ("reference", "cummax", "torch")
QUADRANT_STEPS = {
  "top_left": (1, 1),
  "top_right": (1, -1),
  "bottom_left": (-1, 1),
  "bottom_right": (-1, -1),
}


# --------------------------------------------------------------------------
# The implementations: name -> f(x) on a JAX array.


def op_fn(op: str, implementation: str) -> Callable:
  if op in GROUPED:
    return lambda x: lmconv_jax.grouped_landmark_pool(
      x, op, implementation=implementation
    )
  return lambda x: lmconv_jax.landmark_pool(
    x, op, implementation=implementation
  )


def cummax_fn(op: str) -> Callable:
  """A quadrant as two cumulative maxima (rows of the quadrant first)."""
  row_step, col_step = QUADRANT_STEPS[op]

  def f(x):
    y = lax.cummax(x, axis=x.ndim - 3, reverse=row_step < 0)
    return lax.cummax(y, axis=x.ndim - 2, reverse=col_step < 0)

  return f


def chained(f: Callable, n: int, backward: bool) -> Callable:
  """jit of n calls of f (or of its vjp) in a row, each fed the last output."""

  def fwd_bwd(x, ct):
    return jax.vjp(f, x)[1](ct)[0]  # the backward reads the forward: both run

  def run(x, ct):
    for _ in range(n):
      x = fwd_bwd(x, ct) if backward else f(x)
    return x

  return jax.jit(run)


def copy_chain(n: int) -> Callable:
  def run(x, c):
    for _ in range(n):  # the barrier keeps XLA from fusing n copies into one
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


# --------------------------------------------------------------------------
# torch (optional)


def torch_or_none(platform: str):
  """torch if it imports and (for platform gpu) sees a CUDA device."""
  try:
    import torch
  except Exception:  # not installed, or broken: the peer is skipped
    return None
  if platform == "gpu" and not torch.cuda.is_available():
    return None
  return torch


def torch_timer(
  torch,
  op: str,
  shape,
  dtype: str,
  backward: bool,
  chain: int,
  repeats: int,
  platform: str,
) -> float:
  """Median seconds per call of torch.cummax twice (+ autograd backward)."""
  dev = "cuda" if platform == "gpu" else "cpu"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  row_step, col_step = QUADRANT_STEPS[op]
  gen = torch.Generator(device="cpu").manual_seed(0)
  x = torch.randn(shape, generator=gen).to(dev, tdtype)
  ct = torch.randn(shape, generator=gen).to(dev, tdtype)

  def pool(x):
    a = x.flip(1) if row_step < 0 else x
    a = torch.cummax(a, dim=1).values
    a = a.flip(2) if col_step < 0 else a
    a = torch.cummax(a, dim=2).values
    if col_step < 0:
      a = a.flip(2)
    return a.flip(1) if row_step < 0 else a

  def call():
    if backward:
      xr = x.detach().requires_grad_(True)
      pool(xr).backward(ct)
      return xr.grad
    with torch.no_grad():
      return pool(x)

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()

  for _ in range(2):
    call()
  sync()
  times = []
  for _ in range(repeats):
    if dev == "cuda":
      start = torch.cuda.Event(enable_timing=True)
      end = torch.cuda.Event(enable_timing=True)
      start.record()
      for _ in range(chain):
        call()
      end.record()
      end.synchronize()
      times.append(start.elapsed_time(end) / 1e3 / chain)
    else:
      t0 = time.perf_counter()
      for _ in range(chain):
        call()
      times.append((time.perf_counter() - t0) / chain)
  return statistics.median(times)


# --------------------------------------------------------------------------
# The run


def peers_of(op: str) -> tuple:
  return (
    ("reference", "cummax", "torch") if op in QUADRANT_STEPS else ("reference",)
  )


def run(
  shapes: dict,
  dtypes: Sequence[str],
  ops: Sequence[str],
  peers: Sequence[str],
  device,
  platform: str,
  chain: int,
  repeats: int,
  budget_s: Optional[float] = None,
  stop_s: Optional[float] = None,
  on_row: Optional[Callable] = None,
) -> list[dict]:
  """One dict per (shape, dtype, op, pass). After ``budget_s`` seconds the
  slow peers (reference, torch) are skipped for the remaining rows; after
  ``stop_s`` no more rows are timed (the rows not timed are listed in the
  last row's ``skipped``)."""
  torch = torch_or_none(platform) if "torch" in peers else None
  start = time.perf_counter()
  rows = []
  for shape_name, shape in shapes.items():
    for dtype in dtypes:
      if stop_s is not None and time.perf_counter() - start > stop_s:
        if rows:
          rows[-1]["skipped"].append(f"{shape_name} {dtype} (time limit)")
        continue
      dt = jnp.dtype(dtype)
      rng = np.random.default_rng(0)
      x = jax.device_put(jnp.asarray(rng.standard_normal(shape), dt), device)
      ct = jax.device_put(jnp.asarray(rng.standard_normal(shape), dt), device)
      nbytes = x.size * dt.itemsize
      copy_s = timed(copy_chain(chain), (x, jnp.zeros((), dt)), repeats) / chain
      copy_gbps = 2 * nbytes / copy_s / 1e9
      for op in ops:
        if stop_s is not None and time.perf_counter() - start > stop_s:
          if rows:
            rows[-1]["skipped"].append(
              f"{shape_name} {dtype} {op} (time limit)"
            )
          continue
        for backward in (False, True):
          over = budget_s is not None and time.perf_counter() - start > budget_s
          moved = nbytes * (6 if backward else 2)
          row = dict(
            shape=shape_name,
            dims=list(shape),
            dtype=dtype,
            op=op,
            pass_="fwd+bwd" if backward else "forward",
            bytes=moved,
            copy_us=copy_s * 1e6,
            copy_gbps=copy_gbps,
            skipped=[],
          )
          impls = {"ffi": op_fn(op, "ffi")}
          for peer in peers_of(op):
            if peer not in peers:
              continue
            if over and peer in ("reference", "torch"):
              row["skipped"].append(f"{peer} (time budget spent)")
            elif peer == "reference":
              impls["reference"] = op_fn(op, "reference")
            elif peer == "cummax":
              impls["cummax"] = cummax_fn(op)
            elif peer == "torch" and torch is None:
              row["skipped"].append("torch (not importable or no GPU)")
          for name, f in impls.items():
            # The reference is slow: one call per jit and fewer repeats.
            n, reps = (
              (1, min(3, repeats)) if name == "reference" else (chain, repeats)
            )
            try:
              s = timed(chained(f, n, backward), (x, ct), reps) / n
              row[f"{name}_us"] = s * 1e6
            except Exception as e:  # report it and go on with the others
              msg = str(e).strip().splitlines()
              row["skipped"].append(
                f"{name} failed ({type(e).__name__}: "
                f"{msg[0][:200] if msg else ''})"
              )
          if (
            torch is not None
            and "torch" in peers
            and "torch" in peers_of(op)
            and not over
          ):
            try:
              s = torch_timer(
                torch, op, shape, dtype, backward, chain, repeats, platform
              )
              row["torch_us"] = s * 1e6
            except Exception as e:  # e.g. a dtype torch's cummax lacks
              row["skipped"].append(f"torch ({type(e).__name__}: {e})")
          for name in ("ffi",) + PEERS:
            if f"{name}_us" in row:
              gbps = moved / (row[f"{name}_us"] * 1e-6) / 1e9
              row[f"{name}_gbps"] = gbps
              row[f"{name}_vs_copy"] = gbps / copy_gbps
              if name != "ffi" and "ffi_us" in row:
                row[f"x_{name}"] = row[f"{name}_us"] / row["ffi_us"]
          rows.append(row)
          print(
            f"  {shape_name} {dtype} {op} {row['pass_']}:"
            + ", ".join(
              f" {p} {row[p + '_us']:.1f} us"
              for p in ("ffi",) + PEERS
              if p + "_us" in row
            )
            + "".join(f"; {s}" for s in row["skipped"]),
            file=sys.stderr,
            flush=True,
          )
          if on_row is not None:
            on_row(rows)
  return rows


def markdown(rows: list[dict], info: dict) -> str:
  def num(v, fmt=".3g"):
    return "" if v is None else format(v, fmt)

  lines = [
    f"{info['device']} ({info['platform']}), jax {info['jax']}, "
    f"jaxlib {info['jaxlib']}, torch {info['torch'] or 'absent'}, "
    f"{info['date']}. JAX times: median per call of {info['chain']} "
    f"chained calls in one jit (the reference: one call); torch: "
    f"eager, CUDA events. GB/s: the op's bytes (2 arrays forward, 6 "
    f"forward + backward) over its time; vs copy: over the copy's "
    f"bandwidth; x peer: the peer's time over ours.\n"
  ]
  key = lambda r: (tuple(r["dims"]), r["dtype"], r["op"], r["pass_"])
  lines.append(
    markdown_table(
      (
        "shape",
        "dtype",
        "op",
        "pass",
        "FFI us",
        "FFI GB/s",
        "vs copy",
        "reference us",
        "x reference",
        "cummax us",
        "x cummax",
        "torch us",
        "x torch",
      ),
      [
        (
          *key(r),
          num(r.get("ffi_us")),
          num(r.get("ffi_gbps"), ".0f"),
          num(r.get("ffi_vs_copy"), ".2f"),
          num(r.get("reference_us")),
          num(r.get("x_reference")),
          num(r.get("cummax_us")),
          num(r.get("x_cummax")),
          num(r.get("torch_us")),
          num(r.get("x_torch")),
        )
        for r in rows
      ],
      "llll" + "r" * 9,
    )
  )
  lines += [
    "",
    "Peers' bandwidth as a fraction of the copy (the op's "
    "bytes over the peer's time):",
    "",
  ]
  lines.append(
    markdown_table(
      ("shape", "dtype", "op", "pass", *PEERS),
      [
        (*key(r), *(num(r.get(p + "_vs_copy"), ".3f") for p in PEERS))
        for r in rows
        if any(f"{p}_us" in r for p in PEERS)
      ],
      "llll" + "r" * len(PEERS),
    )
  )
  copies = {}
  for r in rows:
    copies[tuple(r["dims"]), r["dtype"]] = (r["copy_us"], r["copy_gbps"])
  lines.append("")
  for (dims, dtype), (us, gbps) in copies.items():
    lines.append(
      f"Copy {dims} {dtype}: {us:.1f} us, {gbps:.0f} GB/s (read + write)."
    )
  skipped = sorted({s for r in rows for s in r["skipped"]})
  if skipped:
    lines.append("\nSkipped: " + "; ".join(skipped) + ".")
  return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> list[str]:
  """The project's targets, checked on the rows (float32)."""
  out = []
  for r in rows:
    if r["dtype"] != "float32":
      continue
    if "ffi_us" not in r:
      out.append(
        f"FAIL {r['shape']} {r['op']} {r['pass_']}: the FFI call failed"
      )
      continue
    if r["shape"] == "large" and r["op"] in SINGLE:
      ok = r["ffi_vs_copy"] >= 0.5
      out.append(
        f"{'PASS' if ok else 'MISS'} large {r['op']} {r['pass_']}: "
        f"{r['ffi_vs_copy']:.0%} of copy bandwidth (target 50%)"
      )
    if r["shape"] == "lbylnet" and "x_reference" in r:
      ok = r["x_reference"] >= 10
      out.append(
        f"{'PASS' if ok else 'MISS'} lbylnet {r['op']} "
        f"{r['pass_']}: {r['x_reference']:.1f}x the reference "
        f"(target 10x)"
      )
  return out


def write(
  table: str,
  rows: list[dict],
  info: dict,
  markdown_path: Optional[str],
  json_path: Optional[str],
) -> None:
  if markdown_path:
    with open(markdown_path, "w") as f:
      f.write(table)
  if json_path:
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(
        dict(machine=info, rows=rows, verdict=verdict(rows)), f, indent=1
      )
    os.replace(tmp, json_path)


# --------------------------------------------------------------------------
# docs/benchmarks.md's model (--model): the grouped launch as the CUDA handler
# plans it. The plan comes from the CPU emulation module of the CUDA kernels
# (built with -DLMCONV_EMULATOR=ON, as scripts/setup.sh does), which runs the
# handler's own plan_launch (xla_ffi/cuda_schedule.h); nothing else here uses
# it, and it needs no GPU.

COPY_TBPS = 2.6  # achievable H100 copy bandwidth assumed by the model
PHASE_US = 1.0  # one batch of a phase: a DRAM round trip (+ barrier)
BLOCKS_PER_SM = 2  # 256-thread blocks of <= 128 registers per multiprocessor
REDUCE_BATCH = 8  # loads in flight per reducing thread (kReduceBatch)
MODEL_GROUPINGS = (
  "top_left",
  "north_northwest",
  "quadrants",
  "octants",
  "top_bottom",
  "all_quadrants",
)
MODEL_SHAPES = ("small", "lbylnet", "large")


def _emulator():
  try:
    from lmconv_jax import _lmconv_cuda_emu
  except ImportError:
    return None
  return _lmconv_cuda_emu


def _sweep_batches(sweep: dict, per_batch: int) -> int:
  """Batches a thread runs one after the other over one direction's sweep:
  per phase, the phase's pixels over the pixels a block loads at once."""
  h, w, skew = sweep["view_height"], sweep["view_width"], sweep["skew"]
  if skew == 0:
    return sweep["phases"] * -(-w // per_batch)
  k = np.arange(h)
  total = 0
  for phase in range(sweep["phases"]):
    n = int(np.sum((phase - skew * k >= 0) & (phase - skew * k < w)))
    total += -(-n // per_batch)
  return total


def grouped_model(
  grouping,
  shape,
  pass_: str = "forward",
  *,
  guide_shape=None,
  saved_members: bool = True,
  itemsize: int = 4,
  multiprocessors: int = 132,
) -> dict:
  """The model of one grouped call (H100 by default): the larger of

  * bytes-bound: the bytes it must move from DRAM at COPY_TBPS: x and out
    forward; x, out, ct and dx backward; x, tx, out and tout for the tangent;
    plus a merged group's residual (uint8 winner codes, or the member pools
    with a guide, written forward and read by the merge phase, the backward
    and the tangent), the guide and its gradient, and a broadcast guide's
    per-pixel gradient (written, then read by the reduction) and its slice
    sums (written, then read);
  * latency-bound: waves x the batches a block's threads run in turn
    (each member's sweep of the block's group, plus a merge phase) x
    PHASE_US, plus the two reduction launches' batches.
  """
  emu = _emulator()
  if emu is None:
    raise RuntimeError(
      "the model needs lmconv_jax._lmconv_cuda_emu: build "
      "with -C cmake.define.LMCONV_EMULATOR=ON (as "
      "scripts/setup.sh does)"
    )
  from lmconv_jax._primitives import grouping_attrs
  from lmconv_jax.directions import resolve_grouping

  groups = resolve_grouping(grouping)
  attrs = grouping_attrs(groups)
  shape = tuple(int(v) for v in shape)
  if guide_shape is not None:
    guide_shape = (1,) * (len(shape) - len(guide_shape)) + tuple(guide_shape)
  plan = emu.launch_plan(
    attrs["group_sizes"].tolist(),
    attrs["directions"].tolist(),
    list(shape),
    pass_,
    multiprocessors,
    guide_shape,
    saved_members,
  )
  per_batch = plan["pixels_per_batch"]
  sweeps = plan["sweeps"]
  h, w = shape[-3], shape[-2]
  # The residual is the plan's: uint8 winner codes, or the member pools,
  # which the forward merges in a phase of its own.
  residual, codes = plan["saved_members"], plan["codes"]
  merge_phase = pass_ == "forward" and residual and not codes
  batches, k = 0, 0
  for g in groups:
    n = sum(_sweep_batches(sweeps[k + m], per_batch) for m in range(len(g)))
    if merge_phase and len(g) > 1:
      n += -(-(h * w) // per_batch)
    batches = max(batches, n)
    k += len(g)
  waves = -(-plan["blocks"] // (BLOCKS_PER_SM * multiprocessors))
  lat_us = waves * batches * PHASE_US
  size = int(np.prod(shape))
  if plan["launches"] > 1:
    # The broadcast guide's gradient reduction in two levels, REDUCE_BATCH
    # loads at a time (deterministic, no atomics; cuda_schedule.h): a
    # thread per (slice, guide element) sums a slice's guide_slice pixels
    # in order, then a thread per guide element its guide_slices partials.
    def chain_us(blocks, loads):
      launch_waves = -(-blocks // (BLOCKS_PER_SM * multiprocessors))
      return launch_waves * -(-loads // REDUCE_BATCH) * PHASE_US

    lat_us += chain_us(
      plan["slice_blocks"], min(plan["guide_slice"], plan["guide_n"])
    )
    lat_us += chain_us(plan["total_blocks"], plan["guide_slices"])
  arrays = 2 if pass_ == "forward" else 4
  nbytes = arrays * itemsize * size
  if residual:
    res = size * (1 if codes else plan["max_members"] * itemsize)
    nbytes += res * (2 if merge_phase else 1)
  if guide_shape is not None:
    g_elems = int(np.prod(guide_shape))
    # g; + dg written (backward) or tg read (tangent)
    nbytes += itemsize * g_elems * (1 if pass_ == "forward" else 2)
    if plan["launches"] > 1:
      partials = g_elems * plan["guide_slices"]
      nbytes += 2 * itemsize * size + 2 * max(itemsize, 4) * partials
  bw_us = nbytes / (COPY_TBPS * 1e12) * 1e6
  model_us = max(bw_us, lat_us)
  floor_us = arrays * itemsize * size / (COPY_TBPS * 1e12) * 1e6
  return dict(
    plan,
    waves=waves,
    batches=batches,
    bytes=nbytes,
    bw_us=bw_us,
    latency_us=lat_us,
    model_us=model_us,
    vs_copy=floor_us / model_us,
  )


def model_rows(multiprocessors: int = 132) -> list[tuple]:
  rows = []
  for shape_name in MODEL_SHAPES:
    shape = SHAPES[shape_name]
    cases = [(g, None) for g in MODEL_GROUPINGS]
    cases.append(("quadrants", (shape[-1],)))
    for grouping, guide in cases:
      for pass_ in ("forward", "backward", "tangent"):
        m = grouped_model(
          grouping,
          shape,
          pass_,
          guide_shape=guide,
          multiprocessors=multiprocessors,
        )
        label = grouping + (", guide (C,)" if guide else "")
        rows.append(
          (
            str(shape),
            label,
            pass_,
            m["launches"],
            f"{m['blocks']} x {m['threads']}",
            m["phases"],
            m["waves"],
            m["batches"],
            f"{m['bytes'] / 1e6:.0f}",
            f"{m['bw_us']:.0f}",
            f"{m['latency_us']:.0f}",
            f"{m['model_us']:.0f}",
            f"{m['vs_copy']:.2f}",
          )
        )
  return rows


def model_table(multiprocessors: int = 132) -> str:
  """The grouped launch's model as a markdown table (docs/benchmarks.md)."""
  if _emulator() is None:
    return (
      "bench_gpu: this build has no lmconv_jax._lmconv_cuda_emu (the "
      "CUDA plan's CPU emulation); build with -C "
      "cmake.define.LMCONV_EMULATOR=ON to print the model.\n"
    )
  return (
    markdown_table(
      (
        "shape",
        "grouping",
        "pass",
        "launches",
        "blocks x threads",
        "phases",
        "waves",
        "batches",
        "MB moved",
        "bytes-bound us",
        "latency-bound us",
        "model us",
        "vs copy",
      ),
      model_rows(multiprocessors),
      "lll" + "r" * 10,
    )
    + "\n"
  )


def _csv(choices: Sequence[str]):
  def parse(s: str) -> list[str]:
    items = [t for t in s.split(",") if t]
    bad = [t for t in items if t not in choices]
    if bad:
      raise argparse.ArgumentTypeError(
        f"unknown {', '.join(bad)}; choose from {', '.join(choices)}"
      )
    return items

  return parse


# The exit code when there is no device of the platform asked for.
EXIT_NO_DEVICE = 3


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--platform",
    default="gpu",
    choices=("gpu", "cpu"),
    help="gpu (default) or cpu, for a smoke test of the script",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="one tiny shape, few repeats (checks the script runs)",
  )
  p.add_argument(
    "--shapes",
    type=_csv(tuple(SHAPES) + tuple(QUICK_SHAPES)),
    help=f"comma-separated from {', '.join(SHAPES)}",
  )
  p.add_argument("--dtypes", type=_csv(DTYPES), default=list(DTYPES))
  p.add_argument(
    "--ops",
    type=_csv(OPS),
    default=list(DEFAULT_OPS),
    help=f"comma-separated from {', '.join(OPS)}; default "
    f"{','.join(DEFAULT_OPS)}",
  )
  p.add_argument(
    "--peers",
    type=_csv(PEERS),
    default=list(PEERS),
    help=f"comma-separated from {', '.join(PEERS)} (the copy "
    f"always runs); default all",
  )
  p.add_argument("--chain", type=int, default=10)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument(
    "--budget-s",
    type=float,
    default=None,
    help="after this many seconds, skip the slow peers",
  )
  p.add_argument(
    "--stop-s",
    type=float,
    default=None,
    help="after this many seconds, time no more rows",
  )
  p.add_argument(
    "--model",
    action="store_true",
    help="print the GPU model of docs/benchmarks.md and exit",
  )
  p.add_argument("--markdown", metavar="FILE")
  p.add_argument(
    "--json",
    metavar="FILE",
    help="rows and machine as JSON (rewritten after each row)",
  )
  a = p.parse_args(argv)
  if a.model:
    print(model_table())
    return []
  try:
    device = jax.devices(a.platform)[0]
  except RuntimeError:
    # Not a success: automation that reads the exit code sees nothing ran
    # (scripts/gpu_check.sh's code for "no GPU" too).
    print(
      f"bench_gpu: no {a.platform} device visible to JAX; nothing was "
      f"measured (use --platform cpu --quick to check the script).",
      file=sys.stderr,
    )
    sys.exit(EXIT_NO_DEVICE)
  if a.platform == "gpu":
    problem = _ffi_runs_on(device)
    if problem:
      sys.exit(
        f'bench_gpu: implementation="ffi" does not run on '
        f"{device}: {problem} (are the CUDA kernels built? see "
        f"`python -m lmconv_jax info`)"
      )
  shapes = QUICK_SHAPES if a.quick else SHAPES
  if a.shapes:
    shapes = {k: {**SHAPES, **QUICK_SHAPES}[k] for k in a.shapes}
  chain, repeats = (2, 2) if a.quick else (a.chain, a.repeats)
  torch = torch_or_none(a.platform) if "torch" in a.peers else None
  import jaxlib

  info = dict(
    device=getattr(device, "device_kind", str(device)),
    platform=a.platform,
    multiprocessors=getattr(device, "core_count", None),
    jax=jax.__version__,
    jaxlib=jaxlib.__version__,
    torch=getattr(torch, "__version__", None),
    date=datetime.date.today().isoformat(),
    chain=chain,
    repeats=repeats,
    complete=False,
  )

  def checkpoint(rows):
    write(markdown(rows, info), rows, info, a.markdown, a.json)

  with jax.default_device(device):
    rows = run(
      shapes,
      a.dtypes,
      a.ops,
      a.peers,
      device,
      a.platform,
      chain,
      repeats,
      a.budget_s,
      a.stop_s,
      on_row=checkpoint,
    )
  info["complete"] = True
  table = markdown(rows, info)
  print(table)
  if a.platform != "gpu":
    print(
      "(a smoke test off the GPU: these numbers say nothing about the targets)"
    )
  print("\n".join(verdict(rows)))
  write(table, rows, info, a.markdown, a.json)
  return rows


def _ffi_runs_on(device) -> Optional[str]:
  """None if a tiny FFI pool runs on device, else why not (public API)."""
  try:
    x = jax.device_put(jnp.ones((1, 2, 2, 1), jnp.float32), device)
    jax.block_until_ready(
      lmconv_jax.landmark_pool(x, "top_left", implementation="ffi")
    )
  except Exception as e:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


if __name__ == "__main__":
  main()
