// The XLA FFI handlers of the CUDA kernels (platform "CUDA"), under the same
// target names as the CPU ones. cuda_ffi.h checks the operands and plans the
// launch; this file adds what only a GPU has: the stream XLA hands the
// handler, the multiprocessor count, XLA's scratch allocator, and the launch.
// Nothing here waits for the device.

#include <cuda_runtime_api.h>

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

class CudaBackend {
 public:
  CudaBackend(cudaStream_t stream, int32_t device,
              ffi::ScratchAllocator& scratch)
      : stream_(stream), device_(device), scratch_(scratch) {}

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
    std::optional<void*> p = scratch_.Allocate(bytes, /*alignment=*/256);
    if (!p.has_value()) {
      return ffi::Unexpected(ffi::Error(
          ffi::ErrorCode::kResourceExhausted,
          "lmconv_jax CUDA kernels: could not allocate " +
              std::to_string(bytes) + " bytes of scratch memory"));
    }
    return *p;
  }

  template <typename Body>
  ffi::Error launch(const LaunchPlan& plan, const typename Body::Args& args) {
    if (cudaError_t e = cuda::launch<Body>(plan, args, stream_);
        e != cudaSuccess) {
      return cuda_error("kernel launch", e);
    }
    return ffi::Error::Success();
  }

 private:
  cudaStream_t stream_;
  int32_t device_;
  ffi::ScratchAllocator& scratch_;
};

ffi::Error PoolFwd(cudaStream_t stream, int32_t device,
                   ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                   ffi::Result<ffi::AnyBuffer> out, DirectionAttrs d) {
  CudaBackend be(stream, device, scratch);
  return Forward(be, "lmconv_pool_fwd", x, nullptr, *out, d);
}

ffi::Error PoolFwdGuided(cudaStream_t stream, int32_t device,
                         ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                         ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> out,
                         DirectionAttrs d) {
  CudaBackend be(stream, device, scratch);
  return Forward(be, "lmconv_pool_fwd_guided", x, &g, *out, d);
}

ffi::Error PoolBwd(cudaStream_t stream, int32_t device,
                   ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                   ffi::AnyBuffer out, ffi::AnyBuffer ct,
                   ffi::Result<ffi::AnyBuffer> dx, DirectionAttrs d) {
  CudaBackend be(stream, device, scratch);
  return Backward(be, "lmconv_pool_bwd", x, nullptr, out, ct, *dx, nullptr, d);
}

ffi::Error PoolBwdGuided(cudaStream_t stream, int32_t device,
                         ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                         ffi::AnyBuffer g, ffi::AnyBuffer out,
                         ffi::AnyBuffer ct, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Result<ffi::AnyBuffer> dg, DirectionAttrs d) {
  CudaBackend be(stream, device, scratch);
  ffi::AnyBuffer dg_buf = *dg;
  return Backward(be, "lmconv_pool_bwd_guided", x, &g, out, ct, *dx, &dg_buf,
                  d);
}

ffi::Error PoolTangent(cudaStream_t stream, int32_t device,
                       ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                       ffi::AnyBuffer out, ffi::AnyBuffer tx,
                       ffi::Result<ffi::AnyBuffer> tout, DirectionAttrs d) {
  CudaBackend be(stream, device, scratch);
  return Tangent(be, "lmconv_pool_tangent", x, nullptr, out, tx, nullptr,
                 *tout, d);
}

ffi::Error PoolTangentGuided(cudaStream_t stream, int32_t device,
                             ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                             ffi::AnyBuffer g, ffi::AnyBuffer out,
                             ffi::AnyBuffer tx, ffi::AnyBuffer tg,
                             ffi::Result<ffi::AnyBuffer> tout,
                             DirectionAttrs d) {
  CudaBackend be(stream, device, scratch);
  return Tangent(be, "lmconv_pool_tangent_guided", x, &g, out, tx, &tg,
                 *tout, d);
}

}  // namespace
}  // namespace cuda
}  // namespace lmconv

namespace ffi = xla::ffi;
using lmconv::bind_pool_bwd;
using lmconv::bind_pool_bwd_guided;
using lmconv::bind_pool_fwd;
using lmconv::bind_pool_fwd_guided;
using lmconv::bind_pool_tangent;
using lmconv::bind_pool_tangent_guided;

// Every handler gets the stream, the device and XLA's scratch allocator.
#define LMCONV_CUDA_CONTEXT                         \
  ffi::Ffi::Bind()                                  \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()     \
      .Ctx<ffi::DeviceOrdinal>()                    \
      .Ctx<ffi::ScratchAllocator>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvCudaPoolFwd, lmconv::cuda::PoolFwd,
                              bind_pool_fwd(LMCONV_CUDA_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvCudaPoolFwdGuided,
                              lmconv::cuda::PoolFwdGuided,
                              bind_pool_fwd_guided(LMCONV_CUDA_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvCudaPoolBwd, lmconv::cuda::PoolBwd,
                              bind_pool_bwd(LMCONV_CUDA_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvCudaPoolBwdGuided,
                              lmconv::cuda::PoolBwdGuided,
                              bind_pool_bwd_guided(LMCONV_CUDA_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvCudaPoolTangent, lmconv::cuda::PoolTangent,
                              bind_pool_tangent(LMCONV_CUDA_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvCudaPoolTangentGuided,
                              lmconv::cuda::PoolTangentGuided,
                              bind_pool_tangent_guided(LMCONV_CUDA_CONTEXT));
