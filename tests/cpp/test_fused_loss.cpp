// The fused linear cross-entropy (csrc/loss): loss and gradients against plain
// double-precision math on odd sizes with ignored targets, every ISA and thread count,
// chunk-size invariance, the SIMD micro-tiles bit-equal to the scalar reference (F32 on
// AVX2 and AVX-512), the SIMD cross-entropy rows within their
// float bound of it, the bf16 path's error bound, and argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "common/cpu.h"
#include "loss/fused_loss.h"
#include "test_util.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;
using nanochat_test::random_floats;

namespace {

struct Problem {
  int64_t heads, tokens, vocab, dim;
  std::vector<float> w, h, hw;
  std::vector<int32_t> y;
};

Problem make(std::mt19937& rng, int64_t heads, int64_t tokens, int64_t vocab, int64_t dim) {
  Problem p{heads, tokens, vocab, dim, random_floats(rng, vocab * dim, -0.5f, 0.5f),
            random_floats(rng, heads * tokens * dim, -1.0f, 1.0f), {}, {}};
  for (int64_t i = 0; i < heads; ++i) p.hw.push_back(1.0f / float(1 + i));
  std::uniform_int_distribution<int32_t> tok(0, int32_t(vocab - 1));
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t i = 0; i < heads * tokens; ++i) p.y.push_back(u(rng) < 0.2 ? -1 : tok(rng));
  return p;
}

struct Result {
  float total;
  std::vector<float> loss, gh, gw;
};

Result run(const Problem& p, Isa isa, int64_t chunk, bool grad = true,
           LossPrecision prec = LossPrecision::f32) {
  Result r{0, std::vector<float>(size_t(p.heads)), {}, {}};
  if (grad) {
    r.gh.assign(size_t(p.heads * p.tokens * p.dim), 7.0f);  // overwritten, not accumulated
    r.gw.assign(size_t(p.vocab * p.dim), 7.0f);
  }
  FusedLossArgs a;
  a.weight = p.w.data();
  a.vocab = p.vocab;
  a.dim = p.dim;
  a.hidden = p.h.data();
  a.targets = p.y.data();
  a.heads = p.heads;
  a.tokens = p.tokens;
  a.head_weights = p.hw.data();
  a.loss = r.loss.data();
  a.grad_hidden = grad ? r.gh.data() : nullptr;
  a.grad_weight = grad ? r.gw.data() : nullptr;
  a.chunk = chunk;
  a.precision = prec;
  r.total = fused_linear_cross_entropy(a, isa);
  return r;
}

// Plain double-precision math: logits, softmax, mean CE over non-ignored tokens.
Result reference(const Problem& p) {
  const int64_t T = p.tokens, V = p.vocab, D = p.dim;
  Result r{0, std::vector<float>(size_t(p.heads)), std::vector<float>(size_t(p.heads * T * D)),
           std::vector<float>(size_t(V * D))};
  std::vector<double> gw(static_cast<size_t>(V * D)), z(static_cast<size_t>(V));
  double total = 0;
  for (int64_t i = 0; i < p.heads; ++i) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) n += p.y[i * T + t] >= 0;
    double sum = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int32_t y = p.y[i * T + t];
      if (y < 0) continue;
      const float* h = p.h.data() + (i * T + t) * D;
      double m = -1e300;
      for (int64_t v = 0; v < V; ++v) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(h[d]) * p.w[v * D + d];
        z[v] = s;
        m = std::max(m, s);
      }
      double se = 0;
      for (int64_t v = 0; v < V; ++v) se += std::exp(z[v] - m);
      sum += m + std::log(se) - z[y];
      const double scale = double(p.hw[i]) / double(n);
      for (int64_t v = 0; v < V; ++v) {
        const double g = (std::exp(z[v] - m) / se - (v == y)) * scale;
        for (int64_t d = 0; d < D; ++d) {
          r.gh[(i * T + t) * D + d] += float(g * p.w[v * D + d]);
          gw[v * D + d] += g * h[d];
        }
      }
    }
    r.loss[i] = n ? float(sum / n) : 0.0f;
    total += p.hw[i] * r.loss[i];
  }
  for (size_t k = 0; k < gw.size(); ++k) r.gw[k] = float(gw[k]);
  r.total = float(total);
  return r;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

