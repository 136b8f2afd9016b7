#!/usr/bin/env bash
# Creates a venv with Python >= 3.12 and installs lmconv_jax (editable) with its
# test and build requirements. The CUDA kernels are compiled when `nvcc` is found.
# Idempotent: a second run only rebuilds the extension.
#
#   scripts/setup.sh            .venv: the newest supported jax/jaxlib/flax
#   scripts/setup.sh --lowest   .venv-lowest: the lowest supported ones
#                               (jax/jaxlib 0.11.2, flax 0.12.10), the
#                               extension built against 0.11.2's FFI headers
#
#   scripts/setup.sh --print-python
#                               print the Python >= 3.12 it would make the
#                               venv with, and exit (README's by-hand recipe)
#
# The build: a clean build of the extensions takes about 3 minutes on a quiet
# 2-core machine (several times that on a busy one); a rebuild compiles only
# what changed. It prints the compiler's progress, one "[done/total]" line per
# compiled step, and keeps pip's full output in $VENV/build.log.
#
# LMCONV_VENV=DIR names another venv (built in build/<its name>-<wheel tag>/,
# so that it never shares .venv's CMake build folder); LMCONV_BUILD_DIR=DIR
# picks the build folder; LMCONV_PYTHON=/path/to/python picks the
# interpreter.
# The supported range (keep in step with pyproject.toml):
JAX_RANGE=">=0.11.2,<0.13"
FLAX_RANGE=">=0.12.10,<0.13"
JAX_LOWEST="0.11.2"
FLAX_LOWEST="0.12.10"
set -euo pipefail
cd "$(dirname "$0")/.."

lowest=0
print_python=0
for arg in "$@"; do
  case "$arg" in
    --lowest) lowest=1 ;;
    --print-python) print_python=1 ;;
    -h|--help) sed -n '2,/^# The supported range/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
               exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg'; expected --lowest," \
            "--print-python or --help" >&2; exit 2 ;;
  esac
done
if [ "$lowest" = 1 ]; then
  VENV=${LMCONV_VENV:-.venv-lowest}
  JAX_REQ=("jax==$JAX_LOWEST" "jaxlib==$JAX_LOWEST")
  RUNTIME_REQ=("flax==$FLAX_LOWEST")
  # A build folder of its own: the two venvs' wheel tags are the same, and a
  # shared CMake cache would mix the two jaxlibs' FFI headers.
  BUILD_DIR="build/lowest-{wheel_tag}"
  BUILD_ARGS=(-C "cmake.define.LMCONV_EMULATOR=ON")
else
  VENV=${LMCONV_VENV:-.venv}
  JAX_REQ=("jax$JAX_RANGE" "jaxlib$JAX_RANGE")
  RUNTIME_REQ=("flax$FLAX_RANGE")
  BUILD_DIR="build/{wheel_tag}"                       # pyproject.toml's
  BUILD_ARGS=(-C "cmake.define.LMCONV_EMULATOR=ON")  # the tests' CUDA emulation
fi
# Another venv gets a build folder of its own: a CMake cache shared between
# venvs would rebuild everything on each switch (their paths and jaxlib
# headers differ), or mix two jaxlibs' FFI headers.
if [ "$VENV" != "$([ "$lowest" = 1 ] && echo .venv-lowest || echo .venv)" ]; then
  BUILD_DIR="build/$(basename "$VENV")-{wheel_tag}"
fi
BUILD_DIR=${LMCONV_BUILD_DIR:-$BUILD_DIR}
BUILD_ARGS+=(-C "build-dir=$BUILD_DIR")

find_python() {
  for cand in "${LMCONV_PYTHON:-}" python3.14 python3.13 python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  # pyenv's interpreters, also where pyenv is installed but not on PATH.
  local roots=("${PYENV_ROOT:-$HOME/.pyenv}")
  command -v pyenv >/dev/null 2>&1 && roots=("$(pyenv root)" "${roots[@]}")
  for root in "${roots[@]}"; do
    for cand in "$root"/versions/3.1[2-9]*/bin/python; do
      [ -x "$cand" ] && { echo "$cand"; return; }
    done
  done
  echo "error: lmconv_jax needs Python >= 3.12 (current jax does); none found." \
       "Install one (e.g. 'pyenv install 3.12') or set LMCONV_PYTHON=/path/to/python3.12." >&2
  exit 2
}

if [ "$print_python" = 1 ]; then
  find_python
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python)
  echo "== creating $VENV with $PY ($("$PY" -V))"
  "$PY" -m venv "$VENV"
fi
echo "== installing jax, jaxlib, flax and the build tools into $VENV" \
     "(jaxlib is a large download the first time)"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Build requirements first: the editable install builds without isolation, so
# the extension is compiled against the FFI headers of the jaxlib in $VENV.
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4" ninja \
  "${JAX_REQ[@]}" "${RUNTIME_REQ[@]}"

# ninja's status lines ("[3/20] Building CXX object ...", printed as each step
# finishes) out of pip's verbose output, with the time since the build began;
# everything goes to the log.
progress() {
  local start=$SECONDS line t
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$LOG"
    if [[ $line =~ ^[[:space:]]*(\[[0-9]+/[0-9]+\][[:space:]].*)$ ]]; then
      t=$((SECONDS - start))
      printf '   %2d:%02d %s\n' $((t / 60)) $((t % 60)) "${BASH_REMATCH[1]}"
    fi
  done
}

LOG="$VENV/build.log"
echo "== building lmconv_jax in $VENV (CUDA kernels too if nvcc is on PATH)"
echo "   A clean build takes about 3 minutes on a quiet 2-core machine (several"
echo "   times that on a busy one); a rebuild only what changed. Progress below,"
echo "   one [done/total] line per compiled step; pip's full output: $LOG"
: >"$LOG"
start=$SECONDS
set +e
"$VENV/bin/python" -m pip install -v --no-build-isolation "${BUILD_ARGS[@]}" \
  -e ".[test,demo]" "${JAX_REQ[@]}" "${RUNTIME_REQ[@]}" 2>&1 | progress
status=${PIPESTATUS[0]}
set -e
t=$((SECONDS - start))
if [ "$status" != 0 ]; then
  # What failed: from ninja's first FAILED step on (the compiler's error), else
  # the end of the log (a configure or pip error).
  if grep -q '^[[:space:]]*FAILED: ' "$LOG"; then
    echo "== the build failed after $((t / 60)) min $((t % 60)) s (pip exit $status)." \
         "From the first failed step on (all of it in $LOG):" >&2
    awk '/^[[:space:]]*FAILED: /{p=1} p' "$LOG" | head -n 80 >&2
  else
    echo "== the build failed after $((t / 60)) min $((t % 60)) s (pip exit $status)." \
         "The last 40 lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
  fi
  exit "$status"
fi
echo "== built and installed in $((t / 60)) min $((t % 60)) s"
"$VENV/bin/python" -m lmconv_jax info || true
