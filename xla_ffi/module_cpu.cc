// nanobind module _lmconv_cpu: hands the CPU FFI handlers to Python, which
// registers them with jax.ffi.register_ffi_target (lmconv_jax/_ffi.py).

#include <nanobind/nanobind.h>

#include "nb_registrations.h"

namespace nb = nanobind;

LMCONV_DECLARE_POOL_HANDLERS(Lmconv)

NB_MODULE(_lmconv_cpu, m) {
  m.doc() = "CPU (XLA FFI) kernels of the landmark pool.";
  m.def(
      "registrations",
      [] {
        return lmconv::registrations("lmconv_", LMCONV_POOL_HANDLERS(Lmconv));
      },
      "Returns {target name: capsule} for jax.ffi.register_ffi_target.");
  m.def(
      "build_info",
      [] {
        nb::dict d;
        d["platform"] = "cpu";
        d["compiler"] = __VERSION__;
        lmconv::add_build_versions(d);
        return d;
      },
      "What this module was compiled with.");
}
