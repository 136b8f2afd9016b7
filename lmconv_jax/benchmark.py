"""CPU benchmark of the paths models take: the grouped pool, its guide, its
dtypes, wide channels and the layers, each against a baseline timed in the
same run, interleaved (load from other processes hits both alike).

Sections (rows carry ``section``):

* ``grouping``: each grouping's FFI forward and forward+backward over a
  single-direction FFI pool (top_left) of the same array; the pure-jnp
  reference's time for the same grouping (``ref/ffi``) and its sequential
  depth (scan steps, forward / forward+backward).
* ``guide``: a single pool with a per-channel ``(C,)`` and a per-batch guide
  over the same pool with a per-pixel guide, forward+backward.
* ``dtype``: bfloat16 and float16 forward (single pool, quadrants,
  octants: LandmarkConv4's and LandmarkConv8's pools) over float32's.
* ``wide``: the forward at (B, 64, 64, 256) and the same bytes as
  (B, 128, 128, 64), each over a same-size copy (``x + c``).
* ``layers``: LandmarkConv4 / LandmarkConv8 over an ``nn.Conv`` with the same
  features and kernel.

  python -m lmconv_jax bench [--shape 8,64,64,64] [--markdown F] [--json F]
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import textwrap
import time
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import lmconv_jax
from lmconv_jax import reference
from lmconv_jax.directions import GROUPINGS, resolve_grouping

DEFAULT_SHAPE = (8, 64, 64, 64)
# The targets at the default shape (ratio at most; docs/benchmarks.md).
TARGETS = {
  "quadrants": 1.25,
  "octants": 1.25,
  "top_bottom": 2.6,
  "left_right": 2.6,
  "all_quadrants": 4.6,
  "guide (C,)": 1.25,
  "bfloat16": 1.0,
  "float16": 1.0,
  "C=256": 1.3,
}


# The dtype section's groupings: a single pool and the layers' pools.
DTYPE_GROUPINGS = ("top_left", "quadrants", "octants")


def _time_interleaved(
  calls: dict, repeats: int, budget_s: float, burst: int = 4
) -> dict:
  """Median wall time in seconds of each call (name -> (fn, args)).

  After one warm-up (compile) call each, the calls take turns in bursts: one
  untimed call, then ``burst`` timed calls in a row (a steady state: its
  buffers and threads are warm, as in a training loop). At least 3 and at
  most ``repeats`` turns, fewer once ``budget_s`` is spent.
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


def _fwd_and_grad(f, guided: bool):
  """(jit(f), jit(grad of sum(f * ct))) for f(x, g)."""
  loss = lambda x, g, ct: jnp.sum(f(x, g).astype(jnp.float32) * ct)
  return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1) if guided else 0))


def _grouped(directions, impl="ffi"):
  return lambda x, g: lmconv_jax.grouped_landmark_pool(
    x, directions, g, implementation=impl
  )


def _row(section, case, pass_, ms, baseline, baseline_ms, **extra):
  row = dict(
    section=section,
    case=case,
    pass_=pass_,
    ms=ms * 1e3,
    baseline=baseline,
    baseline_ms=baseline_ms * 1e3,
    ratio=ms / baseline_ms,
    target=TARGETS.get(case),
  )
  row.update(extra)
  return row


