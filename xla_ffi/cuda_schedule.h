// The CUDA schedule of the grouped landmark pool, written once for the GPU
// (cuda.cu) and for its CPU emulation (emulate.cc), so the emulator runs the
// very code the GPU runs.
//
// A kernel is a sequence of phases with a block-wide barrier after each one.
// Its body is two LMCONV_HD functions: Body::begin(args, block, thread), what
// a thread works on (its Lane, decoded once), and Body::run(args, lane,
// phase), one thread's work of one phase; cuda.cu's __global__
// wrapper is begin, then a loop over phases with __syncthreads() in between,
// and the emulator loops phases, then blocks, then threads of the same
// geometry.
// plan_launch() is the one place that decides that geometry.
//
// One launch per pass covers the whole grouping (ffi_common.h: P groups of
// C / P contiguous channels, each of 1 to 4 member directions merged by max).
// A block owns one (image, group, channel chunk of `lanes` channels); its
// threads are (channel lane, pixel lane) pairs, channels fastest, so a warp
// reads whole runs of contiguous channels (NHWC). The block runs its group's
// members one after the other, each member's sweep a run of phases; a merged
// group merges as it goes (member 0 writes out, a later member takes out[p]
// where it is strictly greater or NaN), except a guided forward that saves
// the member pools, which adds one merge phase (out = max of the member
// pools, ties to the first). The launch has max over groups of those
// phases; a block past its own phases only meets the barriers.
//
// The merged groups' residual (ffi_common.h: `members`): unguided, the
// members' winner codes (landmark_pool.h), which the forward writes as it
// merges and from which the tangent and backward route t and G without
// reading x or any pool; guided, the member pools.
//
// The sweep of one direction. Every direction is seen through a view of the
// image (flipped, and transposed for the directions that depend on the
// previous column) in which both neighbours come earlier, and the view is cut
// into phases whose pixels are independent, so one phase is computed at once:
//   * skew 0 ("row" form, all octants): both neighbours are in the previous
//     view row; phase = view row i, its pixels k = j.
//   * skew 1 (quadrants, n = (0,-1) and (-1,0)) and skew 2 (n = (0,-1) and
//     (-1,+1), no named direction has it): phase = skew * i + j, an
//     anti-diagonal wavefront; its pixels are indexed by their row k = i.
// A thread takes the pixels k = pixel lane, + pixel_lanes, ... of each phase,
// loading up to kBatch pixels before it stores any (the pixels of a phase are
// independent), so several loads are in flight per thread.
//
// The backward runs each member's phases in reverse and pulls instead of
// pushing: a pixel q gets G[q] = ct[q] (routed: only where this member won
// the merge) + what the (at most two) pixels whose n1 / n2 is q passed on.
// Those are always in the phase just before (in reverse order), and each
// pixel leaves what it passes on in a per-block ring of two phases in the
// workspace (float32 for halves, double for double), reused by the group's
// members in turn, so there are no atomics and the sum is taken in the same
// order as on the CPU. Member 0 writes dx (and the guide's gradient); later
// members add theirs, rounded to the storage type, as cpu_kernels.h does. A
// guide broadcast along some dims gets its per-pixel gradient in a workspace of
// x's size, which two more launches sum over the broadcast dims in
// landmark_pool.h's two-level order (kGuideSlice), the CPU's: a thread per
// (slice, guide element) sums a slice (ReduceSlicesBody), then a thread per
// guide element sums its slices' partials (ReduceTotalBody): deterministic,
// no atomics.
//
// The tangent (forward-mode AD) is the forward's schedule with another
// per-pixel step: it reads the member's pool (or, unguided merged, its
// winner codes) instead of writing it, and each pixel's running tangent t[p]
// (Compute<S>: float32 for halves, never rounded) goes to a per-block ring
// of two phases, from which the next phase reads its neighbours' t, and to
// tout, rounded once; in a merged group only the member that won the merge
// at p writes tout[p] (from the codes, or found from the member pools), so
// no merge phase is needed.
//
// Memory accesses of the bodies go through ld() / st() (below): plain loads
// and stores on the GPU; in the emulator build (LMCONV_EMULATOR) they are
// recorded per phase by the race and bounds detector of emulate.cc.
#ifndef LMCONV_JAX_XLA_FFI_CUDA_SCHEDULE_H_
#define LMCONV_JAX_XLA_FFI_CUDA_SCHEDULE_H_

#include <cstdint>

#include "landmark_pool.h"

