// Work items shared out to XLA's intra-op threads (the FFI's ThreadPool), for the kernels in
// cpu_attention.cc and cpu_sampling.cc.
//
// An atomic counter hands out the items. The caller works too and then waits only for the
// items already claimed, so a pool task that starts late (or never, if the pool is busy) costs
// nothing: it finds no work and returns. Its state outlives the call for such late tasks; `fn`
// is only ever called for a claimed item, so what it refers to may live on the caller's stack.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t items, F fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto s = std::make_shared<State>();
  auto work = [s, items, fn] {
    for (;;) {
      const int64_t i = s->next.fetch_add(1);
      if (i >= items) return;
      fn(i);
      if (s->done.fetch_add(1) + 1 == items) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->cv.notify_all();
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t i = 0; i < std::min(threads, items) - 1; ++i) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(s->mu);
  s->cv.wait(lock, [&] { return s->done.load() == items; });
}
