// 8-bit optimizer state (csrc/optim/blockwise8.h): the code maps (absmax kept exactly,
// error bounds, an outlier only coarsens its own block), the fused AdamW / Lion / momentum
// steps against double-precision math, every ISA kernel bit-identical to the scalar
// reference on 1 and 2 threads, and argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/threadpool.h"
#include "nanochat/error.hpp"
#include "optim/blockwise8.h"
#include "test_util.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;
using nanochat_test::random_floats;

namespace {

// Mixed magnitudes: most values small, some large, a few exactly zero.
std::vector<float> state_like(std::mt19937& rng, int64_t n, bool nonneg) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::uniform_real_distribution<float> e(-12.0f, 0.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float v = d(rng) * std::exp2(e(rng));
    if (i % 97 == 5) v = 0.0f;
    x[size_t(i)] = nonneg ? v * v : v;
  }
  return x;
}

struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<float> absmax, back;
};

Quantized roundtrip(const std::vector<float>& x, int64_t block, Map8 map) {
  const int64_t n = int64_t(x.size()), nb = optim8_num_blocks(n, block);
  Quantized q{std::vector<uint8_t>(static_cast<size_t>(n)), std::vector<float>(size_t(nb)),
              std::vector<float>(static_cast<size_t>(n))};
  quantize_blockwise(x.data(), n, block, map, q.codes.data(), q.absmax.data());
  dequantize_blockwise(q.codes.data(), q.absmax.data(), n, block, map, q.back.data());
  return q;
}

}  // namespace

TEST(Optim8, RoundtripKeepsEachBlockAbsmaxExactly) {
  GlobalStateGuard guard;
  std::mt19937 rng(1);
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    for (Map8 map : {Map8::linear, Map8::minifloat})
      for (int64_t block : {64, 2048})
        for (int64_t n : {1, 63, 64, 1000, 5000}) {
          const auto x = state_like(rng, n, map == Map8::minifloat);
          const Quantized q = roundtrip(x, block, map);
          for (int64_t b = 0; b * block < n; ++b) {
            const int64_t s = b * block, len = std::min(block, n - s);
            float amax = 0.0f;
            int64_t arg = s;
            for (int64_t i = s; i < s + len; ++i)
              if (std::fabs(x[size_t(i)]) > amax) amax = std::fabs(x[size_t(i)]), arg = i;
            ASSERT_EQ(q.absmax[size_t(b)], amax) << isa_name(isa) << " block " << b;
            ASSERT_EQ(q.back[size_t(arg)], x[size_t(arg)]) << isa_name(isa) << " n " << n;
          }
        }
  }
}

TEST(Optim8, LinearErrorIsHalfAStep) {
  std::mt19937 rng(2);
  const auto x = state_like(rng, 10000, false);
  const Quantized q = roundtrip(x, 256, Map8::linear);
  for (size_t i = 0; i < x.size(); ++i) {
    const float amax = q.absmax[i / 256];
    ASSERT_LE(std::fabs(q.back[i] - x[i]), amax / 254.0f * 1.0001f) << i;
  }
}

TEST(Optim8, MinifloatIsRelativeAndMonotone) {
  // The 255 nonzero levels of an absmax-1 block rise strictly and end at exactly 1.
  std::vector<uint8_t> codes(256);
  for (int c = 0; c < 256; ++c) codes[size_t(c)] = uint8_t(c);
  std::vector<float> absmax(4, 1.0f), lv(256);
  dequantize_blockwise(codes.data(), absmax.data(), 256, 64, Map8::minifloat, lv.data());
  EXPECT_EQ(lv[0], 0.0f);
  EXPECT_EQ(lv[255], 1.0f);
  EXPECT_EQ(lv[1], 1.25f * std::ldexp(1.0f, -32));  // code 1: 31.75 octaves down
  for (int c = 1; c < 256; ++c) ASSERT_LT(lv[size_t(c - 1)], lv[size_t(c)]) << c;
  // Relative error <= 6.25% for values within 2^-31 of the block's absmax.
  std::mt19937 rng(3);
  const auto x = state_like(rng, 20000, true);
  const Quantized q = roundtrip(x, 2048, Map8::minifloat);
  for (size_t i = 0; i < x.size(); ++i) {
    const float amax = q.absmax[i / 2048];
    if (x[i] >= amax * std::exp2(-31.0f))
      ASSERT_LE(std::fabs(q.back[i] - x[i]), 0.0625f * x[i] * 1.0001f) << i;
    else
      ASSERT_LE(q.back[i], amax * std::exp2(-31.0f)) << i;
  }
}