std::vector<Isa> isas() {
  std::vector<Isa> v = {Isa::scalar};
  if (isa_supported(Isa::avx2)) v.push_back(Isa::avx2);
  if (isa_supported(Isa::avx512)) v.push_back(Isa::avx512);
  if (isa_supported(Isa::neon)) v.push_back(Isa::neon);
  return v;
}

#if defined(NANOCHAT_HAVE_X86_KERNELS) || defined(NANOCHAT_HAVE_ARM_KERNELS)
#define NANOCHAT_HAVE_SIMD_LOSS 1
// The SIMD kernel tables this CPU runs, by name, each with the scalar reference at its
// tile shape.
struct Simd {
  const char* name;
  const loss_kernels::Kernels* k;
  const loss_kernels::Kernels* ref;
};
std::vector<Simd> simd_kernels() {
  std::vector<Simd> v;
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (isa_supported(Isa::avx2)) v.push_back({"avx2", &loss_kernels::avx2, &loss_kernels::scalar_6x16});
  if (isa_supported(Isa::avx512)) v.push_back({"avx512", &loss_kernels::avx512, &loss_kernels::scalar});
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  v.push_back({"neon", &loss_kernels::neon, &loss_kernels::scalar_6x16});
#endif
  return v;
}
#endif

}  // namespace

TEST(FusedLoss, MatchesDoublePrecisionReference) {
  GlobalStateGuard guard;
  std::mt19937 rng(1);
  // Odd sizes: partial micro-tiles in every GEMM, K not a multiple of the block.
  const Problem p = make(rng, 3, 45, 301, 37);
  const Result ref = reference(p);
  for (Isa isa : isas())
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      const Result r = run(p, isa, 16);
      SCOPED_TRACE(std::string(isa_name(isa)) + " threads " + std::to_string(threads));
      EXPECT_NEAR(r.total, ref.total, 1e-5);
      for (int64_t i = 0; i < p.heads; ++i) EXPECT_NEAR(r.loss[i], ref.loss[i], 1e-5);
      EXPECT_LT(max_abs_diff(r.gh, ref.gh), 1e-6);
      EXPECT_LT(max_abs_diff(r.gw, ref.gw), 1e-6);
    }
}

TEST(FusedLoss, ChunkSizeDoesNotChangeResults) {
  GlobalStateGuard guard;
  std::mt19937 rng(2);
  const Problem p = make(rng, 2, 100, 97, 300);  // dim > KC: two K blocks in h W^T
  for (Isa isa : isas()) {
    const Result base = run(p, isa, 1000);
    for (int64_t chunk : {1, 7, 13, 64}) {
      const Result r = run(p, isa, chunk);
      // Every row's logits, loss and grad_h are independent of the chunk; only grad_W's
      // sum over tokens is split differently.
      EXPECT_EQ(r.loss, base.loss) << "chunk " << chunk;
      EXPECT_EQ(r.gh, base.gh) << "chunk " << chunk;
      EXPECT_LT(max_abs_diff(r.gw, base.gw), 1e-6) << "chunk " << chunk;
    }
  }
}

TEST(FusedLoss, ThreadCountDoesNotChangeResults) {
  GlobalStateGuard guard;
  std::mt19937 rng(3);
  const Problem p = make(rng, 2, 70, 500, 64);
  for (Isa isa : isas()) {
    set_num_threads(1);
    const Result one = run(p, isa, 32);
    set_num_threads(2);
    const Result two = run(p, isa, 32);
    EXPECT_EQ(one.loss, two.loss);
    EXPECT_EQ(one.gh, two.gh);
    EXPECT_EQ(one.gw, two.gw);
  }
}

