// Attention forward and backward drivers (attention.h) and the scalar reference tiles.
#include "attn/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/row_list.h"
#include "common/threadpool.h"
#include "nanochat/error.hpp"

namespace nanochat {
namespace attn_kernels {
namespace {

void gemm_nt_scalar(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t r,
                    int64_t n, int64_t k, float* c, int64_t ldc) {
  for (int64_t i = 0; i < r; ++i) {
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = 0.0f;
    for (int64_t d = 0; d < k; ++d) {
      const float av = a[i * lda + d];
      const float* b = bt + d * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += av * b[j];
    }
  }
}

void gemm_acc_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t r,
                     int64_t n, int64_t k, float* c, int64_t ldc) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t d = 0; d < k; ++d) {
      const float av = a[i * lda + d];
      const float* br = b + d * ldb;
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] += av * br[j];
    }
}

void probs_scalar(const float* s, int64_t n, float scale, float lse, float* p) {
  for (int64_t j = 0; j < n; ++j) p[j] = std::exp(scale * s[j] - lse);
}

void softmax_grad_scalar(const float* p, const float* dp, int64_t n, float d, float* ds) {
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (dp[j] - d);
}

float softmax_row_scalar(float* s, int64_t n, float scale, float* sum) {
  float m = s[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, s[j]);
  m *= scale;  // scale > 0: the max of the scaled scores
  probs_scalar(s, n, scale, m, s);
  float acc = 0.0f;
  for (int64_t j = 0; j < n; ++j) acc += s[j];
  *sum = acc;
  return m;
}

}  // namespace

const Kernels scalar = {"scalar",     gemm_nt_scalar,      gemm_acc_scalar, probs_scalar,
                        softmax_grad_scalar, softmax_row_scalar};

}  // namespace attn_kernels

namespace {

const attn_kernels::Kernels& kernels() {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (active_isa() >= Isa::avx512) return attn_kernels::avx512;
  if (active_isa() >= Isa::avx2) return attn_kernels::avx2;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (is_arm(active_isa())) return attn_kernels::neon;
#endif
  return attn_kernels::scalar;
}

constexpr int64_t kQueryBlock = 16;  // (kept) query rows per tile

void check(const char* fn, const AttentionShape& s, const int64_t* rows, int64_t n_rows) {
  auto bad = [fn](const std::string& m) { throw Error(std::string(fn) + ": " + m); };
  if (s.batch < 0 || s.seq < 0 || s.heads <= 0 || s.kv_heads <= 0 || s.head_dim <= 0)
    bad("batch, seq >= 0 and heads, kv_heads, head_dim > 0 required");
  if (s.heads % s.kv_heads != 0)
    bad("heads (" + std::to_string(s.heads) + ") is not a multiple of kv_heads (" +
        std::to_string(s.kv_heads) + ")");
  if (s.window < 0) bad("window must be >= 0 (0: full causal), got " + std::to_string(s.window));
  if (!(s.scale > 0.0f) || !std::isfinite(s.scale)) bad("scale must be finite and > 0");
  if (rows) check_row_list(fn, "rows", rows, n_rows, s.batch * s.seq);
}

void check_doc_start(const char* fn, const AttentionShape& s, const int64_t* doc_start) {
  if (!doc_start) return;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t t = 0; t < s.seq; ++t) {
      const int64_t d = doc_start[b * s.seq + t];
      if (d < 0 || d > t)
        throw Error(std::string(fn) + ": doc_start[" + std::to_string(b) + ", " +
                    std::to_string(t) + "] = " + std::to_string(d) + " is outside [0, " +
                    std::to_string(t) + "]");
    }
}

// The first key query t of batch row b sees: the window's start, or its conversation's
// start when that is later (doc_start: (B, T) or nullptr for one sequence per row).
inline int64_t first_key(const AttentionShape& s, const int64_t* doc_start, int64_t b,
                         int64_t t) {
  const int64_t w = s.window > 0 ? std::max<int64_t>(0, t - s.window + 1) : 0;
  return doc_start ? std::max(w, doc_start[b * s.seq + t]) : w;
}

// One (batch row, kv head): every query head of the group, every kept query block.
void backward_task(const attn_kernels::Kernels& K, const AttentionShape& s, int64_t b,
                   int64_t hk, const std::vector<int64_t>& pos, HeadsView q, HeadsView k,
                   HeadsView v, HeadsView o, HeadsView go, HeadsView lse, HeadsOut gq,
                   HeadsOut gk, HeadsOut gv, const int64_t* doc_start) {
  const int64_t T = s.seq, D = s.head_dim, n = int64_t(pos.size());
  const int64_t group = s.heads / s.kv_heads;
  const size_t row_bytes = size_t(D) * sizeof(float);
  // Rows outside the list: zero gradients (dq for every query head of the group).
  std::vector<char> kept(size_t(T), 0);
  for (int64_t t : pos) kept[size_t(t)] = 1;
  for (int64_t t = 0; t < T; ++t) {
    if (kept[size_t(t)]) continue;
    std::memset(gk.at(b, hk, t), 0, row_bytes);
    std::memset(gv.at(b, hk, t), 0, row_bytes);
    for (int64_t g = 0; g < group; ++g) std::memset(gq.at(b, hk * group + g, t), 0, row_bytes);
  }
  if (n == 0) return;
  const int64_t T_used = pos.back() + 1;  // no kept query looks past its own position
  // k^T and v^T (D x T_used) so q k^T and do v^T stream contiguous key rows.
  std::vector<float> kt(size_t(D * T_used)), vt(size_t(D * T_used));
  for (int64_t t = 0; t < T_used; ++t) {
    const float* kr = k.at(b, hk, t);
    const float* vr = v.at(b, hk, t);
    for (int64_t d = 0; d < D; ++d) {
      kt[size_t(d * T_used + t)] = kr[d];
      vt[size_t(d * T_used + t)] = vr[d];
    }
  }
  const int64_t QB = kQueryBlock;
  std::vector<float> dk(size_t(n * D), 0.0f), dv(size_t(n * D), 0.0f);
  std::vector<float> qb(size_t(QB * D)), gob(size_t(QB * D)), dqb(size_t(QB * D));
  std::vector<float> p(size_t(QB * T_used)), ds(size_t(QB * T_used));
  std::vector<float> pk(size_t(n * QB)), dsk(size_t(n * QB));
  float delta[kQueryBlock], lse_b[kQueryBlock];
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t i0 = 0; i0 < n; i0 += QB) {
      const int64_t r = std::min(QB, n - i0);
      for (int64_t i = 0; i < r; ++i) {
        const int64_t t = pos[size_t(i0 + i)];
        std::memcpy(qb.data() + i * D, q.at(b, h, t), row_bytes);
        const float* gor = go.at(b, h, t);
        const float* orow = o.at(b, h, t);
        std::memcpy(gob.data() + i * D, gor, row_bytes);
        float dd = 0.0f;
        for (int64_t d = 0; d < D; ++d) dd += gor[d] * orow[d];
        delta[i] = dd;
        lse_b[i] = *lse.at(b, h, t);
      }
      // Keys [lo, hi) cover every kept query of the block; row i sees [lo_i, pos_i]. Keys
      // before every row's first key (an earlier conversation, outside every window) are
      // skipped.
      const int64_t hi = pos[size_t(i0 + r - 1)] + 1;
      int64_t lo = hi;
      for (int64_t i = 0; i < r; ++i)
        lo = std::min(lo, first_key(s, doc_start, b, pos[size_t(i0 + i)]));
      const int64_t L = hi - lo;
      K.gemm_nt(qb.data(), D, kt.data() + lo, T_used, r, L, D, p.data(), L);   // q k^T
      K.gemm_nt(gob.data(), D, vt.data() + lo, T_used, r, L, D, ds.data(), L);  // do v^T
      for (int64_t i = 0; i < r; ++i) {
        const int64_t t = pos[size_t(i0 + i)];
        const int64_t a = first_key(s, doc_start, b, t) - lo;
        const int64_t e = t + 1 - lo;  // row i's keys are [a, e) of the tile
        float* pr = p.data() + i * L;
        float* dsr = ds.data() + i * L;
        K.probs(pr + a, e - a, s.scale, lse_b[i], pr + a);
        K.softmax_grad(pr + a, dsr + a, e - a, delta[i], dsr + a);
        std::fill(pr, pr + a, 0.0f);
        std::fill(dsr, dsr + a, 0.0f);
        std::fill(pr + e, pr + L, 0.0f);
        std::fill(dsr + e, dsr + L, 0.0f);
      }
      // dq rows of the block: scale * dS k.
      std::fill(dqb.begin(), dqb.begin() + r * D, 0.0f);
      K.gemm_acc(ds.data(), L, k.at(b, hk, lo), k.st, r, D, L, dqb.data(), D);
      for (int64_t i = 0; i < r; ++i) {
        float* out = gq.at(b, h, pos[size_t(i0 + i)]);
        for (int64_t d = 0; d < D; ++d) out[d] = s.scale * dqb[size_t(i * D + d)];
      }
      // dk, dv of the kept keys in [lo, hi): kept indices [j0, i0 + r).
      const int64_t j0 = int64_t(std::lower_bound(pos.begin(), pos.end(), lo) - pos.begin());
      const int64_t nk = i0 + r - j0;
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t c = pos[size_t(j0 + j)] - lo;
        for (int64_t i = 0; i < r; ++i) {
          pk[size_t(j * r + i)] = p[size_t(i * L + c)];
          dsk[size_t(j * r + i)] = ds[size_t(i * L + c)];
        }
      }
      K.gemm_acc(pk.data(), r, gob.data(), D, nk, D, r, dv.data() + j0 * D, D);
      K.gemm_acc(dsk.data(), r, qb.data(), D, nk, D, r, dk.data() + j0 * D, D);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    float* kr = gk.at(b, hk, pos[size_t(j)]);
    float* vr = gv.at(b, hk, pos[size_t(j)]);
    for (int64_t d = 0; d < D; ++d) {
      kr[d] = s.scale * dk[size_t(j * D + d)];
      vr[d] = dv[size_t(j * D + d)];
    }
  }
}