namespace lmconv {

// ---------------------------------------------------------------------------
// Instrumented memory accesses
// ---------------------------------------------------------------------------

#if defined(LMCONV_EMULATOR)
// emulate.cc: records (buffer, element, block, thread, phase, read/write);
// returns false, and the access is not made, if it is out of bounds.
bool emu_trace(const void* base, int64_t index, bool write);
template <typename T>
inline T ld(const T* base, int64_t i) {
  return emu_trace(base, i, false) ? base[i] : T{};
}
template <typename T>
inline void st(T* base, int64_t i, T v) {
  if (emu_trace(base, i, true)) base[i] = v;
}
#else
template <typename T>
LMCONV_HDI T ld(const T* base, int64_t i) {
  return base[i];
}
template <typename T>
LMCONV_HDI void st(T* base, int64_t i, T v) {
  base[i] = v;
}
#endif

// Emulator-only test hooks (Args::flags): a deliberately broken schedule, so
// the tests know the detector works. Ignored by the GPU build.
constexpr int kPlantRace = 1;         // a body reads what another thread
                                      // writes in the same phase
constexpr int kPlantOutOfBounds = 2;  // forward reads one element past x

// ---------------------------------------------------------------------------
// The view and its phases
// ---------------------------------------------------------------------------

struct Sweep {
  int64_t height, width;                  // view extents
  int64_t row_stride, col_stride, start;  // element offsets, as in ScanView
  int64_t g_row_stride, g_col_stride, g_start;  // the same in the guide
  Offset n1, n2;                                // neighbour offsets in the view
  int64_t off1, off2;  // element offsets from a pixel to n1, n2
  bool transposed;     // view rows are image columns
  int skew;            // 0: phase i, k = j; else phase skew*i + j, k = i
  bool n2_first;       // backward: add n2's pull before n1's
  int64_t phases;
  int64_t slots;      // k is in [0, slots)
  int64_t per_phase;  // the most pixels a phase has
};

LMCONV_HDI Offset swap_axes(Offset o) { return Offset{o.dc, o.dr}; }

// Where the guide is, unflipped: element strides (0 along a broadcast dim)
// and its own height and width.
struct GuideStrides {
  int64_t row, col, height, width;
};

// Sweep of a valid direction (make_direction) over (height, width, channels).
LMCONV_HDI Sweep make_sweep(Direction d, int64_t height, int64_t width,
                            int64_t channels, GuideStrides gs) {
  const ScanView v = make_scan_view(d, height, width, channels);
  Sweep s;
  s.height = height;
  s.width = width;
  s.row_stride = v.row_stride;
  s.col_stride = v.col_stride;
  s.start = v.start;
  s.g_row_stride = d.row_step * gs.row;
  s.g_col_stride = d.col_step * gs.col;
  s.g_start = (d.row_step < 0 ? (gs.height - 1) * gs.row : 0) +
              (d.col_step < 0 ? (gs.width - 1) * gs.col : 0);
  s.n1 = v.n1;
  s.n2 = v.n2;
  s.off1 = v.off1;
  s.off2 = v.off2;
  // The reverse scan visits the source of the later neighbour (lower row,
  // then right) first; the CPU adds the pushes in that order.
  s.n2_first = v.n2.dr < v.n1.dr || (v.n2.dr == v.n1.dr && v.n2.dc < v.n1.dc);
  s.transposed = v.n1.dc == -1 && v.n2.dc == -1;  // both in the last column
  if (s.transposed) {
    s.height = width;
    s.width = height;
    s.row_stride = v.col_stride;
    s.col_stride = v.row_stride;
    const int64_t t = s.g_row_stride;
    s.g_row_stride = s.g_col_stride;
    s.g_col_stride = t;
    s.n1 = swap_axes(v.n1);
    s.n2 = swap_axes(v.n2);
  }
  if (s.n1.dr == -1 && s.n2.dr == -1) {
    s.skew = 0;
    s.phases = s.height;
    s.slots = s.width;
    s.per_phase = s.width;
  } else {  // one neighbour is (0, -1), the other (-1, 0) or (-1, +1)
    const Offset up = s.n1.dr == -1 ? s.n1 : s.n2;
    s.skew = up.dc == 0 ? 1 : 2;
    s.phases = s.skew * (s.height - 1) + s.width;
    s.slots = s.height;
    const int64_t diag = (s.width + s.skew - 1) / s.skew;
    s.per_phase = s.height < diag ? s.height : diag;
  }
  return s;
}

// Phase `phase` has the pixels k in [*lo, *hi).
LMCONV_HDI void phase_pixels(const Sweep& s, int64_t phase, int64_t* lo,
                             int64_t* hi) {
  if (s.skew == 0) {
    *lo = 0;
    *hi = s.width;
    return;
  }
  const int64_t past = phase - s.width + 1;  // j < width: k >= past / skew
  *lo = past > 0 ? (past + s.skew - 1) / s.skew : 0;
  const int64_t last = phase / s.skew + 1;  // j >= 0
  *hi = last < s.height ? last : s.height;
}

// View row i and column j of pixel k of `phase`.
LMCONV_HDI void pixel_at(const Sweep& s, int64_t phase, int64_t k, int64_t* i,
                         int64_t* j) {
  *i = s.skew == 0 ? phase : k;
  *j = s.skew == 0 ? k : phase - s.skew * k;
}

// ---------------------------------------------------------------------------
// The launch geometry: ONE planning function for the GPU and the emulator
// ---------------------------------------------------------------------------

// Threads per block. Two such blocks fit on a multiprocessor (the kernels use
// at most 128 registers, cuda.cu's launch bound), so up to 2 x multiprocessors
// blocks run at once: one wave for the shapes of interest.
constexpr int64_t kMaxThreads = 256;
constexpr int64_t kMaxLanes = 32;  // channels per block: one warp's width
constexpr int64_t kMinLanes = 16;  // split channels no finer (>= 32 bytes)
constexpr int kBatch = 4;          // pixels a thread loads before it stores
// Split channels until there are this many blocks per multiprocessor, so a
// small batch still spreads over the GPU. More would not help: a block's
// time is its number of phases, and blocks past what the GPU holds at once
// run in a second wave.
constexpr int64_t kBlocksPerMultiprocessor = 1;
// The grouping's limits (ffi_common.h checks the attributes against the same
// numbers; cuda_ffi.h static_asserts that they agree).
constexpr int kPlanMaxMembers = 4;
constexpr int kPlanMaxGroups = 64;
constexpr int kPlanMaxDirections = 64;
constexpr int kPlanMaxRank = 11;
constexpr int64_t kReduceThreads = 256;
constexpr int kReduceBatch = 8;  // loads in flight per reducing thread

// Which kernel a plan is for: the geometry is the same, the workspace not.
enum class Pass { kForward, kBackward, kTangent };

// The buffers of KernelArgs, as bits of a body's kWrites (what it may write;
// the emulator's detector refuses any other write).
enum Buffer {
  kBufX,
  kBufG,
  kBufOut,
  kBufMembers,
  kBufTx,
  kBufTg,
  kBufTout,
  kBufCt,
  kBufDx,
  kBufDgPixels,
  kBufDg,
  kBufRing,
  kBufPartials,
  kBufCount
};
constexpr unsigned buffer_bit(Buffer b) { return 1u << b; }

// What plan_launch needs to know about one call (cuda_ffi.h fills it from a
// checked ffi_common.h Call).
struct PlanInput {
  int64_t batch, height, width, channels;
  int groups;
  int members[kPlanMaxGroups];
  int first[kPlanMaxGroups];
  Direction dirs[kPlanMaxDirections];
  bool saved_members;  // K > 1 and the residual is in `members`
  bool guided;
  bool guide_full;  // the guide has x's shape
  int rank;         // x's rank (lead dims + 3)
  int64_t x_dims[kPlanMaxRank];
  int64_t g_strides[kPlanMaxRank];  // guide element strides; 0: broadcast
  int64_t g_elements;
};

// The kernel arguments' geometry: everything a body needs, by value (about
// 3 KB: inside CUDA's 4 KB of kernel parameters).
struct LaunchPlan {
  int64_t batch, height, width, channels;
  int64_t image;  // elements per image, H * W * C
  int64_t size;   // elements of x
  int groups;
  int64_t group_channels;  // C / P
  int max_members;         // K
  // The merged groups' residual is in `members` (always for the tangent and
  // backward; a forward for inference may not save it): the member pools
  // (guided) or, `codes`, their winner codes (unguided). A forward that
  // does not save pools merges as it goes, a later member's pool in the ring.
  bool saved_members;
  bool codes;
  int members[kPlanMaxGroups];
  int first[kPlanMaxGroups];
  Direction dirs[kPlanMaxDirections];
  int64_t dir_phases[kPlanMaxDirections];  // each direction's sweep phases
  // The guide (its own shape; read through strides, never broadcast).
  bool guided, guide_full;
  int rank;
  int64_t x_dims[kPlanMaxRank];
  int64_t g_strides[kPlanMaxRank];
  int64_t g_elements;
  GuideStrides guide;  // of the (H, W) dims
  int64_t g_channel_stride;
  // The launch: grid, block, phases (a barrier after each).
  int64_t lanes;        // channels per block
  int64_t chunks;       // channel chunks per group
  int64_t pixel_lanes;  // threads per channel lane
  int64_t blocks;       // batch * groups * chunks
  int64_t threads;      // lanes * pixel_lanes
  int64_t phases;
  int64_t max_slots;  // the most pixels per phase of any sweep's ring
  int64_t ring;       // workspace per block, in Compute<S> elements
  // The two launches after the pool's in a guided backward with a broadcast
  // guide: the per-pixel guide gradient summed over its N = guide_n x
  // elements per guide element, a thread per (slice, guide element) and
  // then a thread per guide element (0 blocks: no reduction).
  int64_t guide_n, guide_slices;
  // The innermost broadcast dims (x's dims of size 1 included) as one run:
  // guide_run positions of a guide element's sequence, guide_step apart in x.
  int64_t guide_run, guide_step;
  int64_t slice_blocks, total_blocks, reduce_threads;
  int64_t launches;
};

LMCONV_HDI GuideStrides no_guide() { return GuideStrides{0, 0, 1, 1}; }

// x's dim k is one the guide is broadcast along (or has size 1).
LMCONV_HDI bool guide_broadcast(const LaunchPlan& p, int k) {
  return p.g_strides[k] == 0 || p.x_dims[k] == 1;
}

// Element offset in x of guide element e's first x element (`broadcast`
// false), or of position `i` of a guide element's sequence of x elements
// from its first (true): i's digits along the broadcast dims, innermost
// fastest (x's element order).
LMCONV_HDI int64_t guide_digits_offset(const LaunchPlan& p, int64_t i,
                                       bool broadcast) {
  int64_t off = 0, stride = 1;
  for (int k = p.rank - 1; k >= 0; --k) {
    if (guide_broadcast(p, k) == broadcast) {
      off += i % p.x_dims[k] * stride;
      i /= p.x_dims[k];
    }
    stride *= p.x_dims[k];
  }
  return off;
}

LMCONV_HDI Sweep sweep_of(const LaunchPlan& p, int dir) {
  return make_sweep(p.dirs[dir], p.height, p.width, p.channels,
                    p.guided ? p.guide : no_guide());
}

// `multiprocessors`: the GPU's (the CUDA handler asks the device).
inline LaunchPlan plan_launch(const PlanInput& in, Pass pass,
                              int64_t multiprocessors) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  LaunchPlan p;
  p.batch = in.batch;
  p.height = in.height;
  p.width = in.width;
  p.channels = in.channels;
  p.image = in.height * in.width * in.channels;
  p.size = in.batch * p.image;
  p.groups = in.groups;
  p.group_channels = in.channels / in.groups;
  p.max_members = 0;
  int total = 0;
  for (int g = 0; g < in.groups; ++g) {
    p.members[g] = in.members[g];
    p.first[g] = in.first[g];
    if (in.members[g] > p.max_members) p.max_members = in.members[g];
    total += in.members[g];
  }
  for (int k = 0; k < kPlanMaxGroups - in.groups; ++k) {
    p.members[in.groups + k] = p.first[in.groups + k] = 0;
  }
  p.saved_members = p.max_members > 1 && in.saved_members;
  p.codes = p.saved_members && !in.guided;
  const bool merge_as_it_goes =
      p.max_members > 1 && (!p.saved_members || p.codes);
  p.guided = in.guided;
  p.guide_full = in.guided && in.guide_full;
  p.rank = in.rank;
  for (int k = 0; k < kPlanMaxRank; ++k) {
    p.x_dims[k] = k < in.rank ? in.x_dims[k] : 1;
    p.g_strides[k] = k < in.rank && in.guided ? in.g_strides[k] : 0;
  }
  p.g_elements = in.guided ? in.g_elements : 0;
  const int r = in.rank;
  p.guide = in.guided ? GuideStrides{p.g_strides[r - 3], p.g_strides[r - 2],
                                     p.g_strides[r - 3] ? in.height : 1,
                                     p.g_strides[r - 2] ? in.width : 1}
                      : no_guide();
  p.g_channel_stride = in.guided ? p.g_strides[r - 1] : 0;
  // Channel chunks: split a group's channels while the GPU is short of
  // blocks.
  const int64_t cg = p.group_channels;
  const int64_t units = in.batch * in.groups;
  p.lanes = cg < kMaxLanes ? cg : kMaxLanes;
  while (units * ceil_div(cg, p.lanes) <
             kBlocksPerMultiprocessor * multiprocessors &&
         p.lanes >= 2 * kMinLanes) {
    p.lanes = ceil_div(p.lanes, 2);
  }
  p.chunks = ceil_div(cg, p.lanes);
  // Phases: each group runs its members' sweeps in turn (+ a merge phase in
  // the forward of a merged group that saves its pools); threads: enough for
  // the widest phase.
  int64_t per_phase = 1;
  p.max_slots = 0;
  for (int k = 0; k < kPlanMaxDirections; ++k) {
    p.dirs[k] = k < total ? in.dirs[k] : Direction{1, 1, {0, -1}, {-1, 0}};
    p.dir_phases[k] = 0;
    if (k >= total) continue;
    const Sweep s = sweep_of(p, k);
    p.dir_phases[k] = s.phases;
    if (s.per_phase > per_phase) per_phase = s.per_phase;
    if (s.slots > p.max_slots) p.max_slots = s.slots;
  }
  p.phases = 0;
  for (int g = 0; g < in.groups; ++g) {
    int64_t n = 0;
    for (int m = 0; m < p.members[g]; ++m) n += p.dir_phases[p.first[g] + m];
    if (pass == Pass::kForward && p.members[g] > 1 && !merge_as_it_goes) {
      n += 1;  // the merge phase
    }
    if (n > p.phases) p.phases = n;
  }
  p.pixel_lanes = kMaxThreads / p.lanes;
  if (per_phase < p.pixel_lanes) p.pixel_lanes = per_phase;
  p.blocks = units * p.chunks;
  p.threads = p.lanes * p.pixel_lanes;
  // Two phases of: G pushed to n1 and n2 (backward), t (tangent), a later
  // member's pool (a forward that merges as it goes).
  p.ring = pass == Pass::kBackward ? 2 * p.max_slots * 2 * p.lanes
           : pass == Pass::kTangent || merge_as_it_goes
               ? 2 * p.max_slots * p.lanes
               : 0;
  const bool reduce =
      pass == Pass::kBackward && p.guided && !p.guide_full && p.g_elements > 0;
  p.guide_n = reduce ? p.size / p.g_elements : 0;
  p.guide_slices = guide_slices(p.guide_n);
  int k = r - 1;
  p.guide_step = 1;
  for (; k >= 0 && !guide_broadcast(p, k); --k) p.guide_step *= p.x_dims[k];
  p.guide_run = 1;
  for (; k >= 0 && guide_broadcast(p, k); --k) p.guide_run *= p.x_dims[k];
  p.reduce_threads = reduce ? kReduceThreads : 0;
  p.slice_blocks =
      reduce ? ceil_div(p.guide_slices * p.g_elements, kReduceThreads) : 0;
  p.total_blocks = reduce ? ceil_div(p.g_elements, kReduceThreads) : 0;
  p.launches = reduce ? 3 : 1;
  return p;
}

