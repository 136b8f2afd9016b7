// The CPU kernels' passes: what one pixel of a scan does (the pool, a merged
// member's pool merged as it is made, its winner codes, the tangents, the
// backward), over the per-pixel math of landmark_pool.h, and the per-pixel
// loops outside the scans (the merge, the guide's reduction). The walkers
// (cpu_walkers.h) visit the pixels. Part of cpu_kernels.h (cpu_kernels.cc
// only).
//
// Pointers are offset to (image, c0); pixel offsets come from the ScanView
// (x and every buffer of x's layout) and the GuideView (the guide).

#ifndef LMCONV_CPU_PASSES_H_
#define LMCONV_CPU_PASSES_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu.h"
#include "cpu_isa.h"
#include "cpu_plan.h"

namespace lmconv {
namespace {

template <typename S>
using Compute = typename StorageTraits<S>::Compute;

// Where the guide of a direction's view pixel (i, j) is, from the item's
// first guide element: broadcast dims have stride 0.
struct GuideView {
  int64_t start, row_stride, col_stride;
};

GuideView make_guide_view(Direction d, const GuideLayout& l) {
  GuideView v;
  v.row_stride = d.row_step * l.row_stride;
  v.col_stride = d.col_step * l.col_stride;
  v.start = (d.row_step < 0 ? (l.height - 1) * l.row_stride : 0) +
            (d.col_step < 0 ? (l.width - 1) * l.col_stride : 0);
  return v;
}

// The guide value for channel c: per channel, or one for all channels.
template <bool kGuideVec, typename S>
LMCONV_INLINE auto guide_at(const S* g, int64_t c) {
  return StorageTraits<S>::load_input(g[kGuideVec ? c : 0]);
}

// n: the lane count, an int64_t or (narrow unguided 16-bit groups,
// forward_item's with_lane_count) a std::integral_constant.
template <typename S, bool kGuided, bool kGuideVec, bool kIn1, bool kIn2,
          typename N>
LMCONV_INLINE void forward_pixel(const S* __restrict x, const S* __restrict g,
                                 S* __restrict out, const S* __restrict o1,
                                 const S* __restrict o2, N n) {
  using T = StorageTraits<S>;
  if constexpr (!kGuided &&
                (std::is_same_v<S, Half> || std::is_same_v<S, BFloat16>)) {
    // The max on the 16-bit lanes (landmark_pool.h: take_max_bits), the
    // result made quiet. With a constant lane count (a narrow group, whose
    // pixel's chain through o2, the previous pixel, is the critical path),
    // x is made quiet before the max instead: o1 and o2 are this pass's
    // own outputs, quiet already, and take_max_bits picks the same input
    // whether or not a NaN is quiet, so the bits are the same.
    constexpr bool kQuietFirst = !std::is_same_v<N, int64_t>;
    for (int64_t c = 0; c < int64_t{n}; ++c) {
      uint16_t m = T::input_bits(x[c].bits);
      if (kQuietFirst) m = T::quiet_bits(m);
      if (kIn1) m = take_max_bits<T>(m, o1[c].bits);
      if (kIn2) m = take_max_bits<T>(m, o2[c].bits);
      out[c].bits = kQuietFirst ? m : T::quiet_bits(m);
    }
    return;
  }
  for (int64_t c = 0; c < int64_t{n}; ++c) {
    const auto xv = T::load_input(x[c]);
    const auto m = pool_max(xv, kIn1, kIn1 ? T::load(o1[c]) : xv, kIn2,
                            kIn2 ? T::load(o2[c]) : xv);
    if constexpr (kGuided) {
      out[c] = T::store(pool_blend(guide_at<kGuideVec>(g, c), m, xv));
    } else {
      out[c] = T::store(m);
    }
  }
}

// The passes that visit pixels in forward scan order. A pass says what one
// pixel does (pixel<kIn1, kIn2>(row, p, j): p its element offset, j its view
// column, row what begin_row(i) set up for its view row; kIn1 / kIn2 whether
// n1 / n2 are inside) and what to prefetch for a later pixel; forward_item
// walks the image once for any of them. kBand: how many view rows a pass
// lets forward_item keep in flight (see forward_item).

// The pool: out[p] from x[p] (g) and the outputs of its neighbours.
template <typename S, bool kGuided, bool kGuideVec>
struct PoolPass {
  static constexpr int kBand = kBandRows;
  struct Row {
    const S* g;  // the guide of view pixel (i, 0)
  };
  const S* x;
  const S* g;  // the item's first guide element
  S* out;
  ScanView v;
  GuideView gv;
  bool prefetch_guide;  // the guide has x's layout

