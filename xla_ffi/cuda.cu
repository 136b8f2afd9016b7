// CUDA kernels of the grouped landmark pool: a thin __global__ wrapper around
// the kernel bodies of cuda_schedule.h (the schedule, shared with the CPU
// emulation) and the per-pixel math of landmark_pool.h (shared with the CPU
// kernels).
//
// Floating point (CMakeLists.txt): --fmad=false, so the blend is never fused;
// -ftz=true, so float32 arithmetic flushes subnormal inputs and results to
// zero, as the CPU kernels do under FTZ/DAZ (XLA's CPU runtime mode) and as
// the emulator does; x and the guide are flushed on load anyway
// (StorageTraits::load_input). float64 arithmetic on the GPU cannot flush: a
// float64 result that would be subnormal (e.g. a blend g * m + (1 - g) * x of
// normal values, a gradient sum) may differ from the CPU's flushed zero. That
// edge is not verified. The 16-bit conversions are landmark_pool.h's software
// ones (issue 10's cuda_fp16.h / cuda_bf16.h intrinsics are not used yet),
// bit for bit those of the CPU for every non-NaN value. NaN: where a NaN goes
// through arithmetic (a blend, a gradient sum, a float16 load, which
// multiplies) the GPU returns its canonical NaN (0x7FFFFFFF) where x86 keeps
// the operand's sign and payload, so NaN *bit patterns* (not NaN-ness) may
// differ from the CPU's there; the selects of the max and of the winners
// pass NaNs through unchanged on both. Also unverified.

#include "cuda_launch.h"

namespace lmconv {
namespace cuda {
namespace {

// One block: the phases of Body in order, a barrier after each, so a phase
// sees everything the block wrote in the phases before it. A block whose
// group has fewer phases than the launch returns from Body::run at once in
// the phases past its own, but still meets every barrier.
template <typename Body>
__global__ void __launch_bounds__(kMaxThreads, 2)
    phased_kernel(const typename Body::Args args, int64_t phases) {
  const Lane lane = Body::begin(args, blockIdx.x, threadIdx.x);
  for (int64_t phase = 0; phase < phases; ++phase) {
    Body::run(args, lane, phase);
    __syncthreads();
  }
}

}  // namespace

template <typename Body>
cudaError_t launch(int64_t blocks, int64_t threads, int64_t phases,
                   const typename Body::Args& args, cudaStream_t stream) {
  phased_kernel<Body>
      <<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0,
         stream>>>(args, phases);
  return cudaGetLastError();
}

#define LMCONV_INSTANTIATE(...)                                               \
  template cudaError_t launch<__VA_ARGS__>(int64_t, int64_t, int64_t,         \
                                           const typename __VA_ARGS__::Args&, \
                                           cudaStream_t);
#define LMCONV_INSTANTIATE_DTYPE(S)          \
  LMCONV_INSTANTIATE(ForwardBody<S, false>)  \
  LMCONV_INSTANTIATE(ForwardBody<S, true>)   \
  LMCONV_INSTANTIATE(BackwardBody<S, false>) \
  LMCONV_INSTANTIATE(BackwardBody<S, true>)  \
  LMCONV_INSTANTIATE(TangentBody<S, false>)  \
  LMCONV_INSTANTIATE(TangentBody<S, true>)   \
  LMCONV_INSTANTIATE(ReduceSlicesBody<S>)    \
  LMCONV_INSTANTIATE(ReduceTotalBody<S>)

LMCONV_INSTANTIATE_DTYPE(float)
LMCONV_INSTANTIATE_DTYPE(double)
LMCONV_INSTANTIATE_DTYPE(Half)
LMCONV_INSTANTIATE_DTYPE(BFloat16)

}  // namespace cuda
}  // namespace lmconv