// ---------------------------------------------------------------------------
// Kernel arguments: one struct for every body
// ---------------------------------------------------------------------------

template <typename S>
using Compute = typename StorageTraits<S>::Compute;

// Null where a pass has no such buffer.
template <typename S>
struct KernelArgs {
  LaunchPlan plan;
  const S* x;
  const S* g;      // the guide, at its own shape
  S* out;          // written by the forward, read by the others
  S* members;      // (..., K, H, W, C): member pools of guided merged groups
  uint8_t* codes;  // the same shape: winner codes of unguided ones
  const S* tx;     // tangent
  const S* tg;     // tangent of the guide, at the guide's shape
  S* tout;
  const S* ct;  // backward
  S* dx;
  S* dg_pixels;          // backward: the guide's gradient per pixel, x's layout
  S* dg;                 // reduction: the guide's gradient, the guide's shape
  Compute<S>* partials;  // reduction: guide_slices x g_elements slice sums
  Compute<S>* ring;      // plan.blocks * plan.ring elements
  int flags;             // emulator test hooks (kPlantRace, ...); 0 on the GPU
};

// ---------------------------------------------------------------------------
// Kernel bodies
// ---------------------------------------------------------------------------

// What thread `thread` of block `block` works on.
struct Lane {
  int64_t block, thread;
  bool active;   // false for the lanes past the group's last channel
  int64_t lane;  // channel lane in the block
  int64_t image, group;
  int64_t base;    // element offset of (image, channel); pixels add to it
  int64_t g_base;  // the same in the guide
  int64_t k0;      // first pixel index; then every pixel_lanes-th
};