TEST(FusedLoss, LossOnlyEqualsLossWithGradients) {
  std::mt19937 rng(4);
  const Problem p = make(rng, 2, 30, 200, 48);
  for (Isa isa : isas()) {
    const Result a = run(p, isa, 8, false), b = run(p, isa, 8, true);
    EXPECT_EQ(a.loss, b.loss);
    EXPECT_EQ(a.total, b.total);
  }
}

TEST(FusedLoss, AllIgnoredHeadIsZeroWithZeroGradient) {
  std::mt19937 rng(5);
  Problem p = make(rng, 2, 10, 50, 16);
  for (int64_t t = 0; t < p.tokens; ++t) p.y[p.tokens + t] = -1;  // head 1: nothing to predict
  const Result r = run(p, Isa::scalar, 4);
  EXPECT_EQ(r.loss[1], 0.0f);
  for (int64_t k = p.tokens * p.dim; k < 2 * p.tokens * p.dim; ++k) ASSERT_EQ(r.gh[k], 0.0f);
  EXPECT_GT(r.loss[0], 0.0f);
}

TEST(FusedLoss, NoTargetsAtAllGivesZeroGradients) {
  std::mt19937 rng(11);
  Problem p = make(rng, 2, 6, 40, 8);
  std::fill(p.y.begin(), p.y.end(), -1);
  for (Isa isa : isas()) {
    const Result r = run(p, isa, 4);  // run() fills the outputs with 7 first
    EXPECT_EQ(r.total, 0.0f);
    for (float g : r.gw) ASSERT_EQ(g, 0.0f) << isa_name(isa);
    for (float g : r.gh) ASSERT_EQ(g, 0.0f) << isa_name(isa);
  }
}

TEST(FusedLoss, F32MicroTileBitEqualsScalar) {
#ifdef NANOCHAT_HAVE_SIMD_LOSS
  using namespace loss_kernels;
  if (simd_kernels().empty()) GTEST_SKIP() << "no SIMD loss kernels on this CPU";
  std::mt19937 rng(6);
  const int64_t kc = 77;
  for (auto [name, k, ref] : simd_kernels()) {
    ASSERT_EQ(k->mr, ref->mr);
    ASSERT_EQ(k->nr, ref->nr);
    // Two panels back to back, as the driver packs them (the AVX2 kernel prefetches the
    // second while it computes the first).
    const auto ap = random_floats(rng, 2 * kc * k->mr, -1, 1);
    const auto bp = random_floats(rng, kc * k->nr, -1, 1);
    for (bool acc : {false, true}) {
      std::vector<float> c1 = random_floats(rng, k->mr * 40, -1, 1), c2 = c1;
      ref->f32(kc, ap.data(), bp.data(), c1.data(), 40, acc);
      k->f32(kc, ap.data(), bp.data(), c2.data(), 40, acc);
      EXPECT_EQ(c1, c2) << name << " accumulate " << acc;
    }
  }
#else
  GTEST_SKIP() << "no SIMD loss kernels in this build";
#endif
}

TEST(FusedLoss, SimdCrossEntropyRowWithinBoundOfScalar) {
#ifdef NANOCHAT_HAVE_SIMD_LOSS
  using namespace loss_kernels;
  if (simd_kernels().empty()) GTEST_SKIP() << "no SIMD loss kernels on this CPU";
  std::mt19937 rng(10);
  // Lengths with every tail (n mod 8 and mod 16), logits spread over ~60 nats so that some
  // exps reach the clamp at -87.
  for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 4099}) {
    const auto x = random_floats(rng, n, -30.0f, 30.0f);
    const int32_t t = int32_t(n / 3);
    std::vector<float> g0 = x;
    const float l0 = scalar.ce_row(g0.data(), n, t, 0.25f, true);
    for (auto [name, k, ref] : simd_kernels()) {
      (void)ref;
      SCOPED_TRACE(std::string(name) + " n " + std::to_string(n));
      std::vector<float> g1 = x, l = x;
      const float l1 = k->ce_row(g1.data(), n, t, 0.25f, true);
      // The loss: f32 sums and a ~1-ulp exp against a double sum, relative 1e-6 of the
      // logsumexp (|lse| <= ~40 here).
      EXPECT_NEAR(l1, l0, 4e-5);
      EXPECT_EQ(k->ce_row(l.data(), n, t, 0.25f, false), l1);  // loss only: same value
      EXPECT_EQ(l, x);                                         // and x untouched
      // The gradient: softmax * scale - onehot * scale, each entry within 1e-6 relative of
      // the scale (0.25).
      for (int64_t j = 0; j < n; ++j) ASSERT_NEAR(g1[j], g0[j], 2.5e-7) << "j " << j;
    }
  }
