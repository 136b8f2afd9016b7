#!/usr/bin/env bash
# The GPU check: one command, from a clean checkout, on a machine with an
# NVIDIA GPU and no network, on the jax already installed there.
#
#   scripts/gpu_check.sh [OUTDIR] [--dry-run]
#
# Steps (expected times on one H200 with 16 cores; each step is also cut off
# at its limit, and all of them together at LMCONV_GPU_CHECK_BUDGET_S, 470 s
# by default, so the whole check ends within 8 minutes):
#   1. preflight  ~5 s    nvidia-smi sees a GPU (else: exit 3, one line),
#                         nvcc, python, jax versions
#   2. build      ~60 s   (limit 150 s) a venv with the system's site
#                         packages (.venv-gpu), `pip install --no-index
#                         --no-build-isolation --no-deps -e .`: the CPU and
#                         CUDA extensions against that jaxlib's FFI headers,
#                         and the device harness
#   3. harness    ~60 s   (limit 90 s) the device harness first, the fastest
#                         proof (tests/cuda_harness.cu: no JAX; every
#                         grouping, dtype, guide and pass on the GPU against
#                         the CPU kernels, bit for bit; one line per case)
#   4. tests      ~100 s  (limit 180 s) `pytest -m gpu tests`: the full grid
#                         on the GPU against the reference and the emulation
#   5. memcheck   ~40 s   (limit 75 s) scripts/gpu_sanitize_case.py under
#                         compute-sanitizer --tool memcheck
#   6. racecheck  ~40 s   (limit 75 s) the same under --tool racecheck
#   7. bench      ~120 s  (limit 150 s) benchmarks/bench_gpu.py: the kernels
#                         against a copy, the reference, lax.cummax, torch
#   8. report     ~2 s    OUTDIR/gpu_report.md and OUTDIR/gpu_results.json
#   total         ~7 min expected, 8 min at most
#
# OUTDIR (default: a new gpu_check_<UTC time> folder in the current
# directory; a relative OUTDIR is taken from there too) receives at most 8
# files: gpu_report.md, gpu_results.json and the logs (env.log, build.log,
# tests.log: the harness's lines, then pytest's; memcheck.log, racecheck.log,
# bench.log).
#
# --dry-run: no GPU needed; runs every step that can run without one: the
# build (or, with LMCONV_GPU_CHECK_PYTHON=/path/to/python, reuses that
# environment's lmconv_jax without building; where the base python has no
# jax, it reuses the project's .venv by itself), the harness's host twin
# (the CUDA bodies on the CPU, a quick grid), the gpu-marked tests (they
# skip), the sanitizer workload on the CPU without the sanitizer, the
# benchmark on the CPU with a tiny shape, and the report.
#
# Exit codes: 0 every step passed; 1 a step failed; 2 bad arguments;
# 3 no GPU (one line on stderr says why).
#
# Environment: LMCONV_GPU_CHECK_PYTHON (use this python, no build),
# LMCONV_GPU_CHECK_BASE_PYTHON (the python whose packages the venv sees;
# default python3, or the project's .venv where python3 has no jax),
# LMCONV_GPU_CHECK_VENV (default .venv-gpu),
# LMCONV_GPU_CHECK_BUDGET_S (default 470), LMCONV_GPU_CHECK_LIMIT_SCALE (an
# integer factor on each step's limit, for slow machines; default 1),
# NVIDIA_SMI (default nvidia-smi).
set -uo pipefail
CALLER_PWD=$(pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    *) if [ -n "$OUTDIR" ]; then
         echo "gpu_check: one OUTDIR only (got '$OUTDIR' and '$arg')" >&2; exit 2
       fi
       OUTDIR=$arg ;;
  esac
done

# --- 1. preflight: is there a GPU? ------------------------------------------
SMI=${NVIDIA_SMI:-nvidia-smi}
if [ "$DRY" = 0 ]; then
  if ! command -v "$SMI" >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here ('$SMI' not found); nothing was run (--dry-run runs the steps that need no GPU)" >&2
    exit 3
  fi
  if ! gpus=$("$SMI" -L 2>&1) || ! grep -q '^GPU ' <<<"$gpus"; then
    echo "gpu_check: no NVIDIA GPU here ('$SMI -L': $(head -n1 <<<"$gpus")); nothing was run (--dry-run runs the steps that need no GPU)" >&2
    exit 3
  fi
fi