// Element offset in the guide of image b's first element.
LMCONV_HDI int64_t guide_image_offset(const LaunchPlan& p, int64_t b) {
  int64_t off = 0;
  for (int k = p.rank - 4; k >= 0; --k) {
    off += (b % p.x_dims[k]) * p.g_strides[k];
    b /= p.x_dims[k];
  }
  return off;
}

LMCONV_HDI Lane lane_of(const LaunchPlan& p, int64_t block, int64_t thread) {
  const int64_t per_image = p.groups * p.chunks;
  Lane l;
  l.block = block;
  l.thread = thread;
  l.image = block / per_image;
  l.group = (block % per_image) / p.chunks;
  l.lane = thread % p.lanes;
  const int64_t in_group = (block % p.chunks) * p.lanes + l.lane;
  const int64_t c = l.group * p.group_channels + in_group;
  l.active = in_group < p.group_channels;
  l.base = l.image * p.image + c;
  l.g_base =
      p.guided ? guide_image_offset(p, l.image) + c * p.g_channel_stride : 0;
  l.k0 = thread / p.lanes;
  return l;
}

// Which member's sweep of the block's group runs at `phase`, and its own
// phase index; member == members for the merge phase, -1 past the end.
struct MemberPhase {
  int member;
  int64_t local;
};

LMCONV_HDI MemberPhase member_phase(const LaunchPlan& p, int64_t group,
                                    int64_t phase) {
  int64_t start = 0;
  const int members = p.members[group];
  for (int k = 0; k < members; ++k) {
    const int64_t n = p.dir_phases[p.first[group] + k];
    if (phase < start + n) return MemberPhase{k, phase - start};
    start += n;
  }
  return MemberPhase{phase == start && members > 1 ? members : -1, 0};
}

