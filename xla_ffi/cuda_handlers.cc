// The XLA FFI handlers of the CUDA kernels (platform "CUDA"), under the same
// target names as the CPU ones: handlers.inc's six handlers over the phased
// back end (cuda_ffi.h) with the GPU platform (cuda_platform.h) on the stream
// XLA hands the handler and XLA's scratch allocator. Nothing here waits for
// the device.

#include "cuda_platform.h"

namespace lmconv {
namespace cuda {
namespace {

using CudaBackend = PhasedBackend<CudaPlatform<ffi::ScratchAllocator>>;

}  // namespace
}  // namespace cuda
}  // namespace lmconv

// The six handlers (handlers.inc): each gets the stream, the device and XLA's
// scratch allocator.
#define LMCONV_SYMBOL(name) LmconvCuda##name
#define LMCONV_TARGET(name) "lmconv_" name
#define LMCONV_CONTEXT_PARAMS \
  cudaStream_t stream, int32_t device, ffi::ScratchAllocator scratch,
#define LMCONV_BIND                                  \
  xla::ffi::Ffi::Bind()                              \
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>() \
      .Ctx<xla::ffi::DeviceOrdinal>()                \
      .Ctx<xla::ffi::ScratchAllocator>()
#define LMCONV_EXTRA_ATTR_PARAMS
#define LMCONV_EXTRA_ATTRS
#define LMCONV_MAKE_BACKEND \
  cuda::CudaBackend(        \
      cuda::CudaPlatform<ffi::ScratchAllocator>(stream, device, scratch))
#include "handlers.inc"