TEST(Optim8, AnOutlierOnlyAffectsItsBlock) {
  std::mt19937 rng(4);
  for (Map8 map : {Map8::linear, Map8::minifloat}) {
    auto x = state_like(rng, 4 * 2048, map == Map8::minifloat);
    const Quantized before = roundtrip(x, 2048, map);
    x[2048 + 17] = 1e6f;  // block 1
    const Quantized after = roundtrip(x, 2048, map);
    for (int64_t i = 0; i < 4 * 2048; ++i) {
      if (i / 2048 == 1) continue;
      ASSERT_EQ(before.codes[size_t(i)], after.codes[size_t(i)]) << i;
    }
    EXPECT_EQ(after.absmax[1], 1e6f);
    EXPECT_EQ(before.absmax[0], after.absmax[0]);
    EXPECT_EQ(before.absmax[2], after.absmax[2]);
    EXPECT_EQ(before.absmax[3], after.absmax[3]);
  }
}

namespace {

// One step of each fused op on every kernel set and thread count; all must be equal.
struct State {
  std::vector<float> p, g, ma, va, u;
  std::vector<int8_t> m;
  std::vector<uint8_t> v;
};

State make_state(int64_t n, int64_t block, uint32_t seed) {
  std::mt19937 rng(seed);
  State s;
  s.p = random_floats(rng, n, -1.0f, 1.0f);
  s.g = state_like(rng, n, false);
  const auto m0 = state_like(rng, n, false), v0 = state_like(rng, n, true);
  const int64_t nb = optim8_num_blocks(n, block);
  s.m.resize(static_cast<size_t>(n));
  s.v.resize(static_cast<size_t>(n));
  s.ma.resize(size_t(nb));
  s.va.resize(size_t(nb));
  s.u.assign(size_t(n), 0.0f);
  quantize_blockwise(m0.data(), n, block, Map8::linear, s.m.data(), s.ma.data());
  quantize_blockwise(v0.data(), n, block, Map8::minifloat, s.v.data(), s.va.data());
  return s;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

}  // namespace

TEST(Optim8, EveryKernelMatchesTheScalarReferenceBitForBit) {
  GlobalStateGuard guard;
  const int64_t block = 128;
  for (int64_t n : {1, 17, 128, 1000, 70001}) {
    State ref = make_state(n, block, 7);
    const int64_t nb = optim8_num_blocks(n, block);
    for (int step = 1; step <= 3; ++step) {
      AdamW8Args a{ref.p.data(), ref.g.data(), ref.m.data(), ref.ma.data(), ref.v.data(),
                   ref.va.data(), n, block, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f,
                   1.0f - std::pow(0.9f, float(step)), 1.0f - std::pow(0.95f, float(step))};
      kOptim8Scalar.adamw(a, 0, nb);
    }
    for (Isa isa : supported_isas())
      for (int threads : {1, 2}) {
        set_isa(isa);
        const Optim8Kernels* k = &optim8_kernels();
        set_num_threads(threads);
        State s = make_state(n, block, 7);
        for (int step = 1; step <= 3; ++step) {
          AdamW8Args a{s.p.data(), s.g.data(), s.m.data(), s.ma.data(), s.v.data(), s.va.data(),
                       n, block, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f,
                       1.0f - std::pow(0.9f, float(step)), 1.0f - std::pow(0.95f, float(step))};
          adamw8_step(a);  // the threaded driver, on the pinned ISA's kernels
        }
        ASSERT_TRUE(same_bits(s.p, ref.p)) << k->name << " n " << n;
        ASSERT_EQ(s.m, ref.m) << k->name;
        ASSERT_EQ(s.v, ref.v) << k->name;
        ASSERT_TRUE(same_bits(s.ma, ref.ma) && same_bits(s.va, ref.va)) << k->name;
      }
    // Lion and momentum
    State lref = make_state(n, block, 9), mref = make_state(n, block, 11);
    kOptim8Scalar.lion({lref.p.data(), lref.g.data(), lref.m.data(), lref.ma.data(), n, block,
                        1e-4f, 0.9f, 0.99f, 0.3f}, 0, nb);
    kOptim8Scalar.momentum({mref.g.data(), mref.m.data(), mref.ma.data(), mref.u.data(), n, block,
                            0.95f, true}, 0, nb);
    for (Isa isa : supported_isas())
      for (int threads : {1, 2}) {
        set_isa(isa);
        const Optim8Kernels* k = &optim8_kernels();
        set_num_threads(threads);
        State l = make_state(n, block, 9), m = make_state(n, block, 11);
        Lion8Args la{l.p.data(), l.g.data(), l.m.data(), l.ma.data(), n, block, 1e-4f, 0.9f, 0.99f, 0.3f};
        Momentum8Args ma{m.g.data(), m.m.data(), m.ma.data(), m.u.data(), n, block, 0.95f, true};
        lion8_step(la);
        momentum8_step(ma);
        ASSERT_TRUE(same_bits(l.p, lref.p)) << k->name;
        ASSERT_EQ(l.m, lref.m) << k->name;
        ASSERT_TRUE(same_bits(m.u, mref.u)) << k->name;
        ASSERT_EQ(m.m, mref.m) << k->name;
        ASSERT_TRUE(same_bits(m.ma, mref.ma)) << k->name;
      }
  }
}

TEST(Optim8, EachIsaPicksItsKernelTable) {
  GlobalStateGuard guard;
  for (Isa isa : supported_isas()) {
    const std::string want = isa == Isa::avx512 || isa == Isa::avx512vnni ? "avx512"
                             : is_x86(isa)                                 ? "avx2"
                             : is_arm(isa)                                 ? "neon"
                                                                           : "scalar";
    EXPECT_EQ(optim8_kernels(isa).name, want) << isa_name(isa);
  }
}

// Every SIMD table against the scalar reference on the values a kernel gets wrong first
// (NaN, infinities, -0, subnormals, a block whose absmax is 0) and on every tail length.
TEST(Optim8, SimdCodeMapsMatchTheScalarReferenceOnEdgeValues) {
  std::vector<const Optim8Kernels*> tables;
  for (Isa isa : supported_isas())
    if (&optim8_kernels(isa) != &kOptim8Scalar) tables.push_back(&optim8_kernels(isa));
  if (tables.empty()) GTEST_SKIP() << "no SIMD kernels on this CPU";
  const float inf = INFINITY, nan = NAN;
  const std::vector<float> specials = {nan, inf, -inf, -0.0f, 0.0f, 1e-40f, -1e-40f, 3.0f,
                                       -2.5f, 1e30f, -7e-20f, 0.5f, 126.5f, -126.5f};
  std::mt19937 rng(21);
  for (int64_t len = 1; len <= 70; ++len)
    for (int variant = 0; variant < 3; ++variant) {
      std::vector<float> x = random_floats(rng, len, -4.0f, 4.0f);
      if (variant == 1)
        for (int64_t i = 0; i < len; i += 3) x[size_t(i)] = specials[size_t(i) % specials.size()];
      if (variant == 2) std::fill(x.begin(), x.end(), 0.0f);  // absmax 0
      for (Map8 map : {Map8::linear, Map8::minifloat}) {
        std::vector<uint8_t> c0(static_cast<size_t>(len)), c1(static_cast<size_t>(len));
        float a0 = -1, a1 = -1;
        kOptim8Scalar.quantize(x.data(), len, 64, map, c0.data(), &a0, 0, 1);
        std::vector<float> d0(static_cast<size_t>(len)), d1(static_cast<size_t>(len));
        for (const Optim8Kernels* k : tables) {
          const std::vector<float> x_before = x;
          k->quantize(x.data(), len, 64, map, c1.data(), &a1, 0, 1);
          ASSERT_TRUE(same_bits(x, x_before));
          ASSERT_EQ(std::memcmp(&a0, &a1, 4), 0) << k->name << " len " << len << " v " << variant;
          ASSERT_EQ(c0, c1) << k->name << " len " << len << " variant " << variant;
          kOptim8Scalar.dequantize(c0.data(), &a0, len, 64, map, d0.data(), 0, 1);
          k->dequantize(c0.data(), &a0, len, 64, map, d1.data(), 0, 1);
          ASSERT_TRUE(same_bits(d0, d1)) << k->name << " len " << len;
        }
      }
    }
}

TEST(Optim8, AdamWStepMatchesDoublePrecision) {
  GlobalStateGuard guard;
  const int64_t n = 3000, block = 256;
  State s = make_state(n, block, 5);
  std::vector<float> m0(static_cast<size_t>(n)), v0(static_cast<size_t>(n));
  dequantize_blockwise(s.m.data(), s.ma.data(), n, block, Map8::linear, m0.data());
  dequantize_blockwise(s.v.data(), s.va.data(), n, block, Map8::minifloat, v0.data());
  const std::vector<float> p0 = s.p;
  const double lr = 1e-2, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, bc1 = 0.2, bc2 = 0.3;
  adamw8_step({s.p.data(), s.g.data(), s.m.data(), s.ma.data(), s.v.data(), s.va.data(), n, block,
               float(lr), float(b1), float(b2), float(eps), float(wd), float(bc1), float(bc2)});
  std::vector<float> m1(static_cast<size_t>(n)), v1(static_cast<size_t>(n));
  dequantize_blockwise(s.m.data(), s.ma.data(), n, block, Map8::linear, m1.data());
  dequantize_blockwise(s.v.data(), s.va.data(), n, block, Map8::minifloat, v1.data());
  for (int64_t i = 0; i < n; ++i) {
    const double g = s.g[size_t(i)];
    const double m = b1 * m0[size_t(i)] + (1 - b1) * g;
    const double v = b2 * v0[size_t(i)] + (1 - b2) * g * g;
    const double p = p0[size_t(i)] * (1 - lr * wd) - lr / bc1 * m / (std::sqrt(v / bc2) + eps);
    ASSERT_NEAR(s.p[size_t(i)], p, 1e-5 * (1 + std::fabs(p))) << i;
    ASSERT_NEAR(m1[size_t(i)], m, s.ma[size_t(i / block)] / 254.0 * 1.001) << i;
    ASSERT_LE(std::fabs(v1[size_t(i)] - v), 0.0625 * v + s.va[size_t(i / block)] * 1e-9) << i;
  }
}

TEST(Optim8, BadArgumentsThrowNamingTheProblem) {
  std::vector<float> x(256), a(4);
  std::vector<uint8_t> c(256);
  for (int64_t block : {int64_t(0), int64_t(100), int64_t(-64), int64_t(1) << 21}) {
    try {
      quantize_blockwise(x.data(), 256, block, Map8::linear, c.data(), a.data());
      FAIL() << "block " << block << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("block_size"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(quantize_blockwise(x.data(), -1, 64, Map8::linear, c.data(), a.data()), Error);
  EXPECT_THROW(quantize_blockwise(nullptr, 256, 64, Map8::linear, c.data(), a.data()), Error);
  std::vector<int8_t> m(256);
  std::vector<float> g(256), p(256);
  Lion8Args l{p.data(), g.data(), m.data(), a.data(), 256, 64, 1e-4f, 0.9f, 1.5f, 0.0f};
  try {
    lion8_step(l);
    FAIL() << "beta2 1.5 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("beta2"), std::string::npos) << e.what();
  }
  // An empty tensor is fine and touches nothing.
  EXPECT_NO_THROW(quantize_blockwise(nullptr, 0, 64, Map8::linear, nullptr, nullptr));
}