  LMCONV_INLINE Row begin_row(int64_t i) const {
    return Row{kGuided ? g + gv.start + i * gv.row_stride : nullptr};
  }
  LMCONV_INLINE void prefetch_pixel(int64_t q, int64_t n) const {
    prefetch<0>(x + q, n);
    if (kGuided && prefetch_guide) prefetch<0>(g + q, n);
    prefetch<1>(out + q, n);
  }
  template <bool kIn1, bool kIn2, typename N>
  LMCONV_INLINE void pixel(const Row& row, int64_t p, int64_t j, N n) {
    forward_pixel<S, kGuided, kGuideVec, kIn1, kIn2>(
        x + p, kGuided ? row.g + j * gv.col_stride : nullptr, out + p,
        out + p + v.off1, out + p + v.off2, n);
  }
};

// A ring of kRows view rows (each `width` pixels of n contiguous elements)
// in which a pass keeps the values its later pixels read: a scan's
// neighbours are in the pixel's own view row or the one before.
template <typename T, int kRows>
struct RowRing {
  struct Row {
    T* r;                  // view row i
    int64_t roff1, roff2;  // from a pixel's values to its n1's, n2's
  };
  int64_t width, n;
  std::vector<T> buf = std::vector<T>(kRows * width * n);

  LMCONV_INLINE Row row(const ScanView& v, int64_t i) {
    T* r = buf.data() + (i % kRows) * width * n;
    const int64_t prev = ((i + kRows - 1) % kRows - i % kRows) * width * n;
    return Row{r, (v.n1.dr ? prev : 0) + v.n1.dc * n,
               (v.n2.dr ? prev : 0) + v.n2.dc * n};
  }
};

// A later member of a merged group when the member pools are not saved
// (inference): its pool lives in a ring of kBand + 1 view rows (its
// neighbours are in the same or the previous view row, and forward_item
// keeps kBand rows in flight), stored as S as if in a buffer, and each value
// is merged into out (which holds the merge of the members before) as it is
// made: out = v if v > out or v is NaN.
template <typename S, bool kGuided, bool kGuideVec>
struct RingMergePass {
  static constexpr int kBand = kBandRows;
  static constexpr int kRing = kBand + 1;
  struct Row {
    typename RowRing<S, kRing>::Row ring;  // the ring's row for view row i
    const S* g;
  };
  const S* x;
  const S* g;
  S* out;
  const ScanView& v;
  GuideView gv;
  int64_t width, n;
  RowRing<S, kRing> ring = RowRing<S, kRing>{width, n};

  LMCONV_INLINE Row begin_row(int64_t i) {
    return Row{ring.row(v, i),
               kGuided ? g + gv.start + i * gv.row_stride : nullptr};
  }
  LMCONV_INLINE void prefetch_pixel(int64_t q, int64_t n_) const {
    prefetch<0>(x + q, n_);
    prefetch<1>(out + q, n_);
  }
  template <bool kIn1, bool kIn2>
  LMCONV_INLINE void pixel(const Row& row, int64_t p, int64_t j, int64_t n_) {
    using T = StorageTraits<S>;
    S* __restrict r = row.ring.r + j * n;
    const S* __restrict o1 = r + row.ring.roff1;
    const S* __restrict o2 = r + row.ring.roff2;
    const S* __restrict xp = x + p;
    S* __restrict op = out + p;
    const S* gp = kGuided ? row.g + j * gv.col_stride : nullptr;
    for (int64_t c = 0; c < n_; ++c) {
      const auto xv = T::load_input(xp[c]);
      const auto m = pool_max(xv, kIn1, kIn1 ? T::load(o1[c]) : xv, kIn2,
                              kIn2 ? T::load(o2[c]) : xv);
      const S val =
          T::store(kGuided ? pool_blend(guide_at<kGuideVec>(gp, c), m, xv) : m);
      r[c] = val;
      const auto vv = T::load(val), cur = T::load(op[c]);
      op[c] = merge_takes(vv, cur) ? val : op[c];
    }
  }
};

// A member of an unguided merged group in a forward that saves the winner
// codes (landmark_pool.h) for the derivatives: its pool lives in a ring of
// view rows, as RingMergePass's does, and is merged into out as it is made
// (member 0 writes out), and it writes its code of every element: the route
// of its max, and kWonMerge where it took out, cleared in the codes of the
// earlier members it took it from (so exactly one member keeps it).
// kFirst: member 0 (a compile-time flag, so each loop has one body).
template <typename S, bool kFirst>
struct CodePass {
  static constexpr int kBand = kBandRows;
  static constexpr int kRing = kBand + 1;
  using Row = typename RowRing<S, kRing>::Row;  // the ring's row for view row i
  const S* x;
  S* out;
  uint8_t* code;          // this member's codes, x's layout
  int64_t member_stride;  // from one member's codes to the next's
  int member;
  const ScanView& v;
  int64_t width, n;
  RowRing<S, kRing> ring = RowRing<S, kRing>{width, n};

