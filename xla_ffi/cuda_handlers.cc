// The XLA FFI handlers of the CUDA kernels (platform "CUDA"), under the same
// target names as the CPU ones: handlers.inc's six handlers over the phased
// back end (cuda_ffi.h) with a platform that has what only a GPU has: the
// stream XLA hands the handler, the multiprocessor count, XLA's scratch
// allocator, and the launch. Nothing here waits for the device.

#include <cuda_runtime_api.h>

#include <optional>
#include <string>

#include "cuda_ffi.h"
#include "cuda_launch.h"

namespace lmconv {
namespace cuda {
namespace {

ffi::Error cuda_error(const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string("lmconv_jax CUDA kernels: ") + what +
                              " failed: " + cudaGetErrorName(e) + ": " +
                              cudaGetErrorString(e));
}

class CudaPlatform {
 public:
  CudaPlatform(cudaStream_t stream, int32_t device,
               ffi::ScratchAllocator& scratch)
      : stream_(stream), device_(device), scratch_(&scratch) {}

  ffi::ErrorOr<int64_t> multiprocessors() const {
    int sms = 0;
    if (cudaError_t e = cudaDeviceGetAttribute(
            &sms, cudaDevAttrMultiProcessorCount, device_);
        e != cudaSuccess) {
      return ffi::Unexpected(cuda_error("cudaDeviceGetAttribute", e));
    }
    return int64_t{sms};
  }

  ffi::ErrorOr<void*> workspace(size_t bytes) {
    if (bytes == 0) bytes = 1;
    std::optional<void*> p = scratch_->Allocate(bytes, /*alignment=*/256);
    if (!p.has_value()) {
      return ffi::Unexpected(
          ffi::Error(ffi::ErrorCode::kResourceExhausted,
                     "lmconv_jax CUDA kernels: could not allocate " +
                         std::to_string(bytes) + " bytes of scratch memory"));
    }
    return *p;
  }

  ffi::Error zero(void* p, size_t bytes) {
    if (cudaError_t e = cudaMemsetAsync(p, 0, bytes, stream_);
        e != cudaSuccess) {
      return cuda_error("cudaMemsetAsync", e);
    }
    return ffi::Error::Success();
  }

  void poison(void*, size_t) {}  // only the emulator poisons
  int flags() const { return 0; }

  template <typename Body>
  ffi::Error launch(const Launch& l, const typename Body::Args& args) {
    if (l.blocks == 0 || l.threads == 0) return ffi::Error::Success();
    if (cudaError_t e = cuda::launch<Body>(l.blocks, l.threads, l.phases,
                                           l.shared_bytes, args, stream_);
        e != cudaSuccess) {
      return cuda_error("kernel launch", e);
    }
    return ffi::Error::Success();
  }

 private:
  cudaStream_t stream_;
  int32_t device_;
  ffi::ScratchAllocator* scratch_;
};

using CudaBackend = PhasedBackend<CudaPlatform>;

}  // namespace
}  // namespace cuda
}  // namespace lmconv

// The six handlers (handlers.inc): each gets the stream, the device and XLA's
// scratch allocator.
#define LMCONV_BACKEND lmconv::cuda::CudaBackend
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
  cuda::CudaBackend(cuda::CudaPlatform(stream, device, scratch))
#include "handlers.inc"
