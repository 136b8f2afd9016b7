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
  int skew;                 // 0: phase = i, k = j; else phase = skew*i + j, k = i
  bool n2_first;            // backward: add n2's pull before n1's
  int64_t phases;
  int64_t slots;            // k is in [0, slots)
};

LMCONV_HDI Offset transposed(Offset o) { return Offset{o.dc, o.dr}; }

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
  if (v.n1.dc == -1 && v.n2.dc == -1) {  // both in the previous column
    s.height = width;
    s.width = height;
    s.row_stride = v.col_stride;
    s.col_stride = v.row_stride;
    s.n1 = transposed(v.n1);
    s.n2 = transposed(v.n2);
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

constexpr int64_t kMaxThreads = 512;  // threads per block (launch bound)
constexpr int64_t kMaxLanes = 32;     // channels per block: one warp's width
constexpr int64_t kMinLanes = 16;     // split channels no finer (>= 32 bytes)
constexpr int kBatch = 4;             // pixels a thread loads before it stores

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
  int64_t ring;          // backward workspace per block, in G's elements
};

// min_blocks: split channel chunks (down to kMinLanes) until there are at
// least this many blocks; the CUDA handler passes a few per multiprocessor.
inline LaunchPlan plan_launch(Direction d, int64_t batch, int64_t height,
                              int64_t width, int64_t channels, bool backward,
                              int64_t min_blocks) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  LaunchPlan p;
  p.sweep = make_sweep(d, height, width, channels);
  p.channels = channels;
  p.image = height * width * channels;
  p.lanes = channels < kMaxLanes ? channels : kMaxLanes;
  while (batch * ceil_div(channels, p.lanes) < min_blocks &&
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
  p.ring = backward ? 2 * s.slots * 2 * p.lanes : 0;
  return p;
}

// ---------------------------------------------------------------------------
// Kernel bodies
// ---------------------------------------------------------------------------

// What thread `thread` of block `block` works on.
struct Lane {
  bool active;     // false for the lanes past the last channel
  int64_t lane;    // channel lane in the block
  int64_t base;    // element offset of (image, channel): pixel offsets add to it
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

// The lane's pixels of `phase` are k = *k, *k + pixel_lanes, ... < *end. A
// body takes them kBatch at a time and loads a whole batch before it stores
// any (the pixels of a phase are independent), so several loads are in
// flight per thread. The loops over a batch run to kBatch (unrolled, so the
// arrays stay in registers) and stop at the end of the phase.
LMCONV_HDI void lane_pixels(const LaunchPlan& p, const Lane& l, int64_t phase,
                            int64_t* k, int64_t* end) {
  int64_t lo;
  phase_pixels(p.sweep, phase, &lo, end);
  *k = l.k0;
  if (*k < lo) {
    *k += (lo - *k + p.pixel_lanes - 1) / p.pixel_lanes * p.pixel_lanes;
  }
}

#if defined(__CUDA_ARCH__)
#define LMCONV_UNROLL_BATCH _Pragma("unroll")
#elif defined(__CUDACC__)  // nvcc's host pass: the host code is not hot
#define LMCONV_UNROLL_BATCH
#else
#define LMCONV_UNROLL_BATCH _Pragma("GCC unroll 4")
#endif

template <typename S>
using Compute = typename StorageTraits<S>::Compute;

// Forward: out[p] from x[p] and the outputs of its neighbours, which earlier
// phases stored (so they are read back as stored).
template <typename S, bool kGuided>
struct ForwardBody {
  struct Args {
    LaunchPlan plan;
    const S* x;
    const S* g;  // null unless kGuided
    S* out;
  };

  static LMCONV_HDI void run(const Args& a, int64_t block, int64_t thread,
                             int64_t phase, unsigned char* /*shared*/) {
    using T = StorageTraits<S>;
    const Lane l = lane_of(a.plan, block, thread);
    if (!l.active) return;
    const Sweep& s = a.plan.sweep;
    const S* x = a.x + l.base;
    S* out = a.out + l.base;
    int64_t k, end;
    lane_pixels(a.plan, l, phase, &k, &end);
    for (; k < end; k += kBatch * a.plan.pixel_lanes) {
      Pixel px[kBatch] = {};
      Compute<S> xv[kBatch] = {}, o1[kBatch] = {}, o2[kBatch] = {},
                 gv[kBatch] = {};
      LMCONV_UNROLL_BATCH
      for (int u = 0; u < kBatch; ++u) {
        if (k + u * a.plan.pixel_lanes >= end) break;
        const Pixel& q = px[u] = pixel(s, phase, k + u * a.plan.pixel_lanes);
        xv[u] = T::load(x[q.at]);
        o1[u] = q.in1 ? T::load(out[q.at + s.off1]) : xv[u];
        o2[u] = q.in2 ? T::load(out[q.at + s.off2]) : xv[u];
        gv[u] = kGuided ? T::load(a.g[l.base + q.at]) : Compute<S>(1);
      }
      LMCONV_UNROLL_BATCH
      for (int u = 0; u < kBatch; ++u) {
        if (k + u * a.plan.pixel_lanes >= end) break;
        const Pixel& q = px[u];
        const Compute<S> m = pool_max(xv[u], q.in1, o1[u], q.in2, o2[u]);
        out[q.at] = T::store(kGuided ? pool_blend(gv[u], m, xv[u]) : m);
      }
    }
  }
};

// Backward: step t runs forward phase phases - 1 - t. The block's ring holds,
// for the last two phases, what each pixel k passed on to its n1 and n2:
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

