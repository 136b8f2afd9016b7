// CPU emulation of the CUDA kernels: the FFI handlers of cuda_ffi.h with a
// Backend that, instead of launching a kernel, runs its body (cuda_schedule.h,
// compiled here for the host) for every block and thread of the real launch
// geometry, phase by phase: all threads of all blocks finish a phase before
// any starts the next, as __syncthreads() guarantees within a block. Blocks
// are independent, so running them in lock step is one valid GPU order.
//
// To catch what the GPU could do differently, the emulator
//   * can run the blocks and threads of each phase in reverse order (a body
//     that read another thread's output of the same phase would differ), and
//   * fills the outputs and the workspace with NaN bytes first, so a pixel
//     that is never written, or read before it is written, shows up as NaN.
//
// Targets (platform "cpu"): lmconv_emu_pool_{fwd,bwd,tangent}[_guided], with
// the operands of the real targets and two more int64 attributes:
// multiprocessors (what the CUDA handler asks the GPU; it shapes the plan)
// and order (0: blocks and threads ascending, 1: descending).

#include <cstring>
#include <vector>

#include "cuda_ffi.h"

namespace lmconv {

// The direction, then the emulator's own two attributes (decoded flat, in
// this order, by aggregate initialisation).
struct EmulatorAttrs {
  DirectionAttrs direction;
  int64_t multiprocessors, order;
};

}  // namespace lmconv

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    lmconv::EmulatorAttrs, LMCONV_DIRECTION_ATTR_MEMBERS,
    xla::ffi::StructMember<int64_t>("multiprocessors"),
    xla::ffi::StructMember<int64_t>("order"));

namespace lmconv {
namespace cuda {
namespace {

// Runs Body like cuda.cu's phased kernel: phases, then blocks, then threads,
// each block with its own shared memory.
template <typename Body>
void emulate(const LaunchPlan& plan, const typename Body::Args& args,
             bool reverse) {
  std::vector<unsigned char> shared(plan.blocks * plan.shared_bytes);
  for (int64_t phase = 0; phase < plan.phases; ++phase) {
    for (int64_t b = 0; b < plan.blocks; ++b) {
      const int64_t block = reverse ? plan.blocks - 1 - b : b;
      for (int64_t t = 0; t < plan.threads; ++t) {
        const int64_t thread = reverse ? plan.threads - 1 - t : t;
        Body::run(args, block, thread, phase,
                  shared.data() + block * plan.shared_bytes);
      }
    }
  }
}

void poison(void* data, size_t bytes) { std::memset(data, 0xFF, bytes); }

class EmulatorBackend {
 public:
  explicit EmulatorBackend(const EmulatorAttrs& a)
      : multiprocessors_(a.multiprocessors), reverse_(a.order != 0) {}

  ffi::ErrorOr<int64_t> multiprocessors() const { return multiprocessors_; }

  ffi::ErrorOr<void*> workspace(size_t bytes) {
    workspace_.resize(bytes / sizeof(double) + 1);  // aligned for any G
    poison(workspace_.data(), workspace_.size() * sizeof(double));
    return static_cast<void*>(workspace_.data());
  }

  template <typename Body>
  ffi::Error launch(const LaunchPlan& plan, const typename Body::Args& args) {
    emulate<Body>(plan, args, reverse_);
    return ffi::Error::Success();
  }

 private:
  int64_t multiprocessors_;
  bool reverse_;
  std::vector<double> workspace_;
};

void poison(ffi::AnyBuffer b) { poison(b.untyped_data(), b.size_bytes()); }

ffi::Error EmuFwd(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out,
                  EmulatorAttrs a) {
  EmulatorBackend be(a);
  poison(*out);
  return Forward(be, "lmconv_emu_pool_fwd", x, nullptr, *out, a.direction);
}

ffi::Error EmuFwdGuided(ffi::AnyBuffer x, ffi::AnyBuffer g,
                        ffi::Result<ffi::AnyBuffer> out, EmulatorAttrs a) {
  EmulatorBackend be(a);
  poison(*out);
  return Forward(be, "lmconv_emu_pool_fwd_guided", x, &g, *out,
                 a.direction);
}

ffi::Error EmuBwd(ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::AnyBuffer ct,
                  ffi::Result<ffi::AnyBuffer> dx, EmulatorAttrs a) {
  EmulatorBackend be(a);
  poison(*dx);
  return Backward(be, "lmconv_emu_pool_bwd", x, nullptr, out, ct, *dx,
                  nullptr, a.direction);
}

ffi::Error EmuBwdGuided(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer out,
                        ffi::AnyBuffer ct, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> dg, EmulatorAttrs a) {
  EmulatorBackend be(a);
  ffi::AnyBuffer dg_buf = *dg;
  poison(*dx);
  poison(dg_buf);
  return Backward(be, "lmconv_emu_pool_bwd_guided", x, &g, out, ct, *dx,
                  &dg_buf, a.direction);
}

ffi::Error EmuTangent(ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::AnyBuffer tx,
                      ffi::Result<ffi::AnyBuffer> tout, EmulatorAttrs a) {
  EmulatorBackend be(a);
  poison(*tout);
  return Tangent(be, "lmconv_emu_pool_tangent", x, nullptr, out, tx, nullptr,
                 *tout, a.direction);
}

ffi::Error EmuTangentGuided(ffi::AnyBuffer x, ffi::AnyBuffer g,
                            ffi::AnyBuffer out, ffi::AnyBuffer tx,
                            ffi::AnyBuffer tg,
                            ffi::Result<ffi::AnyBuffer> tout,
                            EmulatorAttrs a) {
  EmulatorBackend be(a);
  poison(*tout);
  return Tangent(be, "lmconv_emu_pool_tangent_guided", x, &g, out, tx, &tg,
                 *tout, a.direction);
}

}  // namespace
}  // namespace cuda
}  // namespace lmconv

using lmconv::EmulatorAttrs;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LmconvEmuPoolFwd, lmconv::cuda::EmuFwd,
    lmconv::bind_pool_fwd<EmulatorAttrs>(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LmconvEmuPoolFwdGuided, lmconv::cuda::EmuFwdGuided,
    lmconv::bind_pool_fwd_guided<EmulatorAttrs>(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LmconvEmuPoolBwd, lmconv::cuda::EmuBwd,
    lmconv::bind_pool_bwd<EmulatorAttrs>(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LmconvEmuPoolBwdGuided, lmconv::cuda::EmuBwdGuided,
    lmconv::bind_pool_bwd_guided<EmulatorAttrs>(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LmconvEmuPoolTangent, lmconv::cuda::EmuTangent,
    lmconv::bind_pool_tangent<EmulatorAttrs>(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    LmconvEmuPoolTangentGuided, lmconv::cuda::EmuTangentGuided,
    lmconv::bind_pool_tangent_guided<EmulatorAttrs>(xla::ffi::Ffi::Bind()));
