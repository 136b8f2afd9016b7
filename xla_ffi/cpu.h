// The CPU back end of the grouped landmark pool, as handlers.inc sees it:
// CpuBackend, whose passes are the per-dtype entry points declared here. Each
// is defined in cpu_kernels.h and instantiated in its own object file
// (cpu_kernels.cc, compiled by CMake once per storage type), so a
// build spreads the kernels over the cores instead of one translation unit.

#ifndef LMCONV_CPU_H_
#define LMCONV_CPU_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ffi_common.h"

namespace lmconv {

namespace ffi = xla::ffi;

// One pass over every group of the call, on XLA's intra-op thread pool; S is
// the storage type (float, double, Half, BFloat16).
template <typename S>
ffi::Error cpu_forward(ffi::ThreadPool pool, const Call& c,
                       const Buffers<S>& b);
template <typename S>
ffi::Error cpu_tangent(ffi::ThreadPool pool, const Call& c,
                       const Buffers<S>& b);
template <typename S>
ffi::Error cpu_backward(ffi::ThreadPool pool, const Call& c,
                        const Buffers<S>& b);

// Instantiated in cpu_kernels.cc only: no other file compiles the kernels.
// The storage types here, CMakeLists.txt's list and ffi_common.h's
// dispatch_dtype are the same four: keep them in step.
#define LMCONV_CPU_EXTERN(S)                                               \
  extern template ffi::Error cpu_forward<S>(ffi::ThreadPool, const Call&,  \
                                            const Buffers<S>&);            \
  extern template ffi::Error cpu_tangent<S>(ffi::ThreadPool, const Call&,  \
                                            const Buffers<S>&);            \
  extern template ffi::Error cpu_backward<S>(ffi::ThreadPool, const Call&, \
                                             const Buffers<S>&);
LMCONV_CPU_EXTERN(float)
LMCONV_CPU_EXTERN(double)
LMCONV_CPU_EXTERN(Half)
LMCONV_CPU_EXTERN(BFloat16)
#undef LMCONV_CPU_EXTERN

// The thread count the CPU plan (cpu_plan.h: plan_cpu) is made for: the
// pool's, unless a test set another (set_cpu_plan_threads, module_cpu.cc),
// so that any machine runs every schedule. The items still run on the pool.
int64_t cpu_plan_threads(int64_t pool_threads);
// Sets the override (0: the pool's again); returns the previous one.
int64_t set_cpu_plan_threads(int64_t threads);

class CpuBackend {
 public:
  explicit CpuBackend(ffi::ThreadPool pool) : pool_(pool) {}

  ffi::Error zero(void* p, size_t bytes) {
    std::memset(p, 0, bytes);
    return ffi::Error::Success();
  }
  template <typename S>
  ffi::Error forward(const Call& c, const Buffers<S>& b) {
    return cpu_forward<S>(pool_, c, b);
  }
  template <typename S>
  ffi::Error tangent(const Call& c, const Buffers<S>& b) {
    return cpu_tangent<S>(pool_, c, b);
  }
  template <typename S>
  ffi::Error backward(const Call& c, const Buffers<S>& b) {
    return cpu_backward<S>(pool_, c, b);
  }

 private:
  ffi::ThreadPool pool_;
};

}  // namespace lmconv

#endif  // LMCONV_CPU_H_
