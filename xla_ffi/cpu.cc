// CPU back end of the landmark pool: the schedule and the XLA FFI handlers.
//
// The per-pixel math is in landmark_pool.h (shared with CUDA). Here, every
// direction is mapped to a strided view scanned rows ascending, columns
// ascending (landmark_pool.h: ScanView), and one templated kernel walks it.
// Work items are (batch, channel block) pairs; within an item the inner loop
// runs over contiguous channels so the compiler vectorises it. Items run in
// parallel on XLA's intra-op thread pool.
//
// Residuals: the forward saves nothing beyond its output. The backward takes
// x and out and recomputes m[p] = max(x[p], out[p+n1], out[p+n2]) with the
// forward's tie rule, which is exact because out is what the forward stored.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "ffi_common.h"

namespace ffi = xla::ffi;

namespace lmconv {
namespace {

// ---------------------------------------------------------------------------
// Parallel schedule
// ---------------------------------------------------------------------------

// Channel blocks of at most this many elements keep a row of a work item in
// L1/L2 for wide images; blocks are multiples of 16 elements (whole vectors).
constexpr int64_t kMaxChannelBlock = 128;
constexpr int64_t kMinChannelBlock = 16;
// Below this many elements, threads cost more than they save.
constexpr int64_t kMinParallelElements = 1 << 15;

struct Plan {
  Geometry geo;
  int64_t block;    // channels per work item
  int64_t nblocks;  // channel blocks per image
  int64_t items() const { return geo.batch * nblocks; }
};

Plan make_plan(Geometry geo, int64_t threads) {
  int64_t block = std::min(geo.channels, kMaxChannelBlock);
  auto nblocks = [&] { return (geo.channels + block - 1) / block; };
  // Split channels further only while there is too little work to go round.
  while (geo.batch * nblocks() < threads && block >= 2 * kMinChannelBlock) {
    block = (block / 2 + kMinChannelBlock - 1) / kMinChannelBlock *
            kMinChannelBlock;
  }
  return Plan{geo, block, nblocks()};
}

// Runs fn(0), ..., fn(n - 1) on the calling thread and on at most
// pool.num_threads() - 1 helper tasks. Items are claimed from a shared
// counter, so the caller never waits on a task that has not started (no
// deadlock when the caller is itself a pool thread); helpers that start after
// all items are claimed return at once.
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t elements,
                  const std::function<void(int64_t)>& fn) {
  const int64_t threads = elements < kMinParallelElements ? 0
                                                          : pool.num_threads();
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
// Kernels: one work item = one image of the batch, channels [c0, c0 + n).
// Pointers are offset to (image, c0); pixel offsets come from the ScanView.
// ---------------------------------------------------------------------------

template <typename S>
using Compute = typename StorageTraits<S>::Compute;

// The item kernels are compiled for AVX2 and for the baseline ISA, picked at
// load time (gcc/clang function multiversioning); the pixel loops are forced
// inline so they are vectorised for the clone they land in.
#if defined(__x86_64__) && defined(__ELF__)
#define LMCONV_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LMCONV_CPU_CLONES
#endif
#define LMCONV_INLINE inline __attribute__((always_inline))

template <typename S, bool kGuided, bool kIn1, bool kIn2>
LMCONV_INLINE void forward_pixel(const S* __restrict x, const S* __restrict g,
                   S* __restrict out, const S* __restrict o1,
                   const S* __restrict o2, int64_t n) {
  using T = StorageTraits<S>;
  for (int64_t c = 0; c < n; ++c) {
    const auto xv = T::load(x[c]);
    const auto m = pool_max(xv, kIn1, kIn1 ? T::load(o1[c]) : xv, kIn2,
                            kIn2 ? T::load(o2[c]) : xv);
    out[c] = T::store(kGuided ? pool_blend(T::load(g[c]), m, xv) : m);
  }
}

// Scans that run backwards through memory defeat the hardware prefetcher
// (3x slower with a guide), so each kernel prefetches the pixel it will visit
// kPrefetchPixels later in scan order.
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

// The passes that visit pixels in forward scan order. A pass says what one
// pixel does (pixel<kIn1, kIn2>(p, j): p its element offset, j its view
// column; kIn1 / kIn2 whether n1 / n2 are inside), what to prefetch for a
// later pixel, and what to set up at the start of a view row; forward_item
// walks the image once for any of them.

// The pool: out[p] from x[p] (g[p]) and the outputs of its neighbours.
template <typename S, bool kGuided>
struct PoolPass {
  const S* x;
  const S* g;
  S* out;
  const ScanView& v;

  LMCONV_INLINE void begin_row(int64_t) {}
  LMCONV_INLINE void prefetch_pixel(int64_t q, int64_t n) const {
    prefetch<0>(x + q, n);
    if (kGuided) prefetch<0>(g + q, n);
    prefetch<1>(out + q, n);
  }
  template <bool kIn1, bool kIn2>
  LMCONV_INLINE void pixel(int64_t p, int64_t, int64_t n) {
    forward_pixel<S, kGuided, kIn1, kIn2>(x + p, kGuided ? g + p : nullptr,
                                          out + p, out + p + v.off1,
                                          out + p + v.off2, n);
  }
};

// The tangent of a pool already computed (out is read, not written):
// t[p] from tx[p] (g[p], tg[p]) and the tangents of the winners. Like G in
// the backward, the running tangent t (type Compute<S>) lives in the output
// buffer for float and double; halves keep two view rows of it in a float
// scratch (neighbours are in the same or the previous view row) and store
// each t[p] rounded once.
template <typename S, bool kGuided, bool kIn1, bool kIn2>
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
    const auto xv = T::load(x[c]);
    const auto o1v = kIn1 ? T::load(o1[c]) : xv;
    const auto o2v = kIn2 ? T::load(o2[c]) : xv;
    const Acc t1v = kIn1 ? t1[c] : Acc(0);
    const Acc t2v = kIn2 ? t2[c] : Acc(0);
    const auto m = pool_max(xv, kIn1, o1v, kIn2, o2v);
    Acc r;
    if constexpr (kGuided) {
      r = pool_tangent_guided(xv, m, kIn1, o1v, kIn2, o2v, T::load(g[c]),
                              T::load(tx[c]), t1v, t2v, T::load(tg[c]));
    } else {
      r = pool_tangent(xv, m, kIn1, o1v, kIn2, o2v, T::load(tx[c]), t1v, t2v);
    }
    t[c] = r;
    if constexpr (!std::is_same_v<S, Acc>) tout[c] = T::store(r);
  }
}

