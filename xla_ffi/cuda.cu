// CUDA kernels of the landmark pool: a thin __global__ wrapper around the
// kernel bodies of cuda_schedule.h (the schedule, shared with the CPU
// emulation) and the per-pixel math of landmark_pool.h (shared with the CPU
// kernels). Compiled with --fmad=false: the blend is never fused.

#include "cuda_launch.h"

namespace lmconv {
namespace cuda {
namespace {

// One block: the phases of Body in order, a barrier after each, so a phase
// sees everything the block wrote in the phases before it.
template <typename Body>
__global__ void __launch_bounds__(kMaxThreads, 2)
    phased_kernel(const typename Body::Args args) {
  extern __shared__ unsigned char shared[];
  for (int64_t phase = 0; phase < args.plan.phases; ++phase) {
    Body::run(args, blockIdx.x, threadIdx.x, phase, shared);
    __syncthreads();
  }
}

}  // namespace

template <typename Body>
cudaError_t launch(const LaunchPlan& plan, const typename Body::Args& args,
                   cudaStream_t stream) {
  phased_kernel<Body><<<static_cast<unsigned>(plan.blocks),
                        static_cast<unsigned>(plan.threads),
                        static_cast<size_t>(plan.shared_bytes), stream>>>(
      args);
  return cudaGetLastError();
}

#define LMCONV_INSTANTIATE(...)                                          \
  template cudaError_t launch<__VA_ARGS__>(                              \
      const LaunchPlan&, const typename __VA_ARGS__::Args&, cudaStream_t);
#define LMCONV_INSTANTIATE_DTYPE(S)                 \
  LMCONV_INSTANTIATE(ForwardBody<S, false>)         \
  LMCONV_INSTANTIATE(ForwardBody<S, true>)          \
  LMCONV_INSTANTIATE(BackwardBody<S, false>)        \
  LMCONV_INSTANTIATE(BackwardBody<S, true>)         \
  LMCONV_INSTANTIATE(TangentBody<S, false>)         \
  LMCONV_INSTANTIATE(TangentBody<S, true>)

LMCONV_INSTANTIATE_DTYPE(float)
LMCONV_INSTANTIATE_DTYPE(double)
LMCONV_INSTANTIATE_DTYPE(Half)
LMCONV_INSTANTIATE_DTYPE(BFloat16)

}  // namespace cuda
}  // namespace lmconv