def run(
  shape: Sequence[int] = DEFAULT_SHAPE,
  dtype="float32",
  repeats: int = 8,
  budget_s: float = 6.0,
  progress: bool = True,
  sections: Sequence[str] = ("grouping", "guide", "dtype", "wide", "layers"),
) -> list[dict]:
  """Times every section and returns one dict per row."""
  from tqdm import tqdm

  shape = tuple(int(s) for s in shape)
  dtype = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  g_full = jnp.asarray(rng.uniform(0, 1, shape), dtype)
  timed = lambda calls: _time_interleaved(calls, repeats, budget_s)
  rows = []
  work = []
  if "grouping" in sections:
    work += [("grouping", name) for name in GROUPINGS]
  if "guide" in sections:
    work.append(("guide", None))
  if "dtype" in sections:
    work.append(("dtype", None))
  if "wide" in sections:
    work.append(("wide", None))
  if "layers" in sections:
    work.append(("layers", None))
  bar = tqdm(work, disable=not progress, desc="bench")
  single_f, single_b = _fwd_and_grad(_grouped("top_left"), False)
  for section, name in bar:
    bar.set_postfix_str(name or section)
    if section == "grouping":
      ffi_f, ffi_b = _fwd_and_grad(_grouped(name), False)
      ref_f, ref_b = _fwd_and_grad(_grouped(name, "reference"), False)
      t = timed(
        {
          "single_f": (single_f, (x, None)),
          "single_b": (single_b, (x, None, ct)),
          "ffi_f": (ffi_f, (x, None)),
          "ffi_b": (ffi_b, (x, None, ct)),
          "ref_f": (ref_f, (x, None)),
          "ref_b": (ref_b, (x, None, ct)),
        }
      )
      groups = resolve_grouping(name)
      h, w = shape[-3], shape[-2]
      depth = reference.sequential_steps(groups, h, w)
      for p, key in (("forward", "f"), ("fwd+bwd", "b")):
        rows.append(
          _row(
            "grouping",
            name,
            p,
            t["ffi_" + key],
            "single pool (top_left)",
            t["single_" + key],
            reference_ms=t["ref_" + key] * 1e3,
            ref_over_ffi=t["ref_" + key] / t["ffi_" + key],
            reference_depth=depth,
          )
        )
    elif section == "guide":
      full_f, full_b = _fwd_and_grad(_grouped("top_left"), True)
      calls = {"full": (full_b, (x, g_full, ct))}
      guides = {
        "guide (C,)": g_full[(0,) * (len(shape) - 1)],
        "guide per batch": g_full[..., :1, :1, :1],
      }
      for case, g in guides.items():
        calls[case] = (full_b, (x, g, ct))
      t = timed(calls)
      for case in guides:
        rows.append(
          _row("guide", case, "fwd+bwd", t[case], "per-pixel guide", t["full"])
        )
    elif section == "dtype":
      calls = {}
      for dt in ("float32", "bfloat16", "float16"):
        xd = x.astype(dt)
        for grouping in DTYPE_GROUPINGS:
          calls[dt, grouping] = (jax.jit(_grouped(grouping)), (xd, None))
      t = timed(calls)
      for dt in ("bfloat16", "float16"):
        for grouping in DTYPE_GROUPINGS:
          rows.append(
            _row(
              "dtype",
              dt,
              f"forward, {grouping}",
              t[dt, grouping],
              "float32",
              t["float32", grouping],
            )
          )
    elif section == "wide":
      b = shape[0] if len(shape) == 4 else 8
      copy = jax.jit(lambda x, c: x + c)
      zero = jnp.zeros((), dtype)
      calls = {}
      for case, s in (("C=256", (b, 64, 64, 256)), ("C=64", (b, 128, 128, 64))):
        xs = jnp.asarray(rng.standard_normal(s), dtype)
        calls[case] = (single_f, (xs, None))
        calls[case + " copy"] = (copy, (xs, zero))
      t = timed(calls)
      for case, s in (("C=256", (b, 64, 64, 256)), ("C=64", (b, 128, 128, 64))):
        rows.append(
          _row("wide", case, f"forward {s}", t[case], "copy", t[case + " copy"])
        )
    elif section == "layers":
      import flax.linen as nn

      c = shape[-1]
      layers = {
        "LandmarkConv4": lmconv_jax.LandmarkConv4(c, (3, 3)),
        "LandmarkConv8": lmconv_jax.LandmarkConv8(c, (3, 3)),
        "nn.Conv": nn.Conv(c, (3, 3)),
      }
      calls = {}
      for case, layer in layers.items():
        params = layer.init(jax.random.key(0), x)
        f = jax.jit(layer.apply)
        loss = lambda p, x, layer=layer: jnp.sum(layer.apply(p, x) ** 2)
        calls[case, "forward"] = (f, (params, x))
        calls[case, "fwd+bwd"] = (
          jax.jit(jax.grad(loss, argnums=(0, 1))),
          (params, x),
        )
      t = timed(calls)
      for case in ("LandmarkConv4", "LandmarkConv8"):
        for p in ("forward", "fwd+bwd"):
          rows.append(
            _row("layers", case, p, t[case, p], "nn.Conv 3x3", t["nn.Conv", p])
          )
  for r in rows:
    r.update(shape=list(shape), dtype=dtype.name)
  return rows


