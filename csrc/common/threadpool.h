// A small persistent thread pool for the kernels. The calling thread works too,
// so a pool of size 1 runs everything inline. Workers spin briefly before
// sleeping, so back-to-back GEMVs (decode) don't pay a futex wake-up each.
#pragma once

#include <cstdint>
#include <functional>

namespace nanochat {

// Thread count used by the kernels. Default: NANOCHAT_NUM_THREADS if set, else
// all hardware threads. set_num_threads(n <= 0) restores that default.
int num_threads();
void set_num_threads(int n);

// Runs fn(i) for every i in [0, n) on the pool and returns when all are done.
// The first exception thrown by fn is rethrown here. A call made while the pool
// is busy (another thread's job, or a nested call) runs inline instead.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace nanochat
