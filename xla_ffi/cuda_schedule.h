// The CUDA schedule of the landmark pool, written once for the GPU (cuda.cu)
// and for its CPU emulation (emulate.cc), so the emulator runs the very code
// the GPU runs.
//
// A kernel is a sequence of phases with a block-wide barrier after each one.
// Its body is a LMCONV_HD function Body::run(args, block, thread, phase,
// shared) that does one thread's work of one phase; cuda.cu's __global__
// wrapper is a loop over phases with __syncthreads() in between, and the
// emulator loops phases, then blocks, then threads of the same geometry.
// plan_launch() is the one place that decides that geometry.
//
// The schedule. Every direction is seen through a view of the image (flipped,
// and transposed for the directions that depend on the previous column) in
// which both neighbours come earlier, and the view is cut into phases whose
// pixels are independent, so one phase is computed at once:
//   * skew 0 ("row" form, all octants): both neighbours are in the previous
//     view row; phase = view row i, its pixels k = j.
//   * skew 1 (quadrants, n = (0,-1) and (-1,0)) and skew 2 (n = (0,-1) and
//     (-1,+1), no named direction has it): phase = skew * i + j, an
//     anti-diagonal wavefront; its pixels are indexed by their row k = i.
// A block owns one image and a chunk of `lanes` channels; its threads are
// (channel lane, pixel lane) pairs, channels fastest, so a warp reads whole
// runs of contiguous channels (NHWC). A thread takes the pixels k = pixel
// lane, + pixel_lanes, ... of each phase, loading up to kBatch pixels before
// it stores any (the pixels of a phase are independent), so several loads are
// in flight per thread.
//
// The backward runs the phases in reverse and pulls instead of pushing: a
// pixel q gets G[q] = ct[q] + what the (at most two) pixels whose n1 / n2 is q
// passed on. Those are always in the phase just before (in reverse order), and
// each pixel leaves what it passes on in a per-block ring of two phases in the
// workspace (float32 for halves, double for double), so there are no atomics
// and the sum is taken in the same order as on the CPU.
//
// The tangent (forward-mode AD) is the forward's body with another per-pixel
// step (ForwardBody<S, kGuided, /*kTangent=*/true>): it reads out instead of
// writing it, and each pixel's running tangent t[p] (Compute<S>: float32 for
// halves, never rounded) goes to tout, rounded once, and to a per-block ring
// of two phases in the workspace, from which the next phase reads its
// neighbours' t (both are always in the phase just before).
#ifndef LMCONV_JAX_XLA_FFI_CUDA_SCHEDULE_H_
#define LMCONV_JAX_XLA_FFI_CUDA_SCHEDULE_H_

#include <cstdint>

#include "landmark_pool.h"

