// The device harness: the CUDA kernels as nvcc compiled them (cuda.cu), run
// on a GPU through the code the XLA handlers use, and checked bit for bit
// against the CPU kernels. No JAX and no XLA runtime: the XLA FFI headers
// only give the types the back ends share (ffi::Error, Call, Buffers).
//
// For a grid of cases (every direction alone, quadrants, octants,
// top_bottom, left_right, all_quadrants and a custom merged grouping; float32,
// float64, float16, bfloat16; no guide, a full guide and the broadcast guides
// (C,), (B,1,1,1) and a scalar, their gradients over several of the
// reduction's slices; random shapes with odd sizes and C / P not a
// multiple of the block's channel chunk) it runs the forward for training
// (out and the merged groups' residual), the forward for inference, the
// tangent and the backward (dx and the guide's gradient at its own shape):
//   * the GPU side is PhasedBackend over CudaPlatform (cuda_platform.h, the
//     handlers' own platform) with a scratch allocator over cudaMalloc, so
//     plan_for, plan_launch, the workspace and the launches are the real ones;
//   * the reference is the CPU back end (cpu_kernels, linked) on one thread;
//   * every output starts as 0xFF bytes (NaN in every float type, no valid
//     winner code), so an element no kernel wrote fails the case, as does
//     any bit that differs. The tangent and the backward read the CPU
//     forward's out and residual, so each pass is judged on its own.
// It prints one line per case and ends with "N passed, N failed".
//
// Only runtime API calls a GPU simulator also provides are made (device
// count and attributes, malloc / free, memcpy, memset, stream create and
// synchronize, launch, error strings).
//
// The same file built by the host compiler (tests/cuda_harness_host.cc,
// LMCONV_HARNESS_HOST; CMake target lmconv_cuda_harness_host) replaces the
// GPU with the CUDA bodies compiled for the host and run block by block,
// phase by phase, as emulate.cc does: that is how CI exercises the grid, the
// comparison and the poison check without a GPU (tests/test_cuda_harness.py).
//
// Usage: lmconv_cuda_harness [--seed N] [--quick] [--filter TEXT]
//        [--tsv FILE] [--multiprocessors N (host build)] [--list]
//        [--directions] [--plant unwritten|flip (a test of the check)]
// Exit codes: 0 every case passed; 1 a case failed; 2 bad arguments;
// 3 no CUDA device (one line says why).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu.h"
#include "cuda_ffi.h"
#if !defined(LMCONV_HARNESS_HOST)
#include <cuda_runtime_api.h>

#include "cuda_platform.h"
#endif

