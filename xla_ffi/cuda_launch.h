// The one entry point of cuda.cu: launch a phased kernel (cuda_schedule.h).
#ifndef LMCONV_JAX_XLA_FFI_CUDA_LAUNCH_H_
#define LMCONV_JAX_XLA_FFI_CUDA_LAUNCH_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_schedule.h"

namespace lmconv {
namespace cuda {

// Enqueues Body's kernel on `stream` with `blocks` x `threads` and `phases`
// phases (one launch) and returns the launch error, if any; it never waits
// for the device. Defined, and instantiated for every ForwardBody,
// TangentBody, BackwardBody, ReduceSlicesBody and ReduceTotalBody, in cuda.cu.
template <typename Body>
cudaError_t launch(int64_t blocks, int64_t threads, int64_t phases,
                   const typename Body::Args& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_LAUNCH_H_
