"""CPU benchmark: the FFI landmark pool against the pure-jnp reference.

For each direction and guide setting it times, under jit, the forward pass and
forward + backward (jax.grad of sum(out * ct) w.r.t. x, and the guide when
there is one) for:

* ``ffi``: lmconv_jax.landmark_pool(..., implementation="ffi"),
* ``reference``: lmconv_jax.landmark_pool_reference (lax scans),
* ``cummax`` (g = 1 quadrants only): lax.cummax over H, then over W, which
  computes the same values as a quadrant pool (and is XLA's best shot),

next to a same-size elementwise copy measured in the same run (``x + c`` with
c a traced zero, so XLA cannot drop it). Effective bandwidth is the bytes the
kernels must move (each operand read once, each result written once) divided
by the time; ``x copy`` is that bandwidth over the copy's.

  python -m lmconv_jax bench                      # (8, 64, 64, 64) float32
  python benchmarks/bench_cpu.py                  # the same, as a script
  python benchmarks/bench_cpu.py --markdown out.md --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

import lmconv_jax
from lmconv_jax.directions import DIRECTIONS, Direction, resolve

DEFAULT_SHAPE = (8, 64, 64, 64)
DEFAULT_DIRECTIONS = ("top_left", "east_northeast")  # a quadrant, an octant


def _time_interleaved(calls: dict, repeats: int, budget_s: float,
                      burst: int = 4) -> dict:
  """Median wall time in seconds of each call (name -> (fn, args)).

  After one warm-up (compile) call each, the calls take turns in bursts: one
  untimed call, then ``burst`` timed calls in a row (a steady state: its
  buffers and threads are warm, as in a training loop). Taking turns makes
  load from other processes hit all calls alike. At least 3 and at most
  ``repeats`` turns, fewer once ``budget_s`` is spent.
  """
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  start = time.perf_counter()
  for r in range(repeats):
    for name, (fn, args) in calls.items():
      jax.block_until_ready(fn(*args))
      for _ in range(burst):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - t0)
    if r >= 2 and time.perf_counter() - start > budget_s:
      break
  return {name: statistics.median(t) for name, t in times.items()}


def _pool_fns(d: Direction, guided: bool):
  """(name -> forward fn, name -> forward+backward fn), all jitted."""
  def ffi(x, g):
    return lmconv_jax.landmark_pool(x, d, g, implementation="ffi")

  def ref(x, g):
    return lmconv_jax.landmark_pool_reference(x, d, g)

  def cummax(x, g):
    del g
    y = lax.cummax(x, axis=x.ndim - 3, reverse=d.row_step < 0)
    return lax.cummax(y, axis=x.ndim - 2, reverse=d.col_step < 0)

  impls = {"ffi": ffi, "reference": ref}
  if d.is_quadrant and not guided:
    impls["cummax"] = cummax
  fwd, fwd_bwd = {}, {}
  for name, f in impls.items():
    fwd[name] = jax.jit(f)
    argnums = (0, 1) if guided else 0
    loss = lambda x, g, ct, f=f: jnp.sum(f(x, g) * ct)
    fwd_bwd[name] = jax.jit(jax.grad(loss, argnums=argnums))
  return fwd, fwd_bwd


def run(shape: Sequence[int] = DEFAULT_SHAPE, dtype="float32",
        directions: Sequence[str] = DEFAULT_DIRECTIONS,
        guided: Sequence[bool] = (False, True), repeats: int = 10,
        budget_s: float = 10.0, progress: bool = True) -> list[dict]:
  """Times every (direction, guide, pass) and returns one dict per row."""
  shape = tuple(int(s) for s in shape)
  dtype = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  g = jnp.asarray(rng.uniform(0, 1, shape), dtype)
  ct = jnp.asarray(rng.standard_normal(shape), dtype)
  nbytes = x.size * dtype.itemsize

  copy = jax.jit(lambda x, c: x + c)
  zero = jnp.zeros((), dtype)
  plan = [(resolve(name), gd) for name in directions for gd in guided]
  rows = []
  bar = tqdm(total=len(plan), disable=not progress, desc="bench_cpu")
  for d, gd in plan:
    bar.set_postfix_str(f"{d.name}, {'guided' if gd else 'g=1'}")
    gx = g if gd else None
    fwd, fwd_bwd = _pool_fns(d, gd)
    passes = (
        # arrays read + written: forward x (+g) -> out; backward x (+g), out,
        # ct -> dx (+dg).
        ("forward", fwd, (x, gx), 3 if gd else 2),
        ("fwd+bwd", fwd_bwd, (x, gx, ct), 9 if gd else 6))
    calls = {"copy": (copy, (x, zero))}
    for pass_name, fns, args, _ in passes:
      calls.update({(pass_name, name): (fn, args) for name, fn in fns.items()})
    t = _time_interleaved(calls, repeats, budget_s)
    for pass_name, fns, _, n_io in passes:
      row = dict(direction=d.name, alias=d.alias,
                 kind="quadrant" if d.is_quadrant else "octant",
                 guide="guided" if gd else "g=1", pass_=pass_name,
                 shape=list(shape), dtype=dtype.name, bytes=n_io * nbytes,
                 copy_ms=t["copy"] * 1e3,
                 copy_gbps=2 * nbytes / t["copy"] / 1e9)
      for name in fns:
        row[f"{name}_ms"] = t[pass_name, name] * 1e3
        row[f"{name}_gbps"] = row["bytes"] / t[pass_name, name] / 1e9
      row["ffi_vs_copy"] = row["ffi_gbps"] / row["copy_gbps"]
      row["speedup_vs_reference"] = row["reference_ms"] / row["ffi_ms"]
      if "cummax_ms" in row:
        row["speedup_vs_cummax"] = row["cummax_ms"] / row["ffi_ms"]
      rows.append(row)
    bar.update()
  bar.close()
  return rows


def machine() -> dict:
  """What the numbers were measured on."""
  model = platform.processor() or platform.machine()
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  import jaxlib
  return dict(cpu=model, cores=os.cpu_count(), jax=jax.__version__,
              jaxlib=jaxlib.__version__, backend=jax.default_backend(),
              load_avg_1min=round(os.getloadavg()[0], 2),
              date=datetime.date.today().isoformat())


def markdown(rows: list[dict], info: Optional[dict] = None) -> str:
  """A markdown table of the rows (plus a line about the machine)."""
  def ms(v):
    return "" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")
  lines = []
  if info:
    r = rows[0]
    copy_ms = statistics.median(r["copy_ms"] for r in rows)
    copy_gbps = statistics.median(r["copy_gbps"] for r in rows)
    lines.append(f"Shape {tuple(r['shape'])} {r['dtype']}; {info['cpu']}, "
                 f"{info['cores']} cores (1-min load average "
                 f"{info['load_avg_1min']} at the end); jax {info['jax']}; "
                 f"{info['date']}. Copy (`x + c`, same size): {copy_ms:.3g} "
                 f"ms, {copy_gbps:.1f} GB/s (median over the rows).\n")
  lines.append("| direction | guide | pass | FFI ms | FFI GB/s | x copy BW "
               "| reference ms | FFI speed-up | cummax x2 ms |")
  lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    lines.append(
        f"| {r['direction']} ({r['kind']}) | {r['guide']} | {r['pass_']} "
        f"| {ms(r['ffi_ms'])} | {r['ffi_gbps']:.1f} | {r['ffi_vs_copy']:.2f} "
        f"| {ms(r['reference_ms'])} | {r['speedup_vs_reference']:.0f}x "
        f"| {ms(r.get('cummax_ms'))} |")
  return "\n".join(lines) + "\n"


def write_outputs(table: str, rows: list[dict], info: dict,
                  markdown_path: Optional[str], json_path: Optional[str]) -> None:
  """Writes the table (markdown) and the rows with the machine (JSON) if asked."""
  if markdown_path:
    with open(markdown_path, "w") as f:
      f.write(table)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(dict(machine=info, rows=rows), f, indent=1)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)),
                 help="comma-separated (..., H, W, C), default %(default)s")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--directions", default=",".join(DEFAULT_DIRECTIONS),
                 help=f"comma-separated, from {', '.join(DIRECTIONS)}")
  p.add_argument("--repeats", type=int, default=10,
                 help="turns per candidate (each: 1 untimed + 4 timed calls)")
  p.add_argument("--markdown", metavar="FILE", help="also write the table here")
  p.add_argument("--json", metavar="FILE", help="also write the rows here")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  a = p.parse_args(argv)
  rows = run(shape=[int(s) for s in a.shape.split(",")], dtype=a.dtype,
             directions=a.directions.split(","), repeats=a.repeats,
             progress=not a.quiet)
  info = machine()
  table = markdown(rows, info)
  print(table)
  write_outputs(table, rows, info, a.markdown, a.json)
  return rows


if __name__ == "__main__":
  main()
