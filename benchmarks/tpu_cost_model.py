"""A cost model of the Pallas TPU kernels against the reference, without a TPU.

For every pass (forward, tangent, backward) of the named groupings, and a
LandmarkConv4 training step, compiled for compile-only v5e and v6e devices
(scripts/tpu_compile_check.py's harness), it reads:

* HBM bytes: the reference's, XLA's ``cost_analysis()["bytes accessed"]``
  of the compiled module (gathers, scatters, loop state); the kernels', their
  pipelined blocks (``window_params`` in Mosaic's last stage) times the grid
  steps (an upper bound: a block whose index does not change is not fetched
  again), or XLA's count of the module if that is more (it does not see
  inside a custom call: at (8, 128, 128, 256) it reports 512 bytes for a
  quadrants forward);
* the reference's sequential steps: its ``lax.scan`` loops
  (``stablehlo.while`` in the lowered module) times
  ``reference.sequential_steps`` (H + W - 1 for quadrants);
* the kernels' sequential steps and vector operations, off Mosaic's last
  stage (``post-finalize-llo``, one file per kernel): the grid
  (``iteration_bounds``, run in sequence: a v5e or v6e chip has one
  TensorCore), the ``scf.for`` nest with its trip counts, and the ``llo``
  operations on vectors in each loop body. Top-level ``scf.if`` blocks are
  the kernels' per-direction dispatch (one taken per grid step): the model
  counts the costliest; nested ones are counted as taken (an upper bound).

and predicts, per pass: t_HBM = bytes / published HBM bandwidth (v5e
819 GB/s, v6e 1638 GB/s: cloud.google.com/tpu/docs/v5e, /v6e), and for the
kernels t_vec = vector operations / clock, one vector operation per cycle
(a VLIW bundle issues several when they are independent: a pessimistic
issue bound, not a latency bound), at 1.5 GHz (v5e: its published 197 bf16
TFLOP/s over 4 MXUs of 128x128; v6e's clock is not published: the same is
assumed). The prediction is max(t_HBM, t_vec). Only a TPU can tell how far
the truth is from it.

Run (after scripts/tpu_compile_check.sh has made .venv-tpu):

  PYTHONPATH=. .venv-tpu/bin/python benchmarks/tpu_cost_model.py \\
      [--platforms v5e,v6e] [--shapes 32x16x16x128,8x128x128x256] \\
      [--groupings quadrants,octants,...] [--dtype float32] [--guide]

It prints a markdown table (docs/benchmarks.md's "TPU (a model)" section).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import tpu_compile_check as check  # noqa: E402

HBM_BW = {"v5e": 819e9, "v6e": 1638e9, "v4": 1228e9, "v5p": 2765e9}
CLOCK_HZ = 1.5e9  # see the module docstring


# --------------------------------------------------------------------------
# Mosaic's final stage: grid, loops, vector operations.

_CONST = re.compile(r"(%[\w#]+) = llo\.constant \{value = (-?\d+) : i32\}")
_FOR = re.compile(r"scf\.for %\S+ = (%[\w#]+) to (%[\w#]+) step (%[\w#]+)")
_OP = re.compile(r"\bllo\.([a-z_][\w.]*)")


class Block:
  """A loop body, an if branch or a function body: its own ops and children."""

  def __init__(self, kind, trips=1):
    self.kind, self.trips = kind, trips
    self.vec = self.load = self.store = self.scalar = 0
    self.children = []

  def totals(self, top=False, all_ifs=False):
    """(vector ALU, loads, stores, scalar) per execution of this block."""
    own = [self.vec, self.load, self.store, self.scalar]
    ifs = [c for c in self.children if c.kind == "if"]
    rest = [c for c in self.children if c.kind != "if"]
    for c in rest + ([] if top and not all_ifs else ifs):
      t = c.totals()
      own = [a + b * c.trips for a, b in zip(own, t)]
    if top and ifs and not all_ifs:  # one direction: the costliest
      t = max((c.totals() for c in ifs), key=sum)
      own = [a + b for a, b in zip(own, t)]
    return own

  def steps(self, top=False, all_ifs=False):
    """Innermost loop iterations per execution: the sequential steps."""
    ifs = [c.steps() for c in self.children if c.kind == "if"]
    inner = sum(c.steps() for c in self.children if c.kind != "if")
    inner += max(ifs, default=0) if top and not all_ifs else sum(ifs)
    if self.kind == "for":
      return self.trips * max(inner, 1)
    return inner

  def innermost(self):
    """(trip count, ops per iteration) of the innermost loop on the deepest
    path."""
    best = None
    for c in self.children:
      got = c.innermost()
      if got is not None and (best is None or got[2] > best[2]):
        best = got
    if best is None and self.kind == "for":
      return (self.trips, self.vec + self.load + self.store, 1)
    if best is not None and self.kind == "for":
      return (best[0], best[1], best[2] + 1)
    return best


_ITEMSIZE = {
  "f32": 4,
  "i32": 4,
  "bf16": 2,
  "f16": 2,
  "i16": 2,
  "i8": 1,
  "f64": 8,
}


def window_bytes(text):
  """Bytes of the kernel's pipelined blocks (its window_params), in VMEM
  order: the first len(window_params) VMEM memrefs of the main func."""
  n = len(re.findall(r"transform_indices = @transform_\d+", text))
  sig = next((ln for ln in text.splitlines() if "xir.main" in ln), "")
  refs = re.findall(
    r"memref<([\dx]+)x(\w+), #xir\.tiled<[^>]*>, "
    r"#xir\.memory_space<vmem",
    sig,
  )
  return sum(
    math.prod(int(d) for d in dims.split("x")) * _ITEMSIZE.get(dt, 4)
    for dims, dt in refs[:n]
  )


def parse_llo(text):
  """{grid: [...], semantics: [...], body: Block} of a kernel's main func."""
  m = re.search(r"iteration_bounds = array<i64: ([\d, ]+)>", text)
  grid = [int(v) for v in m.group(1).split(",")] if m else [1]
  sem = re.findall(r"dimension_semantics<(\w+)>", text)
  consts = dict(_CONST.findall(text))
  main = text.find("xir.main")
  lines = text[main:].splitlines()[1:]
  root = Block("func")
  stack = [root]
  for ln in lines:
    s = ln.strip()
    if not s:
      continue
    if s.startswith("func.func"):  # the index-map functions follow main
      break
    fm = _FOR.search(s)
    if fm:
      lo, hi, st = (consts.get(v) for v in fm.groups())
      trips = (
        max(0, math.ceil((int(hi) - int(lo)) / int(st)))
        if None not in (lo, hi, st)
        else 1
      )
      blk = Block("for", trips)
      stack[-1].children.append(blk)
      stack.append(blk)
      continue
    if s.startswith("scf.if") or re.match(r"%\S+ = scf\.if", s):
      blk = Block("if")
      stack[-1].children.append(blk)
      stack.append(blk)
      continue
    if s.startswith("} else {"):
      blk = Block("if")
      stack[-2].children.append(blk)
      stack[-1] = blk
      continue
    if s.startswith("}"):
      if len(stack) > 1:
        stack.pop()
      continue
    op = _OP.search(s)
    if op and "llo.constant" not in s:
      name = op.group(1)
      b = stack[-1]
      if name.startswith("vector_load"):
        b.load += 1
      elif name.startswith("vector_store"):
        b.store += 1
      elif "vector<" in s:
        b.vec += 1
      else:
        b.scalar += 1
  return {
    "grid": grid,
    "semantics": sem,
    "body": root,
    "window_bytes": window_bytes(text),
  }