namespace lmconv {
namespace harness {
namespace {

constexpr int kExitNoDevice = 3;
constexpr unsigned char kPoison = 0xFF;

// --plant: a fault put into every case's first output after the device ran,
// so the tests know the check fails where it must.
enum class Plant { kNone, kUnwritten, kFlip };
Plant g_plant = Plant::kNone;

// ---------------------------------------------------------------------------
// The directions (lmconv_jax/directions.py's table; test_cuda_harness.py
// checks they agree) and the groupings of the grid.
// ---------------------------------------------------------------------------

struct NamedDirection {
  const char* name;
  int row_step, col_step, n1r, n1c, n2r, n2c;
};

constexpr NamedDirection kDirections[] = {
    {"top_left", 1, 1, 0, -1, -1, 0},
    {"top_right", 1, -1, 0, 1, -1, 0},
    {"bottom_left", -1, 1, 0, -1, 1, 0},
    {"bottom_right", -1, -1, 0, 1, 1, 0},
    {"east_northeast", 1, -1, 0, 1, -1, 1},
    {"north_northeast", 1, -1, -1, 1, -1, 0},
    {"north_northwest", 1, 1, -1, -1, -1, 0},
    {"west_northwest", 1, 1, 0, -1, -1, -1},
    {"south_southwest", -1, 1, 1, -1, 1, 0},
    {"west_southwest", -1, 1, 0, -1, 1, -1},
    {"south_southeast", -1, -1, 1, 1, 1, 0},
    {"east_southeast", -1, -1, 0, 1, 1, 1},
    // No named direction sweeps the skew-2 wavefront (cuda_schedule.h).
    {"skewed", 1, 1, 0, -1, -1, 1},
};
constexpr int kNamedDirections = 12;
enum : int { TL, TR, BL, BR, ENE, NNE, NNW, WNW, SSW, WSW, SSE, ESE, SKEW };

struct NamedGrouping {
  std::string name;
  std::vector<std::vector<int>> groups;  // indices into kDirections
};

std::vector<NamedGrouping> groupings() {
  std::vector<NamedGrouping> out;
  for (int d = 0; d < kNamedDirections; ++d) {
    out.push_back({kDirections[d].name, {{d}}});
  }
  out.push_back({"quadrants", {{TL}, {TR}, {BL}, {BR}}});
  out.push_back(
      {"octants", {{ENE}, {NNE}, {NNW}, {WNW}, {SSW}, {WSW}, {SSE}, {ESE}}});
  out.push_back({"top_bottom", {{TL, TR}, {BL, BR}}});
  out.push_back({"left_right", {{TL, BL}, {TR, BR}}});
  out.push_back({"all_quadrants", {{TL, TR, BL, BR}}});
  // tests/test_cuda.py's MIXED: 1 to 4 members, every kind of sweep.
  out.push_back(
      {"mixed", {{SKEW}, {NNE, BR}, {WNW, SSW, TR}, {BL, ENE, SSE, ESE}}});
  return out;
}

// ---------------------------------------------------------------------------
// The grid
// ---------------------------------------------------------------------------

enum class Guide { kNone, kFull, kChannel, kBatch, kScalar };
constexpr Guide kGuides[] = {Guide::kNone, Guide::kFull, Guide::kChannel,
                             Guide::kBatch, Guide::kScalar};
const char* guide_name(Guide g) {
  switch (g) {
    case Guide::kNone:
      return "none";
    case Guide::kFull:
      return "full";
    case Guide::kChannel:
      return "(C,)";
    case Guide::kBatch:
      return "(B,1,1,1)";
    case Guide::kScalar:
      return "scalar";
  }
  return "?";
}

enum class Dtype { kF32, kF64, kF16, kBF16 };
constexpr Dtype kDtypes[] = {Dtype::kF32, Dtype::kF64, Dtype::kF16,
                             Dtype::kBF16};
const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::kF32:
      return "float32";
    case Dtype::kF64:
      return "float64";
    case Dtype::kF16:
      return "float16";
    case Dtype::kBF16:
      return "bfloat16";
  }
  return "?";
}

constexpr const char* kPasses[] = {"fwd-train", "fwd-infer", "tangent",
                                   "backward"};

// splitmix64: the same cases on every machine and standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % n); }
  double normal() {
    const double u = 1.0 - uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }

 private:
  uint64_t s_;
};

// One (grouping, dtype, guide, shape): the four passes are its cases.
struct Set {
  const NamedGrouping* grouping;
  Dtype dtype;
  Guide guide;
  int64_t b, h, w, c;
  uint64_t seed;

  std::string label(const char* pass) const {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%-9s %-8s %-15s guide=%-9s x=(%lld,%lld,%lld,%lld)", pass,
                  dtype_name(dtype), grouping->name.c_str(), guide_name(guide),
                  static_cast<long long>(b), static_cast<long long>(h),
                  static_cast<long long>(w), static_cast<long long>(c));
    return buf;
  }
};

// Random shapes: odd and even sizes, 1-pixel rows and columns, channels per
// group on both sides of the 16- and 32-channel chunks and not a multiple
// of them; now and then a larger image (more phases than pixel lanes). A
// (C,) guide's gradient sums B * H * W pixels per channel: 297 to 528, so
// several of the reduction's slices (kGuideSlice), the last one partial.
void draw_shape(Rng& r, int groups, bool quick, Guide guide, Set* s) {
  static constexpr int64_t kPerGroup[] = {1,  2,  3,  5,  7, 16,
                                          17, 19, 31, 33, 45};
  s->b = 1 + r.below(3);
  const bool big = !quick && r.below(6) == 0;
  s->h = big ? 17 + r.below(24) : 1 + r.below(12);
  s->w = big ? 17 + r.below(24) : 1 + r.below(12);
  if (guide == Guide::kChannel && !quick) {
    s->b = 3;
    s->h = 9 + r.below(8);
    s->w = 11;
  }
  int64_t cg = kPerGroup[r.below(quick ? 6 : 11)];
  const int64_t cap = quick ? 4000 : big ? 60000 : 30000;
  while (cg > 1 && s->b * s->h * s->w * cg * groups > cap) cg = (cg + 1) / 2;
  s->c = cg * groups;
}

