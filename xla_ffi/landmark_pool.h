// Per-pixel math of the landmark pool, shared by the CPU and CUDA back ends.
//
// Everything here is a __host__ __device__ inline function on plain values;
// the schedules (which pixel when, which thread) live in cpu_kernels.h and
// cuda_schedule.h. The contract is docs/semantics.md: read it before changing
// anything here.
#ifndef LMCONV_JAX_XLA_FFI_LANDMARK_POOL_H_
#define LMCONV_JAX_XLA_FFI_LANDMARK_POOL_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LMCONV_HD __host__ __device__
#else
#define LMCONV_HD
#endif
#define LMCONV_HDI LMCONV_HD inline

namespace lmconv {

// ---------------------------------------------------------------------------
// Directions
// ---------------------------------------------------------------------------

// A (row, column) offset; row grows downwards, column rightwards.
struct Offset {
  int dr;
  int dc;
};

// One directional pool, as in lmconv_jax/directions.py: a scan order (rows are
// the outer loop) and the two neighbours whose outputs feed a pixel; n1 wins
// ties over n2.
struct Direction {
  int row_step;  // +1: rows top to bottom, -1: bottom to top.
  int col_step;  // +1: columns left to right, -1: right to left.
  Offset n1;
  Offset n2;
};

// True if the pixel at `o` from p is visited before p in d's scan order.
LMCONV_HDI bool visited_before(int row_step, int col_step, Offset o) {
  return o.dr * row_step < 0 || (o.dr == 0 && o.dc * col_step < 0);
}

// Checks raw (int64) attributes and fills *d. Returns nullptr if they form a
// valid direction, else a static message saying what is wrong.
LMCONV_HDI const char* make_direction(int64_t row_step, int64_t col_step,
                                      int64_t n1_row, int64_t n1_col,
                                      int64_t n2_row, int64_t n2_col,
                                      Direction* d) {
  if ((row_step != 1 && row_step != -1) || (col_step != 1 && col_step != -1)) {
    return "row_step and col_step must each be +1 or -1";
  }
  const int64_t offs[4] = {n1_row, n1_col, n2_row, n2_col};
  for (int k = 0; k < 4; ++k) {
    if (offs[k] < -1 || offs[k] > 1) {
      return "neighbour offsets n1_row, n1_col, n2_row, n2_col must be in "
             "{-1, 0, +1}";
    }
  }
  d->row_step = static_cast<int>(row_step);
  d->col_step = static_cast<int>(col_step);
  d->n1 = Offset{static_cast<int>(n1_row), static_cast<int>(n1_col)};
  d->n2 = Offset{static_cast<int>(n2_row), static_cast<int>(n2_col)};
  if (n1_row == n2_row && n1_col == n2_col) {
    return "neighbours n1 and n2 must differ";
  }
  if (!visited_before(d->row_step, d->col_step, d->n1) ||
      !visited_before(d->row_step, d->col_step, d->n2)) {
    return "neighbours n1 and n2 must both be visited before the pixel in "
           "the scan order (rows outer, columns inner) given by row_step and "
           "col_step";
  }
  return nullptr;
}

// A direction seen through a strided view of one (H, W, C) image in which the
// scan runs rows ascending, then columns ascending: rows and columns that the
// direction scans backwards are flipped by negative strides. In this view each
// neighbour offset (a, b) has a == -1 (previous row) or (a, b) == (0, -1).
// Strides and offsets are in elements; `start` is the element offset of the
// first pixel visited, relative to the image's (0, 0, 0) element.
struct ScanView {
  int64_t row_stride;
  int64_t col_stride;
  int64_t start;
  Offset n1;  // neighbour offsets in view coordinates
  Offset n2;
  int64_t off1;  // element offset from a pixel to its neighbour n1
  int64_t off2;
};

LMCONV_HDI ScanView make_scan_view(Direction d, int64_t height, int64_t width,
                                   int64_t channels) {
  ScanView v;
  v.row_stride = d.row_step * width * channels;
  v.col_stride = d.col_step * channels;
  v.start = (d.row_step < 0 ? (height - 1) * width * channels : 0) +
            (d.col_step < 0 ? (width - 1) * channels : 0);
  v.n1 = Offset{d.n1.dr * d.row_step, d.n1.dc * d.col_step};
  v.n2 = Offset{d.n2.dr * d.row_step, d.n2.dc * d.col_step};
  v.off1 = v.n1.dr * v.row_stride + v.n1.dc * v.col_stride;
  v.off2 = v.n2.dr * v.row_stride + v.n2.dc * v.col_stride;
  return v;
}

// True if the neighbour at view offset o of view pixel (i, j) is in the image.
LMCONV_HDI bool inside(int64_t i, int64_t j, Offset o, int64_t height,
                       int64_t width) {
  const int64_t r = i + o.dr, c = j + o.dc;
  return r >= 0 && r < height && c >= 0 && c < width;
}

// ---------------------------------------------------------------------------
// Forward step
// ---------------------------------------------------------------------------

// m := max(m, v) where a later candidate wins only if strictly greater, and a
// NaN candidate wins (a NaN m stays NaN): NaN propagates like lax.max.
template <typename T>
LMCONV_HDI T take_max(T m, T v) {
  const T larger = v > m ? v : m;  // a NaN m stays (x86: one maxps)
  return v != v ? v : larger;
}

// m[p] = max(x[p], out[p + n1], out[p + n2]) with precedence x, n1, n2; a
// neighbour outside the image (in1 / in2 false) is skipped.
template <typename T>
LMCONV_HDI T pool_max(T x, bool in1, T o1, bool in2, T o2) {
  T m = x;
  if (in1) m = take_max(m, o1);
  if (in2) m = take_max(m, o2);
  return m;
}

// out[p] with a guide, evaluated literally (compile with FP contraction off).
template <typename T>
LMCONV_HDI T pool_blend(T g, T m, T x) {
  return g * m + (T(1) - g) * x;
}

// ---------------------------------------------------------------------------
// Backward step
// ---------------------------------------------------------------------------

// What one pixel p contributes in the reverse scan, given G = G[p] (final).
template <typename T>
struct PoolGrad {
  T dx;      // dx[p]
  T dguide;  // dguide[p] (guided only)
  T to_n1;   // added to G[p + n1] (when n1 is inside)
  T to_n2;   // added to G[p + n2] (when n2 is inside)
};

// No guide (g = 1): the whole of G goes to the one winner of the forward max.
// The winner is found from x, o1, o2 directly (no m), which is equivalent to
// the SPEC's tests against m: x wins unless a neighbour is strictly greater,
// n1 beats n2 on ties, and any NaN among them makes every test false.
template <typename T>
LMCONV_HDI PoolGrad<T> pool_backward(T x, bool in1, T o1, bool in2, T o2, T G) {
  // Bitwise & and | (not && and ||): no branches, so loops vectorise. (No
  // struct of the three flags either: gcc 12 keeps one in memory and leaves
  // the channel loop scalar.) pool_route below makes the same three tests.
  const bool self = (in1 | in2 | (x == x)) &  // a lone NaN x is no winner
                    (!in1 | (x >= o1)) & (!in2 | (x >= o2));
  const bool take1 = in1 & (o1 > x) & (!in2 | (o1 >= o2));
  const bool take2 = in2 & (o2 > x) & (!in1 | (o2 > o1));
  PoolGrad<T> r;
  r.dx = self ? G : T(0);
  r.dguide = T(0);
  r.to_n1 = take1 ? G : T(0);
  r.to_n2 = take2 ? G : T(0);
  return r;
}

// ---------------------------------------------------------------------------
// Winner codes: the residual of an unguided merged group
// ---------------------------------------------------------------------------

// For an unguided merged group the forward saves, per member and element,
// one byte instead of the member's pool: bits 0-1 the route of the winner
// of the member's max at p (pool_route: kRouteX, kRouteN1, kRouteN2, or
// kRouteNone when a NaN is among them), bit 2 (kWonMerge) whether this
// member won the group's merge at p (merge_winner's rule: exactly one
// member of the group has it). The backward and tangent then need neither
// x nor the pools: G goes along the route, and only the merge's winner
// takes ct (writes tout).
constexpr int kRouteNone = 0, kRouteX = 1, kRouteN1 = 2, kRouteN2 = 3;
constexpr int kRouteMask = 3, kWonMerge = 4;

// The winner pool_backward routes G to, as a route (its three tests; at
// most one holds, none where a NaN is among them).
template <typename T>
LMCONV_HDI int pool_route(T x, bool in1, T o1, bool in2, T o2) {
  const int self =
      (in1 | in2 | (x == x)) & (!in1 | (x >= o1)) & (!in2 | (x >= o2));
  const int take1 = in1 & (o1 > x) & (!in2 | (o1 >= o2));
  const int take2 = in2 & (o2 > x) & (!in1 | (o2 > o1));
  return self * kRouteX + take1 * kRouteN1 + take2 * kRouteN2;
}

// pool_backward from the route the forward saved (the same bits).
template <typename T>
LMCONV_HDI PoolGrad<T> backward_by_route(int code, T G) {
  const int r = code & kRouteMask;
  PoolGrad<T> g;
  g.dx = r == kRouteX ? G : T(0);
  g.dguide = T(0);
  g.to_n1 = r == kRouteN1 ? G : T(0);
  g.to_n2 = r == kRouteN2 ? G : T(0);
  return g;
}

// pool_tangent from the route (its winner is pool_route's, docs above).
template <typename T>
LMCONV_HDI T tangent_by_route(int code, T tx, T t1, T t2) {
  const int r = code & kRouteMask;
  return r == kRouteX ? tx : r == kRouteN1 ? t1 : r == kRouteN2 ? t2 : T(0);
}

// Guide s = g[p]: the SPEC's formulas, evaluated literally.
template <typename T>
LMCONV_HDI PoolGrad<T> pool_backward_guided(T x, T m, bool in1, T o1, bool in2,
                                            T o2, T s, T G) {
  const T one(1), zero(0);
  const T self = x >= m ? one : zero;
  const T take1 = (one - self) * ((in1 & (o1 >= m)) ? one : zero);
  const T take2 =
      (one - self) * (one - take1) * ((in2 & (o2 >= m)) ? one : zero);
  PoolGrad<T> r;
  r.dx = (s * self + (one - s)) * G;
  r.dguide = (m - x) * G;
  r.to_n1 = s * take1 * G;
  r.to_n2 = s * take2 * G;
  return r;
}

// ---------------------------------------------------------------------------
// Tangent step (forward-mode AD)
// ---------------------------------------------------------------------------

// The tangent t[p] of out[p], visited in forward scan order, given the
// tangent tx = tx[p] and the neighbours' tangents t1 = t[p + n1], t2 =
// t[p + n2] (final: neighbours are visited first). It is the tangent of the
// winner of the forward max, chosen as in the backward (x, then n1, then n2;
// nobody if m is NaN, then 0), so a tie never splits it and forward mode is
// exactly the transpose of reverse mode. No guide (g = 1).
template <typename T>
LMCONV_HDI T pool_tangent(T x, T m, bool in1, T o1, bool in2, T o2, T tx, T t1,
                          T t2) {
  // Bitwise & (not &&) and selects: no branches, so loops vectorise.
  const bool self = x >= m;
  const bool take1 = !self & in1 & (o1 >= m);
  const bool take2 = !self & !take1 & in2 & (o2 >= m);
  return self ? tx : take1 ? t1 : take2 ? t2 : T(0);
}

// Guide s = g[p] with tangent tg: d(s * m + (1 - s) * x), with the winner's
// tangent for dm, evaluated literally.
template <typename T>
LMCONV_HDI T pool_tangent_guided(T x, T m, bool in1, T o1, bool in2, T o2, T s,
                                 T tx, T t1, T t2, T tg) {
  const T win = pool_tangent(x, m, in1, o1, in2, o2, tx, t1, t2);
  return s * win + (T(1) - s) * tx + (m - x) * tg;
}

// ---------------------------------------------------------------------------
// Storage types
// ---------------------------------------------------------------------------

LMCONV_HDI uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LMCONV_HDI float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE binary16 <-> float, round to nearest even, branch-free so loops over
// channels vectorise (after Marat Dukhan's FP16 library). Exact for every
// half value, including subnormals, infinities and NaN (made quiet).
LMCONV_HDI float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized =
      bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude =
      two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized);
  return bits_float(sign | magnitude);
}

