// The CPU kernels' ISA helpers: function multiversioning (the item kernels
// compiled for x86-64-v3 and the baseline ISA), forced inlining, prefetch.
// Part of cpu_kernels.h (cpu_kernels.cc only).

#ifndef LMCONV_CPU_ISA_H_
#define LMCONV_CPU_ISA_H_

#include <cstdint>

// The item kernels are compiled for x86-64-v3 (AVX2, F16C) and for the
// baseline ISA, picked at load time (gcc/clang function multiversioning); the
// pixel loops are forced inline so they are vectorised for the clone they
// land in. FP contraction is off for the whole file (CMakeLists.txt), so
// the FMA the v3 clone may use never fuses our blend.
#if defined(__x86_64__) && defined(__ELF__)
#define LMCONV_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMCONV_CPU_CLONES
#endif
#define LMCONV_INLINE inline __attribute__((always_inline))
// Lambdas inside a cloned function are functions of their own, compiled for
// the baseline ISA unless inlined: they must be, or the v3 clone runs SSE2.
#define LMCONV_LAMBDA_INLINE __attribute__((always_inline))

namespace lmconv {
namespace {

// Prefetches the lines of n elements at p (kWrite: 1 for a write).
template <int kWrite, typename T>
LMCONV_INLINE void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t{sizeof(T)}; b += 64) {
    __builtin_prefetch(c + b, kWrite);
  }
}

}  // namespace
}  // namespace lmconv

#endif  // LMCONV_CPU_ISA_H_
