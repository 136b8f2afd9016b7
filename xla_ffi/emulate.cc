// CPU emulation of the CUDA kernels: handlers.inc's six handlers over the
// phased back end (cuda_ffi.h) with a platform that, instead of launching a
// kernel, runs its body (cuda_schedule.h, compiled here for the host) for
// every block and thread of the real launch geometry, phase by phase: all
// threads of all blocks finish a phase before any starts the next, as
// __syncthreads() guarantees within a block. Blocks are independent, so
// running them in lock step is one valid GPU order.
//
// To catch what the GPU could do differently, the emulator
//   * can run the blocks and threads of each phase in reverse order (a body
//     that read another thread's output of the same phase would differ),
//   * fills the outputs and the workspace with NaN bytes first, so a pixel
//     that is never written, or read before it is written, shows up as NaN,
//   * and, on request, checks every memory access of the bodies (their ld()
//     and st()): the race and bounds detector. Within one phase of one
//     block, no element may be written by one thread and read or written by
//     another (the barrier between phases cannot order those); across blocks
//     (which no barrier orders) no element may be written by one block and
//     read or written by another in the whole launch; every access must lie
//     inside the buffer it is made through, writes only to the buffers the
//     body may write (Body::kWrites), and workspace ring accesses inside the
//     block's own ring. Reads must see data: a buffer the body writes is
//     read only where this launch wrote it before, and a ring slot only in
//     the phase right after it was written (a stale value from an earlier
//     phase or an earlier member would be a schedule bug the NaN poison
//     cannot show). The first violation fails the call with a message that
//     names the buffer, the element, the phase and both threads.
// It computes with subnormals flushed (FTZ/DAZ), as the CPU kernels do and
// as the GPU build does for float32 (cuda.cu: -ftz=true).
//
// Targets (platform "cpu"): lmconv_emu_pool_{fwd,fwd_guided,tangent,
// tangent_guided,bwd,bwd_guided}, with the operands and attributes of the
// real targets and two more int64 attributes: multiprocessors (what the
// CUDA handler asks the GPU; it shapes the plan) and order, a bit set:
//   1: run blocks and threads descending (else ascending),
//   2: run the race and bounds detector,
//   4: test hook: plant a race (the forward reads a pixel of its own phase
//      that another thread writes),
//   8: test hook: plant an out-of-bounds read (one element past x).

#ifndef LMCONV_EMULATOR  // CMakeLists.txt defines it for the whole module
#define LMCONV_EMULATOR 1
#endif

#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_ffi.h"

namespace lmconv {
namespace {

constexpr int64_t kOrderReverse = 1;
constexpr int64_t kOrderCheck = 2;
constexpr int64_t kOrderPlantRace = 4;
constexpr int64_t kOrderPlantOutOfBounds = 8;

const char* const kBufferNames[kBufCount] = {
    "x",      "guide",          "out",          "members", "tx",
    "tguide", "tout",           "ct",           "dx",      "dguide (per pixel)",
    "dguide", "workspace ring", "dguide slices"};

// The race and bounds detector: the state of every element of every buffer
// in the current launch.
class Tracer {
 public:
  struct Region {
    const char* base;
    int64_t elements;
    size_t elem_bytes;
    Buffer id;
    bool writable;
    int64_t per_block;  // > 0: block b may touch only [b, b + 1) * per_block
  };

  void add(Buffer id, const void* base, int64_t elements, size_t elem_bytes,
           bool writable, int64_t per_block = 0) {
    if (!base || elements <= 0) return;
    for (const Region& r : regions_) {
      if (r.base == base) return;  // the same buffer under two names
    }
    regions_.push_back(Region{static_cast<const char*>(base), elements,
                              elem_bytes, id, writable, per_block});
    states_.emplace_back(static_cast<size_t>(elements));
  }

  void at(int64_t phase, int64_t block, int64_t thread, int64_t threads) {
    phase_ = phase;
    block_ = block;
    thread_ = thread;
    threads_ = threads;
  }