#else
  GTEST_SKIP() << "no SIMD loss kernels in this build";
#endif
}

TEST(FusedLoss, Bf16StaysWithinItsErrorBound) {
  std::mt19937 rng(7);
  const Problem p = make(rng, 2, 64, 300, 96);
  const Result f = run(p, Isa::scalar, 32);
  std::vector<Isa> v = {Isa::scalar};
  if (isa_supported(Isa::avx2)) v.push_back(Isa::avx2);
  if (isa_supported(Isa::avx512) && cpu_features().avx512bf16) v.push_back(Isa::avx512);
  if (isa_supported(Isa::neon)) v.push_back(Isa::neon);
  for (Isa isa : v) {
    SCOPED_TRACE(isa_name(isa));
    ASSERT_TRUE(loss_precision_supported(LossPrecision::bf16, isa));
    const Result b = run(p, isa, 32, true, LossPrecision::bf16);
    // bf16 operands carry 8 mantissa bits (relative rounding <= 2^-9): logits of size
    // ~sqrt(96) * 0.3 move by ~1e-2 at worst, the mean loss far less.
    for (int64_t i = 0; i < p.heads; ++i) EXPECT_NEAR(b.loss[i], f.loss[i], 5e-3);
    double gmax = 0;
    for (float g : f.gw) gmax = std::max(gmax, double(std::fabs(g)));
    EXPECT_LT(max_abs_diff(b.gw, f.gw), 0.02 * gmax);
    EXPECT_GT(max_abs_diff(b.gw, f.gw), 0.0);  // it really ran in bf16
  }
}

TEST(FusedLoss, RejectsBadArguments) {
  std::mt19937 rng(8);
  Problem p = make(rng, 1, 4, 10, 8);
  EXPECT_THROW(run(p, Isa::scalar, 0), Error);
  p.y[2] = 10;  // == vocab
  try {
    run(p, Isa::scalar, 4);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("targets[0, 2] = 10"), std::string::npos) << e.what();
  }
  p.y[2] = -2;
  EXPECT_THROW(run(p, Isa::scalar, 4), Error);
  p.y[2] = 0;
  FusedLossArgs a;
  std::vector<float> loss(1), gh(32);
  a.weight = p.w.data();
  a.vocab = 10;
  a.dim = 8;
  a.hidden = p.h.data();
  a.targets = p.y.data();
  a.heads = 1;
  a.tokens = 4;
  a.head_weights = p.hw.data();
  a.loss = loss.data();
  a.grad_hidden = gh.data();  // without grad_weight
  EXPECT_THROW(fused_linear_cross_entropy(a, Isa::scalar), Error);
  EXPECT_THROW(loss_precision_from_name("fp8"), Error);
}

// ---- per-token losses, per-token gradient scales and row subsets ------------------------

