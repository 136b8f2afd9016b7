// CPU kernels of the grouped landmark pool: the schedule. Included only by
// cpu_kernels.cc, which CMake compiles once per (dtype, pass) so the cores
// share the build; cpu.h declares what each instantiates. The handlers are
// handlers.inc (shared with the CUDA back end and its emulation, through
// cpu.h's CpuBackend); the per-pixel math is landmark_pool.h.
//
// Every direction is mapped to a strided view scanned rows ascending, columns
// ascending (landmark_pool.h: ScanView), and one templated kernel walks it.
// Work items are (image, group, channel block) triples; within an item the
// inner loop runs over contiguous channels so the compiler vectorises it.
// Items run in parallel on XLA's intra-op thread pool.
//
// What the backward saves, and why: the forward's residuals are x, the guide
// at its own shape, out and, for a grouping with a merged group (K > 1
// members), `members` (K x the size of x). A single-direction group's
// backward recomputes every pixel's max m[p] = max(x[p], o[p+n1], o[p+n2])
// from x and its pool o = out, with the forward's tie rule, which is exact
// because o is what the forward stored; so nothing else is saved.
// * Unguided, a merged group saves its members' winner codes (one byte per
//   member and element, landmark_pool.h): each member's route at p and
//   whether it won the merge. The backward and tangent then read only ct
//   (tx) and the codes: a member's pool is never stored (it lives in a ring
//   of rows while the forward makes it), and no sweep recomputes it.
// * Guided, it saves the member pools (x's dtype): dguide = (m - x) G needs
//   each member's m. Its backward finds, per pixel, the member that won the
//   merge (one byte per element of scratch), then runs each member's
//   backward with the cotangent routed to its winners.
// A broadcast guide's gradient is written per pixel into scratch, then summed
// over the broadcast dims in a fixed order (no atomics: deterministic).

#ifndef LMCONV_CPU_KERNELS_H_
#define LMCONV_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu.h"

namespace ffi = xla::ffi;

namespace lmconv {
namespace {

// ---------------------------------------------------------------------------
// Parallel schedule
// ---------------------------------------------------------------------------

// Channel blocks of at most this many elements keep a row of a work item in
// L1/L2 for wide images; blocks are multiples of 16 elements (whole vectors).
constexpr int64_t kMaxChannelBlock = 256;
constexpr int64_t kMinChannelBlock = 16;
// Below this many elements, threads cost more than they save.
constexpr int64_t kMinParallelElements = 1 << 15;

// Work items. Normally one item is (image, group, channel block) with the
// block inside the group. When a group's channels are less than a cache
// line (64 bytes: octants of 64 float32 channels, quadrants of bfloat16),
// an item is (image, one line of channels) and pools each group in it in
// turn: no cache line is shared by two items (no false sharing), and the
// second group finds the lines in cache.
struct Plan {
  Geometry geo;
  int groups;
  int64_t group_channels;
  int64_t block;  // channels per work item
  int64_t items_per_image;
  bool whole_groups;  // an item holds block / group_channels groups
  int64_t nblocks;    // channel blocks per group (!whole_groups)
  int64_t items() const { return geo.batch * items_per_image; }
};

Plan make_plan(const Call& c, int64_t threads, int64_t element_bytes) {
  const int64_t cg = c.group_channels;
  const int64_t line = 64;
  if (cg * element_bytes < line && line % (cg * element_bytes) == 0 &&
      (c.geo.channels * element_bytes) % line == 0) {
    const int64_t block = line / element_bytes;
    return Plan{
        c.geo, c.grouping.groups, cg, block, c.geo.channels / block, true, 0};
  }
  int64_t block = std::min(cg, kMaxChannelBlock);
  auto nblocks = [&] { return (cg + block - 1) / block; };
  // Split channels further only while there is too little work to go round.
  while (c.geo.batch * c.grouping.groups * nblocks() < threads &&
         block >= 2 * kMinChannelBlock) {
    block = (block / 2 + kMinChannelBlock - 1) / kMinChannelBlock *
            kMinChannelBlock;
  }
  return Plan{
      c.geo, c.grouping.groups, cg, block, c.grouping.groups * nblocks(),
      false, nblocks()};
}

// Runs fn(0), ..., fn(n - 1) on the calling thread and on at most
// pool.num_threads() - 1 helper tasks. Items are claimed from a shared
// counter, so the caller never waits on a task that has not started (no
// deadlock when the caller is itself a pool thread); helpers that start after
// all items are claimed return at once.
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t elements,
                  const std::function<void(int64_t)>& fn) {
  const int64_t threads =
      elements < kMinParallelElements ? 0 : pool.num_threads();
  const int64_t helpers = std::min(threads, n) - 1;
  if (helpers <= 0) {
    for (int64_t k = 0; k < n; ++k) fn(k);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> pending{0};
    std::mutex mu;
    std::condition_variable done;
    const std::function<void(int64_t)>* fn = nullptr;
    int64_t n = 0;
    void drain() {
      for (int64_t k; (k = next.fetch_add(1)) < n;) {
        (*fn)(k);
        if (pending.fetch_sub(1) == 1) {
          std::lock_guard<std::mutex> lock(mu);
          done.notify_all();
        }
      }
    }
  };
  auto state = std::make_shared<State>();
  state->fn = &fn;  // only dereferenced for claimed items, all before we return
  state->n = n;
  state->pending = n;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state] { state->drain(); });
  }
  state->drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->done.wait(lock, [&] { return state->pending.load() == 0; });
}

// ---------------------------------------------------------------------------
// Kernels: one work item = one image, one group, channels [c0, c0 + n).
// Pointers are offset to (image, c0); pixel offsets come from the ScanView
// (x and every buffer of x's layout) and the GuideView (the guide).
// ---------------------------------------------------------------------------

template <typename S>
using Compute = typename StorageTraits<S>::Compute;

// The item kernels are compiled for x86-64-v3 (AVX2, F16C) and for the
// baseline ISA, picked at load time (gcc/clang function multiversioning); the
// pixel loops are forced inline so they are vectorised for the clone they
// land in. FP contraction is off for the whole file (CMakeLists.txt), so
// the FMA the v3 clone may use never fuses our blend.
#if defined(__x86_64__) && defined(__ELF__)
#define LMCONV_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMCONV_CPU_CLONES
#endif
#define LMCONV_INLINE inline __attribute__((always_inline))
// Lambdas inside a cloned function are functions of their own, compiled for
// the baseline ISA unless inlined: they must be, or the v3 clone runs SSE2.
#define LMCONV_LAMBDA_INLINE __attribute__((always_inline))

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

