// What every lmconv XLA FFI target has in common, whatever runs it: the
// grouping attributes, the operands of the six targets, the input checks and
// the dtype dispatch. The handlers themselves are written once, in
// handlers.inc, over a back end (cpu.h, cuda_handlers.cc, emulate.cc).
//
// A call pools the whole array x of shape (..., H, W, C) for a *grouping*:
// P groups of C / P contiguous channels; group p pools its channels in each
// of its members' directions (1 to kMaxMembers) and, with several members,
// merges them by max with ties to the first listed (lmconv_jax/ops.py).
#ifndef LMCONV_JAX_XLA_FFI_FFI_COMMON_H_
#define LMCONV_JAX_XLA_FFI_FFI_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "landmark_pool.h"
#include "xla/ffi/api/ffi.h"

namespace lmconv {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------------------
// The grouping, from its two attributes:
//   group_sizes: int64[P], the number of directions of each group;
//   directions:  int64[6 * sum(group_sizes)], each direction's (row_step,
//                col_step, n1_row, n1_col, n2_row, n2_col), group by group.
// ---------------------------------------------------------------------------

constexpr int kMaxMembers = 4;      // directions merged in one group
constexpr int kMaxGroups = 64;      // groups in one call
constexpr int kMaxDirections = 64;  // members over all groups

struct Grouping {
  int groups = 0;           // P
  int max_members = 0;      // K = the most members of any group
  int members[kMaxGroups];  // group_sizes: members (directions) per group
  int first[kMaxGroups];    // index in dirs of the group's first member
  Direction dirs[kMaxDirections];

  LMCONV_HDI const Direction& dir(int group, int member) const {
    return dirs[first[group] + member];
  }
};

// (batch, H, W, C): every dim before the last three is folded into batch.
struct Geometry {
  int64_t batch, height, width, channels;
  int64_t size() const { return batch * height * width * channels; }
};

// Where a guide broadcast to x's shape reads: the guide has x's rank and each
// dim is x's or 1. Strides are in elements, 0 along broadcast dims.
struct GuideLayout {
  int64_t row_stride, col_stride, channel_stride;  // of the unflipped image
  int64_t height, width;           // the guide's own H, W (1 if broadcast)
  bool full;                       // exactly x's shape: no reduction needed
  int64_t elements;                // the guide's size
  int lead = 0;                    // number of dims before (H, W, C)
  int64_t x_lead[8], g_stride[8];  // x's leading dims; guide stride (0: bcast)

  // Element offset of image b's first guide element.
  int64_t image_offset(int64_t b) const {
    int64_t off = 0;
    for (int k = lead - 1; k >= 0; --k) {
      off += (b % x_lead[k]) * g_stride[k];
      b /= x_lead[k];
    }
    return off;
  }
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
    case ffi::DataType::F32:
      return "float32";
    case ffi::DataType::F64:
      return "float64";
    case ffi::DataType::F16:
      return "float16";
    case ffi::DataType::BF16:
      return "bfloat16";
    case ffi::DataType::S8:
      return "int8";
    case ffi::DataType::S16:
      return "int16";
    case ffi::DataType::S32:
      return "int32";
    case ffi::DataType::S64:
      return "int64";
    case ffi::DataType::U8:
      return "uint8";
    case ffi::DataType::U32:
      return "uint32";
    case ffi::DataType::PRED:
      return "bool";
    case ffi::DataType::C64:
      return "complex64";
    case ffi::DataType::C128:
      return "complex128";
    default:
      return "XLA element type " + std::to_string(static_cast<int>(t));
  }
}

inline ffi::Error invalid(const char* target, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(target) + ": " + what);
}

