"""The command line: ``python -m lmconv_jax {demo,info,bench}``.

Exit codes: 0 success; 2 a bad command line or option value (nothing ran);
3 something the command needs is missing here (FFI kernels asked for but not
built, the benchmark module absent); 130 interrupted. A user's mistake gets
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_INTERRUPTED = 0, 2, 3, 130

EPILOG = """exit codes: 0 success, 2 bad arguments, 3 a needed component is
missing (kernels, benchmark module), 130 interrupted."""


class UsageError(Exception):
  """A bad option value found after parsing: exit 2, one line, no traceback."""


class MissingError(Exception):
  """Something the command needs is not installed or built: exit 3."""


# --------------------------------------------------------------------------
# Argument types: each error message names what was given and what is valid.


def _positive(convert, noun: str):
  """An argument type: text -> convert(text), which must be > 0 (not NaN)."""

  def parse(text: str):
    error = argparse.ArgumentTypeError(
      f"expected a positive {noun}, got {text.strip()!r}"
    )
    try:
      value = convert(text)
    except ValueError:
      raise error from None
    if not value > 0:
      raise error
    return value

  return parse


_positive_int = _positive(int, "integer")
_positive_float = _positive(float, "number")


def _seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
  return value


def _models(text: str) -> tuple[str, ...]:
  from lmconv_jax.demo.models import KINDS

  keys = tuple(k.strip() for k in text.split(",") if k.strip())
  if text.strip() == "all":
    return tuple(KINDS)
  bad = [k for k in keys if k not in KINDS]
  if bad or not keys:
    raise argparse.ArgumentTypeError(
      f"unknown model {', '.join(map(repr, bad)) or repr(text)}; expected a "
      f"comma-separated list from {', '.join(KINDS)} (or 'all')"
    )
  return keys


def _shape(text: str) -> tuple[int, ...]:
  """bench --shape: (..., H, W, C), at least 3 positive integers (C is checked
  against the sections in cmd_bench)."""
  try:
    dims = tuple(int(s) for s in text.replace("x", ",").split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated integers like 8,64,64,64, got {text!r}"
    )
  if len(dims) < 3 or min(dims) < 1:
    raise argparse.ArgumentTypeError(
      f"expected at least 3 positive dims (..., H, W, C) like 8,64,64,64, "
      f"got {text!r}"
    )
  return dims


# The bench sections whose pools split C into 8 channel groups (the octants,
# LandmarkConv8), so that C must be a multiple of 8.
SECTIONS_C8 = ("grouping", "dtype", "layers")


def check_bench_shape(shape: Sequence[int], sections: Sequence[str]) -> None:
  """A UsageError (exit 2, before anything runs) for a C the sections cannot
  split; nothing for a good shape."""
  needs = [s for s in sections if s in SECTIONS_C8]
  c = shape[-1]
  if needs and c % 8:
    good = ",".join(map(str, (*shape[:-1], max(8, c // 8 * 8))))
    raise UsageError(
      f"--shape {','.join(map(str, shape))}: C = {c} is not a multiple of 8, "
      f"which the {', '.join(needs)} "
      f"{'sections need' if len(needs) > 1 else 'section needs'} "
      f"(octants: 8 channel groups). Give C a multiple of 8 (e.g. --shape "
      f"{good}), or run only --sections guide,wide."
    )


SECTIONS = ("grouping", "guide", "dtype", "wide", "layers")


def _sections(text: str) -> tuple[str, ...]:
  names = tuple(t.strip() for t in text.split(",") if t.strip())
  for n in names:
    if n not in SECTIONS:
      raise argparse.ArgumentTypeError(
        f"unknown section {n!r}; expected a comma-separated list of "
        f"{', '.join(SECTIONS)}"
      )
  if not names:
    raise argparse.ArgumentTypeError("expected at least one section")
  return names


# --------------------------------------------------------------------------
# demo


def _default_out() -> pathlib.Path:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  out = pathlib.Path(f"lmconv_demo_{stamp}")
  k = 1
  while out.exists():
    k += 1
    out = pathlib.Path(f"lmconv_demo_{stamp}-{k}")
  return out


# What `demo` imports beyond the library: the [demo] extra.
DEMO_EXTRA = ("optax", "tqdm", "matplotlib")


def _require_demo_extra(names=DEMO_EXTRA, command: str = "demo") -> None:
  """One line naming what to install when the [demo] extra is missing."""
  missing = []
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise UsageError(
      f"the {command} needs {', '.join(missing)}, which come with the demo "
      f"extra: pip install 'lmconv-jax[demo]' (in a checkout: pip install "
      f"-e '.[demo]')"
    )


def _check_writable_folder(out: pathlib.Path, option: str) -> None:
  """Creates ``out`` and writes a probe file there, so that a run never ends
  unable to save its results (``os.access`` is no test for root)."""
  if out.exists() and not out.is_dir():
    raise UsageError(f"{option} {str(out)!r} exists and is not a folder.")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(
      f"{option} {str(out)!r}: cannot create the folder ({e.strerror})."
    )
  try:
    with tempfile.NamedTemporaryFile(dir=out, prefix=".lmconv_write_check"):
      pass
  except OSError as e:
    raise UsageError(
      f"{option} {str(out)!r}: cannot write there "
      f"({e.strerror}); pick another folder."
    ) from None


def cmd_demo(args) -> int:
  _require_demo_extra(
    [n for n in DEMO_EXTRA if n != "matplotlib" or not args.no_figures]
  )
  from lmconv_jax.demo.experiment import DemoConfig, format_table, run_demo
  from lmconv_jax import ops

  overrides = {
    k: v
    for k, v in dict(
      image_size=args.image_size,
      max_distance=args.max_distance,
      features=args.features,
      train_size=args.train_size,
      test_size=args.test_size,
      steps=args.steps,
      batch_size=args.batch_size,
      learning_rate=args.learning_rate,
      seed=args.seed,
      models=args.models,
      implementation=args.implementation,
    ).items()
    if v is not None
  }
  config = (
    DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
  )
  try:
    config.validate()
  except ValueError as e:
    # The config's field names, as the options the user typed.
    msg = str(e)
    for field in dataclasses.fields(config):
      msg = re.sub(
        rf"\b{field.name}\b", "--" + field.name.replace("_", "-"), msg
      )
    raise UsageError(msg) from None
  try:
    ops.resolve_implementation(config.implementation, "demo --implementation")
  except NotImplementedError as e:
    raise MissingError(str(e)) from None
  out = pathlib.Path(args.out) if args.out else _default_out()
  _check_writable_folder(out, "--out")
  log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
  results = run_demo(
    config,
    out,
    progress=not (args.no_progress or args.quiet),
    figures=not args.no_figures,
    log=log,
    command=" ".join(["python -m lmconv_jax", *args.argv]),
  )
  print()
  print(format_table(results))
  print()
  print(results["verdict"])
  if args.quick:
    print(
      "(--quick is a smoke test of the install and the pipeline, too "
      "small to show the effect; run the demo without --quick for the "
      "comparison.)"
    )
  files = ["results.json"] + results["figures"]
  print(
    f"wrote {', '.join(files)} to {out}/ ({results['total_seconds']:.0f} s "
    f"in all)"
  )
  return EXIT_OK


# --------------------------------------------------------------------------
# info


def _version(module: str) -> Optional[str]:
  try:
    return getattr(importlib.import_module(module), "__version__", "?")
  except ImportError:
    return None


CUDA_HINT = (
  "To get the CUDA kernels: on a Linux machine with an NVIDIA GPU, install "
  "the CUDA toolkit and a CUDA build of jax for the same major version "
  "({jax_cuda}), put nvcc on PATH (e.g. export "
  "PATH=/usr/local/cuda/bin:$PATH) and rebuild from the source checkout: "
  "./scripts/setup.sh (or .venv/bin/python -m pip install "
  "--no-build-isolation -e .). CMake compiles the CUDA code whenever it "
  "finds nvcc."
)


def _nvcc_cuda_version() -> Optional[str]:
  """The CUDA version of the nvcc on PATH, e.g. "13.0", or None."""
  nvcc = shutil.which("nvcc")
  if nvcc is None:
    return None
  try:
    text = subprocess.run(
      [nvcc, "--version"], capture_output=True, text=True, timeout=20
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  found = re.search(r"release (\d+\.\d+)", text)
  return found.group(1) if found else None


def cuda_advice(
  build: dict, gpu_seen: bool, nvcc_version: Optional[str] = None
) -> Optional[str]:
  """How to get or use the CUDA kernels, for the CUDA version they were built
  with (build_info's "cuda_runtime"), else nvcc's; None if nothing to do."""
  cuda = build.get("cuda") or {}
  if cuda.get("built"):
    if gpu_seen:
      return None
    runtime = cuda.get("cuda_runtime")
    if not runtime:
      return None
    major = str(runtime).split(".")[0]
    return (
      f"The CUDA kernels are built (CUDA {runtime}) but JAX sees no "
      f"GPU: to run them, on a machine with an NVIDIA GPU, install "
      f'jax\'s CUDA {major} build: pip install -U "jax[cuda{major}]".'
    )
  if nvcc_version:
    major = nvcc_version.split(".")[0]
    jax_cuda = (
      f'nvcc here is CUDA {nvcc_version}: pip install -U "jax[cuda{major}]"'
    )
  else:
    jax_cuda = (
      'pip install -U "jax[cuda13]" for CUDA 13, "jax[cuda12]" for CUDA 12'
    )
  return CUDA_HINT.format(jax_cuda=jax_cuda)


def gather_info() -> dict:
  import jax
  import lmconv_jax
  from lmconv_jax import _ffi, _primitives, ops

  try:
    build = _ffi.build_info()
  except Exception as e:  # noqa: BLE001 - a diagnostic: report
    build = {"error": f"{type(e).__name__}: {e}"}
  kernels = {}
  for plat in ("cpu", "cuda"):
    entry = dict(build.get(plat, {}))
    built = bool(entry.get("built", _ffi.has_kernels(plat)))
    # The handlers dispatch on every dtype ops.py accepts.
    dtypes = entry.get("dtypes") or (list(ops.DTYPE_NAMES) if built else [])
    kernels[plat] = dict(
      built=built,
      dtypes=list(dtypes),
      **{k: v for k, v in entry.items() if k not in ("built", "dtypes")},
    )
  devices = [
    dict(id=d.id, platform=d.platform, kind=d.device_kind, name=str(d))
    for d in jax.devices()
  ]
  platform_ = ops.platform()
  try:
    auto = ops.resolve_implementation("auto", "info")
  except Exception:  # noqa: BLE001 - reported, not raised
    auto = "?"
  gpu_without_kernels = platform_ in ("cuda", "rocm") and not _ffi.has_kernels(
    platform_
  )
  return dict(
    lmconv_jax=dict(
      version=lmconv_jax.__version__,
      path=str(pathlib.Path(lmconv_jax.__file__).parent),
    ),
    versions=dict(
      python=platform.python_version(),
      jax=jax.__version__,
      jaxlib=_version("jaxlib"),
      flax=_version("flax"),
      optax=_version("optax"),
      numpy=_version("numpy"),
    ),
    kernels=kernels,
    build_info_error=build.get("error"),
    pallas=dict(
      platforms=list(_primitives.PALLAS_PLATFORMS),
      dtypes=[d.name for d in _primitives.PALLAS_TPU_DTYPES],
    ),
    default_backend=jax.default_backend(),
    platform=platform_,
    devices=devices,
    auto_implementation=auto,
    cuda_hint=cuda_advice(
      dict(build, cuda=kernels["cuda"]),
      gpu_seen=any(d["platform"] in ("gpu", "cuda") for d in devices),
      nvcc_version=(None if kernels["cuda"]["built"] else _nvcc_cuda_version()),
    ),
    warning=(
      "JAX sees a GPU but the CUDA kernels are not built: landmark "
      "pools run the pure-jnp reference there (much slower)."
      if gpu_without_kernels
      else None
    ),
  )


def cmd_info(args) -> int:
  info = gather_info()
  if args.json:
    print(json.dumps(info, indent=1))
    return EXIT_OK
  lm = info["lmconv_jax"]
  print(f"lmconv_jax {lm['version']}  ({lm['path']})")
  print(
    "versions: "
    + ", ".join(
      f"{k} {v or 'not installed'}" for k, v in info["versions"].items()
    )
  )
  print("kernels (XLA FFI):")
  for plat, k in info["kernels"].items():
    if k["built"]:
      extra = ", ".join(
        f"{key} {k[key]}"
        for key in ("compiler", "nanobind", "xla_ffi_api", "jaxlib_headers")
        if key in k
      )
      print(
        f"  {plat:<5} built  dtypes: {', '.join(k['dtypes'])}"
        + (f"  ({extra})" if extra else "")
      )
      if "file" in k:
        print(f"        {k['file']}")
    else:
      reason = f" ({k['error']})" if k.get("error") else ""
      print(f"  {plat:<5} not built{reason}")
  pk = info["pallas"]
  print("kernels (Pallas):")
  print(
    f"  {'/'.join(pk['platforms'])}   Pallas (Mosaic TPU), compiled by jax "
    f"when first called; dtypes: {', '.join(pk['dtypes'])} (others: the "
    f'reference); elsewhere implementation="pallas" runs them in '
    f"interpret mode"
  )
  print(f"devices (default backend: {info['default_backend']}):")
  for d in info["devices"]:
    print(f"  {d['name']}  [{d['kind']}]")
  auto = info["auto_implementation"]
  runs = {"ffi": "the FFI kernels", "pallas": "the Pallas kernels"}.get(
    auto, "the pure-jnp reference"
  )
  print(f'implementation="auto" runs: {runs} on {info["platform"]}')
  if info["warning"]:
    print(f"warning: {info['warning']}")
  if info["build_info_error"]:
    print(
      f"warning: the kernels' build_info() failed: {info['build_info_error']}"
    )
  if info["cuda_hint"]:
    print(info["cuda_hint"])
  return EXIT_OK


# --------------------------------------------------------------------------
# bench


def cmd_bench(args) -> int:
  from lmconv_jax import ops

  if args.shape:  # (the default shape suits every section)
    check_bench_shape(args.shape, args.sections or SECTIONS)
  _require_demo_extra(("tqdm",), "benchmark")  # its progress bar
  bench = importlib.import_module("lmconv_jax.benchmark")
  try:  # the suite times the FFI kernels: they must exist
    ops.resolve_implementation("ffi", "bench")
  except NotImplementedError as e:
    raise MissingError(str(e)) from None
  if args.dtype == "float64":
    import jax

    jax.config.update("jax_enable_x64", True)
  rows = bench.run(
    shape=args.shape or bench.DEFAULT_SHAPE,
    dtype=args.dtype or "float32",
    repeats=args.repeats or 8,
    progress=not args.no_progress,
    sections=args.sections or SECTIONS,
  )
  machine = bench.machine()
  table = bench.markdown(rows, machine)
  print(table)
  if args.markdown:
    pathlib.Path(args.markdown).write_text(table)
    print(f"wrote {args.markdown}", file=sys.stderr)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(machine=machine, rows=rows), f, indent=1, default=str)
    print(f"wrote {args.json}", file=sys.stderr)
  return EXIT_OK


def _writable(text: str) -> str:
  """An output file name that can be written: checked (by opening it for
  appending, and removing it again if it was new) before anything runs."""
  path = pathlib.Path(text)
  parent = path.resolve().parent
  if not parent.is_dir():
    raise argparse.ArgumentTypeError(f"folder {str(parent)!r} does not exist")
  if path.is_dir():
    raise argparse.ArgumentTypeError(
      f"{text!r} is a folder, expected a file name"
    )
  existed = path.exists()
  try:
    with open(path, "a"):
      pass
  except OSError as e:
    raise argparse.ArgumentTypeError(
      f"cannot write {text!r} ({e.strerror})"
    ) from None
  if not existed:
    path.unlink()
  return text


# --------------------------------------------------------------------------
# The parser.


def build_parser() -> argparse.ArgumentParser:
  from lmconv_jax import __version__, ops

  parser = argparse.ArgumentParser(
    prog="python -m lmconv_jax",
    description="Landmark convolution for JAX: a demo, the build and "
    "device information, and the benchmark suite.",
    epilog=EPILOG,
  )
  parser.add_argument(
    "--version", action="version", version=f"lmconv_jax {__version__}"
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  d = sub.add_parser(
    "demo",
    help="train box, dilated and landmark convolutions on a "
    "spatial-relation task; print a table, write figures",
    description="Trains four models with the same parameter count and "
    "budget - a 3x3 conv stack, a dilated conv stack, "
    "LandmarkConv4 and LandmarkConv8 - to tell where a plus is "
    "relative to a ring (left of, right of, above, below), "
    "often farther apart than a 3x3 stack can see. Prints a "
    "table and writes results.json and figures to --out. "
    "The default run takes a few minutes on 2 CPU cores.",
    epilog=EPILOG,
  )
  d.add_argument(
    "--out",
    metavar="DIR",
    help="folder for results.json and the figures (created; "
    "files in it are overwritten). Default: a new "
    "lmconv_demo_YYYYmmdd-HHMMSS in the current folder",
  )
  d.add_argument(
    "--quick",
    action="store_true",
    help="a tiny run (24x24 images, 100 steps): seconds, for "
    "tests; too small to show the long-range effect",
  )
  d.add_argument(
    "--seed", type=_seed, metavar="N", help="random seed (default 0)"
  )
  d.add_argument(
    "--models",
    type=_models,
    metavar="LIST",
    help="comma-separated, from box, dilated, lm4, lm8 (default: all four)",
  )
  d.add_argument(
    "--steps",
    type=_positive_int,
    metavar="N",
    help="training steps per model (default 400; --quick 100)",
  )
  d.add_argument(
    "--batch-size",
    type=_positive_int,
    metavar="N",
    help="default 32 (--quick 16)",
  )
  d.add_argument(
    "--learning-rate",
    type=_positive_float,
    metavar="LR",
    help="Adam learning rate, cosine-decayed (default 3e-3)",
  )
  d.add_argument(
    "--features",
    type=_positive_int,
    metavar="N",
    help="channels of every convolution; a multiple of 8 for lm8 (default 16)",
  )
  d.add_argument(
    "--image-size",
    type=_positive_int,
    metavar="PX",
    help="image height and width (default 40; --quick 24)",
  )
  d.add_argument(
    "--max-distance",
    type=_positive_int,
    metavar="PX",
    help="farthest plus-ring distance, at most image-size / 2 "
    "(default image-size / 2)",
  )
  d.add_argument(
    "--train-size",
    type=_positive_int,
    metavar="N",
    help="training images (default 8000; --quick 1024)",
  )
  d.add_argument(
    "--test-size",
    type=_positive_int,
    metavar="N",
    help="test images (default 2000; --quick 256)",
  )
  d.add_argument(
    "--implementation",
    choices=ops.IMPLEMENTATIONS,
    help="landmark pool implementation (default auto: the FFI "
    "kernels where built)",
  )
  d.add_argument(
    "--no-figures",
    action="store_true",
    help="skip the figures (results.json and the table only)",
  )
  d.add_argument("--no-progress", action="store_true", help="no progress bars")
  d.add_argument(
    "-q",
    "--quiet",
    action="store_true",
    help="no progress and no log: only the table, the verdict "
    "and where the files went",
  )
  d.set_defaults(func=cmd_demo, parser=d)

  i = sub.add_parser(
    "info",
    help="versions, compiled kernels and their dtypes, devices, "
    "and how to get the CUDA kernels",
    description="Shows the versions of lmconv_jax and its dependencies, "
    "which platforms and dtypes have compiled FFI kernels, the "
    "devices JAX sees, what implementation='auto' runs here, "
    "and how to build the CUDA kernels if they are missing.",
    epilog=EPILOG,
  )
  i.add_argument("--json", action="store_true", help="print JSON instead")
  i.set_defaults(func=cmd_info, parser=i)

  b = sub.add_parser(
    "bench",
    help="time the landmark pool (FFI kernels against the "
    "reference) and print a table",
    description="Runs the benchmark suite (lmconv_jax.benchmark) with a "
    "progress bar and prints a markdown table: each row's time "
    "over a baseline timed in the same run (the 'over' "
    "column), and the target ratio where there is one; a "
    "legend follows the table. --json and --markdown also "
    "write it to files. Options left out take the suite's "
    "defaults. The targets are for the default shape on a "
    "quiet 2-core CPU; load from other processes distorts the "
    "ratios. docs/benchmarks.md has the sections, the targets "
    "and the measured numbers.",
    epilog=EPILOG,
  )
  b.add_argument(
    "--shape",
    type=_shape,
    metavar="B,H,W,C",
    help="input shape (..., H, W, C), at least 3 positive "
    "integers (default 8,64,64,64, the targets' shape); "
    "C must be a multiple of 8 for "
    "the grouping, dtype and layers sections (octants: 8 "
    "channel groups)",
  )
  b.add_argument(
    "--dtype", choices=ops.DTYPE_NAMES, help="dtype of x (default float32)"
  )
  b.add_argument(
    "--sections",
    type=_sections,
    metavar="LIST",
    help=f"comma-separated, from {', '.join(SECTIONS)} (all)",
  )
  b.add_argument(
    "--repeats",
    type=_positive_int,
    metavar="N",
    help="timed turns per measurement (default 8; each stops "
    "early after about 6 s)",
  )
  b.add_argument(
    "--json",
    type=_writable,
    metavar="FILE",
    help="also write the rows (and the machine) as JSON",
  )
  b.add_argument(
    "--markdown",
    type=_writable,
    metavar="FILE",
    help="also write the table as markdown",
  )
  b.add_argument("--no-progress", action="store_true", help="no progress bar")
  b.set_defaults(func=cmd_bench, parser=b)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  # Exits with 2 on a bad command line. An option the command does not know
  # is reported with that command's usage (parse_args would show the
  # top-level one).
  args, unknown = parser.parse_known_args(argv)
  if unknown:
    args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  args.argv = argv
  prog = f"{parser.prog} {args.command}"
  try:
    return args.func(args)
  except UsageError as e:  # one line, no usage: it parsed
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except MissingError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_MISSING
  except KeyboardInterrupt:
    print(f"\n{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except BrokenPipeError:  # e.g. `... | head`
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK
