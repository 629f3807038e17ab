// Attention tiles, NEON (attention.h; Armv8.0 Advanced SIMD, no extra flags): register-
// blocked float GEMM tiles (up to 6 rows broadcast x 16 columns: 24 accumulators and 4
// column vectors in the 32 registers) and the vector exp of common/neon_math.h. Within
// float reassociation / FMA and the exp polynomial's ~1e-7 relative error of the scalar
// reference (tests/cpp/test_attention.cpp bounds it against double math).
#include <arm_neon.h>

#include <algorithm>
#include <cmath>

#include "attn/attention.h"
#include "common/neon_math.h"

namespace nanochat {
namespace attn_kernels {
namespace {

// C (RB x 4 NV columns) = (Acc ? C : 0) + A (RB x k) . B (k x n), B's row d at b + d * ldb.
// Tail: only the first `left` (< 4) columns of the last vector exist (NV = 1 then).
template <int RB, int NV, bool Acc, bool Tail>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k,
                 float* c, int64_t ldc, int64_t left) {
  float32x4_t acc[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = Acc ? load4(c + i * ldc + 4 * v, Tail, left) : vdupq_n_f32(0.0f);
  for (int64_t d = 0; d < k; ++d) {
    float32x4_t bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load4(b + d * ldb + 4 * v, Tail, left);
    for (int i = 0; i < RB; ++i) {
      const float av = a[i * lda + d];
      for (int v = 0; v < NV; ++v) acc[i][v] = vfmaq_n_f32(acc[i][v], bv[v], av);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) store4(c + i * ldc + 4 * v, Tail, left, acc[i][v]);
}

template <int RB, bool Acc>
void rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t k,
          float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) tile<RB, 4, Acc, false>(a, lda, b + j, ldb, k, c + j, ldc, 4);
  for (; j + 4 <= n; j += 4) tile<RB, 1, Acc, false>(a, lda, b + j, ldb, k, c + j, ldc, 4);
  if (j < n) tile<RB, 1, Acc, true>(a, lda, b + j, ldb, k, c + j, ldc, n - j);
}

template <bool Acc>
void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t r, int64_t n,
          int64_t k, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 6 <= r; i += 6) rows<6, Acc>(a + i * lda, lda, b, ldb, n, k, c + i * ldc, ldc);
  const float* ar = a + i * lda;
  float* cr = c + i * ldc;
  switch (r - i) {
    case 5: rows<5, Acc>(ar, lda, b, ldb, n, k, cr, ldc); break;
    case 4: rows<4, Acc>(ar, lda, b, ldb, n, k, cr, ldc); break;
    case 3: rows<3, Acc>(ar, lda, b, ldb, n, k, cr, ldc); break;
    case 2: rows<2, Acc>(ar, lda, b, ldb, n, k, cr, ldc); break;
    case 1: rows<1, Acc>(ar, lda, b, ldb, n, k, cr, ldc); break;
    default: break;
  }
}

void gemm_nt_neon(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t r,
                  int64_t n, int64_t k, float* c, int64_t ldc) {
  gemm<false>(a, lda, bt, ldb, r, n, k, c, ldc);
}

void gemm_acc_neon(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t r,
                   int64_t n, int64_t k, float* c, int64_t ldc) {
  gemm<true>(a, lda, b, ldb, r, n, k, c, ldc);
}

// scale * s - lse, one rounding (the FMA), as the AVX2 file's fmsub.
inline float32x4_t scaled_minus(float32x4_t s, float32x4_t sc, float32x4_t l) {
  return vfmaq_f32(vnegq_f32(l), s, sc);
}

void probs_neon(const float* s, int64_t n, float scale, float lse, float* p) {
  const float32x4_t sc = vdupq_n_f32(scale), l = vdupq_n_f32(lse);
  for4(n, [&](bool tail, int64_t j, int64_t left) {
    store4(p + j, tail, left, exp_ps(scaled_minus(load4(s + j, tail, left), sc, l)));
  });
}

void softmax_grad_neon(const float* p, const float* dp, int64_t n, float d, float* ds) {
  const float32x4_t dv = vdupq_n_f32(d);
  for4(n, [&](bool tail, int64_t j, int64_t left) {
    store4(ds + j, tail, left,
           vmulq_f32(load4(p + j, tail, left), vsubq_f32(load4(dp + j, tail, left), dv)));
  });
}

float softmax_row_neon(float* s, int64_t n, float scale, float* sum) {
  float32x4_t mv = vdupq_n_f32(-INFINITY);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) mv = vmaxq_f32(mv, vld1q_f32(s + j));
  float m = vmaxvq_f32(mv);
  for (; j < n; ++j) m = std::max(m, s[j]);
  const float mx = scale * m;  // scale > 0: the max of the scaled scores
  const float32x4_t sc = vdupq_n_f32(scale), l = vdupq_n_f32(mx);
  float32x4_t acc = vdupq_n_f32(0.0f);
  for4(n, [&](bool tail, int64_t i, int64_t left) {
    float32x4_t e = exp_ps(scaled_minus(load4(s + i, tail, left), sc, l));
    if (tail) {  // padding lanes hold exp(-mx): keep them out of the sum
      const uint32x4_t lane = {0, 1, 2, 3};
      e = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(e),
                                          vcltq_u32(lane, vdupq_n_u32(uint32_t(left)))));
    }
    acc = vaddq_f32(acc, e);
    store4(s + i, tail, left, e);
  });
  *sum = vaddvq_f32(acc);
  return mx;
}

}  // namespace

const Kernels neon = {"neon", gemm_nt_neon, gemm_acc_neon, probs_neon, softmax_grad_neon,
                      softmax_row_neon};

}  // namespace attn_kernels
}  // namespace nanochat
