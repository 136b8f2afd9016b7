// The GPU platform of the phased back end (cuda_ffi.h): what only a GPU has,
// the stream, the multiprocessor count, device scratch memory and the launch.
// One class for the XLA handlers (cuda_handlers.cc, over XLA's scratch
// allocator) and the standalone device harness (tests/cuda_harness.cu, over
// cudaMalloc), so the harness plans and launches through the handlers' code.
// Nothing here waits for the device.
#ifndef LMCONV_JAX_XLA_FFI_CUDA_PLATFORM_H_
#define LMCONV_JAX_XLA_FFI_CUDA_PLATFORM_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <optional>
#include <string>

#include "cuda_ffi.h"
#include "cuda_launch.h"

namespace lmconv {
namespace cuda {

inline ffi::Error cuda_error(const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string("lmconv_jax CUDA kernels: ") + what +
                              " failed: " + cudaGetErrorName(e) + ": " +
                              cudaGetErrorString(e));
}

// Scratch: ffi::ScratchAllocator or anything with its
// std::optional<void*> Allocate(size_t bytes, size_t alignment).
template <typename Scratch>
class CudaPlatform {
 public:
  CudaPlatform(cudaStream_t stream, int32_t device, Scratch& scratch)
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
    if (cudaError_t e =
            cuda::launch<Body>(l.blocks, l.threads, l.phases, args, stream_);
        e != cudaSuccess) {
      return cuda_error("kernel launch", e);
    }
    return ffi::Error::Success();
  }

 private:
  cudaStream_t stream_;
  int32_t device_;
  Scratch* scratch_;
};

}  // namespace cuda
}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_PLATFORM_H_