LMCONV_HDI uint16_t float_to_half_bits(float f) {
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (bits_float(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return static_cast<uint16_t>((sign >> 16) |
                               (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// bfloat16 <-> float: bfloat16 is the top half of a float.
LMCONV_HDI float bfloat16_bits_to_float(uint16_t b) {
  return bits_float(static_cast<uint32_t>(b) << 16);
}

LMCONV_HDI uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  // A mask, not ?:, which gcc turned into branches in some callers' loops.
  const uint32_t is_nan =
      0u - static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u);
  return static_cast<uint16_t>((quiet_nan & is_nan) | (rounded & ~is_nan));
}

// Host storage of the 16-bit types (XLA hands them over as raw bits).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// StorageTraits<S>: how an element stored as S is computed on. Compute is the
// type of the math and of the gradient accumulator G; load/store convert.
// A neighbour's output is always read back through load(), i.e. as stored.
// The CUDA back end may add specialisations for __half and __nv_bfloat16.
template <typename S>
struct StorageTraits;

// Subnormal inputs (docs/semantics.md): a value of x or of the guide that is
// subnormal in float32 / float64 (bfloat16 shares float32's exponent) is read
// as a zero of its sign, before any arithmetic, in every implementation.
// Branch-free, so the channel loops vectorise.
LMCONV_HDI float flush_subnormal(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t keep = (u & 0x7F800000u) == 0 ? 0x80000000u : 0xFFFFFFFFu;
  return bits_float(u & keep);
}

LMCONV_HDI double flush_subnormal(double v) {
  uint64_t u;
#if defined(__CUDA_ARCH__)
  u = static_cast<uint64_t>(__double_as_longlong(v));
#else
  std::memcpy(&u, &v, sizeof u);
#endif
  const uint64_t keep = (u & 0x7FF0000000000000ull) == 0
                            ? 0x8000000000000000ull
                            : 0xFFFFFFFFFFFFFFFFull;
  u &= keep;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double r;
  std::memcpy(&r, &u, sizeof r);
  return r;
#endif
}

// load() reads a value as stored; load_input() reads x or the guide, with
// the subnormal rule above (float16 subnormals are normal in float32: kept).
template <>
struct StorageTraits<float> {
  using Compute = float;
  static LMCONV_HDI float load(float v) { return v; }
  static LMCONV_HDI float load_input(float v) { return flush_subnormal(v); }
  static LMCONV_HDI float store(float v) { return v; }
};

template <>
struct StorageTraits<double> {
  using Compute = double;
  static LMCONV_HDI double load(double v) { return v; }
  static LMCONV_HDI double load_input(double v) { return flush_subnormal(v); }
  static LMCONV_HDI double store(double v) { return v; }
};

// The 16-bit types also say, on their bits (see max_bits below): kInfBits,
// the bits of +infinity (a larger magnitude is a NaN); input_bits, the bits
// load_input reads (its subnormal rule); quiet_bits, the bits store(load(v))
// gives for a value v as a float would leave the max (NaNs made quiet).
template <>
struct StorageTraits<Half> {
  using Compute = float;
  static LMCONV_HDI float load(Half v) { return half_bits_to_float(v.bits); }
  static LMCONV_HDI float load_input(Half v) { return load(v); }
  static LMCONV_HDI Half store(float v) { return Half{float_to_half_bits(v)}; }
  static constexpr uint16_t kInfBits = 0x7C00u;
  static LMCONV_HDI uint16_t input_bits(uint16_t b) { return b; }
  static LMCONV_HDI uint16_t quiet_bits(uint16_t b) {
    // float_to_half_bits writes every NaN as sign | 0x7E00 (masks, not ?:).
    const uint16_t nan =
        static_cast<uint16_t>(-static_cast<int>((b & 0x7FFFu) > kInfBits));
    return static_cast<uint16_t>((b & ~nan) |
                                 (((b & 0x8000u) | 0x7E00u) & nan));
  }
};

template <>
struct StorageTraits<BFloat16> {
  using Compute = float;
  static LMCONV_HDI float load(BFloat16 v) {
    return bfloat16_bits_to_float(v.bits);
  }
  static LMCONV_HDI float load_input(BFloat16 v) {
    return flush_subnormal(load(v));
  }
  static LMCONV_HDI BFloat16 store(float v) {
    return BFloat16{float_to_bfloat16_bits(v)};
  }
  static constexpr uint16_t kInfBits = 0x7F80u;
  static LMCONV_HDI uint16_t input_bits(uint16_t b) {
    const uint16_t sub =
        static_cast<uint16_t>(-static_cast<int>((b & 0x7F80u) == 0));
    return static_cast<uint16_t>(b & (~sub | 0x8000u));
  }
  static LMCONV_HDI uint16_t quiet_bits(uint16_t b) {
    // float_to_bfloat16_bits keeps a NaN's payload and sets its quiet bit.
    const uint16_t nan =
        static_cast<uint16_t>(-static_cast<int>((b & 0x7FFFu) > kInfBits));
    return static_cast<uint16_t>(b | (0x0040u & nan));
  }
};

// take_max on the bits of a 16-bit float (sign, exponent, mantissa: both
// float16 and bfloat16), without converting, equal bit for bit to
// converting both to float, take_max, and the value it returns: values
// compare as their floats do (+0 and -0 equal, so the first stays), a NaN
// candidate wins and a NaN m stays. The unguided forward's max is one of
// its inputs, so it can run on the 16-bit lanes (twice a float's per vector,
// no conversions) and store quiet_bits of the result.
template <typename Traits>
LMCONV_HDI uint16_t take_max_bits(uint16_t m, uint16_t v) {
  // Branch-free (masks, not ?:), so the channel loops vectorise. Order keys:
  // the magnitude, negated for a negative sign (both zeros are 0).
  const int16_t mm = static_cast<int16_t>(m & 0x7FFFu);
  const int16_t vm = static_cast<int16_t>(v & 0x7FFFu);
  const int16_t ms = static_cast<int16_t>(-static_cast<int16_t>(m >> 15));
  const int16_t vs = static_cast<int16_t>(-static_cast<int16_t>(v >> 15));
  const int16_t mk = static_cast<int16_t>((mm ^ ms) - ms);
  const int16_t vk = static_cast<int16_t>((vm ^ vs) - vs);
  const int16_t inf = static_cast<int16_t>(Traits::kInfBits);
  const int take = (vm > inf) | ((mm <= inf) & (vk > mk));
  const uint16_t mask = static_cast<uint16_t>(-take);
  return static_cast<uint16_t>((v & mask) | (m & ~mask));
}

// The merge of a group's member pools (lmconv_jax/ops.py): the running
// result takes a later member's value only if it is strictly greater or NaN,
// so ties go to the first listed. Returns the winning member's index and
// sets *best to its value.
// The merge's take: the running result cur takes a later member's v (the
// rule of merge_winner below, in one place for every schedule). An int (0 or
// 1), as the expression is, so the channel loops keep their int lanes.
template <typename T>
LMCONV_HDI int merge_takes(T v, T cur) {
  return (v > cur) | (v != v);
}

// A member's winner code at p: its route, and kWonMerge where it took the
// merge (take: 0 or 1, an int so the channel loops stay in int lanes).
LMCONV_HDI int winner_code(int route, int take) {
  return route | (take * kWonMerge);
}

// A later member's gradient added to the earlier members' sum in S: its
// own value rounded to S first, as composing the pools in jnp would.
template <typename Traits, typename S, typename C>
LMCONV_HDI S add_rounded(S sum, C v) {
  return Traits::store(Traits::load(sum) + Traits::load(Traits::store(v)));
}

template <typename T, typename Load>
LMCONV_HDI int merge_winner(int members, Load load, T* best) {
  T b = load(0);
  int w = 0;
  for (int k = 1; k < members; ++k) {
    const T v = load(k);
    const bool take = merge_takes(v, b);
    b = take ? v : b;
    w = take ? k : w;
  }
  *best = b;
  return w;
}

// ---------------------------------------------------------------------------
// The order of a broadcast guide's gradient sum (every back end)
// ---------------------------------------------------------------------------

// The N = x.size / guide.size x elements that read one guide element, in x's
// element order, are cut into slices of kGuideSlice (the last one shorter
// when kGuideSlice does not divide N). Level 1: each slice's partial sum,
// 0 + v0 + v1 + ... in Compute<S>; level 2: 0 + partial 0 + partial 1 + ...,
// rounded once to the storage type. A constant, never the device's or the
// thread count's, so every back end gets the same bits. 256: at LBYLNet's
// (64, 32, 32, C) with a (C,) guide, N = 256^2, where the two levels'
// sequential chains (kGuideSlice and N / kGuideSlice loads) are equal.
constexpr int64_t kGuideSlice = 256;

// The number of level-1 slices of a guide element read by n x elements.
LMCONV_HDI int64_t guide_slices(int64_t n) {
  return (n + kGuideSlice - 1) / kGuideSlice;
}

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_LANDMARK_POOL_H_