namespace {

struct RowsRun {
  std::vector<float> row_loss, gh, gw;
};

// The per-token call: row_loss out, gradient scales per token (`scale`, heads x tokens) and
// the positions `rows` (empty: every token).
RowsRun run_rows(const Problem& p, Isa isa, int64_t chunk, const std::vector<float>& scale,
                 const std::vector<int64_t>& rows, bool all_rows = false) {
  RowsRun r{std::vector<float>(size_t(p.heads * p.tokens), 7.0f),
            std::vector<float>(size_t(p.heads * p.tokens * p.dim), 7.0f),
            std::vector<float>(size_t(p.vocab * p.dim), 7.0f)};
  std::vector<float> loss(size_t(p.heads));
  FusedLossArgs a;
  a.weight = p.w.data();
  a.vocab = p.vocab;
  a.dim = p.dim;
  a.hidden = p.h.data();
  a.targets = p.y.data();
  a.heads = p.heads;
  a.tokens = p.tokens;
  a.head_weights = p.hw.data();
  a.loss = loss.data();
  a.grad_hidden = r.gh.data();
  a.grad_weight = r.gw.data();
  a.chunk = chunk;
  a.row_loss = r.row_loss.data();
  a.row_scale = scale.data();
  if (!all_rows) {
    a.rows = rows.data();
    a.n_rows = int64_t(rows.size());
  }
  fused_linear_cross_entropy(a, isa);
  return r;
}

// Double-precision per-token losses and the gradients of sum_t scale_t * loss_t over `rows`.
RowsRun reference_rows(const Problem& p, const std::vector<float>& scale,
                       const std::vector<int64_t>& rows) {
  const int64_t T = p.tokens, V = p.vocab, D = p.dim;
  RowsRun r{std::vector<float>(size_t(p.heads * T)), std::vector<float>(size_t(p.heads * T * D)),
            std::vector<float>(size_t(V * D))};
  std::vector<double> gw(static_cast<size_t>(V * D)), z(static_cast<size_t>(V));
  for (int64_t i = 0; i < p.heads; ++i)
    for (int64_t t : rows) {
      const int32_t y = p.y[i * T + t];
      if (y < 0) continue;
      const float* h = p.h.data() + (i * T + t) * D;
      double m = -1e300;
      for (int64_t v = 0; v < V; ++v) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(h[d]) * p.w[v * D + d];
        z[size_t(v)] = s;
        m = std::max(m, s);
      }
      double se = 0;
      for (int64_t v = 0; v < V; ++v) se += std::exp(z[size_t(v)] - m);
      r.row_loss[size_t(i * T + t)] = float(m + std::log(se) - z[size_t(y)]);
      for (int64_t v = 0; v < V; ++v) {
        const double g = (std::exp(z[size_t(v)] - m) / se - (v == y)) * scale[size_t(i * T + t)];
        for (int64_t d = 0; d < D; ++d) {
          r.gh[size_t((i * T + t) * D + d)] += float(g * p.w[v * D + d]);
          gw[size_t(v * D + d)] += g * h[d];
        }
      }
    }
  for (size_t k = 0; k < gw.size(); ++k) r.gw[k] = float(gw[k]);
  return r;
}

std::vector<float> random_scales(std::mt19937& rng, const Problem& p) {
  return random_floats(rng, p.heads * p.tokens, -0.05f, 0.05f);
}

std::vector<int64_t> some_rows(std::mt19937& rng, int64_t T) {
  std::vector<int64_t> rows;
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t t = 0; t < T; ++t)
    if (u(rng) < 0.6) rows.push_back(t);
  return rows;
}

}  // namespace

TEST(FusedLoss, RowSubsetWithTokenScalesMatchesReference) {
  GlobalStateGuard guard;
  std::mt19937 rng(21);
  const Problem p = make(rng, 2, 45, 301, 37);
  const auto scale = random_scales(rng, p);
  const auto rows = some_rows(rng, p.tokens);
  const RowsRun ref = reference_rows(p, scale, rows);
  for (Isa isa : isas())
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      SCOPED_TRACE(std::string(isa_name(isa)) + " threads " + std::to_string(threads));
      const RowsRun r = run_rows(p, isa, 16, scale, rows);
      EXPECT_LT(max_abs_diff(r.row_loss, ref.row_loss), 1e-5);
      EXPECT_LT(max_abs_diff(r.gh, ref.gh), 1e-6);
      EXPECT_LT(max_abs_diff(r.gw, ref.gw), 1e-6);
      std::vector<bool> in(size_t(p.tokens));
      for (int64_t t : rows) in[size_t(t)] = true;
      for (int64_t i = 0; i < p.heads; ++i)
        for (int64_t t = 0; t < p.tokens; ++t) {
          if (in[size_t(t)] && p.y[size_t(i * p.tokens + t)] >= 0) continue;
          ASSERT_EQ(r.row_loss[size_t(i * p.tokens + t)], 0.0f);  // not computed: exactly 0
          for (int64_t d = 0; d < p.dim; ++d)
            ASSERT_EQ(r.gh[size_t((i * p.tokens + t) * p.dim + d)], 0.0f);
        }
    }
}

