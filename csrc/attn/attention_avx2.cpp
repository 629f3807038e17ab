// Attention tiles, AVX2/FMA (attention.h): register-blocked float GEMM tiles (up to 6 rows
// broadcast x 16 columns: 12 accumulators, 2 column vectors and a broadcast fill the 16
// ymm registers) and the vector exp of common/avx2_math.h.
#include <immintrin.h>

#include <cmath>

#include "attn/attention.h"
#include "common/avx2_math.h"

namespace nanochat {
namespace attn_kernels {
namespace {

// C (RB x 16 columns from j) = (Acc ? C : 0) + A (RB x k) . B (k x n), B's row d at
// b + d * ldb. Tail: columns past n masked (m0, m1 hold lanes j..j+7, j+8..j+15).
template <int RB, bool Acc, bool Tail>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k,
                 float* c, int64_t ldc, __m256i m0, __m256i m1) {
  __m256 acc[RB][2];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
    acc[i][0] = Acc ? load8<Tail>(c + i * ldc, m0) : _mm256_setzero_ps();
    acc[i][1] = Acc ? load8<Tail>(c + i * ldc + 8, m1) : _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < k; ++d) {
    const __m256 b0 = load8<Tail>(b + d * ldb, m0);
    const __m256 b1 = load8<Tail>(b + d * ldb + 8, m1);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + d);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
    store8<Tail>(c + i * ldc, m0, acc[i][0]);
    store8<Tail>(c + i * ldc + 8, m1, acc[i][1]);
  }
}

template <int RB, bool Acc>
void rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t k,
          float* c, int64_t ldc) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) tile<RB, Acc, false>(a, lda, b + j, ldb, k, c + j, ldc, all, all);
  if (j < n)
    tile<RB, Acc, true>(a, lda, b + j, ldb, k, c + j, ldc, mask8(n - j), mask8(n - j - 8));
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

void gemm_nt_avx2(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t r,
                  int64_t n, int64_t k, float* c, int64_t ldc) {
  gemm<false>(a, lda, bt, ldb, r, n, k, c, ldc);
}

void gemm_acc_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t r,
                   int64_t n, int64_t k, float* c, int64_t ldc) {
  gemm<true>(a, lda, b, ldb, r, n, k, c, ldc);
}

void probs_avx2(const float* s, int64_t n, float scale, float lse, float* p) {
  const __m256 sc = _mm256_set1_ps(scale), l = _mm256_set1_ps(lse);
  for8(n, [&](auto tail, int64_t j, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    store8<T>(p + j, m, exp_ps(_mm256_fmsub_ps(load8<T>(s + j, m), sc, l)));
  });
}

void softmax_grad_avx2(const float* p, const float* dp, int64_t n, float d, float* ds) {
  const __m256 dv = _mm256_set1_ps(d);
  for8(n, [&](auto tail, int64_t j, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    store8<T>(ds + j, m, _mm256_mul_ps(load8<T>(p + j, m), _mm256_sub_ps(load8<T>(dp + j, m), dv)));
  });
}

float softmax_row_avx2(float* s, int64_t n, float scale, float* sum) {
  const __m256 lowest = _mm256_set1_ps(-INFINITY);
  __m256 mv = lowest;
  for8(n, [&](auto tail, int64_t j, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    const __m256 v = load8<T>(s + j, m);
    mv = _mm256_max_ps(mv, T ? _mm256_blendv_ps(lowest, v, _mm256_castsi256_ps(m)) : v);
  });
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float mx = scale * _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  const __m256 sc = _mm256_set1_ps(scale), l = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for8(n, [&](auto tail, int64_t j, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    __m256 e = exp_ps(_mm256_fmsub_ps(load8<T>(s + j, m), sc, l));
    if (T) e = _mm256_and_ps(e, _mm256_castsi256_ps(m));
    acc = _mm256_add_ps(acc, e);
    store8<T>(s + j, m, e);
  });
  *sum = hsum_ps(acc);
  return mx;
}

}  // namespace

const Kernels avx2 = {"avx2", gemm_nt_avx2, gemm_acc_avx2, probs_avx2, softmax_grad_avx2,
                      softmax_row_avx2};

}  // namespace attn_kernels
}  // namespace nanochat