def kernel_stats(dump_dir):
  """Per kernel of one case's dumps: grid steps, sequential loop steps,
  vector ops (ALU, loads, stores) per grid step and innermost iteration."""
  out = []
  for f in sorted(pathlib.Path(dump_dir).glob("*post-finalize-llo.txt")):
    name = re.sub(r"^.*mosaic-dump-|-post-finalize-llo\.txt$", "", f.name)
    k = parse_llo(f.read_text())
    grid_steps = math.prod(k["grid"])
    vec, load, store, _ = k["body"].totals(top=True)
    hi = sum(k["body"].totals(top=True, all_ifs=True)[:3])
    inner = k["body"].innermost()
    out.append(
      {
        "name": name,
        "grid": k["grid"],
        "semantics": k["semantics"],
        "grid_steps": grid_steps,
        "loop_steps": k["body"].steps(top=True),
        "loop_steps_hi": k["body"].steps(top=True, all_ifs=True),
        "vec_ops": vec + load + store,
        "vec_ops_hi": hi,
        "hbm": grid_steps * k["window_bytes"],
        "alu": vec,
        "load": load,
        "store": store,
        "inner": inner,
      }
    )
  return out


# --------------------------------------------------------------------------


def fmt_t(s):
  if s is None:
    return "-"
  return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def measure(case, dumps):
  r = check.compile_case(case)
  r["dump"] = dumps.collect(case.name)
  return r


