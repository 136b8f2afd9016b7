// What every lmconv XLA FFI target has in common, whatever runs it: the
// direction attributes, the operands of the six targets, the input checks
// and the dtype dispatch. Used by the CPU handlers (cpu.cc), the CUDA
// handlers and their CPU emulation (cuda_ffi.h), so all fail alike.
#ifndef LMCONV_JAX_XLA_FFI_FFI_COMMON_H_
#define LMCONV_JAX_XLA_FFI_FFI_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>

#include "landmark_pool.h"
#include "xla/ffi/api/ffi.h"

namespace lmconv {

// The direction as it arrives: six int64 attributes (Python ints).
struct DirectionAttrs {
  int64_t row_step, col_step, n1_row, n1_col, n2_row, n2_col;
};

}  // namespace lmconv

// The members of DirectionAttrs, for the decoding of a struct that starts
// with them.
#define LMCONV_DIRECTION_ATTR_MEMBERS                                      \
  xla::ffi::StructMember<int64_t>("row_step"),                             \
      xla::ffi::StructMember<int64_t>("col_step"),                         \
      xla::ffi::StructMember<int64_t>("n1_row"),                           \
      xla::ffi::StructMember<int64_t>("n1_col"),                           \
      xla::ffi::StructMember<int64_t>("n2_row"),                           \
      xla::ffi::StructMember<int64_t>("n2_col")

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(lmconv::DirectionAttrs,
                                      LMCONV_DIRECTION_ATTR_MEMBERS);

namespace lmconv {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------------------
// The six targets' operands and results, bound after a binding's contexts,
// with the attributes as a struct A (DirectionAttrs, or one that extends it):
//   lmconv_pool_fwd         (x)              -> out
//   lmconv_pool_fwd_guided  (x, g)           -> out
//   lmconv_pool_bwd         (x, out, ct)     -> dx
//   lmconv_pool_bwd_guided  (x, g, out, ct)  -> dx, dguide
//   lmconv_pool_tangent         (x, out, tx)         -> tout
//   lmconv_pool_tangent_guided  (x, g, out, tx, tg)  -> tout
// ---------------------------------------------------------------------------

// kArgs buffer operands, then kRets buffer results, then the attributes.
template <int kArgs, int kRets, typename A, typename B>
auto bind_buffers(B&& binding) {
  if constexpr (kArgs > 0) {
    return bind_buffers<kArgs - 1, kRets, A>(
        std::forward<B>(binding).template Arg<ffi::AnyBuffer>());
  } else if constexpr (kRets > 0) {
    return bind_buffers<0, kRets - 1, A>(
        std::forward<B>(binding).template Ret<ffi::AnyBuffer>());
  } else {
    return std::forward<B>(binding).template Attrs<A>();
  }
}

template <typename A = DirectionAttrs, typename B>
auto bind_pool_fwd(B&& b) {
  return bind_buffers<1, 1, A>(std::forward<B>(b));
}
template <typename A = DirectionAttrs, typename B>
auto bind_pool_fwd_guided(B&& b) {
  return bind_buffers<2, 1, A>(std::forward<B>(b));
}
template <typename A = DirectionAttrs, typename B>
auto bind_pool_bwd(B&& b) {
  return bind_buffers<3, 1, A>(std::forward<B>(b));
}
template <typename A = DirectionAttrs, typename B>
auto bind_pool_bwd_guided(B&& b) {
  return bind_buffers<4, 2, A>(std::forward<B>(b));
}
template <typename A = DirectionAttrs, typename B>
auto bind_pool_tangent(B&& b) {
  return bind_buffers<3, 1, A>(std::forward<B>(b));
}
template <typename A = DirectionAttrs, typename B>
auto bind_pool_tangent_guided(B&& b) {
  return bind_buffers<5, 1, A>(std::forward<B>(b));
}

// ---------------------------------------------------------------------------
// Checks: each returns an InvalidArgument that names the target, what was
// given and what was expected.
// ---------------------------------------------------------------------------

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
    default: return "XLA " + std::to_string(static_cast<int>(t));
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

inline ffi::Error unsupported_dtype(const char* target, ffi::DataType t) {
  return ffi::Error::InvalidArgument(
      std::string(target) + ": unsupported dtype " + dtype_str(t) +
      "; expected float32, float64, float16 or bfloat16");
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

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_FFI_COMMON_H_
