// Attention backward tiles, AVX-512 (attention.h): register-blocked float GEMM tiles (rows
// broadcast, 16-float columns) and the vector exp of common/avx512_math.h.
#include <immintrin.h>

#include <cmath>

#include "attn/attention.h"
#include "common/avx512_math.h"

namespace nanochat {
namespace attn_kernels {
namespace {

inline __mmask16 lanes(int64_t n) { return n <= 0 ? __mmask16(0) : mask16(n); }

// C (RB x n) = A (RB x k) . BT (k x n), 32 columns at a time: 2 * RB accumulators.
template <int RB>
void nt_rows(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t n, int64_t k,
             float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 32) {
    const __mmask16 m0 = lanes(n - j), m1 = lanes(n - j - 16);
    __m512 acc[RB][2];
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < k; ++d) {
      const float* b = bt + d * ldb + j;
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
      const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + 16);
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) {
        const __m512 av = _mm512_set1_ps(a[i * lda + d]);
        acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      _mm512_mask_storeu_ps(c + i * ldc + j, m0, acc[i][0]);
      _mm512_mask_storeu_ps(c + i * ldc + j + 16, m1, acc[i][1]);
    }
  }
}

void gemm_nt_avx512(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t r,
                    int64_t n, int64_t k, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= r; i += 8) nt_rows<8>(a + i * lda, lda, bt, ldb, n, k, c + i * ldc, ldc);
  for (; i + 4 <= r; i += 4) nt_rows<4>(a + i * lda, lda, bt, ldb, n, k, c + i * ldc, ldc);
  for (; i < r; ++i) nt_rows<1>(a + i * lda, lda, bt, ldb, n, k, c + i * ldc, ldc);
}

// C (RB x n) += A (RB x k) . B (k x n), 64 columns at a time: 4 * RB accumulators.
template <int RB>
void acc_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t k,
              float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 64) {
    __mmask16 m[4];
    for (int q = 0; q < 4; ++q) m[q] = lanes(n - j - 16 * q);
    __m512 acc[RB][4];
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_maskz_loadu_ps(m[q], c + i * ldc + j + 16 * q);
    for (int64_t d = 0; d < k; ++d) {
      const float* br = b + d * ldb + j;
      __m512 bv[4];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) bv[q] = _mm512_maskz_loadu_ps(m[q], br + 16 * q);
#pragma GCC unroll 4
      for (int i = 0; i < RB; ++i) {
        const __m512 av = _mm512_set1_ps(a[i * lda + d]);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_fmadd_ps(av, bv[q], acc[i][q]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(c + i * ldc + j + 16 * q, m[q], acc[i][q]);
  }
}

void gemm_acc_avx512(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t r,
                     int64_t n, int64_t k, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= r; i += 4) acc_rows<4>(a + i * lda, lda, b, ldb, n, k, c + i * ldc, ldc);
  for (; i < r; ++i) acc_rows<1>(a + i * lda, lda, b, ldb, n, k, c + i * ldc, ldc);
}

void probs_avx512(const float* s, int64_t n, float scale, float lse, float* p) {
  const __m512 sc = _mm512_set1_ps(scale), l = _mm512_set1_ps(lse);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), sc, l);
    _mm512_mask_storeu_ps(p + j, m, exp_ps(x));
  }
}

void softmax_grad_avx512(const float* p, const float* dp, int64_t n, float d, float* ds) {
  const __m512 dv = _mm512_set1_ps(d);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512 pv = _mm512_maskz_loadu_ps(m, p + j);
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + j), dv);
    _mm512_mask_storeu_ps(ds + j, m, _mm512_mul_ps(pv, g));
  }
}

float softmax_row_avx512(float* s, int64_t n, float scale, float* sum) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, s + j));
  }
  const float mx = scale * _mm512_reduce_max_ps(mv);
  const __m512 sc = _mm512_set1_ps(scale), l = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512 e = exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), sc, l));
    acc = _mm512_mask_add_ps(acc, m, acc, e);
    _mm512_mask_storeu_ps(s + j, m, e);
  }
  *sum = _mm512_reduce_add_ps(acc);
  return mx;
}

}  // namespace

const Kernels avx512 = {"avx512",     gemm_nt_avx512,      gemm_acc_avx512, probs_avx512,
                        softmax_grad_avx512, softmax_row_avx512};

}  // namespace attn_kernels
}  // namespace nanochat
