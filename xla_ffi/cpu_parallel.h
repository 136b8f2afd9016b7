// The CPU kernels' thread pool loop: parallel_for over XLA's intra-op pool.
// Part of cpu_kernels.h (cpu_kernels.cc only).

#ifndef LMCONV_CPU_PARALLEL_H_
#define LMCONV_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "cpu_plan.h"

namespace ffi = xla::ffi;

namespace lmconv {
namespace {

// Runs fn(0), ..., fn(n - 1) on the calling thread and on at most
// pool.num_threads() - 1 helper tasks. Items are claimed from a shared
// counter, so the caller never waits on a task that has not started (no
// deadlock when the caller is itself a pool thread); helpers that start after
// all items are claimed return at once.
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t elements,
                  const std::function<void(int64_t)>& fn) {
  const int64_t threads =
      elements < kMinParallelElements ? 0 : pool.num_threads();
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

}  // namespace
}  // namespace lmconv

#endif  // LMCONV_CPU_PARALLEL_H_
