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
