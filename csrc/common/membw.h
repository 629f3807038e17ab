// Memory read bandwidth probe, so benchmarks can state GEMV speed as a fraction
// of what this machine's memory delivers in the same run.
#pragma once

#include <cstdint>

namespace nanochat {

// Streams `bytes` (rounded to 4 KiB) from a buffer larger than any cache with
// `threads` threads, `reps` times, and returns the best read rate in GB/s (1e9).
double measure_read_bandwidth(int64_t bytes, int threads, int reps);

}  // namespace nanochat