START=$SECONDS
BUDGET=${LMCONV_GPU_CHECK_BUDGET_S:-470}
LIMIT_SCALE=${LMCONV_GPU_CHECK_LIMIT_SCALE:-1}
[ -n "$OUTDIR" ] || OUTDIR="gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
case "$OUTDIR" in /*) ;; *) OUTDIR="$CALLER_PWD/$OUTDIR" ;; esac
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PATH="/usr/local/cuda/bin:$PATH" PYTHONUNBUFFERED=1
STEPS="$WORK/steps.tsv"     # name, status, seconds, expected, limit, note
: >"$STEPS"
MODE=$([ "$DRY" = 1 ] && echo "dry run (no GPU)" || echo "GPU")
echo "gpu_check: $MODE; results in $OUTDIR (budget ${BUDGET} s)"

# run_step NAME EXPECTED LIMIT LOG CMD...: prints progress, times the step,
# cuts it off at min(LIMIT, what is left of the budget), records the result.
run_step() {
  local name=$1 expected=$2 limit=$(($3 * LIMIT_SCALE)) log=$4; shift 4
  local left=$((BUDGET - (SECONDS - START) - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%s\tnot-run\t0\t%s\t0\tno time left in the %s s budget\n' \
      "$name" "$expected" "$BUDGET" >>"$STEPS"
    echo "== $name: skipped (no time left)"; return 1
  fi
  echo "== $name (expect ~${expected} s, limit ${limit} s) -> $(basename "$log")"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0)) status=ok note=""
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=timeout; note="cut off at ${limit} s"
  elif [ "$rc" != 0 ]; then
    status=failed; note="exit code $rc"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$expected" \
    "$limit" "$note" >>"$STEPS"
  echo "   $name: $status in ${dt} s${note:+ ($note)}"
  if [ "$status" != ok ]; then
    tail -n 5 "$log" | sed 's/^/   | /'
    return 1
  fi
}

record() {  # record NAME STATUS NOTE: a step that ran no command
  printf '%s\t%s\t0\t0\t0\t%s\n' "$1" "$2" "$3" >>"$STEPS"
  echo "== $1: $2${3:+ ($3)}"
}

# --- 1. preflight (continued): the environment ------------------------------
ENVLOG="$OUTDIR/env.log"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $MODE"
  echo "checkout: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ', with local changes'))"
  echo "uname: $(uname -srm)"
  echo "cpus: $(nproc)"
  if command -v "$SMI" >/dev/null 2>&1; then
    "$SMI" --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || true
  else
    echo "nvidia-smi: not found"
  fi
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1 || echo 'not found')"
  echo "compute-sanitizer: $(compute-sanitizer --version 2>/dev/null | grep -i version | head -n 1 || echo 'not found')"
  echo "cmake: $(cmake --version 2>/dev/null | head -n 1 || echo 'not found')"
} >"$ENVLOG" 2>&1

# --- 2. build ----------------------------------------------------------------
BUILDLOG="$OUTDIR/build.log"
# A dry run works anywhere: where the base python has no jax (a machine
# whose python3 is bare), the project's own .venv (scripts/setup.sh) has
# this checkout's lmconv_jax, so the dry run reuses it instead of failing.
if [ -z "${LMCONV_GPU_CHECK_PYTHON:-}" ] && [ "$DRY" = 1 ] &&
   ! "${LMCONV_GPU_CHECK_BASE_PYTHON:-python3}" -c 'import jax' >/dev/null 2>&1 &&
   "$REPO/.venv/bin/python" -c 'import jax, lmconv_jax' >/dev/null 2>&1; then
  LMCONV_GPU_CHECK_PYTHON="$REPO/.venv/bin/python"
  echo "gpu_check: ${LMCONV_GPU_CHECK_BASE_PYTHON:-python3} has no jax; the dry run reuses $LMCONV_GPU_CHECK_PYTHON"
fi
if [ -n "${LMCONV_GPU_CHECK_PYTHON:-}" ]; then
  PY=$LMCONV_GPU_CHECK_PYTHON
  record build reused "LMCONV_GPU_CHECK_PYTHON=$PY: its lmconv_jax, not rebuilt"
  echo "build: reused $PY (LMCONV_GPU_CHECK_PYTHON), not rebuilt" >"$BUILDLOG"
else
  BASE=${LMCONV_GPU_CHECK_BASE_PYTHON:-python3}
  VENV=${LMCONV_GPU_CHECK_VENV:-$REPO/.venv-gpu}
  PY="$VENV/bin/python"
  CUDA_FLAG=ON
  if [ "$DRY" = 1 ] && ! command -v nvcc >/dev/null 2>&1; then CUDA_FLAG=AUTO; fi
  build() {
    set -e
    if [ ! -x "$PY" ]; then
      # Without ensurepip in the base, a venv without pip: the base's pip
      # then installs into it (pip --python).
      "$BASE" -m venv --system-site-packages "$VENV" ||
        { rm -rf "$VENV"; "$BASE" -m venv --system-site-packages --without-pip "$VENV"; }
      # If the base python is itself a venv (the GPU image's python3 is),
      # --system-site-packages shows the interpreter's packages, not the
      # venv's: name the base's site folders in a .pth (processed before our
      # own editable install's, so ours wins if the base has lmconv_jax).
      local site
      site=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
      "$BASE" - "$site" <<'EOF'
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()]]
with open(sys.argv[1] + "/00_gpu_check_base_site.pth", "w") as f:
  for d in dirs:
    f.write(f"import site; site.addsitedir({d!r})\n")
EOF
    fi
    "$PY" -c 'import jax, jaxlib, nanobind, scikit_build_core; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)'
    local pip=("$PY" -m pip)
    "$PY" -m pip --version >/dev/null 2>&1 || pip=("$BASE" -m pip --python "$PY")
    # nvcc --threads 0: the CUDA architectures compile in parallel.
    "${pip[@]}" install --no-index --no-build-isolation --no-deps -v \
      -C "build-dir=build/gpu-check-{wheel_tag}" \
      -C "cmake.define.LMCONV_CUDA=$CUDA_FLAG" \
      -C "cmake.define.LMCONV_EMULATOR=ON" \
      -C "cmake.define.CMAKE_CUDA_FLAGS=--threads=0" -e "$REPO"
    # The lmconv_jax that imports is this checkout's, built just now.
    "$PY" - "$REPO" "$VENV" <<'EOF'
import os, sys
import lmconv_jax, lmconv_jax._lmconv_cpu as ext
repo, venv = (os.path.realpath(p) for p in sys.argv[1:])
assert os.path.realpath(lmconv_jax.__file__).startswith(repo), lmconv_jax.__file__
assert os.path.realpath(ext.__file__).startswith(venv), ext.__file__
print("lmconv_jax from", lmconv_jax.__file__, "extension", ext.__file__)
EOF
  }
  export -f build
  export PY BASE VENV REPO CUDA_FLAG
  run_step build 60 150 "$BUILDLOG" bash -c build
fi
BUILD_OK=1
grep -q $'^build\t\(ok\|reused\)\t' "$STEPS" || BUILD_OK=0
if [ "$BUILD_OK" = 0 ]; then
  SKIP_ALL=1
elif ! "$PY" - "$REPO" >>"$BUILDLOG" 2>&1 <<'EOF'
import os, sys
import lmconv_jax
here = os.path.realpath(lmconv_jax.__file__)
sys.exit(None if here.startswith(os.path.realpath(sys.argv[1]) + os.sep)
         else f"lmconv_jax imports from {here}, not from this checkout")
EOF
then
  echo "gpu_check: this checkout's lmconv_jax does not import with $PY; see build.log" | tee -a "$BUILDLOG"
  record import failed "this checkout's lmconv_jax does not import with $PY"
  SKIP_ALL=1
else
  SKIP_ALL=0
  "$PY" -m lmconv_jax info >>"$ENVLOG" 2>&1 || true
  "$PY" -c 'import jax; print("jax devices:", jax.devices())' >>"$ENVLOG" 2>&1 || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' >>"$ENVLOG" 2>&1 || echo "torch: not importable" >>"$ENVLOG"
fi
if [ "$DRY" = 0 ] && [ "$SKIP_ALL" = 0 ] &&
   ! "$PY" -c 'import jax, sys; sys.exit(not jax.devices("gpu"))' >>"$ENVLOG" 2>&1; then
  echo "gpu_check: nvidia-smi sees a GPU but JAX does not (no CUDA plugin in this jax?); see env.log" | tee -a "$ENVLOG"
  record jax-gpu failed "nvidia-smi sees a GPU, JAX does not"
  SKIP_ALL=1
fi

if [ "$SKIP_ALL" = 1 ]; then
  for s in harness tests memcheck racecheck bench; do record "$s" not-run "no working build"; done
else
  # --- 3. the device harness, first: no JAX between the kernels and the check
  # Its binaries are where this build put them (the emulator module knows).
  HARNESS=$("$PY" -c 'from lmconv_jax import _lmconv_cuda_emu as e
i = e.build_info()
print(i.get("harness_cuda", ""), i.get("harness_host", ""), sep="\n")' 2>/dev/null)
  HARNESS_CUDA=$(sed -n 1p <<<"$HARNESS")
  HARNESS_HOST=$(sed -n 2p <<<"$HARNESS")
  echo "== device harness (tests/cuda_harness.cu)" >>"$OUTDIR/tests.log"
  if [ "$DRY" = 0 ] && [ -x "$HARNESS_CUDA" ]; then
    run_step harness 60 90 "$OUTDIR/tests.log" \
      "$HARNESS_CUDA" --tsv "$WORK/harness.tsv"
  elif [ "$DRY" = 0 ]; then
    record harness failed "the device harness was not built (${HARNESS_CUDA:-no path}): see build.log"
  elif [ -x "$HARNESS_HOST" ]; then
    # No GPU: its host twin runs the grid, the comparison and the poison check.
    run_step harness 20 90 "$OUTDIR/tests.log" \
      "$HARNESS_HOST" --quick --tsv "$WORK/harness.tsv"
  else
    record harness skipped "dry run: this build has no harness host twin"
  fi
  echo "== pytest -m gpu tests" >>"$OUTDIR/tests.log"

  # --- 4. the gpu-marked tests (the full grid) -------------------------------
  run_step tests 100 180 "$OUTDIR/tests.log" \
    "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
      --junitxml="$WORK/junit.xml" tests

  # --- 5./6. compute-sanitizer over a small grid -----------------------------
  CASE=(scripts/gpu_sanitize_case.py)
  if [ "$DRY" = 1 ]; then
    run_step memcheck 15 60 "$OUTDIR/memcheck.log" \
      "$PY" "${CASE[@]}" --platform cpu --quick
    record racecheck skipped "dry run: the sanitizer workload ran once, on the CPU, under memcheck's step"
    echo "dry run: racecheck needs a GPU" >"$OUTDIR/racecheck.log"
  elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    record memcheck skipped "compute-sanitizer not found"
    record racecheck skipped "compute-sanitizer not found"
  else
    for tool in memcheck racecheck; do
      # --report-api-errors no: XLA probes CUDA with calls that fail by design;
      # a failed launch of ours still raises in Python. No kernel filter: a
      # filter that matched nothing would pass silently.
      run_step "$tool" 40 75 "$OUTDIR/$tool.log" \
        compute-sanitizer --tool "$tool" --error-exitcode 9 \
          --report-api-errors no --print-limit 50 \
          "$PY" "${CASE[@]}" --quick
    done
  fi

  # --- 7. the benchmark --------------------------------------------------------
  if [ "$DRY" = 1 ]; then
    run_step bench 20 60 "$OUTDIR/bench.log" \
      "$PY" benchmarks/bench_gpu.py --platform cpu --quick \
        --ops top_left,quadrants --json "$WORK/bench.json" \
        --markdown "$WORK/bench.md"
  else
    # The benchmark stops itself before its limit: the slow peers (the
    # reference, torch) are dropped after half of it, new rows after all
    # but 25 s of it, so its tables are written whatever happens.
    lim=$((BUDGET - (SECONDS - START) - 5)); [ "$lim" -gt 150 ] && lim=150
    stop=$((lim - 25)); [ "$stop" -gt 1 ] || stop=1
    run_step bench 120 150 "$OUTDIR/bench.log" \
      "$PY" benchmarks/bench_gpu.py --budget-s $((lim / 2)) --stop-s "$stop" \
        --json "$WORK/bench.json" --markdown "$WORK/bench.md"
  fi
fi

# --- 8. the report: it also decides the exit code ------------------------------
# (a sanitizer that refuses the device is "unsupported", not a failure).
REPORT_PY=$PY
"$REPORT_PY" -c 'import json' 2>/dev/null || REPORT_PY=python3
"$REPORT_PY" scripts/gpu_check_report.py --outdir "$OUTDIR" --work "$WORK" \
  --mode "$([ "$DRY" = 1 ] && echo dry-run || echo gpu)" \
  --seconds $((SECONDS - START)) --budget "$BUDGET"
rc=$?
[ "$rc" = 0 ] || [ "$rc" = 1 ] || rc=1
echo "gpu_check: $([ "$rc" = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED') in $((SECONDS - START)) s; report: $OUTDIR/gpu_report.md"
exit "$rc"