// Scans that run backwards through memory defeat the hardware prefetcher, so
// each kernel prefetches the pixel it will visit kPrefetchPixels later in scan
// order (see docs/perf-log.md, 'CPU, 2026-12-05: a different VM (Intel Xeon);
// the octants' backward', for the narrow backward without it).
constexpr int64_t kPrefetchPixels = 8;

template <int kWrite, typename T>
LMCONV_INLINE void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t{sizeof(T)}; b += 64) {
    __builtin_prefetch(c + b, kWrite);
  }
}

// Element offset of the pixel kPrefetchPixels after view pixel (i, j) at
// element offset p in scan order (before it if kReverse), or -1 if none.
template <bool kReverse>
LMCONV_INLINE int64_t ahead(const ScanView& v, int64_t i, int64_t j, int64_t p,
                            int64_t height, int64_t width) {
  constexpr int64_t d = kReverse ? -kPrefetchPixels : kPrefetchPixels;
  const int64_t jj = j + d;
  if (jj >= 0 && jj < width) return p + d * v.col_stride;
  const int64_t ii = kReverse ? i - 1 : i + 1;  // wraps to the next row
  if (ii < 0 || ii >= height) return -1;
  const int64_t wrapped = kReverse ? jj + width : jj - width;
  return p + (ii - i) * v.row_stride + (wrapped - j) * v.col_stride;
}

// fn(in1, in2), std::bool_constant each: whether view pixel (i, j)'s
// neighbours n1 and n2 are inside the image (the scans' edge pixels).
template <typename F>
LMCONV_INLINE void with_inside(const ScanView& v, int64_t i, int64_t j,
                               int64_t height, int64_t width, F fn) {
  switch (inside(i, j, v.n1, height, width) * 2 +
          inside(i, j, v.n2, height, width)) {
    case 3:
      fn(std::true_type{}, std::true_type{});
      break;
    case 2:
      fn(std::true_type{}, std::false_type{});
      break;
    case 1:
      fn(std::false_type{}, std::true_type{});
      break;
    default:
      fn(std::false_type{}, std::false_type{});
      break;
  }
}

// Narrow channel blocks (at most kBandMaxBytes) are swept kBandRows view rows
// at a time: each pixel's max waits on its left neighbour's (a chain of
// store-to-load and compare latency per pixel), so a narrow block leaves the
// vector units idle unless several rows' chains run side by side.
constexpr int kBandRows = 4;
constexpr int64_t kBandMaxBytes = 128;

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
      op[c] = ((vv > cur) | (vv != vv)) ? val : op[c];
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
        k32[c] = route | kWonMerge;
      } else {
        const auto vv = T::load(val), cur = T::load(op[c]);
        const int32_t take = (vv > cur) | (vv != vv);
        op[c] = take ? val : op[c];
        k32[c] = route | (take * kWonMerge);
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

// Walks the item's view rows in scan order. Wide blocks: one row at a time.
// Narrow blocks (kBandMaxBytes): bands of up to Pass::kBand rows, row i0 + r
// two columns behind row i0 + r - 1, so that every neighbour a pixel reads
// (the previous row's columns j - 1 .. j + 1, and column j - 1 of its own)
// is made by an earlier step; the rows' chains are independent in a step.
//
// forward_rows sweeps view rows [i0, i1) of this schedule (i0 a multiple of
// Pass::kBand), so that several passes can be run a few rows at a time.
template <typename S, typename Pass, typename N = int64_t>
LMCONV_INLINE void forward_rows(Pass& pass, const ScanView& v, int64_t i0,
                                int64_t i1, int64_t height, int64_t width,
                                N n) {
  using Row = typename Pass::Row;
  // One pixel with its neighbours' flags known at compile time.
  auto step = [&](auto in1, auto in2, const Row& row, int64_t i,
                  int64_t j) LMCONV_LAMBDA_INLINE {
    const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
    if (const int64_t q = ahead<false>(v, i, j, p, height, width); q >= 0) {
      pass.prefetch_pixel(q, n);
    }
    pass.template pixel<decltype(in1)::value, decltype(in2)::value>(row, p, j,
                                                                    n);
  };
  auto edge = [&](const Row& row, int64_t i, int64_t j) LMCONV_LAMBDA_INLINE {
    with_inside(v, i, j, height, width,
                [&](auto in1, auto in2)
                    LMCONV_LAMBDA_INLINE { step(in1, in2, row, i, j); });
  };
  const int64_t j1 = width - 1;
  constexpr int kBand = Pass::kBand;
  if (kBand > 1 && n * int64_t{sizeof(S)} <= kBandMaxBytes && height > 1) {
    for (int64_t b0 = i0; b0 < i1; b0 += kBand) {
      const int rows = static_cast<int>(std::min<int64_t>(kBand, i1 - b0));
      Row row[kBand];
      for (int r = 0; r < rows; ++r) row[r] = pass.begin_row(b0 + r);
      const int64_t steps = width + 2 * (rows - 1);
      for (int64_t t = 0; t < steps; ++t) {
#pragma GCC unroll 4  // kBandRows
        for (int r = 0; r < kBand; ++r) {
          const int64_t i = b0 + r, j = t - 2 * r;
          if (r >= rows || j < 0 || j > j1) continue;
          if (i > 0 && j > 0 && j < j1) {
            step(std::true_type{}, std::true_type{}, row[r], i, j);
          } else {
            edge(row[r], i, j);
          }
        }
      }
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const Row row = pass.begin_row(i);
    edge(row, i, 0);
    // Interior columns: a neighbour is inside unless it is in the row above
    // the first, so one switch per row (not per pixel).
    const bool in1 = v.n1.dr == 0 || i > 0, in2 = v.n2.dr == 0 || i > 0;
    if (in1 && in2) {
      for (int64_t j = 1; j < j1; ++j)
        step(std::true_type{}, std::true_type{}, row, i, j);
    } else if (in1) {
      for (int64_t j = 1; j < j1; ++j)
        step(std::true_type{}, std::false_type{}, row, i, j);
    } else if (in2) {
      for (int64_t j = 1; j < j1; ++j)
        step(std::false_type{}, std::true_type{}, row, i, j);
    } else {
      for (int64_t j = 1; j < j1; ++j)
        step(std::false_type{}, std::false_type{}, row, i, j);
    }
    if (width > 1) edge(row, i, j1);
  }
}

// fn(lanes): lanes is n, or, for an unguided 16-bit PoolPass (the max on the
// bits, forward_pixel) and n in {4, 8, 16}, n as a std::integral_constant:
// with n at run time gcc 12 left those groups' lane loops scalar. Dispatched
// once per item, not per pixel: a branch in the pixel loop slowed the wide
// groups' (see docs/perf-log.md, 'CPU, 2026-12-04 (later): narrow 16-bit
// groups get a constant lane count').
template <typename S, typename Pass, typename F>
LMCONV_INLINE void with_lane_count(int64_t n, F fn) {
  constexpr bool kBits =
      (std::is_same_v<S, Half> || std::is_same_v<S, BFloat16>) &&
      std::is_same_v<Pass, PoolPass<S, false, false>>;
  if constexpr (kBits) {
    switch (n) {
      case 4:
        return fn(std::integral_constant<int64_t, 4>{});
      case 8:
        return fn(std::integral_constant<int64_t, 8>{});
      case 16:
        return fn(std::integral_constant<int64_t, 16>{});
      default:
        break;
    }
  }
  fn(n);
}

template <typename S, typename Pass>
LMCONV_CPU_CLONES void forward_item(Pass& pass, const ScanView& v,
                                    int64_t height, int64_t width, int64_t n) {
  with_lane_count<S, Pass>(n, [&](auto lanes) LMCONV_LAMBDA_INLINE {
    forward_rows<S>(pass, v, 0, height, height, width, lanes);
  });
}

// Several views swept together: view pixel (i, j) of each in turn, for the
// views of one image whose scans visit x's rows in the same order (the
// same row_step). Alone, a group of C / P channels reads one line in every
// C elements, the hardware fetches the lines around it in vain, and the
// next group fetches them again; swept together, the groups' views use a
// row's lines in the same pass (the columns of a view that scans them
// right to left are read in the same row), and their chains run side by
// side, so no band is needed.
template <typename S, typename Pass, typename N>
LMCONV_INLINE void forward_views_n(Pass* passes, int count, int64_t height,
                                   int64_t width, N n) {
  using Row = typename Pass::Row;
  Row rows[kMaxDirections];
  auto step = [&](auto in1, auto in2, int k, int64_t i,
                  int64_t j) LMCONV_LAMBDA_INLINE {
    Pass& pass = passes[k];
    const ScanView& v = pass.v;
    const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
    if (const int64_t q = ahead<false>(v, i, j, p, height, width); q >= 0) {
      pass.prefetch_pixel(q, n);
    }
    pass.template pixel<decltype(in1)::value, decltype(in2)::value>(rows[k], p,
                                                                    j, n);
  };
  auto edge = [&](int k, int64_t i, int64_t j) LMCONV_LAMBDA_INLINE {
    with_inside(passes[k].v, i, j, height, width,
                [&](auto in1, auto in2)
                    LMCONV_LAMBDA_INLINE { step(in1, in2, k, i, j); });
  };
  const int64_t j1 = width - 1;
  for (int64_t i = 0; i < height; ++i) {
    for (int k = 0; k < count; ++k) rows[k] = passes[k].begin_row(i);
    for (int k = 0; k < count; ++k) edge(k, i, 0);
    // Interior columns of a row below the first: every neighbour is inside.
    if (i > 0) {
      for (int64_t j = 1; j < j1; ++j) {
        for (int k = 0; k < count; ++k) {
          step(std::true_type{}, std::true_type{}, k, i, j);
        }
      }
    } else {
      for (int64_t j = 1; j < j1; ++j) {
        for (int k = 0; k < count; ++k) edge(k, i, j);
      }
    }
    if (width > 1) {
      for (int k = 0; k < count; ++k) edge(k, i, j1);
    }
  }
}

template <typename S, typename Pass>
LMCONV_CPU_CLONES void forward_views(Pass* passes, int count, int64_t height,
                                     int64_t width, int64_t n) {
  with_lane_count<S, Pass>(n, [&](auto lanes) LMCONV_LAMBDA_INLINE {
    forward_views_n<S>(passes, count, height, width, lanes);
  });
}

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
      dx[c] = T::store(T::load(dx[c]) + T::load(T::store(r.dx)));
    } else {
      dx[c] = T::store(r.dx);
    }
    if constexpr (kGuided) {
      if constexpr (kAccum) {
        dg[c] = T::store(T::load(dg[c]) + T::load(T::store(r.dguide)));
      } else {
        dg[c] = T::store(r.dguide);
      }
    }
  }
}

