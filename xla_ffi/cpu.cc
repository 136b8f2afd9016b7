// The six CPU handlers of the grouped landmark pool: handlers.inc over
// CpuBackend (cpu.h), with XLA's intra-op thread pool. The kernels are
// cpu_kernels.h, compiled in their own object files (cpu_kernels.cc).

#include "cpu.h"

#include <atomic>

namespace lmconv {

namespace {
std::atomic<int64_t> plan_threads_override{0};
}  // namespace

int64_t cpu_plan_threads(int64_t pool_threads) {
  const int64_t t = plan_threads_override.load(std::memory_order_relaxed);
  return t > 0 ? t : pool_threads;
}

int64_t set_cpu_plan_threads(int64_t threads) {
  return plan_threads_override.exchange(threads);
}

}  // namespace lmconv

namespace ffi = xla::ffi;

#define LMCONV_SYMBOL(name) Lmconv##name
#define LMCONV_TARGET(name) "lmconv_" name
#define LMCONV_CONTEXT_PARAMS ffi::ThreadPool pool,
#define LMCONV_BIND xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()
#define LMCONV_EXTRA_ATTR_PARAMS
#define LMCONV_EXTRA_ATTRS
#define LMCONV_MAKE_BACKEND lmconv::CpuBackend(pool)
#include "handlers.inc"