  LMCONV_INLINE Row begin_row(int64_t i) { return ring.row(v, i); }
  LMCONV_INLINE void prefetch_pixel(int64_t q, int64_t n_) const {
    prefetch<0>(x + q, n_);
    prefetch<1>(out + q, n_);
    prefetch<1>(code + q, n_);
  }
  template <bool kIn1, bool kIn2>
  LMCONV_INLINE void pixel(const Row& row, int64_t p, int64_t j, int64_t n_) {
    using T = StorageTraits<S>;
    S* __restrict r = row.r + j * n;
    const S* __restrict o1 = r + row.roff1;
    const S* __restrict o2 = r + row.roff2;
    const S* __restrict xp = x + p;
    S* __restrict op = out + p;
    uint8_t* __restrict cp = code + p;
    // The codes as int32 lanes first, then narrowed to bytes: gcc 12 leaves
    // a loop that stores bytes beside float lanes scalar (see
    // docs/perf-log.md, 'CPU, 2026-12-04: winner codes instead of member
    // pools').
    int32_t k32[kMaxChannelBlock];  // an item has at most this many channels
    for (int64_t c = 0; c < n_; ++c) {
      const auto xv = T::load_input(xp[c]);
      const auto o1v = kIn1 ? T::load(o1[c]) : xv;
      const auto o2v = kIn2 ? T::load(o2[c]) : xv;
      const S val = T::store(pool_max(xv, kIn1, o1v, kIn2, o2v));
      r[c] = val;
      const int32_t route = pool_route(xv, kIn1, o1v, kIn2, o2v);
      if constexpr (kFirst) {
        op[c] = val;
        k32[c] = winner_code(route, 1);
      } else {
        const auto vv = T::load(val), cur = T::load(op[c]);
        const int32_t take = merge_takes(vv, cur);
        op[c] = take ? val : op[c];
        k32[c] = winner_code(route, take);
      }
    }
    for (int64_t c = 0; c < n_; ++c) cp[c] = static_cast<uint8_t>(k32[c]);
    // The earlier members lose the merge where this one took it.
    for (int k = 1; !kFirst && k <= member; ++k) {
      uint8_t* __restrict prev = cp - k * member_stride;
      for (int64_t c = 0; c < n_; ++c) {
        prev[c] = static_cast<uint8_t>(prev[c] & ~(k32[c] & kWonMerge));
      }
    }
  }
};

// The tangent of an unguided merged group's member from its winner codes:
// t[p] is tx[p] or a neighbour's t along the saved route (tangent_by_route);
// t lives in a scratch of two view rows (Compute<S>), and the member that
// won the merge at p writes tout[p], rounded once.
template <typename S>
struct TangentCodePass {
  using Acc = Compute<S>;
  static constexpr int kBand = 1;  // the ring holds two view rows of t
  using Row = typename RowRing<Acc, 2>::Row;
  const uint8_t* code;  // this member's codes, x's layout
  const S* tx;
  S* tout;
  const ScanView& v;
  int64_t width, n;
  RowRing<Acc, 2> t_ring = RowRing<Acc, 2>{width, n};

