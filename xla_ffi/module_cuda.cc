// nanobind module _lmconv_cuda: hands the CUDA FFI handlers to Python, which
// registers them for platform "CUDA" (lmconv_jax/_ffi.py). Linked to the
// static CUDA runtime, so it imports on a machine with no GPU and no driver.

#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "nb_registrations.h"

namespace nb = nanobind;

LMCONV_DECLARE_POOL_HANDLERS(LmconvCuda)

namespace {

std::string version_str(int v) {  // CUDA's 1000 * major + 10 * minor
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

}  // namespace

NB_MODULE(_lmconv_cuda, m) {
  m.doc() = "CUDA (XLA FFI) kernels of the landmark pool.";
  m.def(
      "registrations",
      [] {
        return lmconv::registrations("lmconv_",
                                     LMCONV_POOL_HANDLERS(LmconvCuda));
      },
      "Returns {target name: capsule} for jax.ffi.register_ffi_target.");
  m.def(
      "build_info",
      [] {
        nb::dict d;
        d["platform"] = "cuda";
        d["compiler"] = "nvcc " LMCONV_NVCC_VERSION " (host: " __VERSION__ ")";
        d["cuda_architectures"] = LMCONV_CUDA_ARCHITECTURES;
        int runtime = 0;
        cudaRuntimeGetVersion(&runtime);  // the static runtime: needs no driver
        d["cuda_runtime"] = version_str(runtime);
        lmconv::add_build_versions(d);
        return d;
      },
      "What this module was compiled with.");
}
