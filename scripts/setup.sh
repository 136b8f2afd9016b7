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
# LMCONV_VENV=DIR names another venv; LMCONV_PYTHON=/path/to/python picks the
# interpreter. The supported range (keep in step with pyproject.toml):
JAX_RANGE=">=0.11.2,<0.13"
FLAX_RANGE=">=0.12.10,<0.13"
JAX_LOWEST="0.11.2"
FLAX_LOWEST="0.12.10"
set -euo pipefail
cd "$(dirname "$0")/.."

lowest=0
for arg in "$@"; do
  case "$arg" in
    --lowest) lowest=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$lowest" = 1 ]; then
  VENV=${LMCONV_VENV:-.venv-lowest}
  JAX_REQ=("jax==$JAX_LOWEST" "jaxlib==$JAX_LOWEST")
  RUNTIME_REQ=("flax==$FLAX_LOWEST")
  # A build folder of its own: the two venvs' wheel tags are the same, and a
  # shared CMake cache would mix the two jaxlibs' FFI headers.
  BUILD_ARGS=(-C "build-dir=build/lowest-{wheel_tag}" -C "cmake.define.LMCONV_EMULATOR=ON")
else
  VENV=${LMCONV_VENV:-.venv}
  JAX_REQ=("jax$JAX_RANGE" "jaxlib$JAX_RANGE")
  RUNTIME_REQ=("flax$FLAX_RANGE")
  BUILD_ARGS=(-C "cmake.define.LMCONV_EMULATOR=ON")  # the tests' CUDA emulation
fi

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

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python)
  echo "== creating $VENV with $PY ($("$PY" -V))"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Build requirements first: the editable install builds without isolation, so
# the extension is compiled against the FFI headers of the jaxlib in $VENV.
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4" ninja \
  "${JAX_REQ[@]}" "${RUNTIME_REQ[@]}"
echo "== building lmconv_jax in $VENV (CUDA kernels too if nvcc is on PATH)"
"$VENV/bin/python" -m pip install -q --no-build-isolation "${BUILD_ARGS[@]}" \
  -e ".[test,demo]" "${JAX_REQ[@]}" "${RUNTIME_REQ[@]}"
"$VENV/bin/python" -m lmconv_jax info || true