  bool access(const void* base, int64_t index, bool write) {
    if (!error_.empty()) return false;
    size_t k = 0;
    for (; k < regions_.size(); ++k) {
      if (regions_[k].base == base) break;
    }
    if (k == regions_.size()) {
      std::ostringstream s;
      s << "an access through a pointer that is no buffer of the call (" << base
        << ", element " << index << "; buffers:";
      for (const Region& r : regions_) {
        s << " " << kBufferNames[r.id] << "="
          << static_cast<const void*>(r.base);
      }
      s << ")";
      fail(s.str());
      return false;
    }
    const Region& r = regions_[k];
    if (index < 0 || index >= r.elements) {
      std::ostringstream s;
      s << "out of bounds: " << (write ? "write to " : "read of ")
        << kBufferNames[r.id] << " element " << index << " (it has "
        << r.elements << ")";
      fail(s.str());
      return false;
    }
    if (write && !r.writable) {
      fail(std::string("write to the read-only buffer ") + kBufferNames[r.id] +
           " element " + std::to_string(index));
      return false;
    }
    if (r.per_block > 0 && index / r.per_block != block_) {
      std::ostringstream s;
      s << "out of bounds: " << (write ? "write to " : "read of ")
        << kBufferNames[r.id] << " element " << index
        << ", outside the block's own ring [" << block_ * r.per_block << ", "
        << (block_ + 1) * r.per_block << ")";
      fail(s.str());
      return false;
    }
    State& e = states_[k][static_cast<size_t>(index)];
    const int64_t me = block_ * threads_ + thread_;
    // Across blocks: nothing orders them within a launch.
    if (e.block < 0) e.block = block_;
    if (e.block != block_) e.multi_block = true;
    e.written |= write;
    if (e.multi_block && e.written) {
      race(r, index, write, "another block", e.block);
      return false;
    }
    // Within a block: the phase's barrier orders only different phases.
    if (e.phase != phase_) {
      e.phase = phase_;
      e.writer = -1;
      e.reader = -1;
    }
    if (e.writer >= 0 && e.writer != me) {
      race(r, index, write, "written by", e.writer);
      return false;
    }
    if (write) {
      if (e.reader == kMany || (e.reader >= 0 && e.reader != me)) {
        race(r, index, write, "read by", e.reader);
        return false;
      }
      e.writer = me;
      e.last_write = phase_;
    } else {
      e.reader = e.reader == -1 || e.reader == me ? me : kMany;
      // What the body writes it must have written before it reads it; the
      // ring passes values only from one phase to the next.
      if (r.writable && e.last_write < 0) {
        fail(std::string("read before write: ") + kBufferNames[r.id] +
             " element " + std::to_string(index) +
             " was not written in this launch");
        return false;
      }
      if (r.id == kBufRing && e.last_write != phase_ - 1) {
        fail("stale read: workspace ring element " + std::to_string(index) +
             " was last written in phase " + std::to_string(e.last_write) +
             ", not the phase before");
        return false;
      }
    }
    return true;
  }

  const std::string& error() const { return error_; }

 private:
  static constexpr int64_t kMany = -2;
  struct State {
    int64_t phase = -1;
    int64_t writer = -1;      // block * threads + thread, this phase
    int64_t reader = -1;      // the same, or kMany
    int64_t block = -1;       // the first block that touched it in the launch
    int64_t last_write = -1;  // the phase of the last write in the launch
    bool multi_block = false, written = false;
  };

  void fail(const std::string& what) {
    if (!error_.empty()) return;
    std::ostringstream s;
    s << "lmconv_jax CUDA emulator: " << what << ", in phase " << phase_
      << " by block " << block_ << " thread " << thread_;
    error_ = s.str();
  }

  void race(const Region& r, int64_t index, bool write, const char* other,
            int64_t who) {
    std::ostringstream s;
    s << "race: " << (write ? "write to " : "read of ") << kBufferNames[r.id]
      << " element " << index << ", ";
    if (who == kMany) {
      s << other << " several other threads in the same phase";
    } else if (std::string(other) == "another block") {
      s << "touched by block " << who << " (and written) in the same launch";
    } else {
      s << other << " block " << who / threads_ << " thread " << who % threads_
        << " in the same phase";
    }
    fail(s.str());
  }

  std::vector<Region> regions_;
  std::deque<std::vector<State>> states_;
  int64_t phase_ = 0, block_ = 0, thread_ = 0, threads_ = 1;
  std::string error_;
};

thread_local Tracer* tracer = nullptr;

}  // namespace

bool emu_trace(const void* base, int64_t index, bool write) {
  return tracer == nullptr || tracer->access(base, index, write);
}

namespace {

// Registers the buffers of one launch of Body with the tracer.
template <typename Body>
void add_buffers(Tracer& t, const typename Body::Args& a) {
  using S = std::remove_const_t<std::remove_pointer_t<decltype(a.x)>>;
  const LaunchPlan& p = a.plan;
  const unsigned w = Body::kWrites;
  auto add = [&](Buffer id, const void* base, int64_t n, size_t bytes,
                 int64_t per_block = 0) {
    t.add(id, base, n, bytes, (w & buffer_bit(id)) != 0, per_block);
  };
  const size_t s = sizeof(S);
  add(kBufX, a.x, p.size, s);
  add(kBufG, a.g, p.g_elements, s);
  add(kBufOut, a.out, p.size, s);
  if (a.members) {  // the member pools (guided) or the winner codes
    add(kBufMembers, a.members, p.max_members * p.size, s);
  } else {
    add(kBufMembers, a.codes, p.max_members * p.size, sizeof(uint8_t));
  }
  add(kBufTx, a.tx, p.size, s);
  add(kBufTg, a.tg, p.g_elements, s);
  add(kBufTout, a.tout, p.size, s);
  add(kBufCt, a.ct, p.size, s);
  add(kBufDx, a.dx, p.size, s);
  add(kBufDgPixels, a.dg_pixels, p.size, s);
  add(kBufDg, a.dg, p.g_elements, s);
  add(kBufRing, a.ring, p.blocks * p.ring, sizeof(Compute<S>), p.ring);
  add(kBufPartials, a.partials, p.guide_slices * p.g_elements,
      sizeof(Compute<S>));
}

class EmulatorPlatform {
 public:
  EmulatorPlatform(int64_t multiprocessors, int64_t order)
      : multiprocessors_(multiprocessors), order_(order) {}

