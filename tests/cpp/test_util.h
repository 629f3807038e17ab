// Small helpers shared by the C++ unit tests.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "common/threadpool.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"

namespace nanochat_test {

// Random ternary codes; about `zero_frac` of them zero, the rest +-1.
inline std::vector<int8_t> random_codes(std::mt19937& rng, int64_t n, double zero_frac = 1.0 / 3) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int8_t> c(static_cast<size_t>(n));
  for (auto& v : c) {
    const double r = u(rng);
    v = r < zero_frac ? 0 : (r < zero_frac + (1.0 - zero_frac) / 2 ? 1 : -1);
  }
  return c;
}

// Random int8 activations over the full range [-128, 127].
inline std::vector<int8_t> random_q(std::mt19937& rng, int64_t n) {
  std::uniform_int_distribution<int> d(-128, 127);
  std::vector<int8_t> q(static_cast<size_t>(n));
  for (auto& v : q) v = int8_t(d(rng));
  return q;
}

inline std::vector<float> random_floats(std::mt19937& rng, int64_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = d(rng);
  return x;
}

// Restores the process-wide ISA and thread count when a test ends, pass or fail.
struct GlobalStateGuard {
  GlobalStateGuard() = default;
  GlobalStateGuard(const GlobalStateGuard&) = delete;
  GlobalStateGuard& operator=(const GlobalStateGuard&) = delete;
  ~GlobalStateGuard() {
    nanochat::reset_isa();
    nanochat::set_num_threads(0);
  }
};

}  // namespace nanochat_test
