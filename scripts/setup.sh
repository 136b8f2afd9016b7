#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs lmconv_jax (editable) with its
# test and build requirements. The CUDA kernels are compiled when `nvcc` is found.
# Idempotent: a second run only rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in "${LMCONV_PYTHON:-}" python3.14 python3.13 python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for cand in "$(pyenv root)"/versions/3.1[2-9]*/bin/python; do
      [ -x "$cand" ] && { echo "$cand"; return; }
    done
  fi
  echo "error: lmconv_jax needs Python >= 3.12 (current jax does); none found." \
       "Install one (e.g. 'pyenv install 3.12') or set LMCONV_PYTHON=/path/to/python3.12." >&2
  exit 2
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python)
  echo "== creating .venv with $PY ($("$PY" -V))"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Build requirements first: the editable install builds without isolation.
.venv/bin/python -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4" ninja \
  "jax>=0.12.0,<0.13" "jaxlib>=0.12.0,<0.13"
echo "== building lmconv_jax (CUDA kernels too if nvcc is on PATH)"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,demo]"
.venv/bin/python -m lmconv_jax info || true
