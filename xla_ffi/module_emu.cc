// nanobind module _lmconv_cuda_emu (always built, CPU only): the CPU emulation
// of the CUDA kernels as FFI handlers for tests (emulate.cc), the launch plan
// the CUDA handlers would use, and whether this build compiled the CUDA code.

#include <nanobind/nanobind.h>

#include "cuda_schedule.h"
#include "nb_registrations.h"

namespace nb = nanobind;

LMCONV_DECLARE_POOL_HANDLERS(LmconvEmu)

namespace {

// The launch of one call, as the CUDA handler plans it.
nb::dict launch_plan(int64_t row_step, int64_t col_step, int64_t n1_row,
                     int64_t n1_col, int64_t n2_row, int64_t n2_col,
                     int64_t batch, int64_t height, int64_t width,
                     int64_t channels, bool backward,
                     int64_t multiprocessors, bool tangent) {
  if (backward && tangent) {
    throw nb::value_error("backward and tangent are different kernels");
  }
  lmconv::Direction d;
  if (const char* why = lmconv::make_direction(row_step, col_step, n1_row,
                                               n1_col, n2_row, n2_col, &d)) {
    throw nb::value_error(why);
  }
  const lmconv::LaunchPlan p = lmconv::plan_launch(
      d, batch, height, width, channels,
      backward  ? lmconv::Pass::kBackward
      : tangent ? lmconv::Pass::kTangent
                : lmconv::Pass::kForward,
      multiprocessors);
  nb::dict r;
  r["blocks"] = p.blocks;
  r["threads"] = p.threads;
  r["phases"] = p.phases;
  r["shared_bytes"] = p.shared_bytes;
  r["workspace_elements"] = p.blocks * p.ring;
  r["lanes"] = p.lanes;
  r["pixel_lanes"] = p.pixel_lanes;
  r["skew"] = p.sweep.skew;
  r["transposed"] = p.sweep.transposed;
  r["view_height"] = p.sweep.height;
  r["view_width"] = p.sweep.width;
  r["pixels_per_batch"] = p.pixel_lanes * lmconv::kBatch;
  r["launches"] = 1;
  return r;
}

}  // namespace

NB_MODULE(_lmconv_cuda_emu, m) {
  m.doc() = "CPU emulation of the CUDA kernels of the landmark pool (tests).";
  m.def("registrations", [] {
    return lmconv::registrations("lmconv_emu_",
                                 LMCONV_POOL_HANDLERS(LmconvEmu));
  }, "Returns {target name: capsule} for jax.ffi.register_ffi_target (cpu).");
  m.def("launch_plan", &launch_plan, nb::arg("row_step"), nb::arg("col_step"),
        nb::arg("n1_row"), nb::arg("n1_col"), nb::arg("n2_row"),
        nb::arg("n2_col"), nb::arg("batch"), nb::arg("height"),
        nb::arg("width"), nb::arg("channels"), nb::arg("backward"),
        nb::arg("multiprocessors"), nb::arg("tangent") = false,
        "The CUDA launch of one pool call (forward, backward=True or "
        "tangent=True): grid, block, phases, workspace.");
  m.def("build_info", [] {
    nb::dict d;
    d["cuda_compiled"] = bool(LMCONV_CUDA_COMPILED);
    d["cuda_compiler"] = LMCONV_CUDA_COMPILER;
    return d;
  }, "Whether this build compiled the CUDA kernels, and with which nvcc.");
}