  static LMCONV_HDI Acc* slot(const Args& a, int64_t block, const Lane& l,
                              int64_t phase, int64_t k, int which) {
    const int64_t index =
        (((phase & 1) * a.plan.sweep.slots + k) * 2 + which) * a.plan.lanes +
        l.lane;
    return a.ring + block * a.plan.ring + index;
  }

  // G[q]: ct[q] plus what the pixels whose n1 / n2 is q passed on (they are
  // in phase + 1), added in the CPU's order.
  static LMCONV_HDI Acc pull(const Args& a, int64_t block, const Lane& l,
                             int64_t phase, const Pixel& q, Acc ct) {
    const Sweep& s = a.plan.sweep;
    Acc G = ct;
    for (int t = 0; t < 2; ++t) {
      const int which = (t == 0) == s.n2_first ? 1 : 0;
      const Offset nb = which ? s.n2 : s.n1;
      if (inside(q.i, q.j, Offset{-nb.dr, -nb.dc}, s.height, s.width)) {
        const int64_t k = s.skew == 0 ? q.j - nb.dc : q.i - nb.dr;
        G += *slot(a, block, l, phase + 1, k, which);
      }
    }
    return G;
  }

  static LMCONV_HDI void run(const Args& a, int64_t block, int64_t thread,
                             int64_t step, unsigned char* /*shared*/) {
    using T = StorageTraits<S>;
    const Lane l = lane_of(a.plan, block, thread);
    if (!l.active) return;
    const Sweep& s = a.plan.sweep;
    const int64_t phase = a.plan.phases - 1 - step;
    const S* x = a.x + l.base;
    const S* out = a.out + l.base;
    int64_t k, end;
    lane_pixels(a.plan, l, phase, &k, &end);
    for (; k < end; k += kBatch * a.plan.pixel_lanes) {
      Pixel px[kBatch] = {};
      Acc G[kBatch] = {}, xv[kBatch] = {}, o1[kBatch] = {}, o2[kBatch] = {},
          gv[kBatch] = {};
      LMCONV_UNROLL_BATCH
      for (int u = 0; u < kBatch; ++u) {
        if (k + u * a.plan.pixel_lanes >= end) break;
        const Pixel& q = px[u] = pixel(s, phase, k + u * a.plan.pixel_lanes);
        G[u] = pull(a, block, l, phase, q, T::load(a.ct[l.base + q.at]));
        xv[u] = T::load(x[q.at]);
        o1[u] = q.in1 ? T::load(out[q.at + s.off1]) : xv[u];
        o2[u] = q.in2 ? T::load(out[q.at + s.off2]) : xv[u];
        gv[u] = kGuided ? T::load(a.g[l.base + q.at]) : Acc(1);
      }
      LMCONV_UNROLL_BATCH
      for (int u = 0; u < kBatch; ++u) {
        if (k + u * a.plan.pixel_lanes >= end) break;
        const Pixel& q = px[u];
        PoolGrad<Acc> r;
        if constexpr (kGuided) {
          const Acc m = pool_max(xv[u], q.in1, o1[u], q.in2, o2[u]);
          r = pool_backward_guided(xv[u], m, q.in1, o1[u], q.in2, o2[u],
                                   gv[u], G[u]);
          a.dg[l.base + q.at] = T::store(r.dguide);
        } else {
          r = pool_backward(xv[u], q.in1, o1[u], q.in2, o2[u], G[u]);
        }
        a.dx[l.base + q.at] = T::store(r.dx);
        *slot(a, block, l, phase, q.k, 0) = r.to_n1;
        *slot(a, block, l, phase, q.k, 1) = r.to_n2;
      }
    }
  }
};

}  // namespace lmconv

#endif  // LMCONV_JAX_XLA_FFI_CUDA_SCHEDULE_H_