template <typename S, bool kGuided>
struct TangentPass {
  using Acc = Compute<S>;
  static constexpr bool kInPlace = std::is_same_v<S, Acc>;
  const S* x;
  const S* g;
  const S* out;
  const S* tx;
  const S* tg;
  S* tout;
  const ScanView& v;
  int64_t width, n;
  std::vector<Acc> scratch = std::vector<Acc>(kInPlace ? 0 : 2 * width * n);
  // t of view pixel (i, j) is at row + j * t_col, channels contiguous.
  const int64_t t_col = kInPlace ? v.col_stride : n;
  Acc* row = nullptr;
  int64_t toff1 = 0, toff2 = 0;  // from t[p] to t[p + n1], t[p + n2]

  Acc* row_ptr(int64_t i) {
    if constexpr (kInPlace) {
      return reinterpret_cast<Acc*>(tout) + v.start + i * v.row_stride;
    } else {
      return scratch.data() + (i & 1) * width * n;
    }
  }
  LMCONV_INLINE void begin_row(int64_t i) {
    row = row_ptr(i);
    const int64_t prev_row = i > 0 ? row_ptr(i - 1) - row : 0;
    toff1 = (v.n1.dr ? prev_row : 0) + v.n1.dc * t_col;
    toff2 = (v.n2.dr ? prev_row : 0) + v.n2.dc * t_col;
  }
  LMCONV_INLINE void prefetch_pixel(int64_t q, int64_t n_) const {
    prefetch<0>(x + q, n_);
    prefetch<0>(out + q + v.off1, n_);  // may be outside: harmless
    prefetch<0>(out + q + v.off2, n_);
    prefetch<0>(tx + q, n_);
    if (kGuided) prefetch<0>(g + q, n_);
    if (kGuided) prefetch<0>(tg + q, n_);
    prefetch<1>(tout + q, n_);
  }
  template <bool kIn1, bool kIn2>
  LMCONV_INLINE void pixel(int64_t p, int64_t j, int64_t n_) {
    Acc* t = row + j * t_col;
    tangent_pixel<S, kGuided, kIn1, kIn2>(
        x + p, kGuided ? g + p : nullptr, out + p + v.off1, out + p + v.off2,
        tx + p, kGuided ? tg + p : nullptr, t + toff1, t + toff2, t,
        kInPlace ? nullptr : tout + p, n_);
  }
};

