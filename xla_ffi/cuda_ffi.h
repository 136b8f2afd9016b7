// The phased back end: what the CUDA handlers (cuda_handlers.cc) and their
// CPU emulation (emulate.cc) have in common. Both are handlers.inc's six
// handlers over PhasedBackend<Platform>, which turns a checked Call
// (ffi_common.h) into the launch plan and kernel arguments of
// cuda_schedule.h and hands them to a Platform:
//
//   ffi::ErrorOr<int64_t> multiprocessors();       // the GPU's
//   ffi::ErrorOr<void*> workspace(size_t bytes);   // device scratch
//   ffi::Error zero(void* p, size_t bytes);        // device memset
//   void poison(void* p, size_t bytes);            // emulator: NaN bytes
//   int flags();                                   // emulator test hooks
//   template <typename Body>
//   ffi::Error launch(const Launch&, const typename Body::Args&);
//
// One launch per pass for the whole grouping, plus the reduction of a
// broadcast guide's gradient in the guided backward (two more, small
// launches: slice sums, then their totals).
#ifndef LMCONV_JAX_XLA_FFI_CUDA_FFI_H_
#define LMCONV_JAX_XLA_FFI_CUDA_FFI_H_

#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "cuda_schedule.h"
#include "ffi_common.h"

namespace lmconv {

static_assert(kPlanMaxMembers == kMaxMembers, "grouping limits differ");
static_assert(kPlanMaxGroups == kMaxGroups, "grouping limits differ");
static_assert(kPlanMaxDirections == kMaxDirections, "grouping limits differ");

// A kernel launch: grid, block, phases (a barrier after each).
struct Launch {
  int64_t blocks, threads, phases;
};

inline Launch main_launch(const LaunchPlan& p) {
  return Launch{p.blocks, p.threads, p.phases};
}
inline Launch slices_launch(const LaunchPlan& p) {
  return Launch{p.slice_blocks, p.reduce_threads, 1};
}
inline Launch total_launch(const LaunchPlan& p) {
  return Launch{p.total_blocks, p.reduce_threads, 1};
}

// The plan of a checked call.
inline LaunchPlan plan_for(const Call& c, Pass pass, int64_t multiprocessors) {
  PlanInput in;
  in.batch = c.geo.batch;
  in.height = c.geo.height;
  in.width = c.geo.width;
  in.channels = c.geo.channels;
  const Grouping& gr = c.grouping;
  in.groups = gr.groups;
  int total = 0;
  for (int g = 0; g < gr.groups; ++g) {
    in.members[g] = gr.members[g];
    in.first[g] = gr.first[g];
    total += gr.members[g];
  }
  for (int k = 0; k < total; ++k) in.dirs[k] = gr.dirs[k];
  in.saved_members = c.has_members;
  in.guided = c.guided;
  in.guide_full = c.guided && c.guide.full;
  const GuideLayout& l = c.guide;
  const int lead = c.guided ? l.lead : 0;
  in.rank = lead + 3;
  for (int k = 0; k < lead; ++k) {
    in.x_dims[k] = l.x_lead[k];
    in.g_strides[k] = l.g_stride[k];
  }
  in.x_dims[lead] = c.geo.height;
  in.x_dims[lead + 1] = c.geo.width;
  in.x_dims[lead + 2] = c.geo.channels;
  in.g_strides[lead] = c.guided ? l.row_stride : 0;
  in.g_strides[lead + 1] = c.guided ? l.col_stride : 0;
  in.g_strides[lead + 2] = c.guided ? l.channel_stride : 0;
  in.g_elements = c.guided ? l.elements : 0;
  return plan_launch(in, pass, multiprocessors);
}

template <typename Platform>
class PhasedBackend {
 public:
  explicit PhasedBackend(Platform platform) : pf_(std::move(platform)) {}

  ffi::Error zero(void* p, size_t bytes) { return pf_.zero(p, bytes); }

  template <typename S>
  ffi::Error forward(const Call& c, const Buffers<S>& b) {
    KernelArgs<S> a;
    if (auto e = args_of(c, Pass::kForward, b, &a); e.failure()) return e;
    a.out = b.out_w;
    pf_.poison(a.out, bytes<S>(a.plan.size));
    if (c.has_members && c.guided) {
      pf_.poison(a.members, bytes<S>(a.plan.max_members * a.plan.size));
    } else if (c.has_members) {
      pf_.poison(a.codes, bytes<uint8_t>(a.plan.max_members * a.plan.size));
    }
    return launch_main<ForwardBody>(c.guided, a);
  }

