// The XLA FFI side of the CUDA kernels, written once for the real launch
// (cuda_handlers.cc) and for the CPU emulation (emulate.cc): input checks,
// dtype dispatch, the launch plan and the kernel arguments. What differs is a
// Backend:
//
//   ffi::ErrorOr<int64_t> multiprocessors();       // the GPU's
//   ffi::ErrorOr<void*> workspace(size_t bytes);   // device scratch
//   template <typename Body>
//   ffi::Error launch(const LaunchPlan&, const typename Body::Args&);
//
// The checks (ffi_common.h) are those of cpu.cc, so both platforms fail alike.
#ifndef LMCONV_JAX_XLA_FFI_CUDA_FFI_H_
#define LMCONV_JAX_XLA_FFI_CUDA_FFI_H_

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "cuda_schedule.h"
#include "ffi_common.h"

namespace lmconv {
namespace cuda {

template <typename S>
const S* data_or_null(const ffi::AnyBuffer* b) {
  return b ? data<S>(*b) : nullptr;
}

// Checks the operands, plans the launch; plan->blocks == 0 if there is
// nothing to do.
template <typename Backend>
ffi::Error prepare(Backend& be, const char* target, ffi::AnyBuffer x,
                   std::initializer_list<std::pair<const char*,
                                                   const ffi::AnyBuffer*>>
                       others,
                   DirectionAttrs attrs, Pass pass, LaunchPlan* plan) {
  auto dir = direction_of(target, attrs);
  if (dir.has_error()) return dir.error();
  auto geo = geometry_of(target, x);
  if (geo.has_error()) return geo.error();
  for (const auto& [name, buffer] : others) {
    if (!buffer) continue;
    if (auto e = check_like_x(target, name, x, *buffer); e.failure()) return e;
  }
  plan->blocks = 0;
  if (geo->size() == 0) return ffi::Error::Success();
  auto multiprocessors = be.multiprocessors();
  if (multiprocessors.has_error()) return multiprocessors.error();
  *plan = plan_launch(*dir, geo->batch, geo->height, geo->width,
                      geo->channels, pass, *multiprocessors);
  if (plan->blocks > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument(
        std::string(target) + ": " + std::to_string(plan->blocks) +
        " (batch x channel chunks) thread blocks is more than a CUDA grid "
        "holds; split the batch");
  }
  return ffi::Error::Success();
}

template <typename Backend>
ffi::Error Forward(Backend& be, const char* target, ffi::AnyBuffer x,
                   const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                   DirectionAttrs attrs) {
  LaunchPlan plan;
  if (auto e = prepare(be, target, x, {{"guide", g}, {"out", &out}}, attrs,
                       Pass::kForward, &plan);
      e.failure() || plan.blocks == 0) {
    return e;
  }
  ffi::Error result;
  const bool ok = dispatch_dtype(x.element_type(), [&](auto tag) {
    using S = decltype(tag);
    auto run = [&](auto body) {
      using Body = decltype(body);
      result = be.template launch<Body>(
          plan, typename Body::Args{plan, data<S>(x), data_or_null<S>(g),
                                    data<S>(out)});
    };
    if (g) run(ForwardBody<S, true>{});
    else run(ForwardBody<S, false>{});  // g = 1: reads no guide
  });
  return ok ? std::move(result) : unsupported_dtype(target, x.element_type());
}

template <typename Backend>
ffi::Error Backward(Backend& be, const char* target, ffi::AnyBuffer x,
                    const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                    ffi::AnyBuffer ct, ffi::AnyBuffer dx,
                    const ffi::AnyBuffer* dg, DirectionAttrs attrs) {
  LaunchPlan plan;
  if (auto e = prepare(be, target, x,
                       {{"guide", g}, {"dguide", dg}, {"out", &out},
                        {"ct", &ct}, {"dx", &dx}},
                       attrs, Pass::kBackward, &plan);
      e.failure() || plan.blocks == 0) {
    return e;
  }
  ffi::Error result;
  const bool ok = dispatch_dtype(x.element_type(), [&](auto tag) {
    using S = decltype(tag);
    auto ring = be.workspace(static_cast<size_t>(plan.blocks * plan.ring) *
                             sizeof(Compute<S>));
    if (ring.has_error()) {
      result = ring.error();
      return;
    }
    auto run = [&](auto body) {
      using Body = decltype(body);
      result = be.template launch<Body>(
          plan, typename Body::Args{plan, data<S>(x), data_or_null<S>(g),
                                    data<S>(out), data<S>(ct), data<S>(dx),
                                    dg ? data<S>(*dg) : nullptr,
                                    static_cast<Compute<S>*>(*ring)});
    };
    if (g) run(BackwardBody<S, true>{});
    else run(BackwardBody<S, false>{});
  });
  return ok ? std::move(result) : unsupported_dtype(target, x.element_type());
}

// The tangent of out = pool(x[, g]) along tx (and tg when guided): one
// launch of the forward's schedule with the tangent's step (TangentBody).
template <typename Backend>
ffi::Error Tangent(Backend& be, const char* target, ffi::AnyBuffer x,
                   const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                   ffi::AnyBuffer tx, const ffi::AnyBuffer* tg,
                   ffi::AnyBuffer tout, DirectionAttrs attrs) {
  LaunchPlan plan;
  if (auto e = prepare(be, target, x,
                       {{"guide", g}, {"tguide", tg}, {"out", &out},
                        {"tx", &tx}, {"tout", &tout}},
                       attrs, Pass::kTangent, &plan);
      e.failure() || plan.blocks == 0) {
    return e;
  }
  ffi::Error result;
  const bool ok = dispatch_dtype(x.element_type(), [&](auto tag) {
    using S = decltype(tag);
    auto ring = be.workspace(static_cast<size_t>(plan.blocks * plan.ring) *
                             sizeof(Compute<S>));
    if (ring.has_error()) {
      result = ring.error();
      return;
    }
    auto run = [&](auto body) {
      using Body = decltype(body);
      result = be.template launch<Body>(
          plan, typename Body::Args{plan, data<S>(x), data_or_null<S>(g),
                                    data<S>(out), data<S>(tx),
                                    data_or_null<S>(tg), data<S>(tout),
                                    static_cast<Compute<S>*>(*ring)});
    };
    if (g) run(TangentBody<S, true>{});
    else run(TangentBody<S, false>{});
  });
  return ok ? std::move(result) : unsupported_dtype(target, x.element_type());
}

}  // namespace cuda
}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_FFI_H_