template <typename S, typename Pass>
LMCONV_CPU_CLONES void forward_item(Pass& pass, const ScanView& v,
                                    int64_t height, int64_t width, int64_t n) {
  for (int64_t i = 0; i < height; ++i) {
    pass.begin_row(i);
    for (int64_t j = 0; j < width; ++j) {
      const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
      if (const int64_t q = ahead<false>(v, i, j, p, height, width); q >= 0) {
        pass.prefetch_pixel(q, n);
      }
      switch (inside(i, j, v.n1, height, width) * 2 +
              inside(i, j, v.n2, height, width)) {
        case 3: pass.template pixel<true, true>(p, j, n); break;
        case 2: pass.template pixel<true, false>(p, j, n); break;
        case 1: pass.template pixel<false, true>(p, j, n); break;
        default: pass.template pixel<false, false>(p, j, n); break;
      }
    }
  }
}

// G (the running cotangent of out, type Compute<S>) lives in the dx buffer
// when S is its own compute type (float, double): each G[p] is final when p
// is visited, is read, then overwritten by dx[p], and pushes only go to
// neighbours, which are visited later. Halves keep G in a float scratch of
// two rows, since pushes reach at most the previous row of the view.
// All pointers are __restrict: the ranges [p, p + n) they cover are disjoint
// (n1 != n2, and a neighbour is at least one pixel = C >= n elements away).
template <typename S, bool kGuided, bool kIn1, bool kIn2>
LMCONV_INLINE void backward_pixel(const S* __restrict x, const S* __restrict g,
                    const S* __restrict o1, const S* __restrict o2,
                    Compute<S>* __restrict G, Compute<S>* __restrict G1,
                    Compute<S>* __restrict G2, S* __restrict dx,
                    S* __restrict dg, int64_t n) {
  using T = StorageTraits<S>;
  constexpr bool kInPlace = std::is_same_v<S, Compute<S>>;
  for (int64_t c = 0; c < n; ++c) {
    const auto xv = T::load(x[c]);
    const auto o1v = kIn1 ? T::load(o1[c]) : xv;
    const auto o2v = kIn2 ? T::load(o2[c]) : xv;
    PoolGrad<Compute<S>> r;
    if constexpr (kGuided) {
      const auto m = pool_max(xv, kIn1, o1v, kIn2, o2v);
      r = pool_backward_guided(xv, m, kIn1, o1v, kIn2, o2v, T::load(g[c]),
                               G[c]);
    } else {
      r = pool_backward(xv, kIn1, o1v, kIn2, o2v, G[c]);
    }
    if constexpr (kIn1) G1[c] += r.to_n1;
    if constexpr (kIn2) G2[c] += r.to_n2;
    if constexpr (kInPlace) {
      G[c] = r.dx;  // G is dx
    } else {
      dx[c] = T::store(r.dx);
    }
    if constexpr (kGuided) dg[c] = T::store(r.dguide);
  }
}