def machine() -> dict:
  """What the numbers were measured on (the benchmark's and the demo's)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cores = (
    len(os.sched_getaffinity(0))
    if hasattr(os, "sched_getaffinity")
    else os.cpu_count()
  )
  import jaxlib

  return dict(
    cpu=cpu,
    cores=cores,
    python=platform.python_version(),
    jax=jax.__version__,
    jaxlib=jaxlib.__version__,
    backend=jax.default_backend(),
    devices=[str(d) for d in jax.devices()],
    load_avg_1min=round(os.getloadavg()[0], 2),
    date=datetime.date.today().isoformat(),
  )


def markdown_table(
  header: Sequence[str], rows: Iterable[Sequence], align: str = ""
) -> str:
  """A markdown table (no trailing newline): the header row, the alignment
  row, then one line per row of cells (each written with ``str``).

  ``align``: one letter per column, ``l`` (``---``) or ``r`` (``---:``);
  empty for all left.
  """
  align = align or "l" * len(header)
  if len(align) != len(header) or set(align) - set("lr"):
    raise ValueError(
      f"align {align!r}: expected one l or r per column of {list(header)}"
    )
  rule = {"l": "---", "r": "---:"}
  lines = [
    "| " + " | ".join(header) + " |",
    "|" + "|".join(rule[a] for a in align) + "|",
  ]
  for cells in rows:
    cells = [str(c) for c in cells]
    if len(cells) != len(header):
      raise ValueError(
        f"row {cells} has {len(cells)} cells; the header has {len(header)}"
      )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(rows: list[dict], info: Optional[dict] = None) -> str:
  """A markdown table of the rows (plus a line about the machine)."""

  def ms(v):
    return "" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")

  lines = []
  if info and rows:
    lines.append(
      f"Shape {tuple(rows[0]['shape'])} {rows[0]['dtype']}; "
      f"{info['cpu']}, {info['cores']} cores (1-min load average "
      f"{info['load_avg_1min']} at the end); jax {info['jax']}; "
      f"{info['date']}.\n"
    )
  cells = []
  for r in rows:
    target = r.get("target")
    ok = (
      ""
      if target is None
      else (
        f"<= {target}" + (" met" if r["ratio"] <= target else " **not met**")
      )
    )
    ref = (
      f"{ms(r['reference_ms'])} ({r['ref_over_ffi']:.1f}x)"
      if "reference_ms" in r
      else ""
    )
    depth = r.get("reference_depth")
    depth = (
      ""
      if depth is None
      else (
        f"{depth['forward']} / {depth['fwd+bwd']}"
        if isinstance(depth, dict)
        else str(depth)
      )
    )
    cells.append(
      (
        r["section"],
        r["case"],
        r["pass_"],
        ms(r["ms"]),
        r["baseline"],
        ms(r["baseline_ms"]),
        f"{r['ratio']:.2f}",
        ok,
        ref,
        depth,
      )
    )
  lines.append(
    markdown_table(
      (
        "section",
        "case",
        "pass",
        "ms",
        "over",
        "baseline ms",
        "ratio",
        "target",
        "reference ms (ref/ffi)",
        "reference depth",
      ),
      cells,
      "lllrlrrrrr",
    )
  )
  if rows:
    lines.append("\n" + legend(rows, info))
  return "\n".join(lines) + "\n"


# A 1-min load average above this share of the cores: the machine was busy.
BUSY_LOAD_PER_CORE = 0.5


def legend(rows: list[dict], info: Optional[dict] = None) -> str:
  """How to read :func:`markdown`'s table (printed under it)."""
  shape = tuple(rows[0]["shape"]) if rows else DEFAULT_SHAPE
  lines = [
    "How to read it: ms is the median time of one jitted call; 'over' "
    "names the row's baseline, timed in the same run, taking turns with "
    "it; ratio = ms / baseline ms (below 1: faster than the baseline). "
    "target: the ratio this project aims for (at most), set for the "
    f"default shape {DEFAULT_SHAPE} float32 on both cores of a quiet 2-core "
    "CPU; a few are not met even there. 'reference ms (ref/ffi)': the "
    "pure-jnp reference on the same grouping, and how many times slower "
    "than the kernels it is; 'reference depth': its sequential scan steps "
    "(forward / fwd+bwd). Load from other processes moves the ratios by "
    "20-70 %: compare runs on a quiet machine. docs/benchmarks.md has "
    "the sections, where the targets come from, and measured numbers."
  ]
  if shape != DEFAULT_SHAPE or rows[0]["dtype"] != "float32":
    lines.append(
      f"This run's shape {shape} {rows[0]['dtype']} is not the "
      f"targets': its 'met' / 'not met' say little."
    )
  if info and info.get("load_avg_1min", 0) > BUSY_LOAD_PER_CORE * max(
    1, info.get("cores") or 1
  ):
    lines.append(
      f"The machine was busy (1-min load average "
      f"{info['load_avg_1min']} on {info['cores']} cores): rerun "
      f"on a quiet machine before reading a 'not met'."
    )
  return "\n\n".join(textwrap.fill(line, 79) for line in lines)