// One pixel of a phase: where it is and which neighbours exist.
struct Pixel {
  int64_t k, i, j;
  int64_t at;     // element offset from Lane::base
  int64_t g_at;   // element offset from Lane::g_base
  bool in1, in2;  // n1, n2 inside the image
};

LMCONV_HDI Pixel pixel(const Sweep& s, int64_t phase, int64_t k) {
  Pixel q;
  q.k = k;
  pixel_at(s, phase, k, &q.i, &q.j);
  q.at = s.start + q.i * s.row_stride + q.j * s.col_stride;
  q.g_at = s.g_start + q.i * s.g_row_stride + q.j * s.g_col_stride;
  q.in1 = inside(q.i, q.j, s.n1, s.height, s.width);
  q.in2 = inside(q.i, q.j, s.n2, s.height, s.width);
  return q;
}

#if defined(__CUDA_ARCH__)
#define LMCONV_UNROLL_BATCH _Pragma("unroll")
#elif defined(__CUDACC__)  // nvcc's host pass: the host code is not hot
#define LMCONV_UNROLL_BATCH
#else
#define LMCONV_UNROLL_BATCH _Pragma("GCC unroll 4")
#endif

// Runs a body's step over the lane's pixels of `phase` of sweep s (k = k0,
// k0 + pixel_lanes, ...), kBatch at a time: step.load(u, pixel) for the whole
// batch, then step.store(u, pixel). The pixels of a phase are independent, so
// a thread has several loads in flight before it stores. The loops run to
// kBatch (unrolled: the step's arrays stay in registers) and stop at the end.
template <typename Step>
LMCONV_HDI void for_each_batch(const Sweep& s, int64_t pixel_lanes,
                               const Lane& l, int64_t phase, Step& step) {
  int64_t lo, end;
  phase_pixels(s, phase, &lo, &end);
  int64_t k = l.k0;
  if (k < lo) k += (lo - k + pixel_lanes - 1) / pixel_lanes * pixel_lanes;
  for (; k < end; k += kBatch * pixel_lanes) {
    LMCONV_UNROLL_BATCH
    for (int u = 0; u < kBatch; ++u) {
      if (k + u * pixel_lanes >= end) break;
      step.load(u, pixel(s, phase, k + u * pixel_lanes));
    }
    // The pixel again, not kept from the load: a few integer operations
    // instead of kBatch Pixels live across the loads (ptxas spilled them).
    LMCONV_UNROLL_BATCH
    for (int u = 0; u < kBatch; ++u) {
      if (k + u * pixel_lanes >= end) break;
      step.store(u, pixel(s, phase, k + u * pixel_lanes));
    }
  }
}

// `members` is (..., K, H, W, C) (ffi_common.h): member k of image b starts
// at element (b * K + k) * H*W*C. The offset from x's element b * H*W*C + e
// to member k's element e:
LMCONV_HDI int64_t member_offset(const LaunchPlan& p, int64_t image, int k) {
  return (image * (p.max_members - 1) + k) * p.image;
}

// The member pool a merged group's member k reads or writes (as an offset
// from the pixel's element in x): its slot of `members` where the plan saves
// the member pools (guided), else out (a single-member group's pool; a
// forward that merges as it goes; unused where the codes are read).
template <typename S>
struct PoolRef {
  S* base;
  int64_t offset;
};

template <typename S>
LMCONV_HDI PoolRef<S> pool_of(const KernelArgs<S>& a, int members,
                              int64_t image, int k) {
  if (members == 1 || !a.plan.saved_members || a.plan.codes) {
    return PoolRef<S>{a.out, 0};
  }
  return PoolRef<S>{a.members, member_offset(a.plan, image, k)};
}

// The member that won the merge at x's element p of image `image`
// (landmark_pool.h's rule), and its value.
template <typename S>
LMCONV_HDI int winner_at(const KernelArgs<S>& a, int members, int64_t image,
                         int64_t p, Compute<S>* best) {
  return merge_winner(
      members,
      [&](int k) {
        return StorageTraits<S>::load(
            ld<S>(a.members, p + member_offset(a.plan, image, k)));
      },
      best);
}

// What the Step of every sweeping body starts with (a body's Step derives
// from it, names the parts it uses in using-declarations, as a dependent
// base needs, and adds its pass's load(u, q) and store(u, q), which
// for_each_batch runs for pixel q at u of a batch): member `member` of a
// group of `members`, its sweep s and pool, the block's ring at this lane,
// the sweep phase, and the values every pass loads.
template <typename S, bool kGuided>
struct MemberStep {
  using T = StorageTraits<S>;
  using Acc = Compute<S>;
  const KernelArgs<S>& a;
  const Sweep& s;
  int64_t base, g_base;  // Lane's
  PoolRef<S> pool;
  int64_t ring;  // this block's ring, at this lane (index into a.ring)
  int64_t image;
  int members, member;
  int64_t phase;
  Acc x[kBatch] = {}, o1[kBatch] = {}, o2[kBatch] = {}, g[kBatch] = {};

  // Index of pixel k of phase ph in a ring of one value per pixel.
  LMCONV_HDI int64_t slot(int64_t ph, int64_t k) const {
    return ring + ((ph & 1) * s.slots + k) * a.plan.lanes;
  }
  // The ring index of q's neighbour at view offset n (in the phase before).
  LMCONV_HDI int64_t slot_of(const Pixel& q, Offset n) const {
    return s.skew == 0 ? q.j + n.dc : q.i + n.dr;
  }
  // What the phase before left in such a ring for q's neighbour at n.
  LMCONV_HDI Acc ring_neighbour(const Pixel& q, Offset n) const {
    return ld<Acc>(a.ring, slot(phase - 1, slot_of(q, n)));
  }