  template <typename S>
  ffi::Error backward(const Call& c, const Buffers<S>& b) {
    KernelArgs<S> a;
    if (auto e = args_of(c, Pass::kBackward, b, &a); e.failure()) return e;
    pf_.poison(a.dx, bytes<S>(a.plan.size));
    if (!c.guided) return launch_main<BackwardBody>(false, a);
    pf_.poison(a.dg, bytes<S>(a.plan.g_elements));
    a.dg_pixels = a.dg;
    if (!c.guide.full) {  // per pixel first, then summed over broadcast dims
      auto w = pf_.workspace(bytes<S>(a.plan.size));
      if (w.has_error()) return w.error();
      a.dg_pixels = static_cast<S*>(*w);
      auto q = pf_.workspace(
          bytes<Compute<S>>(a.plan.guide_slices * a.plan.g_elements));
      if (q.has_error()) return q.error();
      a.partials = static_cast<Compute<S>*>(*q);
    }
    if (auto e = launch_main<BackwardBody>(true, a);
        e.failure() || c.guide.full) {
      return e;
    }
    if (auto e =
            pf_.template launch<ReduceSlicesBody<S>>(slices_launch(a.plan), a);
        e.failure()) {
      return e;
    }
    return pf_.template launch<ReduceTotalBody<S>>(total_launch(a.plan), a);
  }

  template <typename S>
  ffi::Error tangent(const Call& c, const Buffers<S>& b) {
    KernelArgs<S> a;
    if (auto e = args_of(c, Pass::kTangent, b, &a); e.failure()) return e;
    pf_.poison(a.tout, bytes<S>(a.plan.size));
    return launch_main<TangentBody>(c.guided, a);
  }

 private:
  template <typename S>
  static size_t bytes(int64_t n) {
    return static_cast<size_t>(n) * sizeof(S);
  }

  ffi::Error plan_of(const Call& c, Pass pass, LaunchPlan* plan) {
    auto mp = pf_.multiprocessors();
    if (mp.has_error()) return mp.error();
    *plan = plan_for(c, pass, *mp);
    if (plan->blocks > std::numeric_limits<int32_t>::max() ||
        plan->slice_blocks > std::numeric_limits<int32_t>::max()) {
      return ffi::Error::InvalidArgument(
          "lmconv_jax CUDA kernels: " + std::to_string(plan->blocks) +
          " (batch x groups x channel chunks) thread blocks is more than a "
          "CUDA grid holds; split the batch");
    }
    return ffi::Error::Success();
  }

  // The kernel arguments of pass `pass` of a checked call: its plan, the
  // call's buffers, and the ring workspace where the plan has a ring (the
  // tangent and backward; a forward that does not save the member pools for
  // the derivatives, whose merged groups merge as they go: ForwardBody).
  template <typename S>
  ffi::Error args_of(const Call& c, Pass pass, const Buffers<S>& b,
                     KernelArgs<S>* args) {
    KernelArgs<S>& a = *args;
    if (auto e = plan_of(c, pass, &a.plan); e.failure()) return e;
    a.x = b.x;
    a.g = b.g;
    a.out = const_cast<S*>(b.out);  // only the forward's body writes it
    a.members = b.members;
    a.codes = b.codes;
    a.tx = b.tx;
    a.tg = b.tg;
    a.tout = b.tout;
    a.ct = b.ct;
    a.dx = b.dx;
    a.dg_pixels = nullptr;
    a.dg = b.dg;
    a.partials = nullptr;
    a.ring = nullptr;
    a.flags = pf_.flags();
    if (a.plan.ring == 0) return ffi::Error::Success();
    return ring(a.plan, &a);
  }

  template <typename S>
  ffi::Error ring(const LaunchPlan& plan, KernelArgs<S>* a) {
    auto w = pf_.workspace(bytes<Compute<S>>(plan.blocks * plan.ring));
    if (w.has_error()) return w.error();
    a->ring = static_cast<Compute<S>*>(*w);
    return ffi::Error::Success();
  }

  // Launches Body<S, guided> on the plan's main grid.
  template <template <typename, bool> class Body, typename S>
  ffi::Error launch_main(bool guided, const KernelArgs<S>& a) {
    if (guided) {
      return pf_.template launch<Body<S, true>>(main_launch(a.plan), a);
    }
    return pf_.template launch<Body<S, false>>(main_launch(a.plan), a);
  }

  Platform pf_;
};

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_FFI_H_