TEST(FusedLoss, SimdRowSubsetWithinBoundOfScalar) {
  GlobalStateGuard guard;
  std::mt19937 rng(22);
  const Problem p = make(rng, 2, 70, 500, 64);
  const auto scale = random_scales(rng, p);
  const auto rows = some_rows(rng, p.tokens);
  const RowsRun s = run_rows(p, Isa::scalar, 32, scale, rows);
  for (Isa isa : isas()) {
    if (isa == Isa::scalar) continue;
    SCOPED_TRACE(isa_name(isa));
    const RowsRun r = run_rows(p, isa, 32, scale, rows);
    EXPECT_LT(max_abs_diff(r.row_loss, s.row_loss), 4e-5);
    EXPECT_LT(max_abs_diff(r.gh, s.gh), 1e-6);
    EXPECT_LT(max_abs_diff(r.gw, s.gw), 1e-6);
  }
}

TEST(FusedLoss, TokenScalesOfTheMeanBitEqualTheMeanCall) {
  // row_scale = w_i / n_i on every token and every row listed: the same call as the mean
  // loss, bit for bit (the per-token path shares the driver), and row_loss sums to it.
  GlobalStateGuard guard;
  std::mt19937 rng(23);
  const Problem p = make(rng, 3, 40, 200, 48);
  std::vector<float> scale(size_t(p.heads * p.tokens));
  for (int64_t i = 0; i < p.heads; ++i) {
    int64_t n = 0;
    for (int64_t t = 0; t < p.tokens; ++t) n += p.y[size_t(i * p.tokens + t)] >= 0;
    for (int64_t t = 0; t < p.tokens; ++t)
      scale[size_t(i * p.tokens + t)] = float(double(p.hw[size_t(i)]) / double(n));
  }
  std::vector<int64_t> every(size_t(p.tokens));
  for (int64_t t = 0; t < p.tokens; ++t) every[size_t(t)] = t;
  for (Isa isa : isas()) {
    SCOPED_TRACE(isa_name(isa));
    const Result mean = run(p, isa, 8);
    for (bool all : {false, true}) {
      const RowsRun r = run_rows(p, isa, 8, scale, every, all);
      EXPECT_EQ(r.gh, mean.gh);
      EXPECT_EQ(r.gw, mean.gw);
      for (int64_t i = 0; i < p.heads; ++i) {
        double sum = 0;
        int64_t n = 0;
        for (int64_t t = 0; t < p.tokens; ++t) {
          sum += r.row_loss[size_t(i * p.tokens + t)];
          n += p.y[size_t(i * p.tokens + t)] >= 0;
        }
        EXPECT_EQ(float(sum / double(n)), mean.loss[size_t(i)]);
      }
    }
  }
}

TEST(FusedLoss, RejectsBadRows) {
  std::mt19937 rng(24);
  const Problem p = make(rng, 1, 6, 10, 8);
  const std::vector<float> scale(6, 1.0f);
  for (const std::vector<int64_t>& rows : {std::vector<int64_t>{2, 1}, {0, 6}, {-1},
                                           {3, 3}}) {
    try {
      run_rows(p, Isa::scalar, 4, scale, rows);
      FAIL() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("rows["), std::string::npos) << e.what();
    }
  }
}
