// Training's row-wise ops (csrc/norm/rmsnorm, csrc/act/swiglu): every ISA against plain
// double-precision math on odd widths (masked tails), thread-count invariance, the
// kept-row backward against the dense one, and the keep-list checks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "act/swiglu.h"
#include "nanochat/error.hpp"
#include "norm/rmsnorm.h"
#include "rows/bf16_rows.h"
#include "ternary/dispatch.h"
#include "test_util.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;
using nanochat_test::random_floats;

namespace {

constexpr float kEps = 1e-5f;

TEST(RmsNorm, MatchesDoubleOnEveryIsa) {
  GlobalStateGuard guard;
  std::mt19937 rng(1);
  for (int64_t dim : {1, 17, 100, 768}) {
    const int64_t rows = 37;
    auto x = random_floats(rng, rows * dim, -3, 3), w = random_floats(rng, dim, 0.5f, 1.5f);
    auto gy = random_floats(rng, rows * dim, -1, 1);
    const size_t n = static_cast<size_t>(rows * dim), nd = static_cast<size_t>(dim);
    std::vector<double> ry(n), rgx(n), rgw(nd, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = &x[size_t(r * dim)];
      double ss = 0, dot = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(xr[i]) * xr[i];
      const double rs = 1 / std::sqrt(ss / dim + kEps);
      for (int64_t i = 0; i < dim; ++i) dot += double(gy[size_t(r * dim + i)]) * w[i] * xr[i] * rs;
      for (int64_t i = 0; i < dim; ++i) {
        const size_t o = size_t(r * dim + i);
        ry[o] = xr[i] * rs * w[i];
        rgx[o] = rs * (gy[o] * w[i] - xr[i] * rs * dot / dim);
        rgw[size_t(i)] += gy[o] * xr[i] * rs;
      }
    }
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      std::vector<float> y(n), rstd(static_cast<size_t>(rows)), gx(n), gw(nd);
      rms_norm_forward(x.data(), w.data(), rows, dim, kEps, y.data(), rstd.data());
      rms_norm_backward(gy.data(), x.data(), w.data(), rstd.data(), rows, dim, nullptr, 0,
                        gx.data(), gw.data());
      for (size_t i = 0; i < ry.size(); ++i) {
        ASSERT_NEAR(y[i], ry[i], 1e-5 * (1 + std::fabs(ry[i]))) << isa_name(isa) << " " << dim;
        ASSERT_NEAR(gx[i], rgx[i], 1e-5 * (1 + std::fabs(rgx[i]))) << isa_name(isa);
      }
      for (int64_t i = 0; i < dim; ++i)
        ASSERT_NEAR(gw[size_t(i)], rgw[size_t(i)], 1e-4 * (1 + std::fabs(rgw[size_t(i)])));
    }
  }
}

TEST(RmsNorm, KeptRowsAndThreadsAndChecks) {
  GlobalStateGuard guard;
  std::mt19937 rng(2);
  const int64_t rows = 100, dim = 48;
  auto x = random_floats(rng, rows * dim, -2, 2), w = random_floats(rng, dim, 0.5f, 1.5f);
  auto gy = random_floats(rng, rows * dim, -1, 1);
  std::vector<float> y(x.size()), rstd(static_cast<size_t>(rows));
  rms_norm_forward(x.data(), w.data(), rows, dim, kEps, y.data(), rstd.data());
  std::vector<int64_t> keep;
  auto masked = gy;
  for (int64_t r = 0; r < rows; ++r) {
    if (r % 3 != 1) keep.push_back(r);
    else std::fill(masked.begin() + r * dim, masked.begin() + (r + 1) * dim, 0.0f);
  }
  const size_t nd = static_cast<size_t>(dim);
  std::vector<float> gx(x.size(), 7.0f), gw(nd), dx(x.size()), dw(nd);
  rms_norm_backward(masked.data(), x.data(), w.data(), rstd.data(), rows, dim, nullptr, 0,
                    dx.data(), dw.data());
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    rms_norm_backward(gy.data(), x.data(), w.data(), rstd.data(), rows, dim, keep.data(),
                      int64_t(keep.size()), gx.data(), gw.data());
    for (size_t i = 0; i < gx.size(); ++i) ASSERT_EQ(gx[i], dx[i]) << i;  // dropped rows: 0
    for (int64_t i = 0; i < dim; ++i) ASSERT_NEAR(gw[size_t(i)], dw[size_t(i)], 1e-5);
  }
  const int64_t bad[] = {3, 2};
  EXPECT_THROW(rms_norm_backward(gy.data(), x.data(), w.data(), rstd.data(), rows, dim, bad, 2,
                                 gx.data(), gw.data()), Error);
  const int64_t out[] = {rows};
  EXPECT_THROW(rms_norm_backward(gy.data(), x.data(), w.data(), rstd.data(), rows, dim, out, 1,
                                 gx.data(), gw.data()), Error);
}

