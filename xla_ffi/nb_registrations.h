// What the nanobind modules (module_cpu.cc, module_cuda.cc, module_emu.cc)
// have in common: the six handlers' declarations, the {target name: capsule}
// dict for jax.ffi.register_ffi_target, and the versions a module was
// compiled against.
#ifndef LMCONV_JAX_XLA_FFI_NB_REGISTRATIONS_H_
#define LMCONV_JAX_XLA_FFI_NB_REGISTRATIONS_H_

#include <nanobind/nanobind.h>

#include <string>
#include <utility>

#include "xla/ffi/api/c_api.h"

// Declares the handlers P##PoolFwd, ..., P##PoolTangentGuided that
// XLA_FFI_DEFINE_HANDLER_SYMBOL defines elsewhere.
#define LMCONV_DECLARE_POOL_HANDLERS(P)                                       \
  extern "C" {                                                                \
  XLA_FFI_Handler P##PoolFwd, P##PoolFwdGuided, P##PoolBwd, P##PoolBwdGuided, \
      P##PoolTangent, P##PoolTangentGuided;                                   \
  }

// Those handlers, as a lmconv::PoolHandlers.
#define LMCONV_POOL_HANDLERS(P)                                 \
  ::lmconv::PoolHandlers {                                      \
    P##PoolFwd, P##PoolFwdGuided, P##PoolBwd, P##PoolBwdGuided, \
        P##PoolTangent, P##PoolTangentGuided                    \
  }

#define LMCONV_STR_(x) #x
#define LMCONV_STR(x) LMCONV_STR_(x)

namespace lmconv {

struct PoolHandlers {
  XLA_FFI_Handler *fwd, *fwd_guided, *bwd, *bwd_guided, *tangent,
      *tangent_guided;
};

inline nanobind::capsule encapsulate(XLA_FFI_Handler* fn) {
  return nanobind::capsule(reinterpret_cast<void*>(fn),
                           "xla._CUSTOM_CALL_TARGET");
}

// {prefix + "pool_fwd": capsule, ...} for jax.ffi.register_ffi_target.
inline nanobind::dict registrations(const std::string& prefix,
                                    const PoolHandlers& h) {
  const std::pair<const char*, XLA_FFI_Handler*> targets[] = {
      {"pool_fwd", h.fwd},         {"pool_fwd_guided", h.fwd_guided},
      {"pool_bwd", h.bwd},         {"pool_bwd_guided", h.bwd_guided},
      {"pool_tangent", h.tangent}, {"pool_tangent_guided", h.tangent_guided},
  };
  nanobind::dict d;
  for (const auto& [name, fn] : targets) {
    d[(prefix + name).c_str()] = encapsulate(fn);
  }
  return d;
}

// Adds the nanobind, XLA FFI API and jaxlib header versions to build_info.
// Inline, so LMCONV_BUILD_JAXLIB_VERSION is the including module's.
inline void add_build_versions(nanobind::dict& d) {
  d["nanobind"] = LMCONV_STR(NB_VERSION_MAJOR) "." LMCONV_STR(
      NB_VERSION_MINOR) "." LMCONV_STR(NB_VERSION_PATCH);
  d["xla_ffi_api"] =
      LMCONV_STR(XLA_FFI_API_MAJOR) "." LMCONV_STR(XLA_FFI_API_MINOR);
#ifdef LMCONV_BUILD_JAXLIB_VERSION
  d["jaxlib_headers"] = LMCONV_BUILD_JAXLIB_VERSION;
#endif
}

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_NB_REGISTRATIONS_H_
