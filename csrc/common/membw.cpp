#include "common/membw.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "common/large_buffer.h"
#include "ternary/ternary.h"

namespace nanochat {

namespace {
// Wide independent 64-bit adds: the compiler vectorizes this at the baseline ISA,
// which is enough to saturate memory (it needs no AVX-512 to be memory bound).
uint64_t sum_range(const uint64_t* p, int64_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
    s4 += p[i + 4];
    s5 += p[i + 5];
    s6 += p[i + 6];
    s7 += p[i + 7];
  }
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
}
}  // namespace

double measure_read_bandwidth(int64_t bytes, int threads, int reps) {
  if (bytes < 4096 || threads < 1 || reps < 1)
    throw Error("measure_read_bandwidth: need bytes >= 4096, threads >= 1, reps >= 1");
  const int64_t n = bytes / 8 / 512 * 512;
  // Huge pages as the engine's weights get (common/large_buffer.h), so the GEMV's
  // fraction of this rate compares like with like.
  LargeBuffer mem(size_t(n) * 8);
  uint64_t* buf = reinterpret_cast<uint64_t*>(mem.data());
  for (int64_t i = 0; i < n; ++i) buf[i] = uint64_t(i);  // touch every page
  const int64_t per = (n / threads + 511) / 512 * 512;
  std::vector<uint64_t> sums(static_cast<size_t>(threads));
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> ts;
    for (int k = 1; k < threads; ++k)
      ts.emplace_back([&, k] {
        const int64_t b = std::min(n, k * per), e = std::min(n, b + per);
        sums[size_t(k)] = sum_range(buf + b, e - b);
      });
    sums[0] = sum_range(buf, std::min(n, per));
    for (auto& t : ts) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n) * 8.0 / s / 1e9);
  }
  volatile uint64_t sink = 0;
  for (uint64_t s : sums) sink = sink + s;
  (void)sink;
  return best;
}

}  // namespace nanochat