  LMCONV_INLINE Row begin_row(int64_t i) { return t_ring.row(v, i); }
  LMCONV_INLINE void prefetch_pixel(int64_t q, int64_t n_) const {
    prefetch<0>(code + q, n_);
    prefetch<0>(tx + q, n_);
    prefetch<1>(tout + q, n_);
  }
  template <bool kIn1, bool kIn2>
  LMCONV_INLINE void pixel(const Row& row, int64_t p, int64_t j, int64_t n_) {
    using T = StorageTraits<S>;
    Acc* __restrict t = row.r + j * n;
    const Acc* __restrict t1 = t + row.roff1;
    const Acc* __restrict t2 = t + row.roff2;
    const uint8_t* __restrict cp = code + p;
    const S* __restrict txp = tx + p;
    S* __restrict tp = tout + p;
    for (int64_t c = 0; c < n_; ++c) {
      const int32_t k = cp[c];
      const Acc r = tangent_by_route(k, T::load(txp[c]), kIn1 ? t1[c] : Acc(0),
                                     kIn2 ? t2[c] : Acc(0));
      t[c] = r;
      tp[c] = (k & kWonMerge) ? T::store(r) : tp[c];
    }
  }
};

// The tangent of a pool already computed (o, its output, is read): t[p]
// from tx[p] (g, tg) and the tangents of the winners. Like G in the
// backward, the running tangent t (type Compute<S>) lives in the output
// buffer for float and double; halves keep two view rows of it in a float
// scratch (neighbours are in the same or the previous view row) and store
// each t[p] rounded once.
template <typename S, bool kGuided, bool kGuideVec, bool kIn1, bool kIn2>
LMCONV_INLINE void tangent_pixel(const S* __restrict x, const S* __restrict g,
                                 const S* __restrict o1, const S* __restrict o2,
                                 const S* __restrict tx, const S* __restrict tg,
                                 const Compute<S>* __restrict t1,
                                 const Compute<S>* __restrict t2,
                                 Compute<S>* __restrict t, S* __restrict tout,
                                 int64_t n) {
  using T = StorageTraits<S>;
  using Acc = Compute<S>;
  for (int64_t c = 0; c < n; ++c) {
    const auto xv = T::load_input(x[c]);
    const auto o1v = kIn1 ? T::load(o1[c]) : xv;
    const auto o2v = kIn2 ? T::load(o2[c]) : xv;
    const Acc t1v = kIn1 ? t1[c] : Acc(0);
    const Acc t2v = kIn2 ? t2[c] : Acc(0);
    const auto m = pool_max(xv, kIn1, o1v, kIn2, o2v);
    Acc r;
    if constexpr (kGuided) {
      r = pool_tangent_guided(xv, m, kIn1, o1v, kIn2, o2v,
                              guide_at<kGuideVec>(g, c), T::load(tx[c]), t1v,
                              t2v, T::load(tg[kGuideVec ? c : 0]));
    } else {
      r = pool_tangent(xv, m, kIn1, o1v, kIn2, o2v, T::load(tx[c]), t1v, t2v);
    }
    t[c] = r;
    if constexpr (!std::is_same_v<S, Acc>) tout[c] = T::store(r);
  }
}

template <typename S, bool kGuided, bool kGuideVec>
struct TangentPass {
  using Acc = Compute<S>;
  static constexpr bool kInPlace = std::is_same_v<S, Acc>;
  static constexpr int kBand = 1;  // the scratch holds two view rows
  struct Row {
    Acc* t;                // t of view pixel (i, 0)
    int64_t toff1, toff2;  // from t[p] to t[p + n1], t[p + n2]
    int64_t g;             // guide offset of view pixel (i, 0)
  };
  const S* x;
  const S* g;
  const S* out;
  const S* tx;
  const S* tg;
  S* tout;
  const ScanView& v;
  GuideView gv;
  int64_t width, n;
  std::vector<Acc> scratch = std::vector<Acc>(kInPlace ? 0 : 2 * width * n);
  // t of view pixel (i, j) is at row + j * t_col, channels contiguous.
  const int64_t t_col = kInPlace ? v.col_stride : n;