template <typename S, bool kGuided>
LMCONV_CPU_CLONES void backward_item(const S* x, const S* g, const S* out, const S* ct, S* dx,
                   S* dg, const ScanView& v, int64_t height, int64_t width,
                   int64_t n) {
  using Acc = Compute<S>;
  constexpr bool kInPlace = std::is_same_v<S, Acc>;
  std::vector<Acc> scratch(kInPlace ? 0 : 2 * width * n);
  // G of view pixel (i, j) is at row_ptr(i) + j * g_col, channels contiguous.
  const int64_t g_col = kInPlace ? v.col_stride : n;
  auto row_ptr = [&](int64_t i) -> Acc* {
    if constexpr (kInPlace) {
      return reinterpret_cast<Acc*>(dx) + v.start + i * v.row_stride;
    } else {
      return scratch.data() + (i & 1) * width * n;
    }
  };
  // G of view pixel (i, j) := ct. Done one pixel at a time inside the pixel
  // loop (not as a separate pass over the row), so the loads of ct overlap
  // the math.
  auto load_ct = [&](int64_t i, int64_t j) {
    Acc* __restrict G = row_ptr(i) + j * g_col;
    const S* __restrict c = ct + v.start + i * v.row_stride + j * v.col_stride;
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
    for (int64_t j = width - 1; j >= 0; --j) {
      const int64_t p = v.start + i * v.row_stride + j * v.col_stride;
      Acc* G = G_row + j * g_col;
      const S* gp = kGuided ? g + p : nullptr;
      S* dgp = kGuided ? dg + p : nullptr;
      const S* o1 = out + p + v.off1;
      const S* o2 = out + p + v.off2;
      if (const int64_t q = ahead<true>(v, i, j, p, height, width); q >= 0) {
        prefetch<0>(x + q, n);
        prefetch<0>(out + q + v.off1, n);  // may be outside: harmless
        prefetch<0>(out + q + v.off2, n);
        if (kGuided) prefetch<0>(g + q, n);
        if (kGuided) prefetch<1>(dg + q, n);
        if (!kInPlace) prefetch<1>(dx + q, n);
      }
      if (i >= 2) {  // row i - 2 of ct and of G is loaded before row i - 1
        const int64_t q = v.start + (i - 2) * v.row_stride + j * v.col_stride;
        prefetch<0>(ct + q, n);
        if (kInPlace) prefetch<1>(dx + q, n);
      }
      if (i > 0 && j > 0) load_ct(i - 1, j - 1);
      switch (inside(i, j, v.n1, height, width) * 2 +
              inside(i, j, v.n2, height, width)) {
        case 3: backward_pixel<S, kGuided, true, true>(x + p, gp, o1, o2, G, G + goff1, G + goff2, dx + p, dgp, n); break;
        case 2: backward_pixel<S, kGuided, true, false>(x + p, gp, o1, o2, G, G + goff1, G + goff2, dx + p, dgp, n); break;
        case 1: backward_pixel<S, kGuided, false, true>(x + p, gp, o1, o2, G, G + goff1, G + goff2, dx + p, dgp, n); break;
        default: backward_pixel<S, kGuided, false, false>(x + p, gp, o1, o2, G, G + goff1, G + goff2, dx + p, dgp, n); break;
      }
    }
  }
}

// Runs item_fn(image_offset, c0, n) over all work items of the plan.
template <typename F>
void for_each_item(ffi::ThreadPool& pool, const Plan& plan, F item_fn) {
  const Geometry& geo = plan.geo;
  const int64_t image = geo.height * geo.width * geo.channels;
  parallel_for(pool, plan.items(), geo.size(), [&](int64_t k) {
    const int64_t b = k / plan.nblocks;
    const int64_t c0 = (k % plan.nblocks) * plan.block;
    item_fn(b * image + c0, std::min(plan.block, geo.channels - c0));
  });
}

// ---------------------------------------------------------------------------
// Handlers: one per target, each dispatching on the element type.
// ---------------------------------------------------------------------------

// What every handler does first: checks the direction, x's rank, then each
// other operand and result given (null ones are skipped) against x, in order;
// plans the work. view is only set if there is work (plan.geo.size() > 0).
struct Call {
  Plan plan;
  ScanView view;
};

ffi::ErrorOr<Call> prepare(
    const char* target, ffi::ThreadPool& pool, ffi::AnyBuffer x,
    std::initializer_list<std::pair<const char*, const ffi::AnyBuffer*>>
        others,
    DirectionAttrs attrs) {
  auto dir = direction_of(target, attrs);
  if (dir.has_error()) return ffi::Unexpected(dir.error());
  auto geo = geometry_of(target, x);
  if (geo.has_error()) return ffi::Unexpected(geo.error());
  for (const auto& [name, b] : others) {
    if (!b) continue;
    if (auto e = check_like_x(target, name, x, *b); e.failure()) {
      return ffi::Unexpected(std::move(e));
    }
  }
  Call c{make_plan(*geo, pool.num_threads()), {}};
  if (c.plan.geo.size() > 0) {
    c.view = make_scan_view(*dir, geo->height, geo->width, geo->channels);
  }
  return c;
}

