// Attention forward and backward over kept rows (csrc/attn): every ISA against softmax
// attention and its dense backward in double precision (full and windowed, grouped-query, head_dim off the 16-lane
// grid), kept rows against the masked dense backward, packed rows (doc_start: each query
// sees its own sequence only), and the shape / row-list / doc_start checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attn/attention.h"
#include "nanochat/error.hpp"
#include "ternary/dispatch.h"
#include "test_util.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;
using nanochat_test::random_floats;

namespace {

// Contiguous (B, heads, T, D) views.
HeadsView view(const std::vector<float>& a, int64_t h, int64_t t, int64_t d) {
  return {a.data(), h * t * d, t * d, d};
}
HeadsOut out(std::vector<float>& a, int64_t h, int64_t t, int64_t d) {
  return {a.data(), h * t * d, t * d, d};
}

struct Problem {
  AttentionShape s;
  std::vector<float> q, k, v, o, go, lse;
  std::vector<int64_t> doc;  // (B, T) sequence starts of packed rows; empty: none
  const int64_t* doc_start() const { return doc.empty() ? nullptr : doc.data(); }
  // double-precision dense gradients of sum(go * o), go zeroed outside `keep`
  std::vector<double> dq, dk, dv;
};

Problem make(int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D, int64_t window,
             const std::vector<char>& keep, std::mt19937& rng,
             const std::vector<int64_t>& doc = {}) {
  Problem p;
  p.s = {B, H, Hkv, T, D, window, float(1 / std::sqrt(double(D)))};
  p.doc = doc;
  p.q = random_floats(rng, B * H * T * D, -1, 1);
  p.k = random_floats(rng, B * Hkv * T * D, -1, 1);
  p.v = random_floats(rng, B * Hkv * T * D, -1, 1);
  p.go = random_floats(rng, B * H * T * D, -1, 1);
  p.o.assign(p.q.size(), 0.0f);
  p.lse.assign(size_t(B * H * T), 0.0f);
  p.dq.assign(p.q.size(), 0.0);
  p.dk.assign(p.k.size(), 0.0);
  p.dv.assign(p.v.size(), 0.0);
  const int64_t G = H / Hkv;
  const double sc = p.s.scale;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / G;
      auto Q = [&](int64_t t, int64_t d) { return double(p.q[size_t(((b * H + h) * T + t) * D + d)]); };
      auto Kx = [&](int64_t t, int64_t d) { return double(p.k[size_t(((b * Hkv + hk) * T + t) * D + d)]); };
      auto Vx = [&](int64_t t, int64_t d) { return double(p.v[size_t(((b * Hkv + hk) * T + t) * D + d)]); };
      for (int64_t i = 0; i < T; ++i) {
        int64_t lo = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
        if (!doc.empty()) lo = std::max(lo, doc[size_t(b * T + i)]);
        std::vector<double> P(size_t(i + 1), 0.0), dP(size_t(i + 1), 0.0);
        double mx = -1e300, sum = 0;
        for (int64_t j = lo; j <= i; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += Q(i, d) * Kx(j, d);
          P[size_t(j)] = s * sc;
          mx = std::max(mx, s * sc);
        }
        for (int64_t j = lo; j <= i; ++j) sum += std::exp(P[size_t(j)] - mx);
        const double lse = mx + std::log(sum);
        p.lse[size_t((b * H + h) * T + i)] = float(lse);
        for (int64_t j = lo; j <= i; ++j) P[size_t(j)] = std::exp(P[size_t(j)] - lse);
        const size_t orow = size_t(((b * H + h) * T + i) * D);
        const bool kept = keep[size_t(b * T + i)];
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = lo; j <= i; ++j) acc += P[size_t(j)] * Vx(j, d);
          p.o[orow + size_t(d)] = float(acc);
          if (kept) delta += double(p.go[orow + size_t(d)]) * float(acc);
        }
        if (!kept) continue;
        for (int64_t j = lo; j <= i; ++j) {
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += double(p.go[orow + size_t(d)]) * Vx(j, d);
          const double ds = P[size_t(j)] * (dp - delta);
          for (int64_t d = 0; d < D; ++d) {
            p.dq[orow + size_t(d)] += sc * ds * Kx(j, d);
            p.dk[size_t(((b * Hkv + hk) * T + j) * D + d)] += sc * ds * Q(i, d);
            p.dv[size_t(((b * Hkv + hk) * T + j) * D + d)] += P[size_t(j)] * p.go[orow + size_t(d)];
          }
        }
      }
    }
  return p;
}