// Checks the attributes (group_sizes, here `members`, and directions) and
// fills *out.
inline ffi::Error grouping_of(const char* target,
                              ffi::Span<const int64_t> members,
                              ffi::Span<const int64_t> directions,
                              Grouping* out) {
  const int64_t p = static_cast<int64_t>(members.size());
  if (p < 1 || p > kMaxGroups) {
    return invalid(target, "the grouping must have 1 to " +
                               std::to_string(kMaxGroups) + " groups; got " +
                               std::to_string(p));
  }
  int64_t total = 0;
  out->groups = static_cast<int>(p);
  out->max_members = 0;
  for (int64_t k = 0; k < p; ++k) {
    const int64_t m = members[k];
    if (m < 1 || m > kMaxMembers) {
      return invalid(target, "group " + std::to_string(k) + " has " +
                                 std::to_string(m) +
                                 " directions; expected 1 "
                                 "to " +
                                 std::to_string(kMaxMembers));
    }
    out->members[k] = static_cast<int>(m);
    out->first[k] = static_cast<int>(total);
    out->max_members = std::max(out->max_members, static_cast<int>(m));
    total += m;
  }
  if (total > kMaxDirections) {
    return invalid(target, "the grouping has " + std::to_string(total) +
                               " directions in all; at most " +
                               std::to_string(kMaxDirections) +
                               " are supported");
  }
  if (static_cast<int64_t>(directions.size()) != 6 * total) {
    return invalid(target, "`directions` must hold 6 values per direction (" +
                               std::to_string(6 * total) + "); got " +
                               std::to_string(directions.size()));
  }
  for (int64_t k = 0; k < total; ++k) {
    const int64_t* a = directions.begin() + 6 * k;
    if (const char* why =
            make_direction(a[0], a[1], a[2], a[3], a[4], a[5], &out->dirs[k])) {
      std::ostringstream s;
      s << "invalid direction " << k << " (row_step=" << a[0]
        << ", col_step=" << a[1] << ", n1=(" << a[2] << ", " << a[3]
        << "), n2=(" << a[4] << ", " << a[5] << ")): " << why;
      return invalid(target, s.str());
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// A checked call: what every back end gets.
// ---------------------------------------------------------------------------

struct Call {
  Geometry geo;
  Grouping grouping;
  int64_t group_channels;  // C / P
  bool guided = false;
  GuideLayout guide;  // if guided
  // The merged groups' (K > 1) residual is in `members`: the member pools
  // (guided) or their winner codes (unguided). Without it (a forward for
  // inference) a merged group merges as it goes.
  bool has_members = false;
  // Unguided with the residual: the derivatives read winner codes.
  bool codes() const { return has_members && !guided; }
};

inline ffi::Error geometry_of(const char* target, ffi::AnyBuffer x,
                              Geometry* geo) {
  auto dims = x.dimensions();
  if (dims.size() < 3 || dims.size() > 11) {
    return invalid(target,
                   "x must have rank 3 to 11, shape (..., H, W, C); "
                   "got shape " +
                       dims_str(dims));
  }
  const size_t r = dims.size();
  *geo = Geometry{1, dims[r - 3], dims[r - 2], dims[r - 1]};
  for (size_t k = 0; k + 3 < r; ++k) geo->batch *= dims[k];
  return ffi::Error::Success();
}

inline ffi::Error check_dtype(const char* target, const char* name,
                              ffi::AnyBuffer x, ffi::AnyBuffer other) {
  if (other.element_type() != x.element_type()) {
    return invalid(target, std::string(name) + " must have x's dtype " +
                               dtype_str(x.element_type()) + "; got " +
                               dtype_str(other.element_type()));
  }
  return ffi::Error::Success();
}

// `other` must have exactly x's shape and dtype.
inline ffi::Error check_like_x(const char* target, const char* name,
                               ffi::AnyBuffer x, ffi::AnyBuffer other) {
  auto xd = x.dimensions(), od = other.dimensions();
  if (!std::equal(xd.begin(), xd.end(), od.begin(), od.end())) {
    return invalid(target, std::string(name) + " must have x's shape " +
                               dims_str(xd) + "; got " + dims_str(od));
  }
  return check_dtype(target, name, x, other);
}

// `members` is (..., K', H, W, C) (x's leading dims, then K'): member k of
// image b is at element (b * K' + k) * H*W*C. K' = K (the most members of a
// group) when the merged groups' residual is saved for the derivatives (a
// grouping with a merged group, K > 1), else 0. The forward may leave it
// unsaved (`optional`: inference); the tangent and backward read it. With a
// guide it holds each member's pool (x's dtype: dguide = (m - x) G needs
// m); without one, each member's winner codes (uint8, landmark_pool.h).
inline ffi::Error check_members(const char* target, Call* c, ffi::AnyBuffer x,
                                ffi::AnyBuffer members, bool optional) {
  auto xd = x.dimensions(), md = members.dimensions();
  const int k = c->grouping.max_members > 1 ? c->grouping.max_members : 0;
  const size_t r = xd.size();
  bool ok =
      md.size() == r + 1 && (md[r - 3] == k || (optional && md[r - 3] == 0));
  for (size_t d = 0; ok && d < r; ++d) ok = md[d < r - 3 ? d : d + 1] == xd[d];
  if (!ok) {
    std::string lead;
    for (size_t d = 0; d + 3 < r; ++d) lead += std::to_string(xd[d]) + ", ";
    return invalid(
        target,
        "members must have shape (" + lead + (optional && k ? "0 or " : "") +
            std::to_string(k) + ", " + std::to_string(xd[r - 3]) + ", " +
            std::to_string(xd[r - 2]) + ", " + std::to_string(xd[r - 1]) +
            ") for this "
            "grouping (x " +
            dims_str(xd) + "); got " + dims_str(md));
  }
  c->has_members = k > 0 && md[r - 3] == k;
  if (c->guided) return check_dtype(target, "members", x, members);
  // Unguided: the winner codes (landmark_pool.h), one byte per element.
  if (members.element_type() != ffi::DataType::U8) {
    return invalid(target,
                   "members (the winner codes of an unguided pool) must be "
                   "uint8; got " +
                       dtype_str(members.element_type()));
  }
  return ffi::Error::Success();
}

// The layout of a guide of dims gd (checked: x's rank r, each dim x's or 1)
// for x of dims xd; also used where there are no buffers (module_emu.cc).
inline GuideLayout guide_layout_from_dims(const int64_t* xd, const int64_t* gd,
                                          int r) {
  GuideLayout l;
  l.full = std::equal(xd, xd + r, gd);
  const int64_t gc = gd[r - 1], gw = gd[r - 2], gh = gd[r - 3];
  l.channel_stride = gc == 1 ? 0 : 1;
  l.col_stride = gw == 1 ? 0 : gc;
  l.row_stride = gh == 1 ? 0 : gw * gc;
  l.height = gh;
  l.width = gw;
  l.lead = r - 3;
  int64_t stride = gh * gw * gc;
  for (int k = l.lead - 1; k >= 0; --k) {
    l.x_lead[k] = xd[k];
    l.g_stride[k] = gd[k] == 1 ? 0 : stride;
    stride *= gd[k];
  }
  l.elements = stride;
  return l;
}

// XLA's CPU runtime computes with subnormals flushed (FTZ and DAZ), and so
// does the jnp reference; host code that runs our per-pixel math (the CPU
// kernels, the CUDA emulation) sets the same mode for its scope.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// The guide (and its tangent or gradient) has x's rank, each dim x's or 1.
inline ffi::Error guide_layout_of(const char* target, const char* name,
                                  ffi::AnyBuffer x, ffi::AnyBuffer g,
                                  GuideLayout* out) {
  auto xd = x.dimensions(), gd = g.dimensions();
  bool ok = xd.size() == gd.size() && xd.size() <= 11;
  for (size_t k = 0; ok && k < xd.size(); ++k) {
    ok = gd[k] == xd[k] || gd[k] == 1;
  }
  if (!ok) {
    return invalid(target, std::string(name) +
                               " must have x's rank with each "
                               "dim x's or 1 (x " +
                               dims_str(xd) + "); got " + dims_str(gd));
  }
  if (auto e = check_dtype(target, name, x, g); e.failure()) return e;
  *out = guide_layout_from_dims(xd.begin(), gd.begin(),
                                static_cast<int>(gd.size()));
  return ffi::Error::Success();
}

// Checks x, the grouping, the guide (if any) and the members residual (if
// given) and fills *c. Other operands are checked with check_like_x.
inline ffi::Error prepare(const char* target, ffi::AnyBuffer x,
                          const ffi::AnyBuffer* g,
                          const ffi::AnyBuffer* members,
                          ffi::Span<const int64_t> member_counts,
                          ffi::Span<const int64_t> directions, Call* c,
                          bool members_optional = false) {
  if (auto e = grouping_of(target, member_counts, directions, &c->grouping);
      e.failure()) {
    return e;
  }
  if (auto e = geometry_of(target, x, &c->geo); e.failure()) return e;
  const int64_t p = c->grouping.groups;
  if (c->geo.channels % p != 0) {
    return invalid(target, "x has " + std::to_string(c->geo.channels) +
                               " channels, which do not split into " +
                               std::to_string(p) + " equal groups");
  }
  c->group_channels = c->geo.channels / p;
  c->guided = g != nullptr;
  if (g) {
    if (auto e = guide_layout_of(target, "guide", x, *g, &c->guide);
        e.failure()) {
      return e;
    }
  }
  c->has_members = false;
  if (members) {
    if (auto e = check_members(target, c, x, *members, members_optional);
        e.failure()) {
      return e;
    }
  }
  return ffi::Error::Success();
}

inline ffi::Error unsupported_dtype(const char* target, ffi::DataType t) {
  return invalid(target, "unsupported dtype " + dtype_str(t) +
                             "; expected float32, float64, float16 or "
                             "bfloat16");
}

// Calls fn(S{}) with S the storage type of dtype t; false if unsupported.
template <typename F>
bool dispatch_dtype(ffi::DataType t, F&& fn) {
  switch (t) {
    case ffi::DataType::F32:
      fn(float{});
      return true;
    case ffi::DataType::F64:
      fn(double{});
      return true;
    case ffi::DataType::F16:
      fn(Half{});
      return true;
    case ffi::DataType::BF16:
      fn(BFloat16{});
      return true;
    default:
      return false;
  }
}

template <typename S>
S* data(ffi::AnyBuffer b) {
  return static_cast<S*>(b.untyped_data());
}
template <typename S>
S* data_or_null(const ffi::AnyBuffer* b) {
  return b ? data<S>(*b) : nullptr;
}

// The buffers of one call, typed. Null where a target has no such operand.
template <typename S>
struct Buffers {
  using Storage = S;
  const S* x = nullptr;
  const S* g = nullptr;      // guide, at its own (broadcast) shape
  const S* out = nullptr;    // tangent, backward: the forward's result
  S* out_w = nullptr;        // forward: the result
  S* members = nullptr;      // K x x.size: member pools (K > 1, guided)
  uint8_t* codes = nullptr;  // K x x.size: winner codes (K > 1, unguided)
  const S* tx = nullptr;     // tangent
  const S* tg = nullptr;     // tangent of the guide, at the guide's shape
  S* tout = nullptr;
  const S* ct = nullptr;  // backward
  S* dx = nullptr;
  S* dg = nullptr;  // at the guide's shape
};

// ---------------------------------------------------------------------------
// The handler bodies, once for every back end: check, dispatch on the dtype,
// hand the typed buffers to the back end's forward / tangent / backward<S>.
// ---------------------------------------------------------------------------

inline ffi::Error check_guide_like(const char* target, const char* name,
                                   ffi::AnyBuffer g, ffi::AnyBuffer other) {
  auto gd = g.dimensions(), od = other.dimensions();
  if (!std::equal(gd.begin(), gd.end(), od.begin(), od.end())) {
    return invalid(target, std::string(name) + " must have the guide's shape " +
                               dims_str(gd) + "; got " + dims_str(od));
  }
  return check_dtype(target, name, g, other);
}

// The buffers every pass reads: x, the guide and the member pools.
// Runs run(b) with b the Buffers<S> of x's dtype S, its inputs x, g and
// members filled in; run sets the pass's other buffers and returns its error.
template <typename Run>
ffi::Error with_inputs(const char* target, const Call& c, ffi::AnyBuffer x,
                       const ffi::AnyBuffer* g, ffi::AnyBuffer members,
                       Run run) {
  ffi::Error result;
  const bool ok = dispatch_dtype(x.element_type(), [&](auto tag) {
    using S = decltype(tag);
    Buffers<S> b;
    b.x = data<S>(x);
    b.g = data_or_null<S>(g);
    b.members = c.has_members && c.guided ? data<S>(members) : nullptr;
    b.codes = c.has_members && !c.guided ? data<uint8_t>(members) : nullptr;
    result = run(b);
  });
  return ok ? std::move(result) : unsupported_dtype(target, x.element_type());
}

// What the tangent and the backward check alike: the call, three operands
// of x's shape and one of the guide's (if guided).
inline ffi::Error prepare_derivative(
    const char* target, ffi::AnyBuffer x, const ffi::AnyBuffer* g,
    ffi::AnyBuffer members,
    std::initializer_list<std::pair<const char*, ffi::AnyBuffer*>> like_x,
    const char* guide_name, const ffi::AnyBuffer* like_guide,
    ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> dirs, Call* c) {
  if (auto e = prepare(target, x, g, &members, sizes, dirs, c); e.failure()) {
    return e;
  }
  for (const auto& [name, b] : like_x) {
    if (auto e = check_like_x(target, name, x, *b); e.failure()) return e;
  }
  if (g) return check_guide_like(target, guide_name, *g, *like_guide);
  return ffi::Error::Success();
}

template <typename Backend>
ffi::Error run_forward(Backend& be, const char* target, ffi::AnyBuffer x,
                       const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                       ffi::AnyBuffer members, ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> dirs) {
  Call c;
  if (auto e = prepare(target, x, g, &members, sizes, dirs, &c,
                       /*members_optional=*/true);
      e.failure()) {
    return e;
  }
  if (auto e = check_like_x(target, "out", x, out); e.failure()) return e;
  if (c.geo.size() == 0) return ffi::Error::Success();
  return with_inputs(target, c, x, g, members, [&](auto& b) {
    using S = typename std::decay_t<decltype(b)>::Storage;
    b.out_w = data<S>(out);
    return be.template forward<S>(c, b);
  });
}

template <typename Backend>
ffi::Error run_tangent(Backend& be, const char* target, ffi::AnyBuffer x,
                       const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                       ffi::AnyBuffer members, ffi::AnyBuffer tx,
                       const ffi::AnyBuffer* tg, ffi::AnyBuffer tout,
                       ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> dirs) {
  Call c;
  if (auto e = prepare_derivative(target, x, g, members,
                                  {{"out", &out}, {"tx", &tx}, {"tout", &tout}},
                                  "tguide", tg, sizes, dirs, &c);
      e.failure()) {
    return e;
  }
  if (c.geo.size() == 0) return ffi::Error::Success();
  return with_inputs(target, c, x, g, members, [&](auto& b) {
    using S = typename std::decay_t<decltype(b)>::Storage;
    b.out = data<S>(out);
    b.tx = data<S>(tx);
    b.tg = data_or_null<S>(tg);
    b.tout = data<S>(tout);
    return be.template tangent<S>(c, b);
  });
}

template <typename Backend>
ffi::Error run_backward(Backend& be, const char* target, ffi::AnyBuffer x,
                        const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                        ffi::AnyBuffer members, ffi::AnyBuffer ct,
                        ffi::AnyBuffer dx, ffi::AnyBuffer* dg,
                        ffi::Span<const int64_t> sizes,
                        ffi::Span<const int64_t> dirs) {
  Call c;
  if (auto e = prepare_derivative(target, x, g, members,
                                  {{"out", &out}, {"ct", &ct}, {"dx", &dx}},
                                  "dguide", dg, sizes, dirs, &c);
      e.failure()) {
    return e;
  }
  if (c.geo.size() == 0) {
    // Nothing pooled: the guide's gradient is 0 (all-zero bits, any dtype).
    if (g && dg->size_bytes() > 0) {
      return be.zero(dg->untyped_data(), dg->size_bytes());
    }
    return ffi::Error::Success();
  }
  return with_inputs(target, c, x, g, members, [&](auto& b) {
    using S = typename std::decay_t<decltype(b)>::Storage;
    b.out = data<S>(out);
    b.ct = data<S>(ct);
    b.dx = data<S>(dx);
    b.dg = g ? data<S>(*dg) : nullptr;
    return be.template backward<S>(c, b);
  });
}

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_FFI_COMMON_H_