  LMCONV_HDI void load_x(int u, const Pixel& q) {
    x[u] = T::load_input(ld<S>(a.x, base + q.at));
  }
  // The member's pool at q's neighbours, as stored (x where there is none).
  LMCONV_HDI void load_neighbours(int u, const Pixel& q) {
    const int64_t p = pool.offset + base + q.at;
    o1[u] = q.in1 ? T::load(ld<S>(pool.base, p + s.off1)) : x[u];
    o2[u] = q.in2 ? T::load(ld<S>(pool.base, p + s.off2)) : x[u];
  }
  LMCONV_HDI void load_guide(int u, const Pixel& q) {
    if constexpr (kGuided) g[u] = T::load_input(ld<S>(a.g, g_base + q.g_at));
  }

  // Whether the member won the merge at x's element p (alone: always),
  // from the member pools (guided).
  LMCONV_HDI bool won(int64_t p) const {
    Acc best;
    return members == 1 || winner_at(a, members, image, p, &best) == member;
  }
  // Whether this member's winner codes are the residual (unguided, merged).
  LMCONV_HDI bool coded() const {
    return !kGuided && a.plan.codes && members > 1;
  }
  // Index in a.codes of member k's code of x's element p.
  LMCONV_HDI int64_t code_index(int64_t p, int k) const {
    return p + member_offset(a.plan, image, k);
  }

  // Whether q's phase has a pixel after q (the emulator's kPlantRace reads
  // what it writes).
  LMCONV_HDI bool next_in_phase(const Pixel& q) const {
    int64_t lo, hi;
    phase_pixels(s, phase, &lo, &hi);
    return q.k + 1 < hi;
  }
};

// begin() and run() of the sweeping bodies (ForwardBody, TangentBody and
// BackwardBody derive from it). A phase of the launch is a phase of the
// sweep of one member of the lane's group (member_phase), the backward's
// in reverse, run with Body::Step; the forward's merge phase is
// Body::merge.
template <typename Body, typename S>
struct SweepBody {
  using Args = KernelArgs<S>;

  static LMCONV_HDI Lane begin(const Args& a, int64_t block, int64_t thread) {
    return lane_of(a.plan, block, thread);
  }

  static LMCONV_HDI void run(const Args& a, const Lane& l, int64_t phase) {
    const LaunchPlan& p = a.plan;
    if (!l.active) return;
    const int members = p.members[l.group];
    const MemberPhase mp = member_phase(p, l.group, phase);
    if (mp.member < 0) return;
    if (mp.member == members) {  // the merge phase (only the forward has one)
      if constexpr (Body::kPass == Pass::kForward) Body::merge(a, l);
      return;
    }
    const int dir = p.first[l.group] + mp.member;
    const Sweep s = sweep_of(p, dir);
    const int64_t local = Body::kPass == Pass::kBackward
                              ? p.dir_phases[dir] - 1 - mp.local
                              : mp.local;
    typename Body::Step step{
        {a, s, l.base, l.g_base, pool_of(a, members, l.image, mp.member),
         l.block * p.ring + l.lane, l.image, members, mp.member, local}};
    for_each_batch(s, p.pixel_lanes, l, local, step);
  }
};

// Forward: member k's pool at p from x[p] (g[p]) and the pool at its
// neighbours, which earlier phases stored (so they are read back as stored).
// Then, for a merged group, the merge phase: out = max of the member pools.
// A forward that does not save the member pools (inference) merges as it
// goes instead: member 0 writes out; a later member keeps its pool (as
// stored) in the block's ring, ring[phase & 1][k][lane], where the next
// phase finds its neighbours, and takes out[p] where it is strictly greater
// or NaN (landmark_pool.h's merge_winner, member by member).
template <typename S, bool kGuided>
struct ForwardBody : SweepBody<ForwardBody<S, kGuided>, S> {
  static constexpr Pass kPass = Pass::kForward;
  static constexpr unsigned kWrites =
      buffer_bit(kBufOut) | buffer_bit(kBufMembers) | buffer_bit(kBufRing);
  // (kBufMembers: the member pools or the winner codes, whichever it has.)

  // The merge phase of lane l's group.
  static LMCONV_HDI void merge(const KernelArgs<S>& a, const Lane& l) {
    const LaunchPlan& p = a.plan;
    if (!p.saved_members || p.codes) return;  // merged as it went
    using T = StorageTraits<S>;
    const int64_t pixels = p.height * p.width;
    for (int64_t q = l.k0; q < pixels; q += p.pixel_lanes) {
      const int64_t e = l.base + q * p.channels;
      Compute<S> best;
      winner_at(a, p.members[l.group], l.image, e, &best);
      st<S>(a.out, e, T::store(best));
    }
  }

  struct Step : MemberStep<S, kGuided> {
    using Base = MemberStep<S, kGuided>;
    using Base::a, Base::s, Base::base, Base::pool, Base::members, Base::member,
        Base::phase, Base::x, Base::o1, Base::o2, Base::g;
    using Base::coded, Base::code_index;
    using Base::slot, Base::ring_neighbour, Base::load_x, Base::load_neighbours,
        Base::load_guide, Base::next_in_phase;
    using typename Base::T, typename Base::Acc;
    // Merging as it goes: this member's pool is in the ring.
    const bool in_ring = members > 1 &&
                         (!a.plan.saved_members || a.plan.codes) && member > 0;

    LMCONV_HDI void load(int u, const Pixel& q) {
      load_x(u, q);
      if (in_ring) {
        o1[u] = q.in1 ? ring_neighbour(q, s.n1) : x[u];
        o2[u] = q.in2 ? ring_neighbour(q, s.n2) : x[u];
      } else {
        load_neighbours(u, q);
      }
      load_guide(u, q);
#if defined(LMCONV_EMULATOR)
      if ((a.flags & kPlantRace) && next_in_phase(q)) {  // a race
        (void)ld<S>(pool.base,
                    pool.offset + base + pixel(s, phase, q.k + 1).at);
      }
      if (a.flags & kPlantOutOfBounds) (void)ld<S>(a.x, a.plan.size);
#endif
    }

