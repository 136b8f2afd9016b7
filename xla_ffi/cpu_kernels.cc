// One storage type of the CPU kernels (cpu_kernels.h): its forward, tangent
// and backward. CMake (CMakeLists.txt: lmconv_cpu_kernels) compiles this file
// once for each storage type S in {float, double, Half, BFloat16}, defining
// LMCONV_CPU_STORAGE, so the cores share the build.

#include "cpu_kernels.h"

#ifndef LMCONV_CPU_STORAGE
#error "define LMCONV_CPU_STORAGE (e.g. float)"
#endif

namespace lmconv {

template ffi::Error cpu_forward<LMCONV_CPU_STORAGE>(
    ffi::ThreadPool, const Call&, const Buffers<LMCONV_CPU_STORAGE>&);
template ffi::Error cpu_tangent<LMCONV_CPU_STORAGE>(
    ffi::ThreadPool, const Call&, const Buffers<LMCONV_CPU_STORAGE>&);
template ffi::Error cpu_backward<LMCONV_CPU_STORAGE>(
    ffi::ThreadPool, const Call&, const Buffers<LMCONV_CPU_STORAGE>&);

}  // namespace lmconv
