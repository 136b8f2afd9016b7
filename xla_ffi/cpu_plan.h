// The CPU back end's decisions: which traversal a call's pass runs and how
// its work is cut into items for the thread pool (plan_cpu), and the tuning
// constants they and the walkers use. Like cuda_schedule.h's plan_for, it
// decides everything from the checked call, the pass, the thread count and
// the element size; the kernels (cpu_kernels.h) only execute the plan. The
// emulator module exposes it to the tests (module_emu.cc: cpu_plan), and the
// CPU module's test-only thread count (cpu.h: cpu_plan_threads) lets any
// machine run every schedule. Each constant's measurements are in
// docs/perf-log.md under the heading named beside it.

#ifndef LMCONV_CPU_PLAN_H_
#define LMCONV_CPU_PLAN_H_

#include <algorithm>
#include <cstdint>

#include "ffi_common.h"

namespace lmconv {

// ---------------------------------------------------------------------------
// Tuning constants
// ---------------------------------------------------------------------------

// A row of a work item stays in L1/L2 for wide images.
constexpr int64_t kMaxChannelBlock = 256;
// Blocks split for threads stay multiples of whole vectors.
constexpr int64_t kMinChannelBlock = 16;
// Below this many elements, threads cost more than they save.
constexpr int64_t kMinParallelElements = 1 << 15;
// A cache line: items that share none write no line in common.
constexpr int64_t kLineBytes = 64;
// Narrow blocks sweep this many view rows side by side, so the pixels'
// dependency chains overlap ('CPU, 2026-12-02: after the inlining fix and
// banded narrow sweeps').
constexpr int kBandRows = 4;
// The widest block (in bytes) that is swept in bands.
constexpr int64_t kBandMaxBytes = 128;
// Backward scans defeat the hardware prefetcher: prefetch this many pixels
// ahead ('CPU, 2026-12-05: a different VM (Intel Xeon); the octants'
// backward').
constexpr int64_t kPrefetchPixels = 8;

// ---------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------

enum class CpuPass { kForward, kTangent, kBackward };

// The traversal a pass runs: one kind per schedule. "Items" kinds cut the
// call into (image, channel block) work items; single-direction groups run
// forward_item / backward_item on each, and the kind says how a merged
// group's members run.
enum class CpuKind {
  // An item per image: the groups of one row order swept together
  // (forward_views), downwards then upwards ('CPU, 2026-12-06 (later): an
  // image's groups of one row order swept together, ...').
  kForwardImageRows,
  kForwardItems,         // every group one direction: forward_item
  kForwardCodeMembers,   // merged, unguided, saved: forward_code_members
  kForwardSavedMembers,  // merged, guided, saved: forward_members + merge
  kForwardRingMerge,     // merged, not saved (inference): RingMergePass
  kTangentItems,         // TangentPass per member (guided merged: + winner)
  kTangentCodes,         // merged unguided: TangentCodePass from the codes
  // An item per (image, row order): the groups of that order swept together
  // (backward_views), same log heading as kForwardImageRows.
  kBackwardImageRows,
  // Items of whole cache lines whose groups share a scan order are swept
  // together (backward_views; the others item by item) ('CPU, 2026-12-06: a
  // line of octants' backward swept together (kept)').
  kBackwardLines,
  kBackwardItems,  // backward_item per group and member
};

inline const char* cpu_kind_name(CpuKind k) {
  switch (k) {
    case CpuKind::kForwardImageRows:
      return "forward_image_rows";
    case CpuKind::kForwardItems:
      return "forward_items";
    case CpuKind::kForwardCodeMembers:
      return "forward_code_members";
    case CpuKind::kForwardSavedMembers:
      return "forward_saved_members";
    case CpuKind::kForwardRingMerge:
      return "forward_ring_merge";
    case CpuKind::kTangentItems:
      return "tangent_items";
    case CpuKind::kTangentCodes:
      return "tangent_codes";
    case CpuKind::kBackwardImageRows:
      return "backward_image_rows";
    case CpuKind::kBackwardLines:
      return "backward_lines";
    case CpuKind::kBackwardItems:
      return "backward_items";
  }
  return "?";
}

// The work decomposition: parallel_for runs `items` work items, image
// k / items_per_image. For the image kinds an item is a whole image (or an
// image's row order); for the others an item is a channel block of one
// group, or (whole_groups) a cache line of channels holding block /
// group_channels whole groups, pooled in turn, so no line is shared by two
// items (no false sharing) and the second group finds the lines in cache.
struct CpuPlan {
  CpuKind kind;
  int64_t items;
  int64_t items_per_image;
  int64_t block = 0;          // channels per item (items kinds)
  bool whole_groups = false;  // an item holds block / group_channels groups
  int64_t nblocks = 0;        // channel blocks per group (!whole_groups)
  // kBackwardLines: bit k set where an image's item k is swept together.
  uint64_t lines_together = 0;

