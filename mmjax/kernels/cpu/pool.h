// Work sharing over XLA's intra-op thread pool for mmjax's CPU kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace mmjax_pool {

// Runs task(i) for every i in [0, count): the caller and up to num_threads - 1 helper tasks
// scheduled on the pool claim indices from an atomic counter. The caller only waits for
// indices a running thread has claimed, so a busy pool (or a pool of one) can never deadlock
// the call: it just does the work itself. A helper that starts after the call returned finds
// nothing left to claim and touches only the shared counters, never `task`.
template <typename Task>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, const Task& task) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const Task* fn = &task;
  auto run = [counters, count, fn] {
    for (int64_t i; (i = counters->next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      (*fn)(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));  // a copy per task
  run();
  while (counters->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace mmjax_pool
