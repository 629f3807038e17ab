// Sampler: greedy and its ties, top-k = 1, the top-p support, the empirical distribution
// against softmax(logits / T), the CTRL penalty, seeds, non-finite logits and bad config.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "nanochat/error.hpp"

using nanochat::Error;
using nanochat::Sampler;
using nanochat::SamplerConfig;

namespace {

SamplerConfig cfg(float t, int32_t k = 0, float p = 1.0f, float pen = 1.0f, int32_t win = 64,
                  uint64_t seed = 0) {
  SamplerConfig c;
  c.temperature = t;
  c.top_k = k;
  c.top_p = p;
  c.repetition_penalty = pen;
  c.repetition_window = win;
  c.seed = seed;
  return c;
}

int32_t draw(Sampler& s, std::vector<float> logits, const std::vector<int32_t>& hist = {}) {
  return s.sample(logits.data(), static_cast<int32_t>(logits.size()), hist);
}

std::vector<double> softmax(const std::vector<float>& x, double t) {
  const double mx = *std::max_element(x.begin(), x.end());
  std::vector<double> p(x.size());
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i) sum += p[i] = std::exp((x[i] - mx) / t);
  for (double& v : p) v /= sum;
  return p;
}

// Every frequency within 5 standard deviations of its probability.
void expect_distribution(Sampler& s, const std::vector<float>& logits,
                         const std::vector<double>& want, int n) {
  std::vector<int> count(logits.size(), 0);
  for (int i = 0; i < n; ++i) ++count[static_cast<size_t>(draw(s, logits))];
  for (size_t i = 0; i < want.size(); ++i) {
    const double sd = std::sqrt(want[i] * (1 - want[i]) / n);
    EXPECT_NEAR(static_cast<double>(count[i]) / n, want[i], 5 * sd + 1e-12) << "token " << i;
  }
}

