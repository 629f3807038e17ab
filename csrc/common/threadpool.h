// Persistent thread pools for the kernels. The calling thread works too, so a pool of
// size 1 runs everything inline. Workers spin briefly before sleeping, so back-to-back
// GEMVs (decode) don't pay a futex wake-up each. Each parallel_for takes a pool of its
// own for the call (an idle one of the right size, else a fresh one), so concurrent
// callers (sessions on different threads) each run on all their threads.
#pragma once

#include <cstdint>
#include <functional>

namespace nanochat {

// The most threads one pool may have (set_num_threads, NANOCHAT_NUM_THREADS,
// LoadOptions.n_threads): above any CPU this runs on, well below the count at which
// creating threads fails on an ordinary system.
constexpr int kMaxThreads = 1024;

// Library-wide thread count. Default: NANOCHAT_NUM_THREADS if set (clamped to
// kMaxThreads), else all hardware threads (likewise). set_num_threads(n <= 0) restores
// that default; n > kMaxThreads, or threads that cannot be started, throw nanochat::Error
// and leave the previous setting in place.
int num_threads();
void set_num_threads(int n);

// While alive, parallel_for calls on this thread use n threads (n <= 0: the library-wide
// count). A Session of a model loaded with LoadOptions.n_threads runs under one.
class ThreadCountScope {
 public:
  explicit ThreadCountScope(int n);
  ~ThreadCountScope();
  ThreadCountScope(const ThreadCountScope&) = delete;
  ThreadCountScope& operator=(const ThreadCountScope&) = delete;

 private:
  int prev_;
};

// Runs fn(i) for every i in [0, n) on a pool and returns when all are done. The first
// exception thrown by fn is rethrown here. A nested call (from inside fn) runs inline.
// Throws nanochat::Error when no pool can be started (the threads cannot be created).
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace nanochat
