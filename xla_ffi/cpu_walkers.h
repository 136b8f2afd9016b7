// The CPU kernels' walkers: the traversals of an item's pixels in scan
// order (forward_item, forward_views, forward_members,
// forward_code_members) and in reverse (backward_item, backward_views),
// for any pass of cpu_passes.h. Part of cpu_kernels.h (cpu_kernels.cc only).

#ifndef LMCONV_CPU_WALKERS_H_
#define LMCONV_CPU_WALKERS_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_passes.h"
#include "cpu_plan.h"

namespace lmconv {
namespace {

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

// One view pixel (i, j) of pass with its neighbours' flags known at compile
// time (kIn1, kIn2: inside the image), after a prefetch of the pixel
// kPrefetchPixels ahead.
template <bool kIn1, bool kIn2, typename Pass, typename N>
LMCONV_INLINE void forward_step(Pass& pass, const typename Pass::Row& row,
                                int64_t i, int64_t j, int64_t height,
                                int64_t width, N n) {
  const ScanView& v = pass.v;
  const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
  if (const int64_t q = ahead<false>(v, i, j, p, height, width); q >= 0) {
    pass.prefetch_pixel(q, n);
  }
  pass.template pixel<kIn1, kIn2>(row, p, j, n);
}

// A pixel with a neighbour outside the image (the first and last columns,
// the first row): its flags found at run time. Out of line, so a walker
// inlines the interior's pixel only (the build's time and size grow with the
// copies); such pixels are O(H + W) of the H * W. The row comes by value and
// the walkers' interior loops hold no call, so their state stays in
// registers.
template <typename Pass, typename N>
LMCONV_CPU_CLONES __attribute__((noinline)) void forward_edge(
    Pass& pass, const typename Pass::Row row, int64_t i, int64_t j,
    int64_t height, int64_t width, N n) {
  with_inside(pass.v, i, j, height, width,
              [&](auto in1, auto in2) LMCONV_LAMBDA_INLINE {
                forward_step<decltype(in1)::value, decltype(in2)::value>(
                    pass, row, i, j, height, width, n);
              });
}

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
  const int64_t j1 = width - 1;
  constexpr int kBand = Pass::kBand;
  if (kBand > 1 && n * int64_t{sizeof(S)} <= kBandMaxBytes && height > 1) {
    for (int64_t b0 = i0; b0 < i1; b0 += kBand) {
      const int rows = static_cast<int>(std::min<int64_t>(kBand, i1 - b0));
      Row row[kBand];
      for (int r = 0; r < rows; ++r) row[r] = pass.begin_row(b0 + r);
      // Steps [t0, t1): a full band below the first row, every row's pixel
      // in the interior columns (a loop of its own, with no call).
      const int64_t steps = width + 2 * (rows - 1);
      const bool full = rows == kBand && b0 > 0;
      const int64_t t0 = full ? 2 * kBand - 1 : steps;
      const int64_t t1 = full ? std::max(t0, j1) : steps;
      for (int64_t t = 0; t < steps; ++t) {
        if (t == t0) {
          for (; t < t1; ++t) {
#pragma GCC unroll 4  // kBandRows
            for (int r = 0; r < kBand; ++r) {
              forward_step<true, true>(pass, row[r], b0 + r, t - 2 * r, height,
                                       width, n);
            }
          }
          if (t == steps) break;
        }
#pragma GCC unroll 4  // kBandRows
        for (int r = 0; r < kBand; ++r) {
          const int64_t i = b0 + r, j = t - 2 * r;
          if (r >= rows || j < 0 || j > j1) continue;
          if (i > 0 && j > 0 && j < j1) {
            forward_step<true, true>(pass, row[r], i, j, height, width, n);
          } else {
            forward_edge(pass, row[r], i, j, height, width, n);
          }
        }
      }
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const Row row = pass.begin_row(i);
    // A neighbour of an interior pixel is inside unless it is in the row
    // above the first.
    if (i == 0 && (v.n1.dr != 0 || v.n2.dr != 0)) {
      for (int64_t j = 0; j < width; ++j) {
        forward_edge(pass, row, i, j, height, width, n);
      }
      continue;
    }
    forward_edge(pass, row, i, 0, height, width, n);
    for (int64_t j = 1; j < j1; ++j) {
      forward_step<true, true>(pass, row, i, j, height, width, n);
    }
    if (width > 1) forward_edge(pass, row, i, j1, height, width, n);
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
  const int64_t j1 = width - 1;
  for (int64_t i = 0; i < height; ++i) {
    for (int k = 0; k < count; ++k) rows[k] = passes[k].begin_row(i);
    for (int k = 0; k < count; ++k) {
      forward_edge(passes[k], rows[k], i, 0, height, width, n);
    }
    // Interior columns of a row below the first: every neighbour is inside.
    if (i > 0) {
      for (int64_t j = 1; j < j1; ++j) {
        for (int k = 0; k < count; ++k) {
          forward_step<true, true>(passes[k], rows[k], i, j, height, width, n);
        }
      }
    } else {
      for (int64_t j = 1; j < j1; ++j) {
        for (int k = 0; k < count; ++k) {
          forward_edge(passes[k], rows[k], i, j, height, width, n);
        }
      }
    }
    if (width > 1) {
      for (int k = 0; k < count; ++k) {
        forward_edge(passes[k], rows[k], i, j1, height, width, n);
      }
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

// The backward's schedule: which routing of ct a member's backward reads and
// how it adds into dx, as template flags (the guide's, kGuided and
// kGuideVec, too).
//   kMasked: a merged group's member (ct routed to the merge's winners);
//   kAccum: a later member (adds its rounded dx to the earlier ones');
//   kCodes: routed by the unguided winner codes (kMasked too).
template <typename S, bool kGuided, bool kGuideVec, bool kMasked, bool kAccum,
          bool kCodes>
struct BackwardKind {
  static_assert(!kCodes || (kMasked && !kGuided), "codes: unguided, merged");
  using Storage = S;
  using Acc = Compute<S>;
  static constexpr bool kGuidedV = kGuided, kGuideVecV = kGuideVec;
  static constexpr bool kMaskedV = kMasked, kAccumV = kAccum;
  static constexpr bool kCodesV = kCodes;
  // G lives in dx itself (no rounding between, nothing to add to).
  static constexpr bool kInPlace = std::is_same_v<S, Acc> && !kAccum;
};

// A view's state in the backward's view row i: where its G rows are.
template <typename Acc>
struct BackwardRow {
  int64_t i;
  Acc* G_row;   // G of view pixel (i, j) is at G_row + j * g_col
  Acc* G_prev;  // row i - 1's (null on the first)
  int64_t g_col, goff1, goff2;  // G's column stride; neighbours' offsets
  int64_t g_row;                // the guide's row start (guided)
};

// G of view pixel (i, j) := ct (routed), into G. Done one pixel at a time
// inside the pixel loop, so the loads of ct overlap the math.
template <typename K>
LMCONV_INLINE void backward_load_ct(const BackwardArgs<typename K::Storage>& a,
                                    typename K::Acc* __restrict G, int64_t i,
                                    int64_t j) {
  using S = typename K::Storage;
  using Acc = typename K::Acc;
  const ScanView& v = *a.v;
  const int64_t n = a.n;
  const int64_t q = v.start + i * v.row_stride + j * v.col_stride;
  const S* __restrict c = a.ct + q;
  if constexpr (K::kCodesV) {
    const uint8_t* __restrict w = a.code + q;
    for (int64_t k = 0; k < n; ++k) {
      const Acc ck = StorageTraits<S>::load(c[k]);
      G[k] = (int32_t{w[k]} & kWonMerge) ? ck : Acc(0);
    }
  } else if constexpr (K::kMaskedV) {
    const uint8_t* __restrict w = a.winner + q;
    const uint8_t me = static_cast<uint8_t>(a.member);
    for (int64_t k = 0; k < n; ++k) {
      const Acc ck = StorageTraits<S>::load(c[k]);
      G[k] = w[k] == me ? ck : Acc(0);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) G[k] = StorageTraits<S>::load(c[k]);
  }
}

// View pixel (i, j) of the backward (reverse scan order), its neighbours'
// flags known at compile time.
template <typename K, bool kIn1, bool kIn2>
LMCONV_INLINE void backward_step(const BackwardArgs<typename K::Storage>& a,
                                 const BackwardRow<typename K::Acc>& r,
                                 int64_t j) {
  using S = typename K::Storage;
  const ScanView& v = *a.v;
  const int64_t i = r.i, n = a.n;
  const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
  auto* G = r.G_row + j * r.g_col;
  const S* gp = K::kGuidedV ? a.g + r.g_row + j * a.gv.col_stride : nullptr;
  S* dgp = K::kGuidedV ? a.dg + p : nullptr;
  const S* o1 = K::kCodesV ? nullptr : a.o + p + v.off1;
  const S* o2 = K::kCodesV ? nullptr : a.o + p + v.off2;
  if (const int64_t q = ahead<true>(v, i, j, p, a.height, a.width); q >= 0) {
    if constexpr (K::kCodesV) {
      prefetch<0>(a.code + q, n);
    } else {
      prefetch<0>(a.x + q, n);
      prefetch<0>(a.o + q + v.off1, n);  // may be outside: harmless
      prefetch<0>(a.o + q + v.off2, n);
    }
    if (K::kGuidedV) prefetch<1>(a.dg + q, n);
    if (!K::kInPlace) prefetch<1>(a.dx + q, n);
  }
  if (i >= 2) {  // row i - 2 of ct and of G is loaded before row i - 1
    const int64_t q = v.start + (i - 2) * v.row_stride + j * v.col_stride;
    prefetch<0>(a.ct + q, n);
    if (K::kInPlace) prefetch<1>(a.dx + q, n);
  }
  if (i > 0 && j > 0) {
    backward_load_ct<K>(a, r.G_prev + (j - 1) * r.g_col, i - 1, j - 1);
  }
  backward_pixel<S, K::kGuidedV, K::kGuideVecV, K::kAccumV, K::kCodesV, kIn1,
                 kIn2>(a.x + p, gp, o1, o2, K::kCodesV ? a.code + p : nullptr,
                       G, G + r.goff1, G + r.goff2, a.dx + p, dgp, n);
}

// A pixel with a neighbour outside the image: out of line, as forward_edge.
template <typename K>
LMCONV_CPU_CLONES __attribute__((noinline)) void backward_edge(
    const BackwardArgs<typename K::Storage>& a,
    const BackwardRow<typename K::Acc> r, int64_t j) {
  with_inside(*a.v, r.i, j, a.height, a.width,
              [&](auto in1, auto in2) LMCONV_LAMBDA_INLINE {
                backward_step<K, decltype(in1)::value, decltype(in2)::value>(
                    a, r, j);
              });
}

// The backward of `count` views of one image whose scans visit x's rows in
// the same order (one view: a member's backward, backward_item), in reverse
// scan order: view pixel (i, j) of each in turn, each exactly as alone (its
// G, its pushes, its loads of ct in the same order; the views' channels are
// disjoint), so one pass reads the item's lines and the views' per-pixel
// work overlaps (a line of float32 octants holds two: I1 / I2, ...).
template <typename K>
LMCONV_CPU_CLONES void backward_views(
    const BackwardArgs<typename K::Storage>* args, int count) {
  using Acc = typename K::Acc;
  const int64_t height = args[0].height, width = args[0].width, n = args[0].n;
  std::vector<Acc> scratch(K::kInPlace ? 0 : count * 2 * width * n);
  auto row_ptr = [&](int k, int64_t i) LMCONV_LAMBDA_INLINE -> Acc* {
    if constexpr (K::kInPlace) {
      const ScanView& v = *args[k].v;
      return reinterpret_cast<Acc*>(args[k].dx) + v.start + i * v.row_stride;
    } else {
      return scratch.data() + (2 * k + (i & 1)) * width * n;
    }
  };
  const int64_t g_col0 = K::kInPlace ? 0 : n;
  BackwardRow<Acc> rows[kMaxGroups];
  for (int k = 0; k < count; ++k) {
    const int64_t g_col = K::kInPlace ? args[k].v->col_stride : g_col0;
    for (int64_t j = width - 1; j >= 0; --j) {
      backward_load_ct<K>(args[k], row_ptr(k, height - 1) + j * g_col,
                          height - 1, j);
    }
  }
  for (int64_t i = height - 1; i >= 0; --i) {
    for (int k = 0; k < count; ++k) {
      const BackwardArgs<typename K::Storage>& a = args[k];
      const ScanView& v = *a.v;
      BackwardRow<Acc>& r = rows[k];
      r.i = i;
      r.g_col = K::kInPlace ? v.col_stride : g_col0;
      r.G_row = row_ptr(k, i);
      r.G_prev = i > 0 ? row_ptr(k, i - 1) : nullptr;
      // Pushes from pixel (i, j) reach row i - 1 at columns j - 1 .. j + 1:
      // column j - 1 of row i - 1 is loaded just before pixel j, the last
      // column before the row starts.
      if (i > 0) {
        backward_load_ct<K>(a, r.G_prev + (width - 1) * r.g_col, i - 1,
                            width - 1);
      }
      // Offsets of the neighbours' G from G[p] (view rows dr are 0 or -1).
      const int64_t prev_row = i > 0 ? r.G_prev - r.G_row : 0;
      r.goff1 = (v.n1.dr ? prev_row : 0) + v.n1.dc * r.g_col;
      r.goff2 = (v.n2.dr ? prev_row : 0) + v.n2.dc * r.g_col;
      r.g_row = a.gv.start + i * a.gv.row_stride;
    }
    if (width > 1) {
      for (int k = 0; k < count; ++k) {
        backward_edge<K>(args[k], rows[k], width - 1);
      }
    }
    // Interior columns of a row below the first: every neighbour is inside.
    if (i > 0) {
      for (int64_t j = width - 2; j >= 1; --j) {
        for (int k = 0; k < count; ++k) {
          backward_step<K, true, true>(args[k], rows[k], j);
        }
      }
    } else {
      for (int64_t j = width - 2; j >= 1; --j) {
        for (int k = 0; k < count; ++k) backward_edge<K>(args[k], rows[k], j);
      }
    }
    for (int k = 0; k < count; ++k) backward_edge<K>(args[k], rows[k], 0);
  }
}

// A single direction's backward (every pool's gradient): backward_views'
// sweep of one view, with its edge pixels inline (4 variants each) and its
// row state in locals. Out of line, or through BackwardRow and
// backward_step, this walker measured up to 1.3x slower (docs/perf-log.md,
// 'CPU, 2026-12-08: the edges out of line'), so it is the one walker that
// keeps them.
template <typename S, bool kGuided, bool kGuideVec>
LMCONV_CPU_CLONES void backward_single(const BackwardArgs<S>& a) {
  using K = BackwardKind<S, kGuided, kGuideVec, false, false, false>;
  using Acc = Compute<S>;
  constexpr bool kInPlace = K::kInPlace;
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
  // G of view pixel (i, j) := ct, one pixel at a time inside the pixel loop,
  // so the loads of ct overlap the math.
  auto load_ct = [&](int64_t i, int64_t j) LMCONV_LAMBDA_INLINE {
    Acc* __restrict G = row_ptr(i) + j * g_col;
    const S* __restrict c =
        a.ct + v.start + i * v.row_stride + j * v.col_stride;
    for (int64_t k = 0; k < n; ++k) G[k] = StorageTraits<S>::load(c[k]);
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
      if (const int64_t q = ahead<true>(v, i, j, p, height, width); q >= 0) {
        prefetch<0>(a.x + q, n);
        prefetch<0>(a.o + q + v.off1, n);  // may be outside: harmless
        prefetch<0>(a.o + q + v.off2, n);
        if (kGuided) prefetch<1>(a.dg + q, n);
        if (!kInPlace) prefetch<1>(a.dx + q, n);
      }
      if (i >= 2) {  // row i - 2 of ct and of G is loaded before row i - 1
        const int64_t q = v.start + (i - 2) * v.row_stride + j * v.col_stride;
        prefetch<0>(a.ct + q, n);
        if (kInPlace) prefetch<1>(a.dx + q, n);
      }
      if (i > 0 && j > 0) load_ct(i - 1, j - 1);
      backward_pixel<S, kGuided, kGuideVec, false, false, decltype(in1)::value,
                     decltype(in2)::value>(
          a.x + p, gp, a.o + p + v.off1, a.o + p + v.off2, nullptr, G,
          G + goff1, G + goff2, a.dx + p, dgp, n);
    };
    auto edge = [&](int64_t j) LMCONV_LAMBDA_INLINE {
      with_inside(v, i, j, height, width,
                  [&](auto in1, auto in2)
                      LMCONV_LAMBDA_INLINE { step(in1, in2, j); });
    };
    if (width > 1) edge(width - 1);
    if (i > 0) {
      for (int64_t j = width - 2; j >= 1; --j) {
        step(std::true_type{}, std::true_type{}, j);
      }
    } else {
      // The first view row (its neighbours above are outside): out of line.
      const BackwardRow<Acc> r{i, G_row, nullptr, g_col, goff1, goff2, g_row};
      for (int64_t j = width - 2; j >= 1; --j) backward_edge<K>(a, r, j);
    }
    edge(0);
  }
}

// One view's backward (a member's): a single direction's is
// backward_single; a merged group's member (ct routed to its winners) is
// backward_views' sweep of one view.
template <typename S, bool kGuided, bool kGuideVec, bool kMasked, bool kAccum,
          bool kCodes = false>
LMCONV_INLINE void backward_item(const BackwardArgs<S>& a) {
  if constexpr (kMasked) {
    backward_views<
        BackwardKind<S, kGuided, kGuideVec, kMasked, kAccum, kCodes>>(&a, 1);
  } else {
    static_assert(!kAccum && !kCodes, "a single direction: no merge");
    backward_single<S, kGuided, kGuideVec>(a);
  }
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

}  // namespace
}  // namespace lmconv

#endif  // LMCONV_CPU_WALKERS_H_
