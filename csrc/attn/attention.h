// Causal softmax attention for training: the forward, and the backward over a list of query
// rows (Collider's kept tokens).
//
//   S = scale * q k^T (causal, optionally a sliding window), P = exp(S - lse), o = P v
//   dP = do v^T,  dS = P * (dP - rowsum(do * o)),
//   dq = scale * dS k,  dk = scale * dS^T q,  dv = P^T do
//
// When only some query rows carry an output gradient (a Collider micro-batch: a dropped
// token's do is exactly zero), dq is zero on the other rows, and the layer feeding k and v
// drops their gradients on the other rows anyway (its backward GEMMs run on the kept rows).
// So this computes, per (batch, kv head), P and dS for the kept queries only, and dk, dv for
// the kept keys only: about (3 r + 2 r^2) / 5 of the dense causal work at kept fraction r.
// Rows not in the list get dq = dk = dv = 0. With every row listed it is the plain dense
// backward. Grouped-query attention is native: q head h reads kv head h / (H / Hkv), and a
// kv head's dk, dv sum over its query heads.
//
// Plain C++17 driver over the thread pool (one task per batch row and kv head); the inner
// tiles are per-ISA kernels (scalar reference, AVX2, AVX-512, NEON).
#pragma once

#include <cstdint>

#include "ternary/dispatch.h"  // Isa

namespace nanochat {

// A (B, heads, T, D) float tensor with arbitrary strides (in elements) over b, h, t and
// contiguous d; lse uses the same struct with D = 1.
struct HeadsView {
  const float* p = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
  const float* at(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};
struct HeadsOut {
  float* p = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
  float* at(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

struct AttentionShape {
  int64_t batch = 0, heads = 0, kv_heads = 0, seq = 0, head_dim = 0;
  int64_t window = 0;  // 0: full causal; w > 0: query t sees keys t - w + 1 .. t
  float scale = 0.0f;  // softmax scale of q k^T (1 / sqrt(head_dim) by default)
};

// The forward: out (B, H, T, D) = softmax(scale * q k^T, causal / windowed) v and lse
// (B, H, T), the natural-log sum of exp(scale * q k^T) per query row (what the backward
// takes). Same tiles as the backward: 16-query blocks, keys past the block's last query
// skipped. doc_start: packed sequences (several conversations in one row): a contiguous
// (B, T) array, doc_start[b, t] the position of the first token of token t's sequence;
// query t then sees keys [max(window start, doc_start[b, t]), t] and key tiles before every
// query's start are skipped. nullptr: one sequence per row. Throws nanochat::Error on a bad
// shape or a doc_start[b, t] outside [0, t].
void attention_forward(const AttentionShape& shape, HeadsView q, HeadsView k, HeadsView v,
                       HeadsOut out, HeadsOut lse, const int64_t* doc_start = nullptr);

// q, o, go (B, H, T, D); k, v (B, Hkv, T, D); lse (B, H, T), the forward's natural-log
// sum of exp(scale * q k^T) per query row. rows: sorted flat row indices b * T + t
// (n_rows of them) that carry an output gradient, nullptr for all. Writes every row of
// gq (B, H, T, D), gk and gv (B, Hkv, T, D). doc_start: as the forward's. Throws
// nanochat::Error on a bad shape, list or doc_start.
void attention_backward(const AttentionShape& shape, HeadsView q, HeadsView k, HeadsView v,
                        HeadsView o, HeadsView go, HeadsView lse, const int64_t* rows,
                        int64_t n_rows, HeadsOut gq, HeadsOut gk, HeadsOut gv,
                        const int64_t* doc_start = nullptr);

// ---- per-ISA tile kernels (internal; declared here for the kernel files) ---------------
// The kernel path attention forward/backward run on the active ISA ("avx2", ...).
const char* attention_path();

namespace attn_kernels {

// C (r x n, ldc) = A (r x k, lda) . BT (k x n, ldb): a product with the right operand
// stored transposed (BT = B^T row-major), e.g. q (r x D) times k^T (D x keys).
using GemmNT = void (*)(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t r,
                        int64_t n, int64_t k, float* c, int64_t ldc);
// C (r x n, ldc) += A (r x k, lda) . B (k x n, ldb).
using GemmAcc = void (*)(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t r,
                         int64_t n, int64_t k, float* c, int64_t ldc);
// p[j] = exp(scale * s[j] - lse) for j in [0, n).
using Probs = void (*)(const float* s, int64_t n, float scale, float lse, float* p);
// ds[j] = p[j] * (dp[j] - d) for j in [0, n).
using SoftmaxGrad = void (*)(const float* p, const float* dp, int64_t n, float d, float* ds);
// The forward's row (n >= 1), in place: m = scale * max_j s[j], s[j] = exp(scale * s[j] - m);
// returns m and sets *sum = sum_j s[j].
using SoftmaxRow = float (*)(float* s, int64_t n, float scale, float* sum);

struct Kernels {
  const char* name;  // the ISA path, as `nanochat info` reports it
  GemmNT gemm_nt;
  GemmAcc gemm_acc;
  Probs probs;
  SoftmaxGrad softmax_grad;
  SoftmaxRow softmax_row;
};

extern const Kernels scalar;
#ifdef NANOCHAT_HAVE_X86_KERNELS
extern const Kernels avx2;
extern const Kernels avx512;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
extern const Kernels neon;  // Isa::neon and neon_dotprod
#endif

}  // namespace attn_kernels
}  // namespace nanochat
