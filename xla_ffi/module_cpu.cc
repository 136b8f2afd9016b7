// nanobind module _lmconv_cpu: hands the CPU FFI handlers to Python, which
// registers them with jax.ffi.register_ffi_target (lmconv_jax/_ffi.py).

#include <nanobind/nanobind.h>

#include "cpu.h"
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
      "set_plan_threads",
      [](int64_t threads) {
        if (threads < 0) throw nb::value_error("threads must be >= 0");
        return lmconv::set_cpu_plan_threads(threads);
      },
      nb::arg("threads"),
      "Test only: plan the CPU kernels for this many threads (0: the "
      "pool's), whatever the machine; returns the previous setting. The "
      "items still run on XLA's pool, so every result is the same.");
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