void run_and_check(const Problem& p, const std::vector<char>& keep, bool all_rows) {
  const auto& s = p.s;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < keep.size(); ++i)
    if (keep[i]) rows.push_back(int64_t(i));
  std::vector<float> gq(p.q.size(), 7.0f), gk(p.k.size(), 7.0f), gv(p.v.size(), 7.0f);
  const int64_t H = s.heads, Hk = s.kv_heads, T = s.seq, D = s.head_dim;
  attention_backward(s, view(p.q, H, T, D), view(p.k, Hk, T, D), view(p.v, Hk, T, D),
                     view(p.o, H, T, D), view(p.go, H, T, D), {p.lse.data(), H * T, T, 1},
                     all_rows ? nullptr : rows.data(), int64_t(rows.size()), out(gq, H, T, D),
                     out(gk, Hk, T, D), out(gv, Hk, T, D), p.doc_start());
  auto row_kept = [&](size_t idx, int64_t heads) {
    const int64_t t = int64_t(idx / size_t(D)) % T, b = int64_t(idx / size_t(D * T * heads));
    return bool(keep[size_t(b * T + t)]);
  };
  for (size_t i = 0; i < gq.size(); ++i)
    ASSERT_NEAR(gq[i], p.dq[i], 2e-5 * (1 + std::fabs(p.dq[i]))) << "dq " << i;
  for (size_t i = 0; i < gk.size(); ++i) {
    const bool kept = all_rows || row_kept(i, Hk);
    ASSERT_NEAR(gk[i], kept ? p.dk[i] : 0.0, 2e-5 * (1 + std::fabs(p.dk[i]))) << "dk " << i;
    ASSERT_NEAR(gv[i], kept ? p.dv[i] : 0.0, 2e-5 * (1 + std::fabs(p.dv[i]))) << "dv " << i;
  }
}

TEST(AttentionForward, MatchesDoubleOnEveryIsa) {
  GlobalStateGuard guard;
  std::mt19937 rng(5);
  for (auto [H, Hkv, D, window] : std::vector<std::array<int64_t, 4>>{
           {4, 2, 16, 0}, {2, 2, 24, 5}, {3, 1, 64, 0}, {2, 1, 8, 1}}) {
    const int64_t B = 2, T = 41;
    const std::vector<char> keep(size_t(B * T), 1);
    const Problem p = make(B, H, Hkv, T, D, window, keep, rng);
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      SCOPED_TRACE(std::string(isa_name(isa)) + " D=" + std::to_string(D));
      std::vector<float> o(p.o.size(), 7.0f), lse(p.lse.size(), 7.0f);
      attention_forward(p.s, view(p.q, H, T, D), view(p.k, Hkv, T, D), view(p.v, Hkv, T, D),
                        out(o, H, T, D), {lse.data(), H * T, T, 1});
      for (size_t i = 0; i < o.size(); ++i) ASSERT_NEAR(o[i], p.o[i], 2e-6) << "out " << i;
      for (size_t i = 0; i < lse.size(); ++i) ASSERT_NEAR(lse[i], p.lse[i], 2e-6) << "lse " << i;
    }
  }
}

TEST(AttentionBackward, DenseMatchesDoubleOnEveryIsa) {
  GlobalStateGuard guard;
  std::mt19937 rng(3);
  for (auto [H, Hkv, D, window] : std::vector<std::array<int64_t, 4>>{
           {4, 2, 16, 0}, {2, 2, 24, 5}, {3, 1, 64, 0}, {2, 1, 8, 1}}) {
    const int64_t B = 2, T = 41;
    const std::vector<char> keep(size_t(B * T), 1);
    const Problem p = make(B, H, Hkv, T, D, window, keep, rng);
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      SCOPED_TRACE(std::string(isa_name(isa)) + " D=" + std::to_string(D));
      run_and_check(p, keep, /*all_rows=*/true);
    }
  }
}

TEST(AttentionBackward, KeptRowsMatchMaskedDenseOnEveryIsa) {
  GlobalStateGuard guard;
  std::mt19937 rng(4);
  const int64_t B = 3, T = 53;
  std::vector<char> keep(size_t(B * T));
  std::bernoulli_distribution coin(0.6);
  for (auto& k : keep) k = coin(rng);
  std::fill(keep.begin() + T, keep.begin() + 2 * T, 0);  // a batch row with nothing kept
  for (int64_t window : {0, 7}) {
    const Problem p = make(B, 4, 2, T, 32, window, keep, rng);
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      SCOPED_TRACE(std::string(isa_name(isa)) + " window=" + std::to_string(window));
      run_and_check(p, keep, /*all_rows=*/false);
    }
  }
}