template <typename S, bool kGuided, bool kGuideVec, bool kMasked, bool kAccum,
          bool kCodes = false>
LMCONV_CPU_CLONES void backward_item(const BackwardArgs<S>& a) {
  static_assert(!kCodes || (kMasked && !kGuided), "codes: unguided, merged");
  using Acc = Compute<S>;
  constexpr bool kInPlace = std::is_same_v<S, Acc> && !kAccum;
  const ScanView& v = *a.v;
  const int64_t height = a.height, width = a.width, n = a.n;
  std::vector<Acc> scratch(kInPlace ? 0 : 2 * width * n);
  // G of view pixel (i, j) is at row_ptr(i) + j * g_col, channels contiguous.
  const int64_t g_col = kInPlace ? v.col_stride : n;
  auto row_ptr = [&](int64_t i) LMCONV_LAMBDA_INLINE -> Acc* {
    if constexpr (kInPlace) {
      return reinterpret_cast<Acc*>(a.dx) + v.start + i * v.row_stride;
    } else {
      return scratch.data() + (i & 1) * width * n;
    }
  };
  // G of view pixel (i, j) := ct (routed). Done one pixel at a time inside
  // the pixel loop, so the loads of ct overlap the math.
  auto load_ct = [&](int64_t i, int64_t j) LMCONV_LAMBDA_INLINE {
    Acc* __restrict G = row_ptr(i) + j * g_col;
    const int64_t q = v.start + i * v.row_stride + j * v.col_stride;
    const S* __restrict c = a.ct + q;
    if constexpr (kCodes) {
      const uint8_t* __restrict w = a.code + q;
      for (int64_t k = 0; k < n; ++k) {
        const Acc ck = StorageTraits<S>::load(c[k]);
        G[k] = (int32_t{w[k]} & kWonMerge) ? ck : Acc(0);
      }
    } else if constexpr (kMasked) {
      const uint8_t* __restrict w = a.winner + q;
      const uint8_t me = static_cast<uint8_t>(a.member);
      for (int64_t k = 0; k < n; ++k) {
        const Acc ck = StorageTraits<S>::load(c[k]);
        G[k] = w[k] == me ? ck : Acc(0);
      }
    } else {
      for (int64_t k = 0; k < n; ++k) G[k] = StorageTraits<S>::load(c[k]);
    }
  };
  for (int64_t j = width - 1; j >= 0; --j) load_ct(height - 1, j);
  for (int64_t i = height - 1; i >= 0; --i) {
    // Pushes from pixel (i, j) reach row i - 1 at columns j - 1 .. j + 1:
    // column j - 1 of row i - 1 is loaded just before pixel j, the last
    // column before the row starts.
    if (i > 0) load_ct(i - 1, width - 1);
    Acc* G_row = row_ptr(i);
    // Offsets of the neighbours' G from G[p] (view rows dr are 0 or -1).
    const int64_t prev_row = i > 0 ? row_ptr(i - 1) - G_row : 0;
    const int64_t goff1 = (v.n1.dr ? prev_row : 0) + v.n1.dc * g_col;
    const int64_t goff2 = (v.n2.dr ? prev_row : 0) + v.n2.dc * g_col;
    const int64_t g_row = a.gv.start + i * a.gv.row_stride;
    auto step = [&](auto in1, auto in2, int64_t j) LMCONV_LAMBDA_INLINE {
      const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
      Acc* G = G_row + j * g_col;
      const S* gp = kGuided ? a.g + g_row + j * a.gv.col_stride : nullptr;
      S* dgp = kGuided ? a.dg + p : nullptr;
      const S* o1 = kCodes ? nullptr : a.o + p + v.off1;
      const S* o2 = kCodes ? nullptr : a.o + p + v.off2;
      if (const int64_t q = ahead<true>(v, i, j, p, height, width); q >= 0) {
        if constexpr (kCodes) {
          prefetch<0>(a.code + q, n);
        } else {
          prefetch<0>(a.x + q, n);
          prefetch<0>(a.o + q + v.off1, n);  // may be outside: harmless
          prefetch<0>(a.o + q + v.off2, n);
        }
        if (kGuided) prefetch<1>(a.dg + q, n);
        if (!kInPlace) prefetch<1>(a.dx + q, n);
      }
      if (i >= 2) {  // row i - 2 of ct and of G is loaded before row i - 1
        const int64_t q = v.start + (i - 2) * v.row_stride + j * v.col_stride;
        prefetch<0>(a.ct + q, n);
        if (kInPlace) prefetch<1>(a.dx + q, n);
      }
      if (i > 0 && j > 0) load_ct(i - 1, j - 1);
      backward_pixel<S, kGuided, kGuideVec, kAccum, kCodes,
                     decltype(in1)::value, decltype(in2)::value>(
          a.x + p, gp, o1, o2, kCodes ? a.code + p : nullptr, G, G + goff1,
          G + goff2, a.dx + p, dgp, n);
    };
    auto edge = [&](int64_t j) LMCONV_LAMBDA_INLINE {
      with_inside(v, i, j, height, width,
                  [&](auto in1, auto in2)
                      LMCONV_LAMBDA_INLINE { step(in1, in2, j); });
    };
    // Interior columns: one switch per row (see forward_item).
    const bool in1 = v.n1.dr == 0 || i > 0, in2 = v.n2.dr == 0 || i > 0;
    if (width > 1) edge(width - 1);
    if (in1 && in2) {
      for (int64_t j = width - 2; j >= 1; --j)
        step(std::true_type{}, std::true_type{}, j);
    } else if (in1) {
      for (int64_t j = width - 2; j >= 1; --j)
        step(std::true_type{}, std::false_type{}, j);
    } else if (in2) {
      for (int64_t j = width - 2; j >= 1; --j)
        step(std::false_type{}, std::true_type{}, j);
    } else {
      for (int64_t j = width - 2; j >= 1; --j)
        step(std::false_type{}, std::false_type{}, j);
    }
    edge(0);
  }
}

