// The one entry point of cuda.cu: launch a phased kernel (cuda_schedule.h).
#ifndef LMCONV_JAX_XLA_FFI_CUDA_LAUNCH_H_
#define LMCONV_JAX_XLA_FFI_CUDA_LAUNCH_H_

#include <cuda_runtime_api.h>

#include "cuda_schedule.h"

namespace lmconv {
namespace cuda {

// Enqueues Body's kernel on `stream` in plan's geometry (one launch) and
// returns the launch error, if any; it never waits for the device. Defined,
// and instantiated for every ForwardBody, BackwardBody and TangentBody, in
// cuda.cu.
template <typename Body>
cudaError_t launch(const LaunchPlan& plan, const typename Body::Args& args,
                   cudaStream_t stream);

}  // namespace cuda
}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_LAUNCH_H_