  Acc* row_ptr(int64_t i) {
    if constexpr (kInPlace) {
      return reinterpret_cast<Acc*>(tout) + v.start + i * v.row_stride;
    } else {
      return scratch.data() + (i & 1) * width * n;
    }
  }
  LMCONV_INLINE Row begin_row(int64_t i) {
    Acc* row = row_ptr(i);
    const int64_t prev_row = i > 0 ? row_ptr(i - 1) - row : 0;
    return Row{row, (v.n1.dr ? prev_row : 0) + v.n1.dc * t_col,
               (v.n2.dr ? prev_row : 0) + v.n2.dc * t_col,
               gv.start + i * gv.row_stride};
  }
  LMCONV_INLINE void prefetch_pixel(int64_t q, int64_t n_) const {
    prefetch<0>(x + q, n_);
    prefetch<0>(out + q + v.off1, n_);  // may be outside: harmless
    prefetch<0>(out + q + v.off2, n_);
    prefetch<0>(tx + q, n_);
    prefetch<1>(tout + q, n_);
  }
  template <bool kIn1, bool kIn2>
  LMCONV_INLINE void pixel(const Row& row, int64_t p, int64_t j, int64_t n_) {
    Acc* t = row.t + j * t_col;
    const int64_t gq = row.g + j * gv.col_stride;
    tangent_pixel<S, kGuided, kGuideVec, kIn1, kIn2>(
        x + p, kGuided ? g + gq : nullptr, out + p + v.off1, out + p + v.off2,
        tx + p, kGuided ? tg + gq : nullptr, t + row.toff1, t + row.toff2, t,
        kInPlace ? nullptr : tout + p, n_);
  }
};

// The backward of one member's pool over one item.
//
// G (the running cotangent of the member's pool, type Compute<S>) lives in
// the dx buffer when S is its own compute type and dx is not accumulated
// (the first member): each G[p] is final when p is visited, is read, then
// overwritten by dx[p], and pushes only go to neighbours, which are visited
// later. Otherwise G is in a scratch of two view rows, since pushes reach at
// most the previous row of the view.
//
// kMasked: a merged group's member; G starts as ct where this member won the
// merge (winner[p] == member, or kWonMerge in its code) and 0 elsewhere.
// kAccum: dx and dg already hold the earlier members' gradients; this
// member's, rounded to S, is added (in S), as composing the pools in jnp
// would. kCodes (unguided merged groups): the member's winner codes say
// where G goes (landmark_pool.h), so neither x nor the pool is read.
template <typename S>
struct BackwardArgs {
  const S* x;
  const S* g;  // the item's first guide element
  GuideView gv;
  const S* o;  // the member's pool (out, or its slot of members)
  const S* ct;
  S* dx;
  S* dg;                  // x's layout (the guide's gradient per pixel)
  const uint8_t* winner;  // x's layout; kMasked only
  const uint8_t* code;    // the member's winner codes, x's layout; kCodes
  int member;
  const ScanView* v;
  int64_t height, width, n;
};

template <typename S, bool kGuided, bool kGuideVec, bool kAccum, bool kCodes,
          bool kIn1, bool kIn2>
LMCONV_INLINE void backward_pixel(
    const S* __restrict x, const S* __restrict g, const S* __restrict o1,
    const S* __restrict o2, const uint8_t* __restrict code,
    Compute<S>* __restrict G, Compute<S>* __restrict G1,
    Compute<S>* __restrict G2, S* __restrict dx, S* __restrict dg, int64_t n) {
  using T = StorageTraits<S>;
  constexpr bool kInPlace = std::is_same_v<S, Compute<S>> && !kAccum;
  for (int64_t c = 0; c < n; ++c) {
    PoolGrad<Compute<S>> r;
    if constexpr (kCodes) {
      r = backward_by_route(int32_t{code[c]}, G[c]);
    } else if constexpr (kGuided) {
      const auto xv = T::load_input(x[c]);
      const auto o1v = kIn1 ? T::load(o1[c]) : xv;
      const auto o2v = kIn2 ? T::load(o2[c]) : xv;
      const auto m = pool_max(xv, kIn1, o1v, kIn2, o2v);
      r = pool_backward_guided(xv, m, kIn1, o1v, kIn2, o2v,
                               guide_at<kGuideVec>(g, c), G[c]);
    } else {
      const auto xv = T::load_input(x[c]);
      const auto o1v = kIn1 ? T::load(o1[c]) : xv;
      const auto o2v = kIn2 ? T::load(o2[c]) : xv;
      r = pool_backward(xv, kIn1, o1v, kIn2, o2v, G[c]);
    }
    if constexpr (kIn1) G1[c] += r.to_n1;
    if constexpr (kIn2) G2[c] += r.to_n2;
    if constexpr (kInPlace) {
      G[c] = r.dx;  // G is dx
    } else if constexpr (kAccum) {
      dx[c] = add_rounded<T>(dx[c], r.dx);
    } else {
      dx[c] = T::store(r.dx);
    }
    if constexpr (kGuided) {
      if constexpr (kAccum) {
        dg[c] = add_rounded<T>(dg[c], r.dguide);
      } else {
        dg[c] = T::store(r.dguide);
      }
    }
  }
}

// fn(p) for the element offset p (from the item's offset) of every pixel of
// the item in x's rows [r0, r1), with its channels [p, p + n).
template <typename F>
LMCONV_INLINE void for_each_pixel(const Geometry& geo, int64_t r0, int64_t r1,
                                  F fn) {
  for (int64_t i = r0; i < r1; ++i) {
    for (int64_t j = 0; j < geo.width; ++j) {
      fn((i * geo.width + j) * geo.channels);
    }
  }
}

// The same for every pixel of the item.
template <typename F>
LMCONV_INLINE void for_each_pixel(const Geometry& geo, F fn) {
  for_each_pixel(geo, 0, geo.height, fn);
}

// out = merge of the item's member pools (member k at pools + k * image);
// with `winner`, also the index of the member that won (merge_winner's rule,
// members outer so the channel loops vectorise).
// merge_rows does it for x's rows [r0, r1) only.
template <typename S>
LMCONV_INLINE void merge_rows(const Geometry& geo, int members, const S* pools,
                              S* out, uint8_t* winner, int64_t n, int64_t r0,
                              int64_t r1) {
  using T = StorageTraits<S>;
  const int64_t size = geo.height * geo.width * geo.channels;
  Compute<S> best[kMaxChannelBlock];
  uint8_t w[kMaxChannelBlock];
  for_each_pixel(geo, r0, r1, [&](int64_t p) LMCONV_LAMBDA_INLINE {
    for (int64_t c0 = 0; c0 < n; c0 += kMaxChannelBlock) {
      const int64_t m = std::min(kMaxChannelBlock, n - c0);
      const S* __restrict p0 = pools + p + c0;
      for (int64_t c = 0; c < m; ++c) {
        best[c] = T::load(p0[c]);
        w[c] = 0;
      }
      for (int k = 1; k < members; ++k) {
        const S* __restrict pk = pools + k * size + p + c0;
        for (int64_t c = 0; c < m; ++c) {
          const Compute<S> v = T::load(pk[c]);
          const bool take = merge_takes(v, best[c]);
          best[c] = take ? v : best[c];
          w[c] = take ? static_cast<uint8_t>(k) : w[c];
        }
      }
      if (out) {
        for (int64_t c = 0; c < m; ++c) out[p + c0 + c] = T::store(best[c]);
      }
      if (winner) {
        for (int64_t c = 0; c < m; ++c) winner[p + c0 + c] = w[c];
      }
    }
  });
}

// dg (the guide's shape) = the per-pixel gradient dg_full (x's layout)
// summed over the broadcast dims in landmark_pool.h's two-level order
// (kGuideSlice), as the CUDA kernels sum it: one pass over dg_full in x's
// element order, each guide element's running slice sum closed into its
// total every kGuideSlice elements it reads.
template <typename S>
void reduce_guide(const Geometry& geo, const GuideLayout& l, const S* dg_full,
                  S* dg) {
  using T = StorageTraits<S>;
  using Acc = Compute<S>;
  FlushDenormals ftz;
  const size_t elements = static_cast<size_t>(l.elements);
  std::vector<Acc> part(elements, Acc(0)), total(elements, Acc(0));
  // Elements read in the current slice; with the channels not broadcast,
  // a pixel's guide elements share it, kept at its channel 0's.
  std::vector<int64_t> count(elements, 0);
  auto close = [&](int64_t e) {
    total[e] += part[e];
    part[e] = Acc(0);
  };
  const int64_t image = geo.height * geo.width * geo.channels;
  for (int64_t b = 0; b < geo.batch; ++b) {
    const int64_t a0 = l.image_offset(b);
    const S* d = dg_full + b * image;
    for (int64_t i = 0; i < geo.height; ++i) {
      for (int64_t j = 0; j < geo.width; ++j) {
        const int64_t a = a0 + i * l.row_stride + j * l.col_stride;
        const S* dp = d + (i * geo.width + j) * geo.channels;
        Acc* pp = part.data() + a;
        if (l.channel_stride) {
          for (int64_t c = 0; c < geo.channels; ++c) pp[c] += T::load(dp[c]);
          if (++count[a] == kGuideSlice) {
            count[a] = 0;
            for (int64_t c = 0; c < geo.channels; ++c) close(a + c);
          }
        } else {
          for (int64_t c = 0; c < geo.channels; ++c) {
            pp[0] += T::load(dp[c]);
            if (++count[a] == kGuideSlice) {
              count[a] = 0;
              close(a);
            }
          }
        }
      }
    }
  }
  // Every guide element is read by the same number of x elements, so all
  // have a shorter last slice, or none.
  const int64_t n = geo.size() / l.elements;
  for (size_t e = 0; e < elements; ++e) {
    if (n % kGuideSlice) close(static_cast<int64_t>(e));
    dg[e] = T::store(total[e]);
  }
}

}  // namespace
}  // namespace lmconv

#endif  // LMCONV_CPU_PASSES_H_
