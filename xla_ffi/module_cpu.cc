// nanobind module _lmconv_cpu: hands the CPU FFI handlers to Python, which
// registers them with jax.ffi.register_ffi_target (lmconv_jax/_ffi.py).

#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" {
XLA_FFI_Error* LmconvPoolFwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvPoolFwdGuided(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvPoolBwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvPoolBwdGuided(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvPoolTangent(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* LmconvPoolTangentGuided(XLA_FFI_CallFrame* call_frame);
}

namespace {

#define LMCONV_STR_(x) #x
#define LMCONV_STR(x) LMCONV_STR_(x)

template <typename Fn>
nb::capsule encapsulate(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn), "xla._CUSTOM_CALL_TARGET");
}

}  // namespace

NB_MODULE(_lmconv_cpu, m) {
  m.doc() = "CPU (XLA FFI) kernels of the landmark pool.";
  m.def("registrations", [] {
    nb::dict d;
    d["lmconv_pool_fwd"] = encapsulate(LmconvPoolFwd);
    d["lmconv_pool_fwd_guided"] = encapsulate(LmconvPoolFwdGuided);
    d["lmconv_pool_bwd"] = encapsulate(LmconvPoolBwd);
    d["lmconv_pool_bwd_guided"] = encapsulate(LmconvPoolBwdGuided);
    d["lmconv_pool_tangent"] = encapsulate(LmconvPoolTangent);
    d["lmconv_pool_tangent_guided"] = encapsulate(LmconvPoolTangentGuided);
    return d;
  }, "Returns {target name: capsule} for jax.ffi.register_ffi_target.");
  m.def("build_info", [] {
    nb::dict d;
    d["platform"] = "cpu";
    d["compiler"] = __VERSION__;
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