// The unguided backward of an item's single-direction groups whose views
// scan in the same order (a line of octants of float32 holds two: I1 / I2,
// I3 / I4, I5 / I6 or I7 / I8), swept together: view pixel (i, j) of each
// in turn, each exactly as backward_item would (its G, its pushes, its
// loads of ct in the same order; the groups' channels are disjoint), so one
// pass reads the item's lines and the groups' per-pixel work overlaps.
template <typename S>
LMCONV_CPU_CLONES void backward_views(const BackwardArgs<S>* args, int count) {
  using Acc = Compute<S>;
  constexpr bool kInPlace = std::is_same_v<S, Acc>;
  const int64_t height = args[0].height, width = args[0].width, n = args[0].n;
  std::vector<Acc> scratch(kInPlace ? 0 : count * 2 * width * n);
  auto row_ptr = [&](int k, int64_t i) LMCONV_LAMBDA_INLINE -> Acc* {
    if constexpr (kInPlace) {
      const ScanView& v = *args[k].v;
      return reinterpret_cast<Acc*>(args[k].dx) + v.start + i * v.row_stride;
    } else {
      return scratch.data() + (2 * k + (i & 1)) * width * n;
    }
  };
  auto g_col = [&](int k) LMCONV_LAMBDA_INLINE -> int64_t {
    return kInPlace ? args[k].v->col_stride : n;
  };
  auto load_ct = [&](int k, int64_t i, int64_t j) LMCONV_LAMBDA_INLINE {
    const ScanView& v = *args[k].v;
    Acc* __restrict G = row_ptr(k, i) + j * g_col(k);
    const S* __restrict c =
        args[k].ct + v.start + i * v.row_stride + j * v.col_stride;
    for (int64_t e = 0; e < n; ++e) G[e] = StorageTraits<S>::load(c[e]);
  };
  for (int k = 0; k < count; ++k) {
    for (int64_t j = width - 1; j >= 0; --j) load_ct(k, height - 1, j);
  }
  Acc* G_row[kMaxGroups];
  int64_t goff1[kMaxGroups], goff2[kMaxGroups];
  for (int64_t i = height - 1; i >= 0; --i) {
    for (int k = 0; k < count; ++k) {
      const ScanView& v = *args[k].v;
      if (i > 0) load_ct(k, i - 1, width - 1);
      G_row[k] = row_ptr(k, i);
      const int64_t prev_row = i > 0 ? row_ptr(k, i - 1) - G_row[k] : 0;
      goff1[k] = (v.n1.dr ? prev_row : 0) + v.n1.dc * g_col(k);
      goff2[k] = (v.n2.dr ? prev_row : 0) + v.n2.dc * g_col(k);
    }
    auto step = [&](auto in1, auto in2, int k, int64_t j) LMCONV_LAMBDA_INLINE {
      const BackwardArgs<S>& a = args[k];
      const ScanView& v = *a.v;
      const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
      Acc* G = G_row[k] + j * g_col(k);
      if (const int64_t q = ahead<true>(v, i, j, p, height, width); q >= 0) {
        prefetch<0>(a.x + q, n);
        prefetch<0>(a.o + q + v.off1, n);  // may be outside: harmless
        prefetch<0>(a.o + q + v.off2, n);
        if (!kInPlace) prefetch<1>(a.dx + q, n);
      }
      if (i >= 2) {  // row i - 2 of ct and of G is loaded before row i - 1
        const int64_t q = v.start + (i - 2) * v.row_stride + j * v.col_stride;
        prefetch<0>(a.ct + q, n);
        if (kInPlace) prefetch<1>(a.dx + q, n);
      }
      if (i > 0 && j > 0) load_ct(k, i - 1, j - 1);
      backward_pixel<S, false, false, false, false, decltype(in1)::value,
                     decltype(in2)::value>(
          a.x + p, nullptr, a.o + p + v.off1, a.o + p + v.off2, nullptr, G,
          G + goff1[k], G + goff2[k], a.dx + p, nullptr, n);
    };
    auto edge = [&](int k, int64_t j) LMCONV_LAMBDA_INLINE {
      with_inside(*args[k].v, i, j, height, width,
                  [&](auto in1, auto in2)
                      LMCONV_LAMBDA_INLINE { step(in1, in2, k, j); });
    };
    if (width > 1) {
      for (int k = 0; k < count; ++k) edge(k, width - 1);
    }
    // Interior columns of a row below the first: every neighbour is inside.
    if (i > 0) {
      for (int64_t j = width - 2; j >= 1; --j) {
        for (int k = 0; k < count; ++k) {
          step(std::true_type{}, std::true_type{}, k, j);
        }
      }
    } else {
      for (int64_t j = width - 2; j >= 1; --j) {
        for (int k = 0; k < count; ++k) edge(k, j);
      }
    }
    for (int k = 0; k < count; ++k) edge(k, 0);
  }
}

