// nanobind module _lmconv_cuda: hands the CUDA FFI handlers to Python, which
// registers them for platform "CUDA" (lmconv_jax/_ffi.py). Linked to the
// static CUDA runtime, so it imports on a machine with no GPU and no driver.

#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" {
XLA_FFI_Error* LmconvCudaPoolFwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvCudaPoolFwdGuided(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvCudaPoolBwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvCudaPoolBwdGuided(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvCudaPoolTangent(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvCudaPoolTangentGuided(XLA_FFI_CallFrame* call_frame);
}

namespace {

#define LMCONV_STR_(x) #x
#define LMCONV_STR(x) LMCONV_STR_(x)

template <typename Fn>
nb::capsule encapsulate(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn), "xla._CUSTOM_CALL_TARGET");
}

std::string version_str(int v) {  // CUDA's 1000 * major + 10 * minor
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

}  // namespace

NB_MODULE(_lmconv_cuda, m) {
  m.doc() = "CUDA (XLA FFI) kernels of the landmark pool.";
  m.def("registrations", [] {
    nb::dict d;
    d["lmconv_pool_fwd"] = encapsulate(LmconvCudaPoolFwd);
    d["lmconv_pool_fwd_guided"] = encapsulate(LmconvCudaPoolFwdGuided);
    d["lmconv_pool_bwd"] = encapsulate(LmconvCudaPoolBwd);
    d["lmconv_pool_bwd_guided"] = encapsulate(LmconvCudaPoolBwdGuided);
    d["lmconv_pool_tangent"] = encapsulate(LmconvCudaPoolTangent);
    d["lmconv_pool_tangent_guided"] =
        encapsulate(LmconvCudaPoolTangentGuided);
    return d;
  }, "Returns {target name: capsule} for jax.ffi.register_ffi_target.");
  m.def("build_info", [] {
    nb::dict d;
    d["platform"] = "cuda";
    d["compiler"] = "nvcc " LMCONV_NVCC_VERSION " (host: " __VERSION__ ")";
    d["cuda_architectures"] = LMCONV_CUDA_ARCHITECTURES;
    int runtime = 0;
    cudaRuntimeGetVersion(&runtime);  // the static runtime: needs no driver
    d["cuda_runtime"] = version_str(runtime);
    d["nanobind"] = LMCONV_STR(NB_VERSION_MAJOR) "." LMCONV_STR(
        NB_VERSION_MINOR) "." LMCONV_STR(NB_VERSION_PATCH);
    d["xla_ffi_api"] = LMCONV_STR(XLA_FFI_API_MAJOR) "." LMCONV_STR(
        XLA_FFI_API_MINOR);
#ifdef LMCONV_BUILD_JAXLIB_VERSION
    d["jaxlib_headers"] = LMCONV_BUILD_JAXLIB_VERSION;
#endif
    return d;
  }, "What this module was compiled with.");
}