ffi::Error Forward(const char* target, ffi::ThreadPool pool, ffi::AnyBuffer x,
                   const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                   DirectionAttrs attrs) {
  auto call = prepare(target, pool, x, {{"guide", g}, {"out", &out}}, attrs);
  if (call.has_error()) return call.error();
  const Plan& plan = call->plan;
  const Geometry& geo = plan.geo;
  if (geo.size() == 0) return ffi::Error::Success();
  const ScanView& v = call->view;
  const bool ok = dispatch_dtype(x.element_type(), [&](auto tag) {
    using S = decltype(tag);
    const S* xp = data<S>(x);
    S* op = data<S>(out);
    if (g) {
      const S* gp = data<S>(*g);
      for_each_item(pool, plan, [&](int64_t off, int64_t n) {
        PoolPass<S, true> pass{xp + off, gp + off, op + off, v};
        forward_item<S>(pass, v, geo.height, geo.width, n);
      });
    } else {  // g = 1: the fast path reads no guide
      for_each_item(pool, plan, [&](int64_t off, int64_t n) {
        PoolPass<S, false> pass{xp + off, nullptr, op + off, v};
        forward_item<S>(pass, v, geo.height, geo.width, n);
      });
    }
  });
  return ok ? ffi::Error::Success() : unsupported_dtype(target, x.element_type());
}

ffi::Error Backward(const char* target, ffi::ThreadPool pool,
                    ffi::AnyBuffer x, const ffi::AnyBuffer* g,
                    ffi::AnyBuffer out, ffi::AnyBuffer ct, ffi::AnyBuffer dx,
                    const ffi::AnyBuffer* dg, DirectionAttrs attrs) {
  auto call = prepare(target, pool, x,
                      {{"guide", g},
                       {"dguide", g ? dg : nullptr},
                       {"out", &out},
                       {"ct", &ct},
                       {"dx", &dx}},
                      attrs);
  if (call.has_error()) return call.error();
  const Plan& plan = call->plan;
  const Geometry& geo = plan.geo;
  if (geo.size() == 0) return ffi::Error::Success();
  const ScanView& v = call->view;
  const bool ok = dispatch_dtype(x.element_type(), [&](auto tag) {
    using S = decltype(tag);
    const S* xp = data<S>(x);
    const S* op = data<S>(out);
    const S* cp = data<S>(ct);
    S* dxp = data<S>(dx);
    if (g) {
      const S* gp = data<S>(*g);
      S* dgp = data<S>(*dg);
      for_each_item(pool, plan, [&](int64_t off, int64_t n) {
        backward_item<S, true>(xp + off, gp + off, op + off, cp + off,
                               dxp + off, dgp + off, v, geo.height,
                               geo.width, n);
      });
    } else {
      for_each_item(pool, plan, [&](int64_t off, int64_t n) {
        backward_item<S, false>(xp + off, nullptr, op + off, cp + off,
                                dxp + off, nullptr, v, geo.height,
                                geo.width, n);
      });
    }
  });
  return ok ? ffi::Error::Success() : unsupported_dtype(target, x.element_type());
}

ffi::Error Tangent(const char* target, ffi::ThreadPool pool, ffi::AnyBuffer x,
                   const ffi::AnyBuffer* g, ffi::AnyBuffer out,
                   ffi::AnyBuffer tx, const ffi::AnyBuffer* tg,
                   ffi::AnyBuffer tout, DirectionAttrs attrs) {
  auto call = prepare(target, pool, x,
                      {{"guide", g},
                       {"tguide", g ? tg : nullptr},
                       {"out", &out},
                       {"tx", &tx},
                       {"tout", &tout}},
                      attrs);
  if (call.has_error()) return call.error();
  const Plan& plan = call->plan;
  const Geometry& geo = plan.geo;
  if (geo.size() == 0) return ffi::Error::Success();
  const ScanView& v = call->view;
  const bool ok = dispatch_dtype(x.element_type(), [&](auto tag) {
    using S = decltype(tag);
    const S* xp = data<S>(x);
    const S* op = data<S>(out);
    const S* txp = data<S>(tx);
    S* tp = data<S>(tout);
    if (g) {
      const S* gp = data<S>(*g);
      const S* tgp = data<S>(*tg);
      for_each_item(pool, plan, [&](int64_t off, int64_t n) {
        TangentPass<S, true> pass{xp + off, gp + off, op + off, txp + off,
                                  tgp + off, tp + off, v, geo.width, n};
        forward_item<S>(pass, v, geo.height, geo.width, n);
      });
    } else {
      for_each_item(pool, plan, [&](int64_t off, int64_t n) {
        TangentPass<S, false> pass{xp + off, nullptr, op + off, txp + off,
                                   nullptr, tp + off, v, geo.width, n};
        forward_item<S>(pass, v, geo.height, geo.width, n);
      });
    }
  });
  return ok ? ffi::Error::Success() : unsupported_dtype(target, x.element_type());
}

