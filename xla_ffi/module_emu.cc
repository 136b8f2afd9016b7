// nanobind module _lmconv_cuda_emu (built with -DLMCONV_EMULATOR=ON, CPU only):
// the CPU emulation of the CUDA kernels as FFI handlers for tests (emulate.cc),
// the launch plan the CUDA handlers would use, the CPU kernels' plan
// (cpu_plan.h) for any thread count, and whether this build compiled the CUDA
// code.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu_plan.h"
#include "cuda_ffi.h"
#include "nb_registrations.h"

namespace nb = nanobind;

// CMakeLists.txt: the device harness and its host twin, where built.
#ifndef LMCONV_HARNESS_CUDA
#define LMCONV_HARNESS_CUDA ""
#endif
#ifndef LMCONV_HARNESS_HOST_PATH
#define LMCONV_HARNESS_HOST_PATH ""
#endif

LMCONV_DECLARE_POOL_HANDLERS(LmconvEmu)

namespace {

// The checked call the handlers would see for these operands.
lmconv::Call call_of(const char* where, std::vector<int64_t>& group_sizes,
                     std::vector<int64_t>& directions,
                     std::vector<int64_t>& shape, const std::string& pass,
                     std::optional<std::vector<int64_t>>& guide_shape,
                     bool saved_members) {
  lmconv::Call c;
  const xla::ffi::Span<const int64_t> sizes(group_sizes.data(),
                                            group_sizes.size());
  const xla::ffi::Span<const int64_t> dirs(directions.data(),
                                           directions.size());
  if (auto e = lmconv::grouping_of(where, sizes, dirs, &c.grouping);
      e.failure()) {
    throw nb::value_error(e.message().c_str());
  }
  const int r = static_cast<int>(shape.size());
  if (r < 3 || r > 11) throw nb::value_error("shape must have rank 3 to 11");
  c.geo = lmconv::Geometry{1, shape[r - 3], shape[r - 2], shape[r - 1]};
  for (int k = 0; k + 3 < r; ++k) c.geo.batch *= shape[k];
  if (c.geo.channels % c.grouping.groups != 0) {
    throw nb::value_error("channels do not split into the groups");
  }
  c.group_channels = c.geo.channels / c.grouping.groups;
  c.has_members =
      c.grouping.max_members > 1 && (saved_members || pass != "forward");
  c.guided = guide_shape.has_value();
  if (c.guided) {
    if (static_cast<int>(guide_shape->size()) != r) {
      throw nb::value_error("guide_shape must have x's rank");
    }
    c.guide =
        lmconv::guide_layout_from_dims(shape.data(), guide_shape->data(), r);
  }
  return c;
}

// The launches of one call, as the CUDA handler plans them.
nb::dict launch_plan(std::vector<int64_t> group_sizes,
                     std::vector<int64_t> directions,
                     std::vector<int64_t> shape, const std::string& pass,
                     int64_t multiprocessors,
                     std::optional<std::vector<int64_t>> guide_shape,
                     bool saved_members) {
  const lmconv::Call c = call_of("launch_plan", group_sizes, directions, shape,
                                 pass, guide_shape, saved_members);
  lmconv::Pass p;
  if (pass == "forward")
    p = lmconv::Pass::kForward;
  else if (pass == "backward")
    p = lmconv::Pass::kBackward;
  else if (pass == "tangent")
    p = lmconv::Pass::kTangent;
  else
    throw nb::value_error("pass must be 'forward', 'backward' or 'tangent'");
  const lmconv::LaunchPlan lp = lmconv::plan_for(c, p, multiprocessors);
  nb::dict d;
  d["blocks"] = lp.blocks;
  d["threads"] = lp.threads;
  d["phases"] = lp.phases;
  d["workspace_elements"] = lp.blocks * lp.ring;
  d["lanes"] = lp.lanes;
  d["chunks"] = lp.chunks;
  d["pixel_lanes"] = lp.pixel_lanes;
  d["pixels_per_batch"] = lp.pixel_lanes * lmconv::kBatch;
  d["launches"] = lp.launches;
  d["max_members"] = lp.max_members;
  d["saved_members"] = lp.saved_members;  // the residual is in `members`
  d["codes"] = lp.codes;  // ... as uint8 winner codes (else member pools)
  d["guide_slice"] = lmconv::kGuideSlice;  // the reduction's two levels
  d["guide_n"] = lp.guide_n;
  d["guide_slices"] = lp.guide_slices;
  d["slice_blocks"] = lp.slice_blocks;
  d["total_blocks"] = lp.total_blocks;
  d["reduce_threads"] = lp.reduce_threads;
  d["kernel_args_bytes"] = sizeof(lmconv::KernelArgs<float>);
  nb::list sweeps;
  int total = 0;
  for (int g = 0; g < c.grouping.groups; ++g) total += c.grouping.members[g];
  for (int k = 0; k < total; ++k) {
    const lmconv::Sweep s = lmconv::sweep_of(lp, k);
    nb::dict sd;
    sd["phases"] = s.phases;
    sd["skew"] = s.skew;
    sd["transposed"] = s.transposed;
    sd["view_height"] = s.height;
    sd["view_width"] = s.width;
    sd["slots"] = s.slots;
    sweeps.append(sd);
  }
  d["sweeps"] = sweeps;
  return d;
}

// The CPU kernels' plan of one call (cpu_plan.h: plan_cpu) for `threads`
// threads and elements of element_bytes.
nb::dict cpu_plan(std::vector<int64_t> group_sizes,
                  std::vector<int64_t> directions, std::vector<int64_t> shape,
                  const std::string& pass, int64_t threads,
                  int64_t element_bytes,
                  std::optional<std::vector<int64_t>> guide_shape,
                  bool saved_members) {
  const lmconv::Call c = call_of("cpu_plan", group_sizes, directions, shape,
                                 pass, guide_shape, saved_members);
  if (pass != "forward" && pass != "tangent" && pass != "backward") {
    throw nb::value_error("pass must be 'forward', 'backward' or 'tangent'");
  }
  if (threads < 1) throw nb::value_error("threads must be >= 1");
  if (element_bytes != 2 && element_bytes != 4 && element_bytes != 8) {
    throw nb::value_error("element_bytes must be 2, 4 or 8");
  }
  const lmconv::CpuPass p = pass == "forward"   ? lmconv::CpuPass::kForward
                            : pass == "tangent" ? lmconv::CpuPass::kTangent
                                                : lmconv::CpuPass::kBackward;
  const lmconv::CpuPlan plan = lmconv::plan_cpu(c, p, threads, element_bytes);
  nb::dict d;
  d["kind"] = lmconv::cpu_kind_name(plan.kind);
  d["items"] = plan.items;
  d["items_per_image"] = plan.items_per_image;
  d["block"] = plan.block;
  d["whole_groups"] = plan.whole_groups;
  d["nblocks"] = plan.nblocks;
  nb::list together;
  for (int64_t k = 0; k < plan.items_per_image; ++k) {
    if (plan.swept_together(k)) together.append(k);
  }
  d["swept_together"] = together;
  return d;
}

}  // namespace