std::vector<Set> make_grid(const std::vector<NamedGrouping>& gs, uint64_t seed,
                           bool quick) {
  std::vector<Set> sets;
  uint64_t k = 0;
  for (const NamedGrouping& g : gs) {
    for (Dtype d : kDtypes) {
      for (Guide gd : kGuides) {
        ++k;
        // --quick: every grouping, dtype and guide, but small shapes.
        Rng r(seed * 1000003ull + k);
        Set s{&g, d, gd, 0, 0, 0, 0, r.next()};
        draw_shape(r, static_cast<int>(g.groups.size()), quick, gd, &s);
        sets.push_back(s);
      }
    }
  }
  return sets;
}

// ---------------------------------------------------------------------------
// Device memory: the GPU's, or host memory in the host build
// ---------------------------------------------------------------------------

#if defined(LMCONV_HARNESS_HOST)
void* dev_alloc(size_t n) { return std::malloc(n ? n : 1); }
void dev_free(void* p) { std::free(p); }
void upload(void* d, const void* h, size_t n) { std::memcpy(d, h, n); }
void download(void* h, const void* d, size_t n) { std::memcpy(h, d, n); }
void fill(void* d, unsigned char byte, size_t n) { std::memset(d, byte, n); }
void finish() {}
#else
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e) +
                             ": " + cudaGetErrorString(e));
  }
}
cudaStream_t g_stream = nullptr;
void* dev_alloc(size_t n) {
  void* p = nullptr;
  check(cudaMalloc(&p, n ? n : 1), "cudaMalloc");
  return p;
}
void dev_free(void* p) { cudaFree(p); }
void upload(void* d, const void* h, size_t n) {
  check(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}
void download(void* h, const void* d, size_t n) {
  check(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}
void fill(void* d, unsigned char byte, size_t n) {
  check(cudaMemset(d, byte, n), "cudaMemset");
}
// A fault in a kernel shows here (the launches themselves do not wait).
void finish() {
  check(cudaStreamSynchronize(g_stream), "the kernels (cudaStreamSynchronize)");
  check(cudaGetLastError(), "cudaGetLastError");
}
#endif

// One device buffer, freed with its owner.
class DevBuf {
 public:
  explicit DevBuf(size_t bytes) : p_(dev_alloc(bytes)) {}
  DevBuf(DevBuf&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf& operator=(DevBuf&&) = delete;
  ~DevBuf() {
    if (p_) dev_free(p_);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_;
};

template <typename T>
DevBuf to_device(const std::vector<T>& h) {
  DevBuf d(h.size() * sizeof(T));
  if (!h.empty()) upload(d.as<void>(), h.data(), h.size() * sizeof(T));
  return d;
}
DevBuf poisoned(size_t bytes) {
  DevBuf d(bytes);
  fill(d.as<void>(), kPoison, bytes ? bytes : 1);
  return d;
}
template <typename T>
std::vector<T> to_host(const DevBuf& d, size_t n) {
  std::vector<T> h(n);
  if (n) download(h.data(), d.as<void>(), n * sizeof(T));
  return h;
}

// ---------------------------------------------------------------------------
// The two back ends
// ---------------------------------------------------------------------------

#if defined(LMCONV_HARNESS_HOST)
// The CUDA bodies on the host, as emulate.cc runs them (without its race
// detector, which tests/test_cuda.py runs): each thread's begin, then phase
// by phase every block and thread.
class HostPlatform {
 public:
  explicit HostPlatform(int64_t multiprocessors) : mps_(multiprocessors) {}
  ffi::ErrorOr<int64_t> multiprocessors() const { return mps_; }
  ffi::ErrorOr<void*> workspace(size_t bytes) {
    scratch_.emplace_back(poisoned(bytes));
    return scratch_.back().as<void>();
  }
  ffi::Error zero(void* p, size_t bytes) {
    std::memset(p, 0, bytes);
    return ffi::Error::Success();
  }
  void poison(void*, size_t) {}  // the harness poisons every output itself
  int flags() const { return 0; }
  template <typename Body>
  ffi::Error launch(const Launch& l, const typename Body::Args& args) {
    if (l.blocks == 0 || l.threads == 0) return ffi::Error::Success();
    FlushDenormals ftz;  // the GPU build flushes float32 (-ftz=true)
    std::vector<Lane> lanes(static_cast<size_t>(l.blocks * l.threads));
    for (int64_t b = 0; b < l.blocks; ++b) {
      for (int64_t k = 0; k < l.threads; ++k) {
        lanes[b * l.threads + k] = Body::begin(args, b, k);
      }
    }
    for (int64_t phase = 0; phase < l.phases; ++phase) {
      for (int64_t b = 0; b < l.blocks; ++b) {
        for (int64_t k = 0; k < l.threads; ++k) {
          Body::run(args, lanes[b * l.threads + k], phase);
        }
      }
    }
    return ffi::Error::Success();
  }

 private:
  int64_t mps_;
  std::vector<DevBuf> scratch_;
};
using DeviceBackend = PhasedBackend<HostPlatform>;
int64_t g_multiprocessors = 132;  // an H200's
DeviceBackend device_backend() {
  return DeviceBackend(HostPlatform(g_multiprocessors));
}
#else
// XLA's scratch allocator's part, over cudaMalloc: poisoned (a ring slot
// read before it is written shows), freed after the call.
class DeviceScratch {
 public:
  std::optional<void*> Allocate(size_t bytes, size_t /*alignment*/) {
    try {
      blocks_.emplace_back(poisoned(bytes));  // cudaMalloc: 256-byte aligned
    } catch (const std::runtime_error&) {
      return std::nullopt;
    }
    return blocks_.back().as<void>();
  }

 private:
  std::vector<DevBuf> blocks_;
};
using DeviceBackend = PhasedBackend<cuda::CudaPlatform<DeviceScratch>>;
#endif

// The CPU kernels' ffi::ThreadPool, without XLA: one thread, and a task
// scheduled (none is, with one thread) runs at once.
XLA_FFI_Error* one_thread(XLA_FFI_ThreadPool_NumThreads_Args* a) {
  *a->num_threads = 1;
  return nullptr;
}
XLA_FFI_Error* run_now(XLA_FFI_ThreadPool_Schedule_Args* a) {
  a->task(a->data);
  return nullptr;
}
class CpuReference {
 public:
  CpuReference() {
    std::memset(&api_, 0, sizeof(api_));
    api_.struct_size = sizeof(api_);
    api_.XLA_FFI_ThreadPool_NumThreads = &one_thread;
    api_.XLA_FFI_ThreadPool_Schedule = &run_now;
  }
  CpuBackend backend() {
    return CpuBackend(
        *ffi::CtxDecoding<ffi::ThreadPool>::Decode(&api_, nullptr, diag_));
  }

 private:
  XLA_FFI_Api api_;
  ffi::DiagnosticEngine diag_;
};

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

template <typename S>
S from_double(double v);
template <>
float from_double<float>(double v) {
  return static_cast<float>(v);
}
template <>
double from_double<double>(double v) {
  return v;
}
template <>
Half from_double<Half>(double v) {
  return Half{float_to_half_bits(static_cast<float>(v))};
}
template <>
BFloat16 from_double<BFloat16>(double v) {
  return BFloat16{float_to_bfloat16_bits(static_cast<float>(v))};
}

// Tie-heavy x: small integers, post-ReLU zeros, a constant, normals.
double x_value(Rng& r) {
  const double u = r.uniform();
  if (u < 0.35) return static_cast<double>(r.below(7) - 3);
  if (u < 0.55) return std::max(0.0, r.normal());
  if (u < 0.62) return 0.5;
  return 2.0 * r.normal();
}
// Guides at the blend's interesting points and in between.
double guide_value(Rng& r) {
  static constexpr double kPoints[] = {0.0, 0.5, 1.0, 1.5, -0.5};
  return r.below(2) ? kPoints[r.below(5)] : -0.5 + 2.0 * r.uniform();
}

template <typename S>
std::vector<S> values(size_t n, Rng& r, double (*draw)(Rng&)) {
  std::vector<S> v(n);
  for (S& e : v) e = from_double<S>(draw(r));
  return v;
}
double normal_value(Rng& r) { return r.normal(); }

// ---------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------

std::string hex(const unsigned char* p, size_t bytes) {
  uint64_t v = 0;
  std::memcpy(&v, p, bytes);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%0*llx", static_cast<int>(2 * bytes),
                static_cast<unsigned long long>(v));
  return buf;
}

void plant(std::vector<unsigned char>* got, size_t bytes) {
  if (got->size() < bytes || g_plant == Plant::kNone) return;
  const size_t i = (got->size() / bytes / 2) * bytes;  // a middle element
  if (g_plant == Plant::kUnwritten)
    std::memset(got->data() + i, kPoison, bytes);
  if (g_plant == Plant::kFlip) (*got)[i] ^= 1;
}

// "" if got and want are the same bits wherever used(i), and neither has an
// element left at the poison there; else what differs.
std::string compare(const char* name, const void* got_p, const void* want_p,
                    size_t n, size_t bytes,
                    const std::function<bool(size_t)>& used) {
  const auto* got = static_cast<const unsigned char*>(got_p);
  const auto* want = static_cast<const unsigned char*>(want_p);
  std::vector<unsigned char> poison(bytes, kPoison);
  size_t differ = 0, unwritten = 0, ref_unwritten = 0, first = n, first_un = n;
  for (size_t i = 0; i < n; ++i) {
    if (used && !used(i)) continue;
    const unsigned char* g = got + i * bytes;
    const unsigned char* w = want + i * bytes;
    if (std::memcmp(w, poison.data(), bytes) == 0) ++ref_unwritten;
    if (std::memcmp(g, poison.data(), bytes) == 0) {
      if (unwritten++ == 0) first_un = i;
    } else if (std::memcmp(g, w, bytes) != 0) {
      if (differ++ == 0) first = i;
    }
  }
  std::string why;
  if (unwritten) {
    why += std::string(name) + ": " + std::to_string(unwritten) + " of " +
           std::to_string(n) + " elements left poisoned (first " +
           std::to_string(first_un) + ")";
  }
  if (differ) {
    why += (why.empty() ? "" : "; ") + std::string(name) + ": " +
           std::to_string(differ) + " of " + std::to_string(n) +
           " elements differ (first " + std::to_string(first) + ": got " +
           hex(got + first * bytes, bytes) + ", want " +
           hex(want + first * bytes, bytes) + ")";
  }
  if (ref_unwritten) {
    why += (why.empty() ? "" : "; ") + std::string(name) +
           ": the CPU reference left " + std::to_string(ref_unwritten) +
           " elements unwritten";
  }
  return why;
}

// ---------------------------------------------------------------------------
// One set: the four passes on both back ends
// ---------------------------------------------------------------------------

struct Outcome {
  std::string label;
  std::string why;  // "" when passed
};

std::string error_text(const ffi::Error& e) {
  return e.failure() ? std::string(e.message()) : std::string();
}

template <typename S>
void run_set(const Set& s, const std::vector<bool>& wanted,
             std::vector<Outcome>* out) {
  const NamedGrouping& ng = *s.grouping;
  std::vector<int64_t> sizes, dirs;
  for (const auto& g : ng.groups) {
    sizes.push_back(static_cast<int64_t>(g.size()));
    for (int d : g) {
      const NamedDirection& nd = kDirections[d];
      for (int v : {nd.row_step, nd.col_step, nd.n1r, nd.n1c, nd.n2r, nd.n2c}) {
        dirs.push_back(v);
      }
    }
  }
  Call c;
  if (auto e = grouping_of("lmconv_cuda_harness",
                           ffi::Span<const int64_t>(sizes.data(), sizes.size()),
                           ffi::Span<const int64_t>(dirs.data(), dirs.size()),
                           &c.grouping);
      e.failure()) {
    throw std::runtime_error(error_text(e));
  }
  const int p = c.grouping.groups, kmax = c.grouping.max_members;
  c.geo = Geometry{s.b, s.h, s.w, s.c};
  c.group_channels = s.c / p;
  c.guided = s.guide != Guide::kNone;
  const int64_t xd[4] = {s.b, s.h, s.w, s.c};
  int64_t gd[4] = {s.b, s.h, s.w, s.c};
  if (s.guide == Guide::kChannel) gd[0] = gd[1] = gd[2] = 1;
  if (s.guide == Guide::kBatch) gd[1] = gd[2] = gd[3] = 1;
  if (s.guide == Guide::kScalar) gd[0] = gd[1] = gd[2] = gd[3] = 1;
  if (c.guided) c.guide = guide_layout_from_dims(xd, gd, 4);
  const size_t n = static_cast<size_t>(c.geo.size());
  const size_t gn = c.guided ? static_cast<size_t>(c.guide.elements) : 0;
  const int k = kmax > 1 ? kmax : 0;  // the residual's K
  const size_t mn = static_cast<size_t>(k) * n;
  const size_t mbytes = c.guided ? sizeof(S) : sizeof(uint8_t);
  // Member k of a group of m > 1 members (k < m), at the group's channels.
  const int64_t image = s.h * s.w * s.c;
  const std::function<bool(size_t)> member_used = [&](size_t i) {
    const int64_t kk = (static_cast<int64_t>(i) / image) % (k ? k : 1);
    const int g =
        static_cast<int>((static_cast<int64_t>(i) % s.c) / c.group_channels);
    return c.grouping.members[g] > 1 && kk < c.grouping.members[g];
  };

  Rng r(s.seed);
  const std::vector<S> x = values<S>(n, r, x_value);
  const std::vector<S> g = values<S>(gn, r, guide_value);
  const std::vector<S> ct = values<S>(n, r, normal_value);
  const std::vector<S> tx = values<S>(n, r, normal_value);
  const std::vector<S> tg = values<S>(gn, r, normal_value);

  // The CPU reference, into poisoned host buffers.
  CpuReference ref;
  CpuBackend cpu = ref.backend();
  auto host_poisoned = [](size_t count, size_t bytes) {
    return std::vector<unsigned char>(count * bytes, kPoison);
  };
  std::vector<unsigned char> out_c = host_poisoned(n, sizeof(S));
  std::vector<unsigned char> mem_c = host_poisoned(mn, mbytes);
  std::vector<unsigned char> inf_c = host_poisoned(n, sizeof(S));
  std::vector<unsigned char> tout_c = host_poisoned(n, sizeof(S));
  std::vector<unsigned char> dx_c = host_poisoned(n, sizeof(S));
  std::vector<unsigned char> dg_c = host_poisoned(gn, sizeof(S));
  auto with_members = [&](Buffers<S>* b, void* mem) {
    b->members = c.has_members && c.guided ? static_cast<S*>(mem) : nullptr;
    b->codes =
        c.has_members && !c.guided ? static_cast<uint8_t*>(mem) : nullptr;
  };
  auto cpu_call = [&](const char* what, ffi::Error e) {
    if (e.failure()) {
      throw std::runtime_error(std::string("CPU ") + what + ": " +
                               error_text(e));
    }
  };
  {
    Buffers<S> b;
    b.x = x.data();
    b.g = c.guided ? g.data() : nullptr;
    c.has_members = k > 0;
    b.out_w = reinterpret_cast<S*>(out_c.data());
    with_members(&b, mem_c.data());
    cpu_call("forward", cpu.forward<S>(c, b));
    c.has_members = false;
    b.out_w = reinterpret_cast<S*>(inf_c.data());
    with_members(&b, nullptr);
    cpu_call("forward (inference)", cpu.forward<S>(c, b));
    c.has_members = k > 0;
    b.out_w = nullptr;
    b.out = reinterpret_cast<const S*>(out_c.data());
    with_members(&b, mem_c.data());
    b.tx = tx.data();
    b.tg = c.guided ? tg.data() : nullptr;
    b.tout = reinterpret_cast<S*>(tout_c.data());
    cpu_call("tangent", cpu.tangent<S>(c, b));
    b.tx = b.tg = nullptr;
    b.tout = nullptr;
    b.ct = ct.data();
    b.dx = reinterpret_cast<S*>(dx_c.data());
    b.dg = c.guided ? reinterpret_cast<S*>(dg_c.data()) : nullptr;
    cpu_call("backward", cpu.backward<S>(c, b));
  }

  // The device, each pass from the CPU forward's out and residual.
  DevBuf x_d = to_device(x), g_d = to_device(g), ct_d = to_device(ct),
         tx_d = to_device(tx), tg_d = to_device(tg), out_in = to_device(out_c),
         mem_in = to_device(mem_c);
  auto base = [&]() {
    Buffers<S> b;
    b.x = x_d.as<S>();
    b.g = c.guided ? g_d.as<S>() : nullptr;
    return b;
  };
  auto bytes_of = [](const std::vector<unsigned char>& v) { return v.size(); };
  for (int pass = 0; pass < 4; ++pass) {
    if (!wanted[pass]) continue;
    Outcome o{s.label(kPasses[pass]), ""};
    try {
#if defined(LMCONV_HARNESS_HOST)
      DeviceBackend dev = device_backend();
#else
      DeviceScratch scratch;
      DeviceBackend dev(
          cuda::CudaPlatform<DeviceScratch>(g_stream, /*device=*/0, scratch));
#endif
      Buffers<S> b = base();
      ffi::Error e;
      if (pass <= 1) {  // forward: for training (with the residual) or not
        c.has_members = pass == 0 && k > 0;
        DevBuf out_d = poisoned(n * sizeof(S));
        DevBuf mem_d = poisoned(c.has_members ? mn * mbytes : 0);
        b.out_w = out_d.as<S>();
        with_members(&b, c.has_members ? mem_d.as<void>() : nullptr);
        e = dev.forward<S>(c, b);
        finish();
        if (e.failure()) throw std::runtime_error(error_text(e));
        auto got = to_host<unsigned char>(out_d, n * sizeof(S));
        plant(&got, sizeof(S));
        o.why =
            compare("out", got.data(), pass == 0 ? out_c.data() : inf_c.data(),
                    n, sizeof(S), nullptr);
        if (c.has_members) {
          const auto gm = to_host<unsigned char>(mem_d, bytes_of(mem_c));
          const std::string w =
              compare(c.guided ? "members" : "codes", gm.data(), mem_c.data(),
                      mn, mbytes, member_used);
          if (!w.empty()) o.why += (o.why.empty() ? "" : "; ") + w;
        }
      } else {
        c.has_members = k > 0;
        b.out = out_in.as<S>();
        with_members(&b, mem_in.as<void>());
        if (pass == 2) {
          DevBuf tout_d = poisoned(n * sizeof(S));
          b.tx = tx_d.as<S>();
          b.tg = c.guided ? tg_d.as<S>() : nullptr;
          b.tout = tout_d.as<S>();
          e = dev.tangent<S>(c, b);
          finish();
          if (e.failure()) throw std::runtime_error(error_text(e));
          auto got = to_host<unsigned char>(tout_d, n * sizeof(S));
          plant(&got, sizeof(S));
          o.why =
              compare("tout", got.data(), tout_c.data(), n, sizeof(S), nullptr);
        } else {
          DevBuf dx_d = poisoned(n * sizeof(S));
          DevBuf dg_d = poisoned(gn * sizeof(S));
          b.ct = ct_d.as<S>();
          b.dx = dx_d.as<S>();
          b.dg = c.guided ? dg_d.as<S>() : nullptr;
          e = dev.backward<S>(c, b);
          finish();
          if (e.failure()) throw std::runtime_error(error_text(e));
          auto got = to_host<unsigned char>(dx_d, n * sizeof(S));
          plant(&got, sizeof(S));
          o.why = compare("dx", got.data(), dx_c.data(), n, sizeof(S), nullptr);
          if (c.guided) {
            const auto gg = to_host<unsigned char>(dg_d, gn * sizeof(S));
            const std::string w = compare("dguide", gg.data(), dg_c.data(), gn,
                                          sizeof(S), nullptr);
            if (!w.empty()) o.why += (o.why.empty() ? "" : "; ") + w;
          }
        }
      }
    } catch (const std::exception& ex) {
      o.why = ex.what();
      if (o.why.empty()) o.why = "error";
    }
    out->push_back(std::move(o));
  }
}

void run_any(const Set& s, const std::vector<bool>& wanted,
             std::vector<Outcome>* out) {
  switch (s.dtype) {
    case Dtype::kF32:
      return run_set<float>(s, wanted, out);
    case Dtype::kF64:
      return run_set<double>(s, wanted, out);
    case Dtype::kF16:
      return run_set<Half>(s, wanted, out);
    case Dtype::kBF16:
      return run_set<BFloat16>(s, wanted, out);
  }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

int usage(const char* why) {
  std::fprintf(stderr,
               "lmconv_cuda_harness: %s\nusage: lmconv_cuda_harness [--seed "
               "N] [--quick] [--filter TEXT] [--tsv FILE] [--list] "
               "[--directions] [--plant unwritten|flip]%s\n",
               why,
#if defined(LMCONV_HARNESS_HOST)
               " [--multiprocessors N]"
#else
               ""
#endif
  );
  return 2;
}

int main_(int argc, char** argv) {
  uint64_t seed = 0;
  bool quick = false, list = false;
  std::string filter, tsv;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char*) -> const char* {
      return i + 1 < argc ? argv[++i] : nullptr;
    };
    if (a == "--seed") {
      const char* v = value("--seed");
      if (!v) return usage("--seed needs a value");
      seed = std::strtoull(v, nullptr, 10);
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--plant") {
      const char* v = value("--plant");
      const std::string f = v ? v : "";
      if (f != "unwritten" && f != "flip") {
        return usage("--plant takes unwritten or flip");
      }
      g_plant = f == "unwritten" ? Plant::kUnwritten : Plant::kFlip;
    } else if (a == "--list") {
      list = true;
    } else if (a == "--filter") {
      const char* v = value("--filter");
      if (!v) return usage("--filter needs a value");
      filter = v;
    } else if (a == "--tsv") {
      const char* v = value("--tsv");
      if (!v) return usage("--tsv needs a file");
      tsv = v;
#if defined(LMCONV_HARNESS_HOST)
    } else if (a == "--multiprocessors") {
      const char* v = value("--multiprocessors");
      if (!v || std::atoll(v) < 1)
        return usage("--multiprocessors needs N >= 1");
      g_multiprocessors = std::atoll(v);
#endif
    } else if (a == "--directions") {
      for (const NamedDirection& d : kDirections) {
        std::printf("%s %d %d %d %d %d %d\n", d.name, d.row_step, d.col_step,
                    d.n1r, d.n1c, d.n2r, d.n2c);
      }
      return 0;
    } else if (a == "-h" || a == "--help") {
      usage("the CUDA kernels against the CPU kernels, bit for bit");
      return 0;
    } else {
      return usage(("unknown argument '" + a + "'").c_str());
    }
  }
  const std::vector<NamedGrouping> gs = groupings();
  const std::vector<Set> sets = make_grid(gs, seed, quick);
  auto selected = [&](const Set& s, int pass) {
    return filter.empty() ||
           s.label(kPasses[pass]).find(filter) != std::string::npos;
  };
  if (list) {
    for (const Set& s : sets) {
      for (int pass = 0; pass < 4; ++pass) {
        if (selected(s, pass))
          std::printf("%s\n", s.label(kPasses[pass]).c_str());
      }
    }
    return 0;
  }

#if defined(LMCONV_HARNESS_HOST)
  std::printf(
      "lmconv_cuda_harness (host build: the CUDA bodies run on the CPU, %lld "
      "multiprocessors planned), seed %llu\n",
      static_cast<long long>(g_multiprocessors),
      static_cast<unsigned long long>(seed));
#else
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count);
      e != cudaSuccess || count < 1) {
    std::fprintf(stderr, "lmconv_cuda_harness: no CUDA device (%s)\n",
                 e != cudaSuccess ? (std::string(cudaGetErrorName(e)) + ": " +
                                     cudaGetErrorString(e))
                                        .c_str()
                                  : "cudaGetDeviceCount: 0");
    return kExitNoDevice;
  }
  int sms = 0, major = 0, minor = 0;
  try {
    check(cudaSetDevice(0), "cudaSetDevice");
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0),
          "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0),
          "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0),
          "cudaDeviceGetAttribute");
    check(cudaStreamCreate(&g_stream), "cudaStreamCreate");
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "lmconv_cuda_harness: no usable CUDA device (%s)\n",
                 ex.what());
    return kExitNoDevice;
  }
  std::printf(
      "lmconv_cuda_harness: device 0, compute capability %d.%d, %d "
      "multiprocessors; seed %llu\n",
      major, minor, sms, static_cast<unsigned long long>(seed));