std::string error_of(const SamplerConfig& c) {
  try {
    Sampler s(c);
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST(Sampler, GreedyIsArgmaxLowestIdOnTies) {
  Sampler s(cfg(0.0f));
  EXPECT_EQ(draw(s, {0.1f, 3.0f, -2.0f, 2.9f}), 1);
  EXPECT_EQ(draw(s, {1.0f, 5.0f, 5.0f, 5.0f}), 1);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(draw(s, {nan, 1.0f, 2.0f, nan}), 2);
  EXPECT_EQ(draw(s, {-inf, -inf, -inf}), 0);
  EXPECT_THROW(draw(s, {nan, nan}), Error);
  Sampler neg(cfg(-1.0f));
  EXPECT_EQ(draw(neg, {0.0f, -1.0f, 7.0f}), 2);
}

TEST(Sampler, TopK1EqualsGreedy) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  Sampler greedy(cfg(0.0f));
  for (uint64_t seed = 0; seed < 50; ++seed) {
    Sampler k1(cfg(1.5f, 1, 1.0f, 1.0f, 64, seed));
    std::vector<float> x(1000);
    for (float& v : x) v = std::round(nd(rng));  // many ties
    EXPECT_EQ(draw(k1, x), draw(greedy, x));
  }
}

TEST(Sampler, TopPKeepsOnlyTheNucleus) {
  // probabilities 0.5, 0.3, 0.15, 0.05
  const std::vector<float> x = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                std::log(0.05f)};
  auto support = [&](float p, int32_t k) {
    Sampler s(cfg(1.0f, k, p, 1.0f, 64, 9));
    std::set<int32_t> seen;
    for (int i = 0; i < 4000; ++i) seen.insert(draw(s, x));
    return seen;
  };
  EXPECT_EQ(support(0.7f, 0), (std::set<int32_t>{0, 1}));
  EXPECT_EQ(support(0.45f, 0), (std::set<int32_t>{0}));
  EXPECT_EQ(support(0.9f, 0), (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(support(1.0f, 0), (std::set<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(support(1.0f, 2), (std::set<int32_t>{0, 1}));
  EXPECT_EQ(support(0.9f, 2), (std::set<int32_t>{0, 1}));  // top-k first, then top-p of 0.8
  EXPECT_EQ(support(0.6f, 3), (std::set<int32_t>{0, 1}));  // 0.5/0.95 < 0.6
}

TEST(Sampler, TopPOverManyTokensMatchesReferenceNucleus) {
  // A flat distribution: the nucleus runs past the first sorted chunks (64, 256).
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  std::vector<float> x(1000);
  for (float& v : x) v = ud(rng);
  const double t = 0.8, p = 0.6;
  std::vector<double> prob = softmax(x, t);
  std::vector<int32_t> order(x.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return x[a] > x[b]; });
  std::set<int32_t> nucleus;
  double cum = 0;
  for (int32_t id : order) {
    nucleus.insert(id);
    cum += prob[id];
    if (cum >= p) break;
  }
  ASSERT_GT(nucleus.size(), 300u);
  Sampler s(cfg(static_cast<float>(t), 0, static_cast<float>(p), 1.0f, 64, 3));
  std::set<int32_t> seen;
  for (int i = 0; i < 5000; ++i) seen.insert(draw(s, x));
  for (int32_t id : seen) EXPECT_TRUE(nucleus.count(id)) << id;
  EXPECT_GT(seen.size(), nucleus.size() * 9 / 10);
}

TEST(Sampler, EmpiricalDistributionMatchesSoftmax) {
  const std::vector<float> x = {1.0f, 0.5f, 0.0f, -0.5f, -1.0f, 2.0f};
  for (float t : {0.7f, 1.0f, 2.5f}) {
    Sampler s(cfg(t, 0, 1.0f, 1.0f, 64, 123));
    expect_distribution(s, x, softmax(x, t), 100000);
  }
  // top-k path (sorted candidates): renormalized over the 4 largest
  Sampler k4(cfg(0.7f, 4, 1.0f, 1.0f, 64, 7));
  std::vector<double> want = softmax({1.0f, 0.5f, 0.0f, 2.0f}, 0.7);
  want = {want[0], want[1], want[2], 0.0, 0.0, want[3]};
  expect_distribution(k4, x, want, 100000);
}

TEST(Sampler, RepetitionPenaltyCtrlStyle) {
  Sampler s(cfg(0.0f, 0, 1.0f, 2.0f, 3));
  std::vector<float> x = {2.0f, 1.5f, -1.0f, 0.5f, 4.0f};
  // Window 3 of {4, 0, 2, 0}: {0, 2} (4 is outside), each once despite 0 twice.
  EXPECT_EQ(s.sample(x.data(), 5, {4, 0, 2, 0}), 4);
  EXPECT_EQ(x, (std::vector<float>{1.0f, 1.5f, -2.0f, 0.5f, 4.0f}));
  // Penalizing the top token changes the greedy choice.
  std::vector<float> y = {2.0f, 1.5f, 0.0f};
  EXPECT_EQ(s.sample(y.data(), 3, {0}), 1);
  // Window 0 and penalty 1 are off.
  Sampler off(cfg(0.0f, 0, 1.0f, 2.0f, 0));
  EXPECT_EQ(draw(off, {2.0f, 1.5f}, {0}), 0);
  Sampler one(cfg(0.0f, 0, 1.0f, 1.0f, 64));
  EXPECT_EQ(draw(one, {2.0f, 1.5f}, {0, 0, 99}), 0);  // (not even range-checked when off)
  // A penalty < 1 favours repeats.
  Sampler fav(cfg(0.0f, 0, 1.0f, 0.5f, 64));
  EXPECT_EQ(draw(fav, {2.0f, 1.5f}, {1}), 1);
  // The history ids the penalty uses must be in range.
  EXPECT_THROW(draw(s, {1.0f, 2.0f}, {5}), Error);
  EXPECT_THROW(draw(s, {1.0f, 2.0f}, {-1}), Error);
}

TEST(Sampler, SameSeedSameSequence) {
  std::vector<float> x(32768);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (float& v : x) v = nd(rng);
  for (const SamplerConfig& c : {cfg(0.9f), cfg(0.9f, 40), cfg(0.9f, 0, 0.9f),
                                 cfg(0.9f, 100, 0.95f, 1.3f)}) {
    SamplerConfig c1 = c, c2 = c, c3 = c;
    c1.seed = c2.seed = 42;
    c3.seed = 43;
    Sampler a(c1), b(c2), d(c3);
    std::vector<int32_t> sa, sb, sd, hist;
    for (int i = 0; i < 20; ++i) {
      sa.push_back(draw(a, x, hist));
      sb.push_back(draw(b, x, hist));
      sd.push_back(draw(d, x, hist));
      hist.push_back(sa.back());
    }
    EXPECT_EQ(sa, sb);
    EXPECT_NE(sa, sd);
  }
}

TEST(Sampler, FixedDrawsForAFixedSeed) {
  // The draw is mt19937_64 (fully specified by the standard) -> top 53 bits -> [0, 1): the
  // same tokens on every platform. Uniform logits make the token floor(u * n).
  Sampler s(cfg(1.0f, 0, 1.0f, 1.0f, 64, 5489));
  std::mt19937_64 ref(5489);
  for (int i = 0; i < 100; ++i) {
    const double u = static_cast<double>(ref() >> 11) * 0x1.0p-53;
    EXPECT_EQ(draw(s, std::vector<float>(1000, 0.25f)), static_cast<int32_t>(u * 1000));
  }
}

TEST(Sampler, NonFiniteLogits) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const SamplerConfig& c : {cfg(1.0f), cfg(1.0f, 2), cfg(1.0f, 0, 0.5f)}) {
    Sampler s(c);
    for (int i = 0; i < 200; ++i) {
      const int32_t t = draw(s, {nan, 0.0f, -inf, 0.0f, nan});
      EXPECT_TRUE(t == 1 || t == 3) << t;
    }
    EXPECT_EQ(draw(s, {0.0f, inf, 1.0f, inf}), 1);
    EXPECT_THROW(draw(s, {nan, -inf}), Error);
  }
}

TEST(Sampler, BadConfigNamesTheParameter) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_NE(error_of(cfg(nan)).find("temperature"), std::string::npos);
  EXPECT_NE(error_of(cfg(inf)).find("temperature"), std::string::npos);
  for (float p : {0.0f, -0.1f, 1.5f, nan})
    EXPECT_NE(error_of(cfg(1.0f, 0, p)).find("top_p"), std::string::npos) << p;
  EXPECT_NE(error_of(cfg(1.0f, -1)).find("top_k"), std::string::npos);
  for (float pen : {0.0f, -1.0f, nan, inf})
    EXPECT_NE(error_of(cfg(1.0f, 0, 1.0f, pen)).find("repetition_penalty"), std::string::npos);
  EXPECT_NE(error_of(cfg(1.0f, 0, 1.0f, 1.0f, -1)).find("repetition_window"),
            std::string::npos);
  EXPECT_EQ(error_of(cfg(1.0f, 5, 0.5f, 1.2f, 0)), "<no error>");
  Sampler s(cfg(1.0f));
  std::vector<float> x(4, 0.0f);
  EXPECT_THROW(s.sample(x.data(), 0, {}), Error);
  EXPECT_THROW(s.sample(nullptr, 4, {}), Error);
  // top_k >= n_vocab is simply off.
  Sampler big(cfg(1.0f, 100));
  EXPECT_GE(draw(big, {0.0f, 1.0f}), 0);
}