NB_MODULE(_lmconv_cuda_emu, m) {
  m.doc() = "CPU emulation of the CUDA kernels of the landmark pool (tests).";
  m.def(
      "registrations",
      [] {
        return lmconv::registrations("lmconv_emu_",
                                     LMCONV_POOL_HANDLERS(LmconvEmu));
      },
      "Returns {target name: capsule} for jax.ffi.register_ffi_target (cpu).");
  m.def("launch_plan", &launch_plan, nb::arg("group_sizes"),
        nb::arg("directions"), nb::arg("shape"), nb::arg("pass_"),
        nb::arg("multiprocessors"), nb::arg("guide_shape") = nb::none(),
        nb::arg("saved_members") = true,
        "The CUDA launches of one grouped call (pass_: 'forward', "
        "'backward' or 'tangent'; saved_members=False: a forward that does "
        "not save the member pools): grid, block, phases, workspace, and "
        "each direction's sweep.");
  m.def("cpu_plan", &cpu_plan, nb::arg("group_sizes"), nb::arg("directions"),
        nb::arg("shape"), nb::arg("pass_"), nb::arg("threads"),
        nb::arg("element_bytes"), nb::arg("guide_shape") = nb::none(),
        nb::arg("saved_members") = true,
        "The CPU kernels' plan of one grouped call for `threads` threads and "
        "elements of element_bytes: the traversal ('kind') and its work "
        "items (items, items_per_image, block, whole_groups, nblocks, and "
        "the items of an image swept together).");
  m.def(
      "build_info",
      [] {
        nb::dict d;
        d["cuda_compiled"] = bool(LMCONV_CUDA_COMPILED);
        d["cuda_compiler"] = LMCONV_CUDA_COMPILER;
        d["harness_cuda"] = LMCONV_HARNESS_CUDA;
        d["harness_host"] = LMCONV_HARNESS_HOST_PATH;
        return d;
      },
      "Whether this build compiled the CUDA kernels, and with which nvcc; "
      "where it put the device harness (tests/cuda_harness.cu) and its host "
      "twin ('' where not built).");
}