#endif
  std::FILE* t = tsv.empty() ? nullptr : std::fopen(tsv.c_str(), "w");
  if (!tsv.empty() && !t) return usage(("cannot write " + tsv).c_str());
  int passed = 0, failed = 0;
  for (const Set& s : sets) {
    std::vector<bool> wanted(4);
    bool any = false;
    for (int pass = 0; pass < 4; ++pass) {
      wanted[pass] = selected(s, pass);
      any = any || wanted[pass];
    }
    if (!any) continue;
    std::vector<Outcome> outcomes;
    try {
      run_any(s, wanted, &outcomes);
    } catch (const std::exception& ex) {  // the CPU reference or a copy
      for (int pass = 0; pass < 4; ++pass) {
        if (wanted[pass])
          outcomes.push_back({s.label(kPasses[pass]), ex.what()});
      }
    }
    for (const Outcome& o : outcomes) {
      const bool ok = o.why.empty();
      (ok ? passed : failed) += 1;
      std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", o.label.c_str(),
                  ok ? "" : ": ", o.why.c_str());
      if (t)
        std::fprintf(t, "%s\t%s\t%s\n", ok ? "ok" : "FAIL", o.label.c_str(),
                     o.why.c_str());
    }
    std::fflush(stdout);
  }
  if (t) std::fclose(t);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 && passed > 0 ? 0 : 1;
}

}  // namespace
}  // namespace harness
}  // namespace lmconv

int main(int argc, char** argv) { return lmconv::harness::main_(argc, argv); }