namespace lmconv {

// ---------------------------------------------------------------------------
// The view and its phases
// ---------------------------------------------------------------------------

struct Sweep {
  int64_t height, width;    // view extents
  int64_t row_stride, col_stride, start;  // element offsets, as in ScanView
  Offset n1, n2;            // neighbour offsets in the view
  int64_t off1, off2;       // element offsets from a pixel to n1, n2
  bool transposed;          // view rows are image columns
  int skew;                 // 0: phase i, k = j; else phase skew*i + j, k = i
  bool n2_first;            // backward: add n2's pull before n1's
  int64_t phases;
  int64_t slots;            // k is in [0, slots)
};

LMCONV_HDI Offset swap_axes(Offset o) { return Offset{o.dc, o.dr}; }

// Sweep of a valid direction (make_direction) over (height, width, channels).
LMCONV_HDI Sweep make_sweep(Direction d, int64_t height, int64_t width,
                            int64_t channels) {
  const ScanView v = make_scan_view(d, height, width, channels);
  Sweep s;
  s.height = height;
  s.width = width;
  s.row_stride = v.row_stride;
  s.col_stride = v.col_stride;
  s.start = v.start;
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
    s.n1 = swap_axes(v.n1);
    s.n2 = swap_axes(v.n2);
  }
  if (s.n1.dr == -1 && s.n2.dr == -1) {
    s.skew = 0;
    s.phases = s.height;
    s.slots = s.width;
  } else {  // one neighbour is (0, -1), the other (-1, 0) or (-1, +1)
    const Offset up = s.n1.dr == -1 ? s.n1 : s.n2;
    s.skew = up.dc == 0 ? 1 : 2;
    s.phases = s.skew * (s.height - 1) + s.width;
    s.slots = s.height;
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
  const int64_t last = phase / s.skew + 1;   // j >= 0
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
constexpr int64_t kMaxLanes = 32;     // channels per block: one warp's width
constexpr int64_t kMinLanes = 16;     // split channels no finer (>= 32 bytes)
constexpr int kBatch = 4;             // pixels a thread loads before it stores
// Split channels until there are this many blocks per multiprocessor, so a
// small batch still spreads over the GPU. More would not help: a block's
// time is its number of phases, and blocks past what the GPU holds at once
// run in a second wave.
constexpr int64_t kBlocksPerMultiprocessor = 1;

struct LaunchPlan {
  Sweep sweep;
  int64_t channels;     // C
  int64_t image;        // elements per image, H * W * C
  int64_t lanes;        // channels per block
  int64_t chunks;       // channel chunks per image
  int64_t pixel_lanes;  // threads per channel lane
  // The launch: grid, block, phases (a barrier after each), shared memory.
  int64_t blocks;       // batch * chunks
  int64_t threads;      // lanes * pixel_lanes
  int64_t phases;
  int64_t shared_bytes;  // per block; this schedule needs none
  int64_t ring;          // workspace per block, in Compute<S> elements
};

// Which kernel a plan is for: the geometry is the same, the workspace not.
enum class Pass { kForward, kBackward, kTangent };

// `multiprocessors`: the GPU's (the CUDA handler asks the device).
inline LaunchPlan plan_launch(Direction d, int64_t batch, int64_t height,
                              int64_t width, int64_t channels, Pass pass,
                              int64_t multiprocessors) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  LaunchPlan p;
  p.sweep = make_sweep(d, height, width, channels);
  p.channels = channels;
  p.image = height * width * channels;
  p.lanes = channels < kMaxLanes ? channels : kMaxLanes;
  while (batch * ceil_div(channels, p.lanes) <
             kBlocksPerMultiprocessor * multiprocessors &&
         p.lanes >= 2 * kMinLanes) {
    p.lanes = ceil_div(p.lanes, 2);
  }
  p.chunks = ceil_div(channels, p.lanes);
  const Sweep& s = p.sweep;
  int64_t per_phase = s.width;  // the most pixels a phase has
  if (s.skew != 0) {
    per_phase = ceil_div(s.width, s.skew);
    if (s.height < per_phase) per_phase = s.height;
  }
  p.pixel_lanes = kMaxThreads / p.lanes;
  if (per_phase < p.pixel_lanes) p.pixel_lanes = per_phase;
  p.blocks = batch * p.chunks;
  p.threads = p.lanes * p.pixel_lanes;
  p.phases = s.phases;
  p.shared_bytes = 0;
  // Two phases of: G pushed to n1 and n2 (backward), t (tangent).
  p.ring = pass == Pass::kBackward  ? 2 * s.slots * 2 * p.lanes
           : pass == Pass::kTangent ? 2 * s.slots * p.lanes
                                    : 0;
  return p;
}

// ---------------------------------------------------------------------------
// Kernel bodies
// ---------------------------------------------------------------------------

// What thread `thread` of block `block` works on.
struct Lane {
  bool active;     // false for the lanes past the last channel
  int64_t lane;    // channel lane in the block
  int64_t base;    // element offset of (image, channel); pixels add to it
  int64_t k0;      // first pixel index; then every pixel_lanes-th
};

LMCONV_HDI Lane lane_of(const LaunchPlan& p, int64_t block, int64_t thread) {
  const int64_t image = block / p.chunks;
  const int64_t lane = thread % p.lanes;
  const int64_t c = (block % p.chunks) * p.lanes + lane;
  return Lane{c < p.channels, lane, image * p.image + c, thread / p.lanes};
}

// One pixel of a phase: where it is and which neighbours exist.
struct Pixel {
  int64_t k, i, j;
  int64_t at;      // element offset from Lane::base
  bool in1, in2;   // n1, n2 inside the image
};

LMCONV_HDI Pixel pixel(const Sweep& s, int64_t phase, int64_t k) {
  Pixel q;
  q.k = k;
  pixel_at(s, phase, k, &q.i, &q.j);
  q.at = s.start + q.i * s.row_stride + q.j * s.col_stride;
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

// Runs a body's step over the lane's pixels of `phase` (k = k0, k0 +
// pixel_lanes, ...), kBatch at a time: step.load(u, pixel) for the whole
// batch, then step.store(u, pixel). The pixels of a phase are independent, so
// a thread has several loads in flight before it stores. The loops run to
// kBatch (unrolled: the step's arrays stay in registers) and stop at the end.
template <typename Step>
LMCONV_HDI void for_each_batch(const LaunchPlan& p, const Lane& l,
                               int64_t phase, Step& step) {
  int64_t lo, end;
  phase_pixels(p.sweep, phase, &lo, &end);
  int64_t k = l.k0;
  if (k < lo) k += (lo - k + p.pixel_lanes - 1) / p.pixel_lanes * p.pixel_lanes;
  for (; k < end; k += kBatch * p.pixel_lanes) {
    Pixel px[kBatch] = {};
    LMCONV_UNROLL_BATCH
    for (int u = 0; u < kBatch; ++u) {
      if (k + u * p.pixel_lanes >= end) break;
      px[u] = pixel(p.sweep, phase, k + u * p.pixel_lanes);
      step.load(u, px[u]);
    }
    LMCONV_UNROLL_BATCH
    for (int u = 0; u < kBatch; ++u) {
      if (k + u * p.pixel_lanes >= end) break;
      step.store(u, px[u]);
    }
  }
}

template <typename S>
using Compute = typename StorageTraits<S>::Compute;

// Forward: out[p] from x[p] and the outputs of its neighbours, which earlier
// phases stored (so they are read back as stored).
//
// kTangent: the same schedule with the tangent's per-pixel step. out is read
// (the forward's result), and t[p] = pool_tangent[_guided](...) from tx[p]
// (g[p], tg[p]) and the neighbours' t, which the phase before left in the
// block's ring: ring[phase & 1][k][lane]. t is stored to tout rounded once;
// the ring keeps it unrounded (Compute<S>), as the CPU kernel does.
template <typename S, bool kGuided, bool kTangent = false>
struct ForwardBody {
  using Acc = Compute<S>;
  struct Args {
    LaunchPlan plan;
    const S* x;
    const S* g;  // null unless kGuided
    S* out;      // written by the forward, read by the tangent
    // Tangent only (null otherwise):
    const S* tx = nullptr;
    const S* tg = nullptr;  // null unless kGuided
    S* tout = nullptr;
    Acc* ring = nullptr;    // plan.blocks * plan.ring elements
  };

  struct Step {
    using T = StorageTraits<S>;
    const Args& a;
    int64_t base;  // Lane::base
    Acc* ring;     // tangent: this block's ring, at this lane
    int64_t phase;
    Acc x[kBatch] = {}, o1[kBatch] = {}, o2[kBatch] = {}, g[kBatch] = {};
    // Tangent only.
    Acc tx[kBatch] = {}, t1[kBatch] = {}, t2[kBatch] = {}, tg[kBatch] = {};

    // t of pixel k of phase ph.
    LMCONV_HDI Acc& slot(int64_t ph, int64_t k) const {
      return ring[((ph & 1) * a.plan.sweep.slots + k) * a.plan.lanes];
    }
    // The ring index of q's neighbour at view offset n (in the phase before).
    LMCONV_HDI int64_t slot_of(const Pixel& q, Offset n) const {
      return a.plan.sweep.skew == 0 ? q.j + n.dc : q.i + n.dr;
    }

    LMCONV_HDI void load(int u, const Pixel& q) {
      const Sweep& s = a.plan.sweep;
      const int64_t p = base + q.at;
      x[u] = T::load(a.x[p]);
      o1[u] = q.in1 ? T::load(a.out[p + s.off1]) : x[u];
      o2[u] = q.in2 ? T::load(a.out[p + s.off2]) : x[u];
      if constexpr (kGuided) g[u] = T::load(a.g[p]);
      if constexpr (kTangent) {
        tx[u] = T::load(a.tx[p]);
        t1[u] = q.in1 ? slot(phase - 1, slot_of(q, s.n1)) : Acc(0);
        t2[u] = q.in2 ? slot(phase - 1, slot_of(q, s.n2)) : Acc(0);
        if constexpr (kGuided) tg[u] = T::load(a.tg[p]);
      }
    }

    LMCONV_HDI void store(int u, const Pixel& q) {
      const Acc m = pool_max(x[u], q.in1, o1[u], q.in2, o2[u]);
      if constexpr (kTangent) {
        Acc t;
        if constexpr (kGuided) {
          t = pool_tangent_guided(x[u], m, q.in1, o1[u], q.in2, o2[u], g[u],
                                  tx[u], t1[u], t2[u], tg[u]);
        } else {
          t = pool_tangent(x[u], m, q.in1, o1[u], q.in2, o2[u], tx[u], t1[u],
                           t2[u]);
        }
        a.tout[base + q.at] = T::store(t);
        slot(phase, q.k) = t;
      } else {
        a.out[base + q.at] = T::store(kGuided ? pool_blend(g[u], m, x[u]) : m);
      }
    }
  };

  static LMCONV_HDI void run(const Args& a, int64_t block, int64_t thread,
                             int64_t phase, unsigned char* /*shared*/) {
    const Lane l = lane_of(a.plan, block, thread);
    if (!l.active) return;
    Step step{a, l.base,
              kTangent ? a.ring + block * a.plan.ring + l.lane : nullptr,
              phase};
    for_each_batch(a.plan, l, phase, step);
  }
};

// The tangent: the forward's schedule and body, the tangent's step.
template <typename S, bool kGuided>
using TangentBody = ForwardBody<S, kGuided, /*kTangent=*/true>;

// Backward: step t runs forward phase phases - 1 - t. A pixel q pulls G[q] =
// ct[q] + what the pixels whose n1 / n2 is q passed on; they are all in the
// phase run just before, and left it in the block's ring, which holds for the
// last two phases what each pixel k passed to its n1 and n2:
// ring[phase & 1][k][n1 or n2][lane].
template <typename S, bool kGuided>
struct BackwardBody {
  using Acc = Compute<S>;
  struct Args {
    LaunchPlan plan;
    const S* x;
    const S* g;  // null unless kGuided
    const S* out;
    const S* ct;
    S* dx;
    S* dg;       // null unless kGuided
    Acc* ring;   // plan.blocks * plan.ring elements
  };

  struct Step {
    using T = StorageTraits<S>;
    const Args& a;
    int64_t base;      // Lane::base
    Acc* ring;         // this block's ring, at this lane
    int64_t phase;
    Acc G[kBatch] = {}, x[kBatch] = {}, o1[kBatch] = {}, o2[kBatch] = {},
        g[kBatch] = {};

    LMCONV_HDI Acc& slot(int64_t ph, int64_t k, int which) const {
      return ring[(((ph & 1) * a.plan.sweep.slots + k) * 2 + which) *
                  a.plan.lanes];
    }

    LMCONV_HDI void load(int u, const Pixel& q) {
      const Sweep& s = a.plan.sweep;
      const int64_t p = base + q.at;
      G[u] = T::load(a.ct[p]);
      for (int t = 0; t < 2; ++t) {  // in the CPU's order
        const int which = (t == 0) == s.n2_first ? 1 : 0;
        const Offset n = which ? s.n2 : s.n1;
        if (inside(q.i, q.j, Offset{-n.dr, -n.dc}, s.height, s.width)) {
          G[u] += slot(phase + 1, s.skew == 0 ? q.j - n.dc : q.i - n.dr, which);
        }
      }
      x[u] = T::load(a.x[p]);
      o1[u] = q.in1 ? T::load(a.out[p + s.off1]) : x[u];
      o2[u] = q.in2 ? T::load(a.out[p + s.off2]) : x[u];
      if constexpr (kGuided) g[u] = T::load(a.g[p]);
    }

    LMCONV_HDI void store(int u, const Pixel& q) {
      const int64_t p = base + q.at;
      PoolGrad<Acc> r;
      if constexpr (kGuided) {
        const Acc m = pool_max(x[u], q.in1, o1[u], q.in2, o2[u]);
        r = pool_backward_guided(x[u], m, q.in1, o1[u], q.in2, o2[u], g[u],
                                 G[u]);
        a.dg[p] = T::store(r.dguide);
      } else {
        r = pool_backward(x[u], q.in1, o1[u], q.in2, o2[u], G[u]);
      }
      a.dx[p] = T::store(r.dx);
      slot(phase, q.k, 0) = r.to_n1;
      slot(phase, q.k, 1) = r.to_n2;
    }
  };

  static LMCONV_HDI void run(const Args& a, int64_t block, int64_t thread,
                             int64_t step, unsigned char* /*shared*/) {
    const Lane l = lane_of(a.plan, block, thread);
    if (!l.active) return;
    Step st{a, l.base, a.ring + block * a.plan.ring + l.lane,
            a.plan.phases - 1 - step};
    for_each_batch(a.plan, l, st.phase, st);
  }
};

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_SCHEDULE_H_