ffi::Error PoolFwd(ffi::ThreadPool pool, ffi::AnyBuffer x,
                   ffi::Result<ffi::AnyBuffer> out, DirectionAttrs d) {
  return Forward("lmconv_pool_fwd", pool, x, nullptr, *out, d);
}

ffi::Error PoolFwdGuided(ffi::ThreadPool pool, ffi::AnyBuffer x,
                         ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> out,
                         DirectionAttrs d) {
  return Forward("lmconv_pool_fwd_guided", pool, x, &g, *out, d);
}

ffi::Error PoolBwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer out,
                   ffi::AnyBuffer ct, ffi::Result<ffi::AnyBuffer> dx,
                   DirectionAttrs d) {
  return Backward("lmconv_pool_bwd", pool, x, nullptr, out, ct, *dx, nullptr,
                  d);
}

ffi::Error PoolBwdGuided(ffi::ThreadPool pool, ffi::AnyBuffer x,
                         ffi::AnyBuffer g, ffi::AnyBuffer out,
                         ffi::AnyBuffer ct, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Result<ffi::AnyBuffer> dg, DirectionAttrs d) {
  ffi::AnyBuffer dg_buf = *dg;
  return Backward("lmconv_pool_bwd_guided", pool, x, &g, out, ct, *dx,
                  &dg_buf, d);
}

ffi::Error PoolTangent(ffi::ThreadPool pool, ffi::AnyBuffer x,
                       ffi::AnyBuffer out, ffi::AnyBuffer tx,
                       ffi::Result<ffi::AnyBuffer> tout, DirectionAttrs d) {
  return Tangent("lmconv_pool_tangent", pool, x, nullptr, out, tx, nullptr,
                 *tout, d);
}

ffi::Error PoolTangentGuided(ffi::ThreadPool pool, ffi::AnyBuffer x,
                             ffi::AnyBuffer g, ffi::AnyBuffer out,
                             ffi::AnyBuffer tx, ffi::AnyBuffer tg,
                             ffi::Result<ffi::AnyBuffer> tout,
                             DirectionAttrs d) {
  return Tangent("lmconv_pool_tangent_guided", pool, x, &g, out, tx, &tg,
                 *tout, d);
}

}  // namespace
}  // namespace lmconv

using lmconv::bind_pool_bwd;
using lmconv::bind_pool_bwd_guided;
using lmconv::bind_pool_fwd;
using lmconv::bind_pool_fwd_guided;
using lmconv::bind_pool_tangent;
using lmconv::bind_pool_tangent_guided;

// Every handler gets XLA's intra-op thread pool; operands as in ffi_common.h.
#define LMCONV_CPU_CONTEXT ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvPoolFwd, lmconv::PoolFwd,
                              bind_pool_fwd(LMCONV_CPU_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvPoolFwdGuided, lmconv::PoolFwdGuided,
                              bind_pool_fwd_guided(LMCONV_CPU_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvPoolBwd, lmconv::PoolBwd,
                              bind_pool_bwd(LMCONV_CPU_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvPoolBwdGuided, lmconv::PoolBwdGuided,
                              bind_pool_bwd_guided(LMCONV_CPU_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvPoolTangent, lmconv::PoolTangent,
                              bind_pool_tangent(LMCONV_CPU_CONTEXT));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LmconvPoolTangentGuided,
                              lmconv::PoolTangentGuided,
                              bind_pool_tangent_guided(LMCONV_CPU_CONTEXT));
