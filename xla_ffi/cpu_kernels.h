// CPU kernels of the grouped landmark pool: the back end, which runs the
// plan (cpu_plan.h: plan_cpu) with the walkers (cpu_walkers.h) over the
// passes (cpu_passes.h) on XLA's thread pool (cpu_parallel.h). Included only
// by cpu_kernels.cc, which CMake compiles once per dtype so the cores
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
// over the broadcast dims in landmark_pool.h's two-level order (slices of
// kGuideSlice, then the slices' sums; cpu_passes.h: reduce_guide), the order
// of the CUDA kernels, so the two back ends agree bit for bit.

#ifndef LMCONV_CPU_KERNELS_H_
#define LMCONV_CPU_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "cpu_passes.h"
#include "cpu_plan.h"
#include "cpu_walkers.h"

namespace ffi = xla::ffi;

namespace lmconv {
namespace {

// ---------------------------------------------------------------------------
// The item loop.
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

// Runs fn(piece) over every work item of an items plan (plan_cpu): a piece
// is one group's channels of the item (an item of whole groups has several,
// run in turn). for_each_item_pieces gives fn(pieces, count, k) all of an
// item's pieces at once, k the item's index in its image.
template <typename F>
void for_each_item_pieces(ffi::ThreadPool& pool, const Call& c,
                          const CpuPlan& plan, F fn) {
  const int64_t cg = c.group_channels;
  parallel_for(pool, plan.items, c.geo.size(), [&](int64_t k) {
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
      for (int64_t g = c0 / cg; g < (c0 + plan.block) / cg; ++g) {
        piece(g, g * cg, cg);
      }
    } else {
      const int64_t group = in_image / plan.nblocks;
      const int64_t c_in_group = (in_image % plan.nblocks) * plan.block;
      piece(group, group * cg + c_in_group,
            std::min(plan.block, cg - c_in_group));
    }
    fn(static_cast<const Item*>(pieces), count, in_image);
  });
}

template <typename F>
void for_each_item(ffi::ThreadPool& pool, const Call& c, const CpuPlan& plan,
                   F fn) {
  for_each_item_pieces(pool, c, plan,
                       [&](const Item* pieces, int count, int64_t) {
                         for (int k = 0; k < count; ++k) fn(pieces[k]);
                       });
}

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
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

  // The plan of pass for this call (the tests may override the threads).
  CpuPlan plan(const Call& c, CpuPass pass, int64_t element_bytes) {
    return plan_cpu(c, pass, cpu_plan_threads(pool_.num_threads()),
                    element_bytes);
  }

  // The forward with an item per image: the groups that scan x's rows
  // downwards, swept together, then those that scan them upwards (they start
  // where the first sweep ended, so its last rows are still in cache).
  template <typename S, bool kGuided, bool kGuideVec>
  void forward_together(const Call& c, const Buffers<S>& b, const Views& views,
                        const CpuPlan& plan) {
    const Geometry& geo = c.geo;
    const Grouping& gr = c.grouping;
    const int64_t cg = c.group_channels;
    const int64_t image = geo.height * geo.width * geo.channels;
    const bool full = c.guided && c.guide.full;
    parallel_for(pool_, plan.items, geo.size(), [&](int64_t bi) {
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
    const CpuPlan p = plan(c, CpuPass::kForward, sizeof(S));
    if (p.kind == CpuKind::kForwardImageRows) {
      forward_together<S, kGuided, kGuideVec>(c, b, views, p);
      return ffi::Error::Success();
    }
    const Geometry& geo = c.geo;
    const bool full = c.guided && c.guide.full;
    for_each_item(pool_, c, p, [&](const Item& it) {
      const int members = c.grouping.members[it.group];
      const S* g = kGuided ? b.g + it.guide_offset : nullptr;
      if (members > 1 && p.kind == CpuKind::kForwardCodeMembers) {
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
      if (members > 1 && p.kind == CpuKind::kForwardSavedMembers) {
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
    const CpuPlan p = plan(c, CpuPass::kTangent, sizeof(S));
    for_each_item(pool_, c, p, [&](const Item& it) {
      const int members = c.grouping.members[it.group];
      if (members > 1 && p.kind == CpuKind::kTangentCodes) {
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
    const CpuPlan p = plan(c, CpuPass::kBackward, sizeof(S));
    if (!kGuided && p.kind == CpuKind::kBackwardImageRows) {
      // An item per (image, scan order through x's rows): its groups swept
      // together.
      const Grouping& gr = c.grouping;
      parallel_for(pool_, p.items, geo.size(), [&](int64_t k) {
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
        if (count > 0)
          backward_views<BackwardKind<S, false, false, false, false, false>>(
              args, count);
      });
      return ffi::Error::Success();
    }
    for_each_item_pieces(
        pool_, c, p, [&](const Item* pieces, int count, int64_t in_image) {
          if (!kGuided && p.swept_together(in_image)) {
            BackwardArgs<S> args[kMaxGroups];
            for (int k = 0; k < count; ++k) args[k] = args_of(pieces[k], 0);
            backward_views<BackwardKind<S, false, false, false, false, false>>(
                args, count);
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
