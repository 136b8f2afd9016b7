"""The TPU compiler check: every pass of the Pallas TPU kernels, compiled.

Compiles, with the real TPU compiler (libtpu: Pallas -> Mosaic -> TPU code)
on a CPU host, for compile-only TPU devices (no TPU needed):

* every pass (forward; tangent through jax.jvp; backward through jax.vjp) of
  every named grouping (lmconv_jax.GROUPINGS), and
* the layers' training steps (LandmarkConv4, LandmarkConv8, LandmarkConv with
  top_bottom: a loss and jax.grad over the params and x),

at (32, 16, 16, 128) (LBYLNet's shape) and (8, 128, 128, 256) (the layers at
the first only, see LAYER_SHAPES), float32 and bfloat16, without and with a
(C,) guide. A case passes when it compiles and
its lowered module holds ``tpu_custom_call`` (a Pallas kernel) and no
``stablehlo.while`` (the pure-jnp reference's wavefront scan). One line per
case: PASS/FAIL, seconds, ``cost_analysis()``'s bytes accessed and
``memory_analysis()``'s temp bytes; then "N passed, N failed". Exit 0 when
every case passed, 1 otherwise, 2 when it cannot start (no kernels module,
no libtpu).

Run it through scripts/tpu_compile_check.sh, which makes the venv with libtpu
(.venv-tpu) and puts the source tree on PYTHONPATH. Directly:

  PYTHONPATH=. .venv-tpu/bin/python scripts/tpu_compile_check.py [--quick]

The pool passes go through ``grouped_landmark_pool(..., implementation=
"pallas")`` when lmconv_jax.IMPLEMENTATIONS has "pallas", else through
lmconv_jax._pallas_tpu's functions directly. ``--layers`` picks the layers'
implementation ("auto", their default, is what a TPU user gets).
``--implementation reference`` compiles the reference instead and expects
its scan (the baseline of benchmarks/tpu_cost_model.py; not a check of the
kernels). ``--selftest`` checks the harness itself on a tiny Pallas kernel
of its own and on the reference, which it must report as a scan.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import pathlib
import shutil
import sys
import time
import warnings

# Compile-only TPUs: jax.experimental.topologies' names.
TOPOLOGIES = {
  "v4": "v4:2x2x1",
  "v5e": "v5e:2x2",
  "v5p": "v5p:2x2x1",
  "v6e": "v6e:2x2",
}
SHAPES = ((32, 16, 16, 128), (8, 128, 128, 256))
# The layers' training steps at the first shape only (unless --all-layer-
# shapes): they check the wiring (the layers' default implementation reaches
# the kernels, in a grad, through flax, per dtype and guide); their kernels
# at the big shape are the pool passes' own (the same pallas_calls, block
# sizes and VMEM), compiled above. A step takes ~10 s to compile here, the
# rest of the matrix ~1.5 s a case: this keeps the run near 10 minutes.
LAYER_SHAPES = SHAPES[:1]
DTYPES = ("float32", "bfloat16")
PASSES = ("forward", "tangent", "backward")
# name -> (linen class name, directions or None for the class's default)
LAYERS = {
  "LandmarkConv4": ("LandmarkConv4", None),
  "LandmarkConv8": ("LandmarkConv8", None),
  "LandmarkConv(top_bottom)": ("LandmarkConv", "top_bottom"),
}
KERNEL_MARK = "tpu_custom_call"  # a Pallas TPU kernel in the lowered module
SCAN_MARK = "stablehlo.while"  # the reference's wavefront scan


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="one shape (32, 16, 16, 128), float32, forward and "
    "backward of quadrants and octants, no layers",
  )
  p.add_argument(
    "--platforms",
    default="v5e,v6e",
    help="comma-separated compile-only TPUs, of "
    f"{', '.join(TOPOLOGIES)} (default: v5e,v6e)",
  )
  p.add_argument(
    "--dump",
    metavar="DIR",
    help="write Mosaic's stages of every kernel (LIBTPU_INIT_ARGS"
    "=--xla_mosaic_dump_to) under DIR/<case>/",
  )
  p.add_argument(
    "--implementation",
    choices=("pallas", "reference"),
    default="pallas",
    help="pallas (default): the check; reference: compile the "
    "pure-jnp reference and expect its scan (a baseline)",
  )
  p.add_argument(
    "--layers",
    choices=("auto", "pallas", "reference", "off"),
    default=None,
    help="the layers' pool implementation: auto (the layers' "
    "default: the Pallas kernels on a TPU; the default here "
    "when lmconv_jax has implementation='pallas'), pallas, "
    "reference (expects the scan), off (default when "
    "lmconv_jax has no implementation='pallas')",
  )
  p.add_argument(
    "--all-layer-shapes",
    action="store_true",
    help="the layers' training steps at every shape (default: "
    "the first; ~4 more minutes)",
  )
  p.add_argument(
    "--only",
    metavar="TEXT",
    action="append",
    default=[],
    help="run only the cases whose name contains every TEXT",
  )
  p.add_argument(
    "--selftest",
    action="store_true",
    help="check the harness on a tiny Pallas kernel of its own "
    "(no lmconv_jax kernels needed)",
  )
  args = p.parse_args(argv)
  args.platforms = [s.strip() for s in args.platforms.split(",") if s.strip()]
  bad = [s for s in args.platforms if s not in TOPOLOGIES]
  if bad or not args.platforms:
    p.error(f"--platforms: unknown {bad}; expected some of {list(TOPOLOGIES)}")
  return args


def start_jax(dump_staging: str | None = None):
  """Imports jax (libtpu's flags first), quietly."""
  # libtpu takes a lock file (/tmp/libtpu_lockfile) meant for a real TPU; a
  # compile-only device needs none, and with it two checks (or a check and
  # the cost model) on one machine would refuse each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if dump_staging:
    os.environ["LIBTPU_INIT_ARGS"] = (
      os.environ.get("LIBTPU_INIT_ARGS", "")
      + f" --xla_mosaic_dump_to={dump_staging}"
    ).strip()
  # lmconv_jax runs from the source tree without its C++ extension: the CPU
  # kernels are not needed to compile for a TPU.
  warnings.filterwarnings(
    "ignore", message="lmconv_jax: the compiled CPU kernels"
  )
  import jax

  return jax


# --------------------------------------------------------------------------
# Devices and argument specs.


@functools.cache
def tpu_device(platform: str):
  from jax.experimental import topologies

  return topologies.get_topology_desc(
    topology_name=TOPOLOGIES[platform], platform="tpu"
  ).devices[0]


def on_device(dev):
  """A function turning shapes/arrays into ShapeDtypeStructs placed on dev."""
  import jax

  make = getattr(jax.sharding, "make_single_device_sharding", None)
  sharding = make(dev) if make else jax.sharding.SingleDeviceSharding(dev)

  def spec(shape, dtype=None):
    if dtype is None:  # an abstract value (e.g. from jax.eval_shape)
      shape, dtype = shape.shape, shape.dtype
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

  return spec


def shape_name(shape):
  return "x".join(map(str, shape))


# --------------------------------------------------------------------------
# The cases: (name, function, argument specs, expect "kernel" or "scan").


class Case:
  def __init__(self, name, fn, args, expect, group="pool", device=None):
    self.name, self.fn, self.args, self.expect = name, fn, args, expect
    self.group = group
    if device is None:  # where the first argument lives
      import jax

      device = next(iter(jax.tree.leaves(args)[0].sharding.device_set))
    self.device = device


def pallas_wired() -> bool:
  import lmconv_jax

  return "pallas" in lmconv_jax.IMPLEMENTATIONS


def pool_fn(pass_, grouping, guided, implementation, direct):
  """The jitted function of one pass. ``direct``: lmconv_jax._pallas_tpu's
  functions (g at x's rank, as lmconv_jax's primitive hands it over);
  else lmconv_jax.grouped_landmark_pool with jax.jvp / jax.vjp."""
  import jax
  import lmconv_jax
  from lmconv_jax.directions import resolve_grouping

  if direct:
    from lmconv_jax import _pallas_tpu as k

    groups = resolve_grouping(grouping)
    if pass_ == "forward":
      return lambda x, g=None: k.grouped_forward(x, g, groups)
    if pass_ == "tangent":
      return lambda x, tx, g=None, tg=None: k.grouped_tangent(
        x, g, tx, tg, groups
      )
    return lambda x, ct, g=None: k.grouped_backward(x, g, ct, groups)

  pool = lambda x, g=None: lmconv_jax.grouped_landmark_pool(
    x, grouping, g, implementation=implementation
  )
  if pass_ == "forward":
    return pool
  if pass_ == "tangent":
    if guided:
      return lambda x, tx, g, tg: jax.jvp(pool, (x, g), (tx, tg))[1]
    return lambda x, tx: jax.jvp(pool, (x,), (tx,))[1]
  if guided:
    return lambda x, ct, g: jax.vjp(pool, x, g)[1](ct)
  return lambda x, ct: jax.vjp(pool, x)[1](ct)


def pool_name(platform, what, pass_, shape, dtype, guided):
  return (
    f"{platform} {what} {pass_} {shape_name(shape)} {dtype} "
    f"{'guide' if guided else 'plain'}"
  )


def pool_case(
  platform, grouping, pass_, shape, dtype, guided, implementation, direct=False
):
  import jax.numpy as jnp

  spec = on_device(tpu_device(platform))
  dt = jnp.dtype(dtype)
  x = spec(shape, dt)
  gshape = ((1,) * (len(shape) - 1) + shape[-1:]) if direct else shape[-1:]
  g = spec(gshape, dt)
  args = {"forward": (x,), "tangent": (x, x), "backward": (x, x)}[pass_]
  if guided:
    args += (g, g) if pass_ == "tangent" else (g,)
  name = pool_name(platform, grouping, pass_, shape, dtype, guided)
  return Case(
    name,
    pool_fn(pass_, grouping, guided, implementation, direct),
    args,
    "scan" if implementation == "reference" else "kernel",
  )


def layer_case(platform, layer, shape, dtype, guided, implementation):
  """A training step: loss = mean(layer(x)^2) and its grad over params, x."""
  import jax
  import jax.numpy as jnp
  import lmconv_jax

  cls_name, directions = LAYERS[layer]
  kw = {} if directions is None else {"directions": directions}
  if implementation != "auto":  # "auto": the layers' default, unset
    kw["implementation"] = implementation
  dt = jnp.dtype(dtype)
  module = getattr(lmconv_jax, cls_name)(
    features=shape[-1], kernel_size=(3, 3), dtype=dt, **kw
  )
  spec = on_device(tpu_device(platform))
  x = spec(shape, dt)
  g = spec(shape[-1:], dt) if guided else None
  # The parameters' shapes, traced on the host (the reference: nothing of the
  # pool's implementation matters for shapes).
  init_kw = dict(kw, implementation="reference")
  params = jax.eval_shape(
    getattr(lmconv_jax, cls_name)(
      features=shape[-1], kernel_size=(3, 3), dtype=dt, **init_kw
    ).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct(shape, dt),
    None if g is None else jax.ShapeDtypeStruct(g.shape, dt),
  )
  params = jax.tree.map(spec, params)

  def step(params, x, g=None):
    def loss(params, x):
      y = module.apply(params, x, g)
      return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return jax.grad(loss, argnums=(0, 1))(params, x)

  name = pool_name(platform, layer, "train-step", shape, dtype, guided)
  args = (params, x) + ((g,) if guided else ())
  return Case(
    name,
    step,
    args,
    "scan" if implementation == "reference" else "kernel",
    "layer",
  )


def all_cases(args, direct, layers_impl):
  import lmconv_jax

  if args.quick:
    shapes, dtypes, passes = SHAPES[:1], DTYPES[:1], ("forward", "backward")
    groupings, guides, layers = ("quadrants", "octants"), (False,), ()
  else:
    shapes, dtypes, passes = SHAPES, DTYPES, PASSES
    groupings, guides, layers = (
      tuple(lmconv_jax.GROUPINGS),
      (False, True),
      tuple(LAYERS),
    )
  if layers_impl == "off":
    layers = ()
  cases = []
  for platform in args.platforms:
    for shape in shapes:
      for dtype in dtypes:
        for guided in guides:
          for grouping in groupings:
            for pass_ in passes:
              cases.append(
                (
                  pool_name(platform, grouping, pass_, shape, dtype, guided),
                  functools.partial(
                    pool_case,
                    platform,
                    grouping,
                    pass_,
                    shape,
                    dtype,
                    guided,
                    args.implementation,
                    direct,
                  ),
                )
              )
          for layer in (
            layers if args.all_layer_shapes or shape in LAYER_SHAPES else ()
          ):
            cases.append(
              (
                pool_name(platform, layer, "train-step", shape, dtype, guided),
                functools.partial(
                  layer_case, platform, layer, shape, dtype, guided, layers_impl
                ),
              )
            )
  return [(n, m) for n, m in cases if all(t in n for t in args.only)]


# --------------------------------------------------------------------------
# Compiling one case.


def fmt_bytes(n):
  if n is None:
    return "-"
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{int(n)} B"


def bytes_accessed(cost):
  """cost_analysis()'s bytes accessed (a dict, or a list of one in older
  jax). A module of only a custom call has no total, just per-operand
  entries ("bytes accessed0{}", "bytes accessedout{}"): their sum."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  if "bytes accessed" in cost:
    return float(cost["bytes accessed"])
  parts = [v for k, v in cost.items() if k.startswith("bytes accessed")]
  return float(sum(parts)) if parts else None


def one_line(e: BaseException, limit=300):
  """An exception as one line: its first line, and the next one too when
  the first only names the error ("...: E1001: CompileTimeScopedVmemOom:")."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = type(e).__name__ + (": " + lines[0] if lines else "")
  if len(lines) > 1 and (text.endswith(":") or len(text) < 80):
    text += " " + lines[1]
  return text if len(text) <= limit else text[: limit - 3] + "..."


def compile_case(case):
  """Lowers and compiles; returns a dict of what was found."""
  import jax

  r = {"name": case.name, "group": case.group, "expect": case.expect}
  t0 = time.perf_counter()
  try:
    # The TPU as the default device, as in a TPU process: Pallas' lowering
    # asks it for the chip (pltpu.get_tpu_info(), e.g. for lax.sign), which
    # is the CPU here otherwise ("Unsupported TPU device kind: cpu").
    with jax.default_device(case.device):
      lowered = jax.jit(case.fn).trace(*case.args).lower()
      text = lowered.as_text()
      r["kernels"] = text.count(KERNEL_MARK)
      r["scans"] = text.count(SCAN_MARK)
      compiled = lowered.compile()
  except Exception as e:  # a compile error is this case's result
    r.update(ok=False, seconds=time.perf_counter() - t0, why=one_line(e))
    return r
  r["seconds"] = time.perf_counter() - t0
  try:
    r["bytes"] = bytes_accessed(compiled.cost_analysis())
  except Exception:
    r["bytes"] = None
  try:
    mem = compiled.memory_analysis()
    r["temp"] = None if mem is None else mem.temp_size_in_bytes
  except Exception:
    r["temp"] = None
  if case.expect == "kernel":
    r["ok"] = r["kernels"] > 0 and r["scans"] == 0
    if not r["ok"]:
      r["why"] = (
        f"{r['kernels']} {KERNEL_MARK}, {r['scans']} {SCAN_MARK} "
        f"(want >= 1 kernel and no reference scan)"
      )
  else:
    r["ok"] = r["scans"] > 0 and r["kernels"] == 0
    if not r["ok"]:
      r["why"] = (
        f"{r['kernels']} {KERNEL_MARK}, {r['scans']} {SCAN_MARK} "
        f"(want the reference's scan and no kernel)"
      )
  return r


def report_line(r, ok=None):
  ok = r["ok"] if ok is None else ok
  line = (
    f"{'PASS' if ok else 'FAIL'}  {r['name']:<58} "
    f"{r['seconds']:6.1f}s  bytes {fmt_bytes(r.get('bytes')):>8}  "
    f"temp {fmt_bytes(r.get('temp')):>8}"
  )
  if r.get("why"):
    line += f"  -- {r['why']}"
  return line


class Dumps:
  """Mosaic's dumps, staged in one folder (libtpu's flag is read once) and
  moved after each case into DIR/<case name>/."""

  def __init__(self, root):
    self.root = pathlib.Path(root) if root else None
    self.staging = None
    if self.root:
      self.root.mkdir(parents=True, exist_ok=True)
      self.staging = self.root / ".staging"
      shutil.rmtree(self.staging, ignore_errors=True)
      self.staging.mkdir()

  def collect(self, name):
    if not self.root:
      return None
    dest = self.root / name.replace(" ", "_").replace("(", "").replace(")", "")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for f in self.staging.iterdir():
      shutil.move(str(f), dest / f.name)
    return dest

  def close(self):
    if self.staging:
      shutil.rmtree(self.staging, ignore_errors=True)


def run_cases(cases, dumps):
  """Builds, compiles and reports each (name, builder) case; returns
  (passed, failed, results)."""
  passed = failed = 0
  results = []
  for name, make in cases:
    try:
      case = make()
    except Exception as e:  # building the case (tracing shapes) failed
      r = {"name": name, "ok": False, "seconds": 0.0, "why": one_line(e)}
      print(report_line(r), flush=True)
      failed += 1
      continue
    r = compile_case(case)
    r["dump"] = dumps.collect(case.name)
    results.append(r)
    print(report_line(r), flush=True)
    passed += r["ok"]
    failed += not r["ok"]
  return passed, failed, results


# --------------------------------------------------------------------------
# --selftest: the harness on a tiny Pallas kernel of its own.


def selftest_kernel():
  """A top-to-bottom running max over H (one image per grid step) with a
  custom VJP whose backward is a second Pallas kernel: the harness's
  stand-in for lmconv_jax's kernels."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import pallas as pl

  def fwd_kernel(x_ref, o_ref):
    o_ref[0, 0] = x_ref[0, 0]

    def body(i, prev):
      cur = jnp.maximum(x_ref[0, i], prev)
      o_ref[0, i] = cur
      return cur

    jax.lax.fori_loop(1, x_ref.shape[1], body, x_ref[0, 0])

  def bwd_kernel(x_ref, o_ref, ct_ref, dx_ref):
    h = x_ref.shape[1]

    def body(j, carry):  # rows bottom to top; carry: ct flowing upwards
      i = h - 1 - j
      total = ct_ref[0, i] + carry
      prev = o_ref[0, jnp.maximum(i - 1, 0)]
      wins = (x_ref[0, i] >= prev) | (i == 0)
      dx_ref[0, i] = jnp.where(wins, total, 0)
      return jnp.where(wins, 0, total)

    jax.lax.fori_loop(0, h, body, jnp.zeros_like(ct_ref[0, 0]))

  def call(kernel, n_in, x):
    spec = pl.BlockSpec((1,) + x.shape[1:], lambda b: (b, 0, 0, 0))
    return lambda *a: pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=(x.shape[0],),
      in_specs=[spec] * n_in,
      out_specs=spec,
    )(*a)

  @jax.custom_vjp
  def running_max(x):
    return call(fwd_kernel, 1, x)(x)

  def fwd(x):
    out = running_max(x)
    return out, (x, out)

  def bwd(res, ct):
    x, out = res
    return (call(bwd_kernel, 3, x)(x, out, ct),)

  running_max.defvjp(fwd, bwd)
  return running_max


def selftest_cases(platforms):
  """(case, should the check pass it) pairs: the kernel passes; the
  reference and a VMEM overflow must be reported as failures."""
  import jax
  import jax.numpy as jnp
  import lmconv_jax

  rmax = selftest_kernel()
  out = []
  for platform in platforms:
    spec = on_device(tpu_device(platform))
    x = spec((4, 16, 16, 128), jnp.float32)
    out.append(
      (Case(f"{platform} selftest-kernel forward", rmax, (x,), "kernel"), True)
    )
    out.append(
      (
        Case(
          f"{platform} selftest-kernel grad",
          jax.grad(lambda x: rmax(x).sum()),
          (x,),
          "kernel",
        ),
        True,
      )
    )
    ref = lambda x: lmconv_jax.grouped_landmark_pool(
      x, "quadrants", implementation="reference"
    )
    out.append(
      (
        Case(
          f"{platform} selftest-reference forward (must FAIL)",
          ref,
          (x,),
          "kernel",
        ),
        False,
      )
    )
    out.append(
      (
        Case(
          f"{platform} selftest-reference forward, expect=scan",
          ref,
          (x,),
          "scan",
        ),
        True,
      )
    )
    # Whole 32 MB images in and out, double-buffered: over the scoped VMEM.
    big = spec((2, 256, 256, 128), jnp.float32)
    out.append(
      (
        Case(
          f"{platform} selftest-kernel VMEM overflow (must FAIL)",
          rmax,
          (big,),
          "kernel",
        ),
        False,
      )
    )
  return out


def run_selftest(args, dumps):
  passed = failed = 0
  for case, should_pass in selftest_cases(args.platforms):
    r = compile_case(case)
    r["dump"] = dumps.collect(case.name)
    right = r["ok"] == should_pass
    if right and not should_pass:
      r["why"] = "detected: " + r.get("why", "")
    print(report_line(r, ok=right), flush=True)
    passed += right
    failed += not right
  if args.dump:  # the kernel's dumps hold the final stage, as a real one's
    d = dumps.root / f"{args.platforms[0]}_selftest-kernel_forward"
    stages = sorted(d.glob("*finalize-llo*")) if d.exists() else []
    right = bool(stages)
    print(
      f"{'PASS' if right else 'FAIL'}  selftest --dump: "
      f"{len(list(d.glob('*'))) if d.exists() else 0} Mosaic stages in "
      f"{d}",
      flush=True,
    )
    passed += right
    failed += not right
  return passed, failed


# --------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  dumps = Dumps(args.dump)
  jax = start_jax(str(dumps.staging) if dumps.staging else None)
  import lmconv_jax

  try:
    devs = {p: tpu_device(p) for p in args.platforms}
  except Exception as e:
    print(
      f"tpu_compile_check: no compile-only TPU device ({one_line(e)}); is "
      f"libtpu installed (scripts/tpu_compile_check.sh installs it)?",
      file=sys.stderr,
    )
    return 2
  print(
    f"jax {jax.__version__}, libtpu {libtpu_version()}, lmconv_jax from "
    f"{pathlib.Path(lmconv_jax.__file__).parent}; devices: "
    f"{', '.join(f'{p}={d.device_kind}' for p, d in devs.items())}",
    flush=True,
  )

  if args.selftest:
    passed, failed = run_selftest(args, dumps)
  else:
    wired = pallas_wired()
    direct = args.implementation == "pallas" and not wired
    if args.implementation == "pallas":
      if importlib.util.find_spec("lmconv_jax._pallas_tpu") is None:
        print(
          "tpu_compile_check: the kernels module lmconv_jax/_pallas_tpu.py "
          "does not exist yet: nothing to check",
          file=sys.stderr,
        )
        return 2
      try:
        import lmconv_jax._pallas_tpu  # noqa: F401
      except Exception as e:
        print(
          f"tpu_compile_check: lmconv_jax._pallas_tpu does not import: "
          f"{one_line(e)}",
          file=sys.stderr,
        )
        return 2
    layers_impl = args.layers or (
      "reference"
      if args.implementation == "reference"
      else "auto"
      if wired
      else "off"
    )
    print(
      f"pools: {'lmconv_jax._pallas_tpu directly' if direct else ''}"
      f"{'' if direct else 'grouped_landmark_pool(implementation=%r)' % args.implementation}"
      f"; layers: {layers_impl}"
      f"{'' if wired else ' (lmconv_jax has no implementation=pallas yet)'}",
      flush=True,
    )
    passed, failed, _ = run_cases(all_cases(args, direct, layers_impl), dumps)
  dumps.close()
  print(
    f"{passed} passed, {failed} failed ({time.perf_counter() - t_start:.0f} s)",
    flush=True,
  )
  return 0 if failed == 0 and passed > 0 else 1


def libtpu_version():
  try:
    import importlib.metadata as md

    return md.version("libtpu")
  except Exception:
    return "?"


if __name__ == "__main__":
  sys.exit(main())