  bool swept_together(int64_t in_image) const {
    return (lines_together >> in_image) & 1;
  }
};

namespace cpu_plan_detail {

// Every group one direction of at most a channel block, and each row order
// (row_step) with no group or at least two: a group alone in its order is
// better served group by group (forward_item has bands).
inline bool rows_pair_up(const Call& c) {
  if (c.grouping.max_members != 1 || c.group_channels > kMaxChannelBlock) {
    return false;
  }
  int down = 0, up = 0;
  for (int p = 0; p < c.grouping.groups; ++p) {
    (c.grouping.dir(p, 0).row_step > 0 ? down : up) += 1;
  }
  return down != 1 && up != 1 && down + up >= 2;
}

// The groups that share a cache line of a pixel share a row order: groups of
// whole lines, or narrow groups a whole number of which fill a line, so that
// items of one image and two row orders write no line in common.
inline bool lines_share_row_order(const Call& c, int64_t element_bytes) {
  const int64_t bytes = c.group_channels * element_bytes;
  if (bytes % kLineBytes == 0) return true;
  if (kLineBytes % bytes != 0 ||
      (c.geo.channels * element_bytes) % kLineBytes != 0) {
    return false;
  }
  const int per_line = static_cast<int>(kLineBytes / bytes);
  for (int p = 0; p < c.grouping.groups; ++p) {
    if (c.grouping.dir(p, 0).row_step !=
        c.grouping.dir(p - p % per_line, 0).row_step) {
      return false;
    }
  }
  return true;
}

// The items decomposition: channel blocks of a group, split further only
// while there is too little work to go round; groups narrower than a line
// that fill lines exactly go a line per item.
inline void plan_items(const Call& c, int64_t threads, int64_t element_bytes,
                       CpuPlan* p) {
  const int64_t cg = c.group_channels;
  if (cg * element_bytes < kLineBytes &&
      kLineBytes % (cg * element_bytes) == 0 &&
      (c.geo.channels * element_bytes) % kLineBytes == 0) {
    p->block = kLineBytes / element_bytes;
    p->whole_groups = true;
    p->items_per_image = c.geo.channels / p->block;
  } else {
    int64_t block = std::min(cg, kMaxChannelBlock);
    auto nblocks = [&] { return (cg + block - 1) / block; };
    while (c.geo.batch * c.grouping.groups * nblocks() < threads &&
           block >= 2 * kMinChannelBlock) {
      block = (block / 2 + kMinChannelBlock - 1) / kMinChannelBlock *
              kMinChannelBlock;
    }
    p->block = block;
    p->nblocks = nblocks();
    p->items_per_image = c.grouping.groups * p->nblocks;
  }
  p->items = c.geo.batch * p->items_per_image;
}

}  // namespace cpu_plan_detail

// What the pass runs and over which items, for `threads` threads (the
// pool's, or the tests' override) and elements of element_bytes.
inline CpuPlan plan_cpu(const Call& c, CpuPass pass, int64_t threads,
                        int64_t element_bytes) {
  namespace d = cpu_plan_detail;
  CpuPlan p{};
  const Grouping& gr = c.grouping;
  const int64_t bytes = c.group_channels * element_bytes;
  // Small calls run on one thread (parallel_for): images enough for any.
  const bool one_thread = c.geo.size() < kMinParallelElements;
  if (pass == CpuPass::kForward) {
    // Groups narrower than a line or of whole lines; groups of part-lines
    // (24 float32 channels) are left to the items, which share no line.
    // Merged groups gained nothing from it (the log heading above).
    if (d::rows_pair_up(c) && (bytes < kLineBytes || bytes % kLineBytes == 0) &&
        (one_thread || c.geo.batch >= threads)) {
      p.kind = CpuKind::kForwardImageRows;
      p.items_per_image = 1;
      p.items = c.geo.batch;
      return p;
    }
    p.kind = gr.max_members == 1 ? CpuKind::kForwardItems
             : c.codes()         ? CpuKind::kForwardCodeMembers
             : c.has_members     ? CpuKind::kForwardSavedMembers
                                 : CpuKind::kForwardRingMerge;
    d::plan_items(c, threads, element_bytes, &p);
    return p;
  }
  if (pass == CpuPass::kTangent) {
    p.kind = !c.guided && gr.max_members > 1 ? CpuKind::kTangentCodes
                                             : CpuKind::kTangentItems;
    d::plan_items(c, threads, element_bytes, &p);
    return p;
  }
  // The backward: float32 quadrants (top_left with top_right, ...) and
  // octants (four groups a sweep) read a row's lines once.
  if (!c.guided && d::rows_pair_up(c) &&
      d::lines_share_row_order(c, element_bytes) &&
      (one_thread || 2 * c.geo.batch >= threads)) {
    p.kind = CpuKind::kBackwardImageRows;
    p.items_per_image = 2;
    p.items = 2 * c.geo.batch;
    return p;
  }
  d::plan_items(c, threads, element_bytes, &p);
  // An item's groups swept together: two or more single directions of one
  // scan order (an item of float32 octants is a line of two: I1 / I2, ...).
  // Lines of one row order but two column orders (bfloat16 quadrants)
  // gained nothing and are not taken.
  if (!c.guided && p.whole_groups) {
    const int64_t cg = c.group_channels;
    for (int64_t k = 0; k < p.items_per_image; ++k) {
      const int g0 = static_cast<int>(k * p.block / cg);
      const int g1 = static_cast<int>((k + 1) * p.block / cg);
      bool together = g1 - g0 >= 2;
      for (int g = g0; together && g < g1; ++g) {
        const Direction& a = gr.dir(g, 0);
        const Direction& b = gr.dir(g0, 0);
        together = gr.members[g] == 1 && a.row_step == b.row_step &&
                   a.col_step == b.col_step;
      }
      if (together) p.lines_together |= uint64_t{1} << k;
    }
  }
  p.kind = p.lines_together ? CpuKind::kBackwardLines : CpuKind::kBackwardItems;
  return p;
}

}  // namespace lmconv

#endif  // LMCONV_CPU_PLAN_H_