// Packed rows: sequences of random lengths back to back (a new one starts with
// probability 1/9 per position, so several start inside one 16-query tile and some span
// tiles); doc_start[b, t] is the first position of t's sequence.
std::vector<int64_t> random_docs(int64_t B, int64_t T, std::mt19937& rng) {
  std::vector<int64_t> doc(size_t(B * T));
  std::bernoulli_distribution start(1.0 / 9);
  for (int64_t b = 0; b < B; ++b) {
    int64_t cur = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (t > 0 && start(rng)) cur = t;
      doc[size_t(b * T + t)] = cur;
    }
  }
  return doc;
}

TEST(AttentionPacked, ForwardAndBackwardStayInsideEachSequenceOnEveryIsa) {
  GlobalStateGuard guard;
  std::mt19937 rng(6);
  const int64_t B = 2, T = 70;
  for (auto [H, Hkv, D, window] : std::vector<std::array<int64_t, 4>>{
           {4, 2, 16, 0}, {2, 2, 24, 5}, {3, 1, 40, 0}}) {
    std::vector<char> keep(size_t(B * T));
    std::bernoulli_distribution coin(0.6);
    for (auto& k : keep) k = coin(rng);
    const std::vector<int64_t> doc = random_docs(B, T, rng);
    const std::vector<char> all(size_t(B * T), 1);
    const Problem dense = make(B, H, Hkv, T, D, window, all, rng, doc);
    const Problem kept = make(B, H, Hkv, T, D, window, keep, rng, doc);
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      SCOPED_TRACE(std::string(isa_name(isa)) + " D=" + std::to_string(D));
      std::vector<float> o(dense.o.size(), 7.0f), lse(dense.lse.size(), 7.0f);
      attention_forward(dense.s, view(dense.q, H, T, D), view(dense.k, Hkv, T, D),
                        view(dense.v, Hkv, T, D), out(o, H, T, D), {lse.data(), H * T, T, 1},
                        dense.doc_start());
      for (size_t i = 0; i < o.size(); ++i) ASSERT_NEAR(o[i], dense.o[i], 2e-6) << "out " << i;
      for (size_t i = 0; i < lse.size(); ++i)
        ASSERT_NEAR(lse[i], dense.lse[i], 2e-6) << "lse " << i;
      run_and_check(dense, all, /*all_rows=*/true);
      run_and_check(kept, keep, /*all_rows=*/false);
    }
  }
}

TEST(AttentionPacked, RejectsDocStartOutsideItsRow) {
  std::vector<float> buf(2 * 4 * 8 * 8, 0.0f), g(buf.size()), l(2 * 4 * 8);
  const HeadsView v{buf.data(), 4 * 8 * 8, 8 * 8, 8};
  const HeadsOut o{g.data(), 4 * 8 * 8, 8 * 8, 8};
  const HeadsView lse{buf.data(), 4 * 8, 8, 1};
  const AttentionShape s{2, 4, 4, 8, 8, 0, 0.35f};
  for (auto [t, value] : std::vector<std::array<int64_t, 2>>{{3, 4}, {5, -1}, {8, 9}}) {
    std::vector<int64_t> doc(16, 0);
    doc[size_t(t)] = value;  // t = 8: batch row 1's position 0 must start at 0
    EXPECT_THROW(attention_forward(s, v, v, v, o, {l.data(), 4 * 8, 8, 1}, doc.data()), Error);
    EXPECT_THROW(attention_backward(s, v, v, v, v, v, lse, nullptr, 0, o, o, o, doc.data()),
                 Error);
  }
}

TEST(AttentionBackward, RejectsBadShapesAndRowLists) {
  std::vector<float> buf(2 * 4 * 8 * 8, 0.0f), g(buf.size());
  const HeadsView v{buf.data(), 4 * 8 * 8, 8 * 8, 8};
  const HeadsOut o{g.data(), 4 * 8 * 8, 8 * 8, 8};
  const HeadsView lse{buf.data(), 4 * 8, 8, 1};
  AttentionShape s{2, 4, 4, 8, 8, 0, 0.35f};
  for (const std::vector<int64_t>& rows : std::vector<std::vector<int64_t>>{
           {3, 1}, {0, 16}, {-1}, {2, 2}})
    EXPECT_THROW(attention_backward(s, v, v, v, v, v, lse, rows.data(), int64_t(rows.size()),
                                    o, o, o),
                 Error);
  AttentionShape gqa = s;
  gqa.kv_heads = 3;
  EXPECT_THROW(attention_backward(gqa, v, v, v, v, v, lse, nullptr, 0, o, o, o), Error);
  AttentionShape win = s;
  win.window = -2;
  EXPECT_THROW(attention_backward(win, v, v, v, v, v, lse, nullptr, 0, o, o, o), Error);
}

}  // namespace
