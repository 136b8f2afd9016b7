// The XLA FFI side of the CUDA kernels, written once for the real launch
// (cuda_handlers.cc) and for the CPU emulation (emulate.cc): input checks,
// dtype dispatch, the launch plan and the kernel arguments. What differs is a
// Backend:
//
//   ffi::ErrorOr<int64_t> min_blocks();            // plan_launch's min_blocks
//   ffi::ErrorOr<void*> workspace(size_t bytes);   // device scratch
//   template <typename Body>
//   ffi::Error launch(const LaunchPlan&, const typename Body::Args&);
//
// The checks and messages are those of cpu.cc, so both platforms fail alike.
#ifndef LMCONV_JAX_XLA_FFI_CUDA_FFI_H_
#define LMCONV_JAX_XLA_FFI_CUDA_FFI_H_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "cuda_schedule.h"
#include "xla/ffi/api/ffi.h"

namespace lmconv {

// The direction as it arrives: six int64 attributes (Python ints).
struct DirectionAttrs {
  int64_t row_step, col_step, n1_row, n1_col, n2_row, n2_col;
};

}  // namespace lmconv

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    lmconv::DirectionAttrs, xla::ffi::StructMember<int64_t>("row_step"),
    xla::ffi::StructMember<int64_t>("col_step"),
    xla::ffi::StructMember<int64_t>("n1_row"),
    xla::ffi::StructMember<int64_t>("n1_col"),
    xla::ffi::StructMember<int64_t>("n2_row"),
    xla::ffi::StructMember<int64_t>("n2_col"));

namespace lmconv {
namespace cuda {

namespace ffi = xla::ffi;

// (batch, H, W, C): every dim before the last three is folded into batch.
struct Geometry {
  int64_t batch, height, width, channels;
  int64_t size() const { return batch * height * width * channels; }
};

inline std::string dims_str(ffi::AnyBuffer::Dimensions dims) {
  std::ostringstream s;
  s << "(";
  for (size_t k = 0; k < dims.size(); ++k) s << (k ? ", " : "") << dims[k];
  s << (dims.size() == 1 ? ",)" : ")");
  return s.str();
}

inline std::string dtype_str(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    default: return "XLA type " + std::to_string(static_cast<int>(t));
  }
}

inline ffi::ErrorOr<Geometry> geometry_of(const char* target,
                                          ffi::AnyBuffer x) {
  auto dims = x.dimensions();
  if (dims.size() < 3) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        std::string(target) + ": x must have rank >= 3, shape (..., H, W, C); "
        "got shape " + dims_str(dims)));
  }
  const size_t r = dims.size();
  Geometry g{1, dims[r - 3], dims[r - 2], dims[r - 1]};
  for (size_t k = 0; k + 3 < r; ++k) g.batch *= dims[k];
  return g;
}

// Every other operand and result must have exactly x's shape and dtype.
inline ffi::Error check_like_x(const char* target, const char* name,
                               ffi::AnyBuffer x, ffi::AnyBuffer other) {
  auto xd = x.dimensions(), od = other.dimensions();
  if (!std::equal(xd.begin(), xd.end(), od.begin(), od.end())) {
    return ffi::Error::InvalidArgument(
        std::string(target) + ": " + name + " must have x's shape " +
        dims_str(xd) + "; got " + dims_str(od));
  }
  if (other.element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument(
        std::string(target) + ": " + name + " must have x's dtype " +
        dtype_str(x.element_type()) + "; got " +
        dtype_str(other.element_type()));
  }
  return ffi::Error::Success();
}

inline ffi::ErrorOr<Direction> direction_of(const char* target,
                                            DirectionAttrs a) {
  Direction d;
  if (const char* why = make_direction(a.row_step, a.col_step, a.n1_row,
                                       a.n1_col, a.n2_row, a.n2_col, &d)) {
    std::ostringstream s;
    s << target << ": invalid direction (row_step=" << a.row_step
      << ", col_step=" << a.col_step << ", n1=(" << a.n1_row << ", "
      << a.n1_col << "), n2=(" << a.n2_row << ", " << a.n2_col
      << ")): " << why;
    return ffi::Unexpected(ffi::Error::InvalidArgument(s.str()));
  }
  return d;
}

// Calls fn(S{}) with S the storage type of dtype t; false if unsupported.
template <typename F>
bool dispatch_dtype(ffi::DataType t, F&& fn) {
  switch (t) {
    case ffi::DataType::F32: fn(float{}); return true;
    case ffi::DataType::F64: fn(double{}); return true;
    case ffi::DataType::F16: fn(Half{}); return true;
    case ffi::DataType::BF16: fn(BFloat16{}); return true;
    default: return false;
  }
}

template <typename S>
S* data(ffi::AnyBuffer b) {
  return static_cast<S*>(b.untyped_data());
}

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
                   DirectionAttrs attrs, bool backward, LaunchPlan* plan) {
  auto dir = direction_of(target, attrs);
  if (dir.has_error()) return dir.error();
  auto geo = geometry_of(target, x);
  if (geo.has_error()) return geo.error();
  for (const auto& [name, buffer] : others) {
    if (!buffer) continue;
    if (auto e = check_like_x(target, name, x, *buffer); e.failure()) return e;
  }
  switch (x.element_type()) {
    case ffi::DataType::F32: case ffi::DataType::F64:
    case ffi::DataType::F16: case ffi::DataType::BF16: break;
    default:
      return ffi::Error::InvalidArgument(
          std::string(target) + ": unsupported dtype " +
          dtype_str(x.element_type()) +
          "; expected float32, float64, float16 or bfloat16");
  }
  plan->blocks = 0;
  if (geo->size() == 0) return ffi::Error::Success();
  auto min_blocks = be.min_blocks();
  if (min_blocks.has_error()) return min_blocks.error();
  *plan = plan_launch(*dir, geo->batch, geo->height, geo->width,
                      geo->channels, backward, *min_blocks);
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
                       /*backward=*/false, &plan);
      e.failure() || plan.blocks == 0) {
    return e;
  }
  ffi::Error result;
  dispatch_dtype(x.element_type(), [&](auto tag) {
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
  return result;
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
                       attrs, /*backward=*/true, &plan);
      e.failure() || plan.blocks == 0) {
    return e;
  }
  ffi::Error result;
  dispatch_dtype(x.element_type(), [&](auto tag) {
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
  return result;
}

}  // namespace cuda
}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_FFI_H_