TEST(SwiGlu, MatchesDoubleOnEveryIsaAndKeptRows) {
  GlobalStateGuard guard;
  std::mt19937 rng(3);
  const int64_t rows = 9, dim = 37;
  auto g = random_floats(rng, rows * dim, -12, 12), u = random_floats(rng, rows * dim, -2, 2);
  auto gh = random_floats(rng, rows * dim, -1, 1);
  g[0] = -100.0f, g[1] = 100.0f, g[2] = 0.0f;  // the sigmoid's saturated ends
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    std::vector<float> h(g.size()), gg(g.size()), gu(g.size());
    swiglu_forward(g.data(), u.data(), rows, dim, h.data());
    swiglu_backward(gh.data(), g.data(), u.data(), rows, dim, nullptr, 0, gg.data(), gu.data());
    for (size_t i = 0; i < g.size(); ++i) {
      const double s = 1 / (1 + std::exp(-double(g[i])));
      const double eh = g[i] * s * u[i], egu = gh[i] * g[i] * s;
      const double egg = gh[i] * u[i] * s * (1 + g[i] * (1 - s));
      ASSERT_NEAR(h[i], eh, 1e-5 * (1 + std::fabs(eh))) << isa_name(isa) << " " << g[i];
      ASSERT_NEAR(gu[i], egu, 1e-5 * (1 + std::fabs(egu))) << isa_name(isa);
      ASSERT_NEAR(gg[i], egg, 1e-5 * (1 + std::fabs(egg))) << isa_name(isa);
    }
    const int64_t keep[] = {0, 4, 8};
    std::vector<float> kg(g.size(), 7.0f), ku(g.size(), 7.0f);
    swiglu_backward(gh.data(), g.data(), u.data(), rows, dim, keep, 3, kg.data(), ku.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < dim; ++i) {
        const size_t o = size_t(r * dim + i);
        const bool kept = r % 4 == 0;
        ASSERT_EQ(kg[o], kept ? gg[o] : 0.0f);
        ASSERT_EQ(ku[o], kept ? gu[o] : 0.0f);
      }
    const int64_t bad[] = {4, 4};
    EXPECT_THROW(swiglu_backward(gh.data(), g.data(), u.data(), rows, dim, bad, 2, kg.data(),
                                 ku.data()), Error);
  }
}

}  // namespace

namespace {

// csrc/rows: every ISA gives the scalar reference's bits (odd widths, kept rows or all).
TEST(Bf16Rows, GatherAndScatterMatchScalarOnEveryIsa) {
  GlobalStateGuard guard;
  std::mt19937 rng(9);
  const int64_t total = 41;
  for (int64_t cols : {1, 17, 100}) {
    auto gy = random_floats(rng, total * cols, -5, 5);
    auto xs = random_floats(rng, total, 0.01f, 0.2f);
    // NaN, infinities and exact ties (0x3F808000: halfway between two bf16 values, even
    // below) take the same bits on every ISA
    gy[0] = std::numeric_limits<float>::quiet_NaN();
    gy[size_t(total * cols - 1)] = std::numeric_limits<float>::infinity();
    gy[size_t(total * cols / 2)] = -std::numeric_limits<float>::infinity();
    gy[size_t(total * cols / 3)] = 1.00390625f;
    std::vector<int8_t> q(size_t(total * cols));
    for (auto& v : q) v = int8_t(int(rng() % 256) - 128);
    const std::vector<int64_t> rows = {0, 2, 3, 17, 40};
    for (const std::vector<int64_t>* list : {static_cast<const std::vector<int64_t>*>(nullptr), &rows}) {
      const int64_t n = list ? int64_t(list->size()) : total;
      const int64_t* rp = list ? list->data() : nullptr;
      std::vector<std::vector<uint16_t>> outs;
      std::vector<std::vector<float>> scattered;
      for (Isa isa : supported_isas()) {
        set_isa(isa);
        std::vector<uint16_t> g(size_t(n * cols)), gs(g.size()), qb(g.size());
        gather_backward_operands(gy.data(), cols, q.data(), cols, xs.data(), total, rp, n,
                                 g.data(), gs.data(), qb.data());
        std::vector<float> dst(size_t(total * cols), 7.0f);
        scatter_scaled_rows(g.data(), cols, rp, n, total, 0.25f, dst.data());
        g.insert(g.end(), gs.begin(), gs.end());
        g.insert(g.end(), qb.begin(), qb.end());
        outs.push_back(g);
        scattered.push_back(dst);
      }
      for (size_t i = 1; i < outs.size(); ++i) {
        EXPECT_EQ(outs[i], outs[0]) << cols;
        EXPECT_EQ(0, std::memcmp(scattered[i].data(), scattered[0].data(),
                                 scattered[0].size() * sizeof(float))) << cols;
      }
      // rows outside the list are zero; listed rows are bf16(gy) * 0.25 (within bf16 ulp)
      for (int64_t r = 0, i = 0; r < total; ++r) {
        const bool listed = !list || (i < n && (*list)[size_t(i)] == r);
        for (int64_t c = 0; c < cols; ++c) {
          const float v = scattered[0][size_t(r * cols + c)];
          if (!listed) {
            ASSERT_EQ(v, 0.0f);
          } else if (!std::isfinite(gy[size_t(r * cols + c)])) {
            ASSERT_EQ(std::isnan(v), std::isnan(gy[size_t(r * cols + c)]));
          } else {
            const float want = gy[size_t(r * cols + c)] * 0.25f;
            ASSERT_NEAR(v, want, std::fabs(want) * 0.004f);
          }
        }
        if (listed) ++i;
      }
    }
  }
  const std::vector<int64_t> bad = {3, 1};
  std::vector<float> dst(10);
  std::vector<uint16_t> src(10);
  EXPECT_THROW(scatter_scaled_rows(src.data(), 1, bad.data(), 2, 10, 1.0f, dst.data()), Error);
}

}  // namespace