// ---------------------------------------------------------------------------
// The item loop and the per-pixel passes outside the scans.
// ---------------------------------------------------------------------------

struct Item {
  int64_t b, group, c0, n;
  int64_t offset;        // element offset of (image b, channel c0) in x
  int64_t guide_offset;  // of the item's first guide element
  int64_t image;         // H * W * C
  int max_members;       // K
  // Element offset of member k's pool of this item in `members`, which is
  // (..., K, H, W, C): image b's member k starts at (b * K + k) * image.
  int64_t member(int k) const { return (b * max_members + k) * image + c0; }
};

// The piece of image b's group `group` over channels [c0, c0 + n).
Item make_item(const Call& c, int64_t b, int64_t group, int64_t c0, int64_t n) {
  Item it;
  it.b = b;
  it.group = group;
  it.c0 = c0;
  it.n = n;
  it.image = c.geo.height * c.geo.width * c.geo.channels;
  it.offset = b * it.image + c0;
  it.max_members = c.has_members ? c.grouping.max_members : 0;
  it.guide_offset =
      c.guided ? c.guide.image_offset(b) + c0 * c.guide.channel_stride : 0;
  return it;
}

// Runs fn(piece) over every work item of the call's plan (make_plan, for
// elements of element_bytes): a piece is one group's channels of the item
// (an item of whole groups has several, run in turn).
// for_each_item_pieces gives fn(pieces, count) all of an item's pieces at
// once.
template <typename F>
void for_each_item_pieces(ffi::ThreadPool& pool, const Call& c,
                          int64_t element_bytes, F fn) {
  const Plan plan = make_plan(c, pool.num_threads(), element_bytes);
  const Geometry& geo = plan.geo;
  parallel_for(pool, plan.items(), geo.size(), [&](int64_t k) {
    FlushDenormals ftz;
    const int64_t b = k / plan.items_per_image;
    const int64_t in_image = k % plan.items_per_image;
    Item pieces[kMaxGroups];
    int count = 0;
    auto piece = [&](int64_t group, int64_t c0, int64_t n) {
      pieces[count++] = make_item(c, b, group, c0, n);
    };
    if (plan.whole_groups) {
      const int64_t c0 = in_image * plan.block;
      for (int64_t g = c0 / plan.group_channels;
           g < (c0 + plan.block) / plan.group_channels; ++g) {
        piece(g, g * plan.group_channels, plan.group_channels);
      }
    } else {
      const int64_t group = in_image / plan.nblocks;
      const int64_t c_in_group = (in_image % plan.nblocks) * plan.block;
      piece(group, group * plan.group_channels + c_in_group,
            std::min(plan.block, plan.group_channels - c_in_group));
    }
    fn(static_cast<const Item*>(pieces), count);
  });
}