    LMCONV_HDI void store(int u, const Pixel& q) {
      const Acc m = pool_max(x[u], q.in1, o1[u], q.in2, o2[u]);
      const S v = T::store(kGuided ? pool_blend(g[u], m, x[u]) : m);
      const int64_t p = base + q.at;
      bool took = true;  // member 0 writes out
      if (in_ring) {
        const Acc vv = T::load(v);
        st<Acc>(a.ring, slot(phase, q.k), vv);
        const Acc cur = T::load(ld<S>(a.out, p));
        took = (vv > cur) | (vv != vv);
        if (took) st<S>(a.out, p, v);
      } else {
        st<S>(pool.base, pool.offset + p, v);
      }
      if (coded()) {  // the route, and the merge won from the earlier members
        const int route = pool_route(x[u], q.in1, o1[u], q.in2, o2[u]);
        st<uint8_t>(a.codes, code_index(p, member),
                    static_cast<uint8_t>(route | (took ? kWonMerge : 0)));
        for (int k = 0; took && k < member; ++k) {
          const int64_t e = code_index(p, k);
          st<uint8_t>(
              a.codes, e,
              static_cast<uint8_t>(ld<uint8_t>(a.codes, e) & ~kWonMerge));
        }
      }
    }
  };
};

// The tangent: member k's t[p] = pool_tangent[_guided](...) from tx[p] (g[p],
// tg[p]) and the neighbours' t, which the phase before left in the block's
// ring: ring[phase & 1][k][lane]. t is stored to tout rounded once (in a
// merged group only by the member that won at p); the ring keeps it
// unrounded (Compute<S>), as the CPU kernel does.
template <typename S, bool kGuided>
struct TangentBody : SweepBody<TangentBody<S, kGuided>, S> {
  static constexpr Pass kPass = Pass::kTangent;
  static constexpr unsigned kWrites =
      buffer_bit(kBufTout) | buffer_bit(kBufRing);

  struct Step : MemberStep<S, kGuided> {
    using Base = MemberStep<S, kGuided>;
    using Base::a, Base::s, Base::base, Base::g_base, Base::phase, Base::x,
        Base::o1, Base::o2, Base::g;
    using Base::slot, Base::ring_neighbour, Base::load_x, Base::load_neighbours,
        Base::load_guide, Base::won, Base::next_in_phase, Base::coded,
        Base::code_index, Base::member;
    using typename Base::T, typename Base::Acc;
    Acc tx[kBatch] = {}, t1[kBatch] = {}, t2[kBatch] = {}, tg[kBatch] = {};
    int code[kBatch] = {};

    LMCONV_HDI void load(int u, const Pixel& q) {
      if (coded()) {
        code[u] = ld<uint8_t>(a.codes, code_index(base + q.at, member));
      } else {
        load_x(u, q);
        load_neighbours(u, q);
      }
      tx[u] = T::load(ld<S>(a.tx, base + q.at));
      t1[u] = q.in1 ? ring_neighbour(q, s.n1) : Acc(0);
      t2[u] = q.in2 ? ring_neighbour(q, s.n2) : Acc(0);
      if constexpr (kGuided) {
        load_guide(u, q);
        tg[u] = T::load(ld<S>(a.tg, g_base + q.g_at));
      }
#if defined(LMCONV_EMULATOR)
      if ((a.flags & kPlantRace) && next_in_phase(q)) {
        (void)ld<Acc>(a.ring, slot(phase, q.k + 1));  // the next pixel's t
      }
#endif
    }

    LMCONV_HDI void store(int u, const Pixel& q) {
      const int64_t p = base + q.at;
      if (coded()) {
        const Acc t = tangent_by_route(code[u], tx[u], t1[u], t2[u]);
        if (code[u] & kWonMerge) st<S>(a.tout, p, T::store(t));
        st<Acc>(a.ring, slot(phase, q.k), t);
        return;
      }
      const Acc m = pool_max(x[u], q.in1, o1[u], q.in2, o2[u]);
      Acc t;
      if constexpr (kGuided) {
        t = pool_tangent_guided(x[u], m, q.in1, o1[u], q.in2, o2[u], g[u],
                                tx[u], t1[u], t2[u], tg[u]);
      } else {
        t = pool_tangent(x[u], m, q.in1, o1[u], q.in2, o2[u], tx[u], t1[u],
                         t2[u]);
      }
      if (won(p)) st<S>(a.tout, p, T::store(t));
      st<Acc>(a.ring, slot(phase, q.k), t);
    }
  };
};

// Backward: step t of member k runs forward phase phases - 1 - t of its
// sweep. A pixel q pulls G[q] = ct[q] (where k won, in a merged group) + what
// the pixels whose n1 / n2 is q passed on; they are all in the phase run just
// before, and left it in the block's ring, which holds for the last two
// phases what each pixel k passed to its n1 and n2:
// ring[phase & 1][k][n1 or n2][lane]. The first step of a sweep pulls
// nothing (its pixels are the sources of none), so the ring needs no reset
// between the members.
template <typename S, bool kGuided>
struct BackwardBody : SweepBody<BackwardBody<S, kGuided>, S> {
  static constexpr Pass kPass = Pass::kBackward;
  static constexpr unsigned kWrites =
      buffer_bit(kBufDx) | buffer_bit(kBufDgPixels) | buffer_bit(kBufRing);

  struct Step : MemberStep<S, kGuided> {
    using Base = MemberStep<S, kGuided>;
    using Base::a, Base::s, Base::base, Base::ring, Base::member, Base::phase,
        Base::x, Base::o1, Base::o2, Base::g;
    using Base::slot_of, Base::load_x, Base::load_neighbours, Base::load_guide,
        Base::won, Base::next_in_phase, Base::coded, Base::code_index;
    using typename Base::T, typename Base::Acc;
    Acc G[kBatch] = {};
    int code[kBatch] = {};

    // Index of what pixel k of phase ph passed to n1 (which = 0) or n2 (1).
    LMCONV_HDI int64_t slot(int64_t ph, int64_t k, int which) const {
      return ring + (((ph & 1) * s.slots + k) * 2 + which) * a.plan.lanes;
    }