  ffi::ErrorOr<int64_t> multiprocessors() const {
    if (multiprocessors_ < 1) {
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "lmconv_emu: multiprocessors must be >= 1"));
    }
    return multiprocessors_;
  }

  ffi::ErrorOr<void*> workspace(size_t bytes) {
    // Owned by the platform (the back end), which outlives the launches.
    workspace_.emplace_back(bytes / sizeof(double) + 1);  // aligned for any G
    std::vector<double>& w = workspace_.back();
    poison(w.data(), w.size() * sizeof(double));
    return static_cast<void*>(w.data());
  }

  ffi::Error zero(void* p, size_t bytes) {
    std::memset(p, 0, bytes);
    return ffi::Error::Success();
  }

  void poison(void* p, size_t bytes) {
    if (p) std::memset(p, 0xFF, bytes);  // NaN in every float type
  }

  // The planted faults only with the detector on, which stops them.
  int flags() const {
    if (!(order_ & kOrderCheck)) return 0;
    return ((order_ & kOrderPlantRace) ? kPlantRace : 0) |
           ((order_ & kOrderPlantOutOfBounds) ? kPlantOutOfBounds : 0);
  }

  // Runs Body like cuda.cu's phased kernel: each thread's begin, then
  // phases, then blocks, then threads.
  template <typename Body>
  ffi::Error launch(const Launch& l, const typename Body::Args& args) {
    FlushDenormals ftz;
    std::unique_ptr<Tracer> t;
    if (order_ & kOrderCheck) {
      t = std::make_unique<Tracer>();
      add_buffers<Body>(*t, args);
    }
    tracer = t.get();
    const bool reverse = (order_ & kOrderReverse) != 0;
    std::vector<Lane> lanes(static_cast<size_t>(l.blocks * l.threads));
    for (int64_t b = 0; b < l.blocks; ++b) {
      for (int64_t k = 0; k < l.threads; ++k) {
        lanes[b * l.threads + k] = Body::begin(args, b, k);
      }
    }
    for (int64_t phase = 0; phase < l.phases; ++phase) {
      for (int64_t b = 0; b < l.blocks; ++b) {
        const int64_t block = reverse ? l.blocks - 1 - b : b;
        for (int64_t k = 0; k < l.threads; ++k) {
          const int64_t thread = reverse ? l.threads - 1 - k : k;
          if (t) t->at(phase, block, thread, l.threads);
          Body::run(args, lanes[block * l.threads + thread], phase);
        }
      }
      if (t && !t->error().empty()) break;
    }
    tracer = nullptr;
    if (t && !t->error().empty()) return ffi::Error::Internal(t->error());
    return ffi::Error::Success();
  }

 private:
  int64_t multiprocessors_;
  int64_t order_;
  std::deque<std::vector<double>> workspace_;
};

using EmulatorBackend = PhasedBackend<EmulatorPlatform>;

}  // namespace
}  // namespace lmconv

// The six handlers (handlers.inc), with the emulator's two attributes.
#define LMCONV_SYMBOL(name) LmconvEmu##name
#define LMCONV_TARGET(name) "lmconv_emu_" name
#define LMCONV_CONTEXT_PARAMS
#define LMCONV_BIND xla::ffi::Ffi::Bind()
#define LMCONV_EXTRA_ATTR_PARAMS , int64_t multiprocessors, int64_t order
#define LMCONV_EXTRA_ATTRS \
  .Attr<int64_t>("multiprocessors").Attr<int64_t>("order")
#define LMCONV_MAKE_BACKEND \
  EmulatorBackend(EmulatorPlatform(multiprocessors, order))
#include "handlers.inc"