template <typename F>
void for_each_item(ffi::ThreadPool& pool, const Call& c, int64_t element_bytes,
                   F fn) {
  for_each_item_pieces(pool, c, element_bytes,
                       [&](const Item* pieces, int count) {
                         for (int k = 0; k < count; ++k) fn(pieces[k]);
                       });
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
          const bool take = (v > best[c]) | (v != v);
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

template <typename S>
LMCONV_CPU_CLONES void merge_item(const Geometry& geo, int members,
                                  const S* pools, S* out, uint8_t* winner,
                                  int64_t n) {
  merge_rows<S>(geo, members, pools, out, winner, n, 0, geo.height);
}

// The forward of `count` consecutive members of a merged group whose scans
// visit x's rows in the same order (row_step), each pass writing its
// member's pool, run together a band of view rows at a time, so the later
// members find the rows' x in cache. With `out` (the last such run: every
// member before it is done), the x rows just made are merged into out while
// the pools are in cache (merge_item's rule: the same bits).
template <typename S, typename Pass>
LMCONV_CPU_CLONES void forward_members(Pass* passes, int count, int row_step,
                                       const Geometry& geo, int members,
                                       const S* pools, S* out, int64_t n) {
  const int64_t height = geo.height, width = geo.width;
  for (int64_t i0 = 0; i0 < height; i0 += Pass::kBand) {
    const int64_t i1 = std::min<int64_t>(height, i0 + Pass::kBand);
    for (int k = 0; k < count; ++k) {
      forward_rows<S>(passes[k], passes[k].v, i0, i1, height, width, n);
    }
    if (out) {
      const int64_t r0 = row_step > 0 ? i0 : height - i1;
      merge_rows<S>(geo, members, pools, out, nullptr, n, r0, r0 + (i1 - i0));
    }
  }
}

// The forward of an unguided merged group's members that visit x's rows in
// the same order (row_step), writing winner codes: `first` (member 0, or
// null when the run starts later) and the `count` members after it, run a
// band of view rows at a time in member order, so the later members find
// the rows' x and out in cache (each pixel still merges in member order).
template <typename S>
LMCONV_CPU_CLONES void forward_code_members(CodePass<S, true>* first,
                                            CodePass<S, false>* rest, int count,
                                            int64_t height, int64_t width,
                                            int64_t n) {
  for (int64_t i0 = 0; i0 < height; i0 += kBandRows) {
    const int64_t i1 = std::min<int64_t>(height, i0 + kBandRows);
    if (first) forward_rows<S>(*first, first->v, i0, i1, height, width, n);
    for (int k = 0; k < count; ++k) {
      forward_rows<S>(rest[k], rest[k].v, i0, i1, height, width, n);
    }
  }
}

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

// dg (the guide's shape) = the per-pixel gradient dg_full (x's layout)
// summed over the broadcast dims, in Compute<S>, in x's element order.
template <typename S>
void reduce_guide(const Geometry& geo, const GuideLayout& l, const S* dg_full,
                  S* dg) {
  using T = StorageTraits<S>;
  FlushDenormals ftz;
  std::vector<Compute<S>> acc(static_cast<size_t>(l.elements), Compute<S>(0));
  const int64_t image = geo.height * geo.width * geo.channels;
  for (int64_t b = 0; b < geo.batch; ++b) {
    Compute<S>* a = acc.data() + l.image_offset(b);
    const S* d = dg_full + b * image;
    for (int64_t i = 0; i < geo.height; ++i) {
      for (int64_t j = 0; j < geo.width; ++j) {
        Compute<S>* ap = a + i * l.row_stride + j * l.col_stride;
        const S* dp = d + (i * geo.width + j) * geo.channels;
        if (l.channel_stride) {
          for (int64_t c = 0; c < geo.channels; ++c) ap[c] += T::load(dp[c]);
        } else {
          for (int64_t c = 0; c < geo.channels; ++c) ap[0] += T::load(dp[c]);
        }
      }
    }
  }
  for (int64_t k = 0; k < l.elements; ++k) dg[k] = T::store(acc[k]);
}

// ---------------------------------------------------------------------------
// The back end.
// ---------------------------------------------------------------------------

// The passes of one call, for cpu_forward, cpu_tangent and cpu_backward
// below.
class CpuKernels {
 public:
  explicit CpuKernels(ffi::ThreadPool pool) : pool_(pool) {}

  template <typename S>
  ffi::Error forward(const Call& c, const Buffers<S>& b) {
    return by_guide(c, [&](auto guided, auto vec) {
      return forward_as<S, guided.value, vec.value>(c, b);
    });
  }

  template <typename S>
  ffi::Error tangent(const Call& c, const Buffers<S>& b) {
    return by_guide(c, [&](auto guided, auto vec) {
      return tangent_as<S, guided.value, vec.value>(c, b);
    });
  }

  template <typename S>
  ffi::Error backward(const Call& c, const Buffers<S>& b) {
    return by_guide(c, [&](auto guided, auto vec) {
      return backward_as<S, guided.value, vec.value>(c, b);
    });
  }

 private:
  // run(kGuided, kGuideVec) with the two as std::bool_constant: is there a
  // guide, and is it per channel.
  template <typename Run>
  static ffi::Error by_guide(const Call& c, Run run) {
    if (!c.guided) return run(std::false_type{}, std::false_type{});
    if (c.guide.channel_stride) return run(std::true_type{}, std::true_type{});
    return run(std::true_type{}, std::false_type{});
  }

  // Every direction's views of x and of the guide.
  struct Views {
    ScanView scan[kMaxDirections];
    GuideView guide[kMaxDirections];

    explicit Views(const Call& c) {
      int total = 0;
      for (int p = 0; p < c.grouping.groups; ++p) {
        total += c.grouping.members[p];
      }
      for (int k = 0; k < total; ++k) {
        scan[k] = make_scan_view(c.grouping.dirs[k], c.geo.height, c.geo.width,
                                 c.geo.channels);
        guide[k] = c.guided ? make_guide_view(c.grouping.dirs[k], c.guide)
                            : GuideView{0, 0, 0};
      }
    }
  };

  // Whether every group is one direction, of at most a channel block, and
  // each scan order through x's rows (row_step) has no group or at least two
  // (a group alone in its order is better served group by group: forward_item
  // has bands). Then the kernels can sweep an image's groups of one row order
  // together: view pixel (i, j) of each in turn, so a row's lines are read in
  // one pass and the groups' chains run side by side.
  static bool rows_pair_up(const Call& c) {
    if (c.grouping.max_members != 1 || c.group_channels > kMaxChannelBlock) {
      return false;
    }
    int down = 0, up = 0;
    for (int p = 0; p < c.grouping.groups; ++p) {
      (c.grouping.dir(p, 0).row_step > 0 ? down : up) += 1;
    }
    return down != 1 && up != 1 && down + up >= 2;
  }

  // A group narrower than a cache line (octants of 64 float32 channels,
  // quadrants of the 16-bit types) or of whole lines (quadrants of float32).
  // Groups of part-lines (24 float32 channels) are left to the items of
  // make_plan, which share no line.
  static bool narrow_or_whole_lines(const Call& c, int64_t element_bytes) {
    const int64_t bytes = c.group_channels * element_bytes;
    return bytes < 64 || bytes % 64 == 0;
  }

  // Whether forward_as sweeps an image's groups together (forward_views), an
  // item per image: rows_pair_up, narrow_or_whole_lines, and images enough
  // for the threads. One sweep then reads a row's lines for all the groups
  // of its row order; merged groups gained nothing from it (see
  // docs/perf-log.md, 'CPU, 2026-12-06 (later): an image's groups of one
  // row order swept together, ...').
  bool sweeps_together(const Call& c, int64_t element_bytes) {
    if (!rows_pair_up(c) || !narrow_or_whole_lines(c, element_bytes)) {
      return false;
    }
    return c.geo.size() < kMinParallelElements ||
           c.geo.batch >= pool_.num_threads();
  }

  // Whether an item's pieces are swept together in the backward
  // (backward_views): two or more single-direction groups whose scans visit
  // pixels in the same order (an item of octants of float32 is a line of two:
  // I1 / I2, ...), so one pass reads the item's lines (see docs/perf-log.md,
  // 'CPU, 2026-12-06: a line of octants' backward swept together (kept)').
  // Lines of groups with one row order but two column orders (bfloat16
  // quadrants) gained nothing and are not taken (same log, 'CPU, 2026-12-06
  // (later): an image's groups of one row order swept together, ...').
  static bool together_backward(const Call& c, const Item* pieces, int count) {
    if (count < 2) return false;
    const Direction& d0 = c.grouping.dir(pieces[0].group, 0);
    for (int k = 0; k < count; ++k) {
      if (c.grouping.members[pieces[k].group] != 1) return false;
      const Direction& d = c.grouping.dir(pieces[k].group, 0);
      if (d.row_step != d0.row_step || d.col_step != d0.col_step) return false;
    }
    return true;
  }

  // Whether the groups that share a cache line of a pixel share a row order:
  // groups of whole lines, or narrow groups a whole number of which fill a
  // line (octants of float32: I1 / I2 in a line), so that items of one image
  // and two row orders write no line in common.
  static bool lines_share_row_order(const Call& c, int64_t element_bytes) {
    const int64_t bytes = c.group_channels * element_bytes;
    if (bytes % 64 == 0) return true;
    if (64 % bytes != 0 || (c.geo.channels * element_bytes) % 64 != 0) {
      return false;
    }
    const int per_line = static_cast<int>(64 / bytes);
    for (int p = 0; p < c.grouping.groups; ++p) {
      if (c.grouping.dir(p, 0).row_step !=
          c.grouping.dir(p - p % per_line, 0).row_step) {
        return false;
      }
    }
    return true;
  }

  // Whether backward_as sweeps an image's groups of one row order together
  // (backward_views), an item per (image, row order): unguided, rows_pair_up,
  // lines_share_row_order, and items enough for the threads: float32
  // quadrants (top_left with top_right, bottom_left with bottom_right) and
  // octants (four groups a sweep, where lines of two had been) read a row's
  // lines once (see docs/perf-log.md, 'CPU, 2026-12-06 (later): an image's
  // groups of one row order swept together, ...'). Other lines of groups of
  // one scan order are swept together by together_backward.
  bool rows_together_backward(const Call& c, int64_t element_bytes) {
    if (c.guided || !rows_pair_up(c) ||
        !lines_share_row_order(c, element_bytes)) {
      return false;
    }
    return c.geo.size() < kMinParallelElements ||
           2 * c.geo.batch >= pool_.num_threads();
  }

  // The forward with an item per image: the groups that scan x's rows
  // downwards, swept together, then those that scan them upwards (they start
  // where the first sweep ended, so its last rows are still in cache).
  template <typename S, bool kGuided, bool kGuideVec>
  void forward_together(const Call& c, const Buffers<S>& b,
                        const Views& views) {
    const Geometry& geo = c.geo;
    const Grouping& gr = c.grouping;
    const int64_t cg = c.group_channels;
    const int64_t image = geo.height * geo.width * geo.channels;
    const bool full = c.guided && c.guide.full;
    parallel_for(pool_, geo.batch, geo.size(), [&](int64_t bi) {
      FlushDenormals ftz;
      for (const int row_step : {1, -1}) {
        PoolPass<S, kGuided, kGuideVec> passes[kMaxGroups];
        int count = 0;
        for (int p = 0; p < gr.groups; ++p) {
          const int d = gr.first[p];
          if (gr.dirs[d].row_step != row_step) continue;
          const int64_t offset = bi * image + p * cg;
          const S* g = kGuided ? b.g + c.guide.image_offset(bi) +
                                     p * cg * c.guide.channel_stride
                               : nullptr;
          passes[count++] = PoolPass<S, kGuided, kGuideVec>{
              b.x + offset,   g,   b.out_w + offset, views.scan[d],
              views.guide[d], full};
        }
        if (count > 0) {
          forward_views<S>(passes, count, geo.height, geo.width, cg);
        }
      }
    });
  }

  template <typename S, bool kGuided, bool kGuideVec>
  ffi::Error forward_as(const Call& c, const Buffers<S>& b) {
    const Views views(c);
    if (sweeps_together(c, sizeof(S))) {
      forward_together<S, kGuided, kGuideVec>(c, b, views);
      return ffi::Error::Success();
    }
    const Geometry& geo = c.geo;
    const bool full = c.guided && c.guide.full;
    for_each_item(pool_, c, sizeof(S), [&](const Item& it) {
      const int members = c.grouping.members[it.group];
      const S* g = kGuided ? b.g + it.guide_offset : nullptr;
      if (members > 1 && c.codes()) {
        // Runs of members that visit x's rows in the same order, together.
        for (int k = 0, e; k < members; k = e) {
          const int row_step = c.grouping.dir(it.group, k).row_step;
          std::vector<CodePass<S, false>> rest;
          auto pass = [&](auto first, int m) {
            const int d = c.grouping.first[it.group] + m;
            return CodePass<S, decltype(first)::value>{b.x + it.offset,
                                                       b.out_w + it.offset,
                                                       b.codes + it.member(m),
                                                       it.image,
                                                       m,
                                                       views.scan[d],
                                                       geo.width,
                                                       it.n};
          };
          std::optional<CodePass<S, true>> first;
          if (k == 0) first.emplace(pass(std::true_type{}, 0));
          for (e = k + (k == 0);
               e < members && c.grouping.dir(it.group, e).row_step == row_step;
               ++e) {
            rest.push_back(pass(std::false_type{}, e));
          }
          forward_code_members<S>(first ? &*first : nullptr, rest.data(),
                                  static_cast<int>(rest.size()), geo.height,
                                  geo.width, it.n);
        }
        return;
      }
      if (members > 1 && c.has_members) {
        // Runs of members that visit x's rows in the same order, together.
        for (int k = 0, e; k < members; k = e) {
          const int row_step = c.grouping.dir(it.group, k).row_step;
          PoolPass<S, kGuided, kGuideVec> passes[kMaxMembers];
          for (e = k;
               e < members && c.grouping.dir(it.group, e).row_step == row_step;
               ++e) {
            const int d = c.grouping.first[it.group] + e;
            passes[e - k] = PoolPass<S, kGuided, kGuideVec>{
                b.x + it.offset, g,   b.members + it.member(e), views.scan[d],
                views.guide[d],  full};
          }
          forward_members<S>(
              passes, e - k, row_step, geo, members, b.members + it.member(0),
              e == members ? b.out_w + it.offset : nullptr, it.n);
        }
        return;
      }
      for (int k = 0; k < members; ++k) {
        const int d = c.grouping.first[it.group] + k;
        if (members > 1 && k > 0) {
          RingMergePass<S, kGuided, kGuideVec> pass{b.x + it.offset,
                                                    g,
                                                    b.out_w + it.offset,
                                                    views.scan[d],
                                                    views.guide[d],
                                                    geo.width,
                                                    it.n};
          forward_item<S>(pass, views.scan[d], geo.height, geo.width, it.n);
          continue;
        }
        PoolPass<S, kGuided, kGuideVec> pass{b.x + it.offset,     g,
                                             b.out_w + it.offset, views.scan[d],
                                             views.guide[d],      full};
        forward_item<S>(pass, views.scan[d], geo.height, geo.width, it.n);
      }
    });
    return ffi::Error::Success();
  }

  template <typename S, bool kGuided, bool kGuideVec>
  ffi::Error tangent_as(const Call& c, const Buffers<S>& b) {
    const Views views(c);
    const Geometry& geo = c.geo;
    // A guided merged group's member tangents, before the winner's is
    // picked (an unguided one's winner codes say where each goes).
    const auto t_members = uninitialized<S>(
        c.has_members && kGuided ? c.grouping.max_members * geo.size() : 0);
    for_each_item(pool_, c, sizeof(S), [&](const Item& it) {
      const int members = c.grouping.members[it.group];
      if (!kGuided && members > 1) {
        for (int k = 0; k < members; ++k) {
          const int d = c.grouping.first[it.group] + k;
          TangentCodePass<S> pass{
              b.codes + it.member(k), b.tx + it.offset, b.tout + it.offset,
              views.scan[d],          geo.width,        it.n};
          forward_item<S>(pass, views.scan[d], geo.height, geo.width, it.n);
        }
        return;
      }
      for (int k = 0; k < members; ++k) {
        const int d = c.grouping.first[it.group] + k;
        const S* o =
            members == 1 ? b.out + it.offset : b.members + it.member(k);
        S* t =
            members == 1 ? b.tout + it.offset : t_members.get() + it.member(k);
        TangentPass<S, kGuided, kGuideVec> pass{
            b.x + it.offset,
            kGuided ? b.g + it.guide_offset : nullptr,
            o,
            b.tx + it.offset,
            kGuided ? b.tg + it.guide_offset : nullptr,
            t,
            views.scan[d],
            views.guide[d],
            geo.width,
            it.n};
        forward_item<S>(pass, views.scan[d], geo.height, geo.width, it.n);
      }
      if (members > 1) {
        using T = StorageTraits<S>;
        const int64_t size = it.image;  // from one member to the next
        const S* pools = b.members + it.member(0);
        const S* ts = t_members.get() + it.member(0);
        S* tout = b.tout + it.offset;
        for_each_pixel(geo, [&](int64_t p) LMCONV_LAMBDA_INLINE {
          for (int64_t ch = 0; ch < it.n; ++ch) {
            Compute<S> best;
            const int w = merge_winner(
                members,
                [&](int k) { return T::load(pools[k * size + p + ch]); },
                &best);
            tout[p + ch] = ts[w * size + p + ch];
          }
        });
      }
    });
    return ffi::Error::Success();
  }

  template <typename S, bool kGuided, bool kGuideVec>
  ffi::Error backward_as(const Call& c, const Buffers<S>& b) {
    const Views views(c);
    const Geometry& geo = c.geo;
    // A guided merged group's merge winners (an unguided one's are in its
    // winner codes).
    const auto winner =
        uninitialized<uint8_t>(c.has_members && kGuided ? geo.size() : 0);
    // A broadcast guide's gradient, per pixel, before the reduction.
    std::unique_ptr<S[]> dg_full;
    S* dg = b.dg;
    if (kGuided && !c.guide.full) {
      dg_full = uninitialized<S>(geo.size());
      dg = dg_full.get();
    }
    // The backward of member k of item it's group.
    auto args_of = [&](const Item& it, int k) {
      const int members = c.grouping.members[it.group];
      const int d = c.grouping.first[it.group] + k;
      return BackwardArgs<S>{
          b.x + it.offset,
          kGuided ? b.g + it.guide_offset : nullptr,
          views.guide[d],
          members == 1 || !kGuided ? b.out + it.offset
                                   : b.members + it.member(k),
          b.ct + it.offset,
          b.dx + it.offset,
          kGuided ? dg + it.offset : nullptr,
          kGuided && members > 1 ? winner.get() + it.offset : nullptr,
          !kGuided && members > 1 ? b.codes + it.member(k) : nullptr,
          k,
          &views.scan[d],
          geo.height,
          geo.width,
          it.n};
    };
    auto item = [&](const Item& it) {
      const int members = c.grouping.members[it.group];
      if (kGuided && members > 1) {
        merge_item<S>(geo, members, b.members + it.member(0), nullptr,
                      winner.get() + it.offset, it.n);
      }
      for (int k = 0; k < members; ++k) {
        const BackwardArgs<S> a = args_of(it, k);
        if (members == 1) {
          backward_item<S, kGuided, kGuideVec, false, false>(a);
        } else if constexpr (!kGuided) {
          if (k == 0) {
            backward_item<S, false, false, true, false, true>(a);
          } else {
            backward_item<S, false, false, true, true, true>(a);
          }
        } else if (k == 0) {
          backward_item<S, kGuided, kGuideVec, true, false>(a);
        } else {
          backward_item<S, kGuided, kGuideVec, true, true>(a);
        }
      }
    };
    if (!kGuided && rows_together_backward(c, sizeof(S))) {
      // An item per (image, scan order through x's rows): its groups swept
      // together.
      const Grouping& gr = c.grouping;
      parallel_for(pool_, 2 * geo.batch, geo.size(), [&](int64_t k) {
        FlushDenormals ftz;
        const int row_step = k % 2 ? -1 : 1;
        BackwardArgs<S> args[kMaxGroups];
        int count = 0;
        for (int p = 0; p < gr.groups; ++p) {
          if (gr.dir(p, 0).row_step != row_step) continue;
          args[count++] = args_of(
              make_item(c, k / 2, p, p * c.group_channels, c.group_channels),
              0);
        }
        if (count > 0) backward_views<S>(args, count);
      });
      return ffi::Error::Success();
    }
    for_each_item_pieces(
        pool_, c, sizeof(S), [&](const Item* pieces, int count) {
          if (!kGuided && together_backward(c, pieces, count)) {
            BackwardArgs<S> args[kMaxGroups];
            for (int k = 0; k < count; ++k) args[k] = args_of(pieces[k], 0);
            backward_views<S>(args, count);
            return;
          }
          for (int k = 0; k < count; ++k) item(pieces[k]);
        });
    if (kGuided && !c.guide.full) reduce_guide<S>(geo, c.guide, dg, b.dg);
    return ffi::Error::Success();
  }

  ffi::ThreadPool pool_;
};

}  // namespace
}  // namespace lmconv

namespace lmconv {

// The entry points cpu.h declares. Defined here, instantiated only in
// cpu_kernels.cc, one storage type and one pass per object file.
template <typename S>
ffi::Error cpu_forward(ffi::ThreadPool pool, const Call& c,
                       const Buffers<S>& b) {
  return CpuKernels(pool).forward(c, b);
}

template <typename S>
ffi::Error cpu_tangent(ffi::ThreadPool pool, const Call& c,
                       const Buffers<S>& b) {
  return CpuKernels(pool).tangent(c, b);
}

template <typename S>
ffi::Error cpu_backward(ffi::ThreadPool pool, const Call& c,
                        const Buffers<S>& b) {
  return CpuKernels(pool).backward(c, b);
}

}  // namespace lmconv

#endif  // LMCONV_CPU_KERNELS_H_
