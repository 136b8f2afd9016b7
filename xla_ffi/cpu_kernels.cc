// One storage type and one pass of the CPU kernels (cpu_kernels.h). CMake
// (CMakeLists.txt: lmconv_cpu_kernels) compiles this file once for each
// storage type S in {float, double, Half, BFloat16} and pass in {forward,
// tangent, backward}, defining LMCONV_CPU_STORAGE and LMCONV_CPU_PASS.

#include "cpu_kernels.h"

#if !defined(LMCONV_CPU_STORAGE) || !defined(LMCONV_CPU_PASS)
#error \
    "define LMCONV_CPU_STORAGE (e.g. float) and LMCONV_CPU_PASS (e.g. forward)"
#endif

#define LMCONV_CPU_CAT(a, b) a##b
#define LMCONV_CPU_ENTRY(pass) LMCONV_CPU_CAT(cpu_, pass)

namespace lmconv {

template ffi::Error LMCONV_CPU_ENTRY(LMCONV_CPU_PASS)<LMCONV_CPU_STORAGE>(
    ffi::ThreadPool, const Call&, const Buffers<LMCONV_CPU_STORAGE>&);

}  // namespace lmconv