    LMCONV_HDI void load(int u, const Pixel& q) {
      const int64_t p = base + q.at;
      const Acc c = T::load(ld<S>(a.ct, p));
      if (coded()) {
        code[u] = ld<uint8_t>(a.codes, code_index(p, member));
        G[u] = (code[u] & kWonMerge) ? c : Acc(0);
      } else {
        G[u] = won(p) ? c : Acc(0);
      }
      for (int t = 0; t < 2; ++t) {  // in the CPU's order
        const int which = (t == 0) == s.n2_first ? 1 : 0;
        const Offset n = which ? s.n2 : s.n1;
        const Offset from{-n.dr, -n.dc};  // to the pixel whose n is q
        if (inside(q.i, q.j, from, s.height, s.width)) {
          G[u] += ld<Acc>(a.ring, slot(phase + 1, slot_of(q, from), which));
        }
      }
      if (!coded()) {
        load_x(u, q);
        load_neighbours(u, q);
        load_guide(u, q);
      }
#if defined(LMCONV_EMULATOR)
      if ((a.flags & kPlantRace) && next_in_phase(q)) {
        (void)ld<Acc>(a.ring, slot(phase, q.k + 1, 0));  // the next pixel's
      }
#endif
    }

    // out[p] = r (first member) or out[p] + r rounded (later members).
    LMCONV_HDI void put(S* out, int64_t p, Acc r) const {
      if (member == 0) {
        st<S>(out, p, T::store(r));
      } else {
        st<S>(out, p, T::store(T::load(ld<S>(out, p)) + T::load(T::store(r))));
      }
    }

    LMCONV_HDI void store(int u, const Pixel& q) {
      const int64_t p = base + q.at;
      PoolGrad<Acc> r;
      if constexpr (kGuided) {
        const Acc m = pool_max(x[u], q.in1, o1[u], q.in2, o2[u]);
        r = pool_backward_guided(x[u], m, q.in1, o1[u], q.in2, o2[u], g[u],
                                 G[u]);
        put(a.dg_pixels, p, r.dguide);
      } else if (coded()) {
        r = backward_by_route(code[u], G[u]);
      } else {
        r = pool_backward(x[u], q.in1, o1[u], q.in2, o2[u], G[u]);
      }
      put(a.dx, p, r.dx);
      st<Acc>(a.ring, slot(phase, q.k, 0), r.to_n1);
      st<Acc>(a.ring, slot(phase, q.k, 1), r.to_n2);
    }
  };
};

// The reduction of a broadcast guide's gradient (the two launches after a
// guided backward's), in landmark_pool.h's two-level order, cpu_passes.h's
// reduce_guide's: a thread's sum is sequential, kReduceBatch loads in flight
// before they are added in order.
LMCONV_HDI Lane reduce_lane(int64_t block, int64_t thread) {
  Lane l{};
  l.block = block;
  l.thread = thread;
  return l;
}

// acc += load(0) + load(1) + ... + load(n - 1), added in that order,
// kReduceBatch loads in flight before they are added.
template <typename Acc, typename Load>
LMCONV_HDI void add_in_order(Acc& acc, int64_t n, const Load& load) {
  for (int64_t k = 0; k < n; k += kReduceBatch) {
    Acc v[kReduceBatch];
    LMCONV_UNROLL_BATCH
    for (int u = 0; u < kReduceBatch; ++u) {
      v[u] = k + u < n ? load(k + u) : Acc(0);
    }
    LMCONV_UNROLL_BATCH
    for (int u = 0; u < kReduceBatch; ++u) {
      if (k + u < n) acc += v[u];
    }
  }
}

// Level 1: thread t = slice * g_elements + e sums slice `slice` of the x
// elements that read guide element e into partials[t]. e fastest, so a
// warp of a (C,) guide reads 32 adjacent channels at a time.
template <typename S>
struct ReduceSlicesBody {
  static constexpr Pass kPass = Pass::kBackward;
  static constexpr unsigned kWrites = buffer_bit(kBufPartials);
  using Args = KernelArgs<S>;
  using Acc = Compute<S>;

  static LMCONV_HDI Lane begin(const Args& /*a*/, int64_t block,
                               int64_t thread) {
    return reduce_lane(block, thread);
  }

  static LMCONV_HDI void run(const Args& a, const Lane& l, int64_t /*phase*/) {
    using T = StorageTraits<S>;
    const LaunchPlan& p = a.plan;
    const int64_t t = l.block * p.reduce_threads + l.thread;
    if (t >= p.guide_slices * p.g_elements) return;
    const int64_t first = t / p.g_elements * kGuideSlice;
    const int64_t end =
        first + kGuideSlice < p.guide_n ? first + kGuideSlice : p.guide_n;
    const int64_t base = guide_digits_offset(p, t % p.g_elements, false);
    Acc acc(0);
    for (int64_t i = first; i < end;) {
      // The rest of i's run: strided loads, no digits to carry.
      const int64_t left = p.guide_run - i % p.guide_run;
      const int64_t n = end - i < left ? end - i : left;
      const int64_t off = base + guide_digits_offset(p, i, true);
      add_in_order(acc, n, [&](int64_t k) {
        return T::load(ld<S>(a.dg_pixels, off + k * p.guide_step));
      });
      i += n;
    }
    st<Acc>(a.partials, t, acc);
  }
};

// Level 2: thread e sums guide element e's partials in slice order,
// rounded once (adjacent e: adjacent partials).
template <typename S>
struct ReduceTotalBody {
  static constexpr Pass kPass = Pass::kBackward;
  static constexpr unsigned kWrites = buffer_bit(kBufDg);
  using Args = KernelArgs<S>;
  using Acc = Compute<S>;

  static LMCONV_HDI Lane begin(const Args& /*a*/, int64_t block,
                               int64_t thread) {
    return reduce_lane(block, thread);
  }

  static LMCONV_HDI void run(const Args& a, const Lane& l, int64_t /*phase*/) {
    using T = StorageTraits<S>;
    const LaunchPlan& p = a.plan;
    const int64_t e = l.block * p.reduce_threads + l.thread;
    if (e >= p.g_elements) return;
    Acc acc(0);
    add_in_order(acc, p.guide_slices, [&](int64_t s) {
      return ld<Acc>(a.partials, s * p.g_elements + e);
    });
    st<S>(a.dg, e, T::store(acc));
  }
};

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_SCHEDULE_H_