// One (batch row, kv head) of the forward: every query head of the group, 16-row blocks.
void forward_task(const attn_kernels::Kernels& K, const AttentionShape& s, int64_t b,
                  int64_t hk, HeadsView q, HeadsView k, HeadsView v, HeadsOut out,
                  HeadsOut lse, const int64_t* doc_start) {
  const int64_t T = s.seq, D = s.head_dim, group = s.heads / s.kv_heads;
  std::vector<float> kt(size_t(D * T));  // k^T (D x T): q k^T streams contiguous key rows
  for (int64_t t = 0; t < T; ++t) {
    const float* kr = k.at(b, hk, t);
    for (int64_t d = 0; d < D; ++d) kt[size_t(d * T + t)] = kr[d];
  }
  const int64_t QB = kQueryBlock;
  std::vector<float> p(size_t(QB * T)), ob(size_t(QB * D));
  float inv[kQueryBlock];
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t i0 = 0; i0 < T; i0 += QB) {
      const int64_t r = std::min(QB, T - i0);
      const int64_t hi = i0 + r;  // keys [lo, hi) cover the block; row t sees [lo_t, t]
      int64_t lo = hi;
      for (int64_t t = i0; t < hi; ++t) lo = std::min(lo, first_key(s, doc_start, b, t));
      const int64_t L = hi - lo;
      K.gemm_nt(q.at(b, h, i0), q.st, kt.data() + lo, T, r, L, D, p.data(), L);
      for (int64_t i = 0; i < r; ++i) {
        const int64_t t = i0 + i;
        const int64_t a = first_key(s, doc_start, b, t) - lo;
        const int64_t e = t + 1 - lo;
        float* pr = p.data() + i * L;
        float sum;
        const float m = K.softmax_row(pr + a, e - a, s.scale, &sum);
        std::fill(pr, pr + a, 0.0f);
        std::fill(pr + e, pr + L, 0.0f);
        inv[i] = 1.0f / sum;
        *lse.at(b, h, t) = m + std::log(sum);
      }
      std::fill(ob.begin(), ob.begin() + r * D, 0.0f);
      K.gemm_acc(p.data(), L, v.at(b, hk, lo), v.st, r, D, L, ob.data(), D);
      for (int64_t i = 0; i < r; ++i) {
        float* o = out.at(b, h, i0 + i);
        for (int64_t d = 0; d < D; ++d) o[d] = ob[size_t(i * D + d)] * inv[i];
      }
    }
  }
}

}  // namespace

const char* attention_path() { return kernels().name; }

void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v,
                       HeadsOut out, HeadsOut lse, const int64_t* doc_start) {
  check("attention_forward", s, nullptr, 0);
  check_doc_start("attention_forward", s, doc_start);
  const auto& K = kernels();
  parallel_for(s.batch * s.kv_heads, [&](int64_t task) {
    forward_task(K, s, task / s.kv_heads, task % s.kv_heads, q, k, v, out, lse, doc_start);
  });
}

void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v,
                        HeadsView o, HeadsView go, HeadsView lse, const int64_t* rows,
                        int64_t n_rows, HeadsOut gq, HeadsOut gk, HeadsOut gv,
                        const int64_t* doc_start) {
  check("attention_backward", s, rows, n_rows);
  check_doc_start("attention_backward", s, doc_start);
  const auto& K = kernels();
  const int64_t T = s.seq;
  parallel_for(s.batch * s.kv_heads, [&](int64_t task) {
    const int64_t b = task / s.kv_heads, hk = task % s.kv_heads;
    std::vector<int64_t> pos;  // kept positions of batch row b, ascending
    if (rows) {
      const int64_t* first = std::lower_bound(rows, rows + n_rows, b * T);
      const int64_t* last = std::lower_bound(first, rows + n_rows, (b + 1) * T);
      for (const int64_t* r = first; r < last; ++r) pos.push_back(*r - b * T);
    } else {
      for (int64_t t = 0; t < T; ++t) pos.push_back(t);
    }
    backward_task(K, s, b, hk, pos, q, k, v, o, go, lse, gq, gk, gv, doc_start);
  });
}

}  // namespace nanochat