def fmt_range(lo, hi, fmt):
  if lo is None or hi is None:
    return "-"
  a, b = fmt(lo), fmt(hi)
  return a if a == b else f"{a} - {b}"


def print_table(rows):
  """The markdown table: per TPU, shape and pass, the reference's bytes,
  steps and t_HBM; the kernels' bytes, steps, vector ops per innermost
  step, t_HBM and t_vec; the prediction max(t_HBM, t_vec), as a range (how
  many direction bodies run per grid step), and the reference's floor over
  it."""
  print(
    "| TPU | shape | pass | reference: HBM | steps | t_HBM | "
    "kernels: HBM | sequential steps | vector ops / step | t_HBM | "
    "t_vec (1 op/cycle) | predicted | reference t_HBM / predicted |"
  )
  print("|" + "---|" * 13)
  for r in rows:
    lo = max(r["t_hbm"] or 0, r["t_vec_lo"] or 0) or None
    hi = max(r["t_hbm"] or 0, r["t_vec"] or 0) or None
    ratio = fmt_range(
      r["ref_t"] / hi if r["ref_t"] and hi else None,
      r["ref_t"] / lo if r["ref_t"] and lo else None,
      lambda v: f"{v:.2g}x",
    )
    print(
      f"| {r['platform']} | {r['shape']} | {r['what']} {r['pass']} | "
      f"{check.fmt_bytes(r['ref_bytes'])} | {r['ref_steps']} | "
      f"{fmt_t(r['ref_t'])} | {check.fmt_bytes(r['pal_bytes'])} | "
      f"{fmt_range(r['k_steps'], r['k_steps_hi'], '{:,}'.format)} | "
      f"{r['per_step']} | {fmt_t(r['t_hbm'])} | "
      f"{fmt_range(r['t_vec_lo'], r['t_vec'], fmt_t)} | "
      f"{fmt_range(lo, hi, fmt_t)} | {ratio} |"
    )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--platforms", default="v5e,v6e")
  p.add_argument("--shapes", default="32x16x16x128,8x128x128x256")
  p.add_argument(
    "--groupings",
    default="quadrants,octants,top_bottom,left_right,all_quadrants",
  )
  p.add_argument("--passes", default="forward,tangent,backward")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--guide", action="store_true", help="a (C,) guide")
  p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
  p.add_argument(
    "--table",
    metavar="FILE",
    help="print the table of a --json FILE, compile nothing",
  )
  p.add_argument(
    "--no-layer",
    action="store_true",
    help="leave out the LandmarkConv4 training step",
  )
  args = p.parse_args(argv)
  if args.table:
    print_table(json.loads(pathlib.Path(args.table).read_text()))
    return 0
  platforms = args.platforms.split(",")
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  t0 = time.perf_counter()
  tmp = tempfile.TemporaryDirectory(prefix="tpu_cost_model_")
  dumps = check.Dumps(tmp.name)
  check.start_jax(str(dumps.staging))
  from lmconv_jax import reference
  from lmconv_jax.directions import resolve_grouping

  rows = []
  for platform in platforms:
    bw = HBM_BW[platform]
    for shape in shapes:
      h, w = shape[-3], shape[-2]
      items = [
        (g, ps)
        for g in args.groupings.split(",")
        for ps in args.passes.split(",")
      ]
      if not args.no_layer:
        items.append(("LandmarkConv4", "train-step"))
      for what, pass_ in items:
        if pass_ == "train-step":
          ref_c = check.layer_case(
            platform, what, shape, args.dtype, args.guide, "reference"
          )
          pal_c = check.layer_case(
            platform, what, shape, args.dtype, args.guide, "pallas"
          )
          groups = resolve_grouping("quadrants")
        else:
          ref_c = check.pool_case(
            platform, what, pass_, shape, args.dtype, args.guide, "reference"
          )
          pal_c = check.pool_case(
            platform, what, pass_, shape, args.dtype, args.guide, "pallas"
          )
          groups = resolve_grouping(what)
        ref = measure(ref_c, dumps)
        pal = measure(pal_c, dumps)
        ref_steps = ref.get("scans", 0) * reference.sequential_steps(
          groups, h, w
        )
        ks = kernel_stats(pal["dump"]) if pal.get("dump") else []
        k_steps = sum(k["grid_steps"] * k["loop_steps"] for k in ks)
        k_steps_hi = sum(k["grid_steps"] * k["loop_steps_hi"] for k in ks)
        k_ops_lo = sum(k["grid_steps"] * k["vec_ops"] for k in ks)
        k_ops = sum(k["grid_steps"] * k["vec_ops_hi"] for k in ks)
        inner = [k["inner"] for k in ks if k["inner"]]
        per_step = max((i[1] for i in inner), default=0)
        t_ref = ref["bytes"] / bw if ref.get("bytes") else None
        # The kernels' blocks, fetched or written back every grid step (an
        # upper bound: Pallas skips a block whose index did not change), or
        # XLA's count of the whole module (the jnp around the kernels; it
        # sees a custom call's operands only), whichever is more.
        pal["bytes"] = (
          max(pal.get("bytes") or 0, sum(k["hbm"] for k in ks)) or None
        )
        t_hbm = pal["bytes"] / bw if pal.get("bytes") else None
        t_vec = k_ops / CLOCK_HZ if k_ops else None
        t_vec_lo = k_ops_lo / CLOCK_HZ if k_ops_lo else None
        rows.append(
          {
            "platform": platform,
            "shape": check.shape_name(shape),
            "what": what,
            "pass": pass_,
            "ok": ref["ok"] and pal["ok"],
            "ref_bytes": ref.get("bytes"),
            "ref_steps": ref_steps,
            "ref_t": t_ref,
            "kernels": len(ks),
            "k_steps": k_steps,
            "k_steps_hi": k_steps_hi,
            "k_ops_lo": k_ops_lo,
            "k_ops": k_ops,
            "per_step": per_step,
            "pal_bytes": pal.get("bytes"),
            "t_hbm": t_hbm,
            "t_vec": t_vec,
            "t_vec_lo": t_vec_lo,
            "why": pal.get("why") or ref.get("why"),
          }
        )
        r = rows[-1]
        print(
          f"# {platform} {r['shape']} {what} {pass_}: ref "
          f"{check.fmt_bytes(r['ref_bytes'])} {ref_steps} steps; "
          f"pallas {check.fmt_bytes(r['pal_bytes'])}, {len(ks)} kernels, "
          f"{k_steps}-{k_steps_hi} steps, {k_ops_lo}-{k_ops} vector ops"
          f"{'' if r['ok'] else '  FAILED: ' + str(r['why'])}",
          file=sys.stderr,
          flush=True,
        )
  dumps.close()
  tmp.cleanup()

  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
  print_table(rows)
  print(
    f"\n({len(rows)} rows, {time.perf_counter() - t0:.0f} s; dtype "
    f"{args.dtype}, {'a (C,) guide' if args.guide else 'no guide'})"
  )
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
