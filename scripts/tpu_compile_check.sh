#!/usr/bin/env bash
# The TPU compiler check: compiles the Pallas TPU kernels (and the layers'
# training steps) with the real TPU compiler (libtpu's Mosaic and XLA:TPU) on
# a CPU host, for compile-only TPU devices; no TPU needed.
#
#   scripts/tpu_compile_check.sh [options]      (from any directory)
#
# Makes (idempotently) .venv-tpu, a venv of its own: libtpu makes every jax
# start probe for a TPU, so it is kept out of the test venv. It holds the
# jax/jaxlib/flax versions of .venv (setup.sh's range when there is no .venv),
# numpy and libtpu; lmconv_jax itself runs from the source tree (PYTHONPATH),
# without its C++ extension (not needed to compile for a TPU). Then runs
# scripts/tpu_compile_check.py, which prints one line per case and
# "N passed, N failed". Options (passed on to it):
#   --quick             one shape, float32, forward and backward of quadrants
#                       and octants (under a minute once the venv exists)
#   --platforms v5e,v6e which compile-only TPUs (default: v5e,v6e)
#   --dump DIR          Mosaic's stages of every kernel under DIR/<case>/
#   --selftest          the harness on a tiny Pallas kernel of its own
#   --layers {auto,pallas,reference,off}   the layers' pool implementation
#                       (default auto, the layers' own default)
#   --all-layer-shapes  the layers' steps at (8, 128, 128, 256) too (+4 min)
#   --only TEXT         only the cases whose name contains TEXT
#   -h, --help          the Python script's full help
#
# Measured 2026-12-07 on the project's 2-core machine, shared (load 7-11):
# the full run 264 cases in 10.4 min (4.7 min of CPU); --quick 30 s; making
# .venv-tpu from local wheels 0.5-1.5 min.
#
# Exit codes: 0 every case passed; 1 a case failed; 2 setup failed or the
# kernels module (lmconv_jax/_pallas_tpu.py) is missing (one line on stderr).
#
# Environment: LMCONV_PYTHON (the interpreter for the venv, as in setup.sh),
# LMCONV_TPU_VENV (default .venv-tpu), LIBTPU_VERSION (default 0.0.52: the
# newest the package index here serves; it works with jax 0.11.2 and 0.12.1).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LMCONV_TPU_VENV:-.venv-tpu}
LIBTPU_VERSION=${LIBTPU_VERSION:-0.0.52}
case " $* " in
  *" -h "*|*" --help "*) sed -n '2,35p' "$0" ;;
esac

# The versions: those of .venv, so that this checks what the tests test.
dist_version() {  # dist_version PYTHON DIST -> its version, or nothing
  "$1" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$2" 2>/dev/null || true
}
REQ=()
for dist in jax jaxlib flax; do
  v=""
  [ -x .venv/bin/python ] && v=$(dist_version .venv/bin/python "$dist")
  if [ -n "$v" ]; then
    REQ+=("$dist==$v")
  else  # no .venv (yet): the range scripts/setup.sh installs
    range=$(sed -n "s/^$( [ "$dist" = flax ] && echo FLAX || echo JAX )_RANGE=\"\(.*\)\"$/\1/p" scripts/setup.sh)
    REQ+=("$dist$range")
  fi
done
REQ+=(numpy "libtpu==$LIBTPU_VERSION")

# Idempotent: the venv is (re)filled only when the requirements changed.
STAMP="$VENV/.lmconv-tpu-requirements"
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(scripts/setup.sh --print-python)  # setup.sh's search; rc 2 if none
  echo "== creating $VENV with $PY ($("$PY" -V 2>&1))"
  "$PY" -m venv "$VENV" || { echo "tpu_compile_check: could not create $VENV" >&2; exit 2; }
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "${REQ[*]}" ]; then
  echo "== installing into $VENV: ${REQ[*]}"
  # libtpu 0.0.52 with jax 0.12.1, which pins 0.0.53: --no-deps for libtpu.
  # (pip's warnings about index folders this machine lacks are dropped.)
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
         "$VENV/bin/python" -m pip install -q "${REQ[@]:0:4}" &&
         "$VENV/bin/python" -m pip install -q --no-deps "libtpu==$LIBTPU_VERSION"
       } 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
    echo "tpu_compile_check: pip install into $VENV failed (${REQ[*]})" >&2; exit 2
  fi
  echo "${REQ[*]}" > "$STAMP"
fi

# lmconv_jax from the source tree, without the C++ extension.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" scripts/tpu_compile_check.py "$@"
