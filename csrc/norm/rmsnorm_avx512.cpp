// RMSNorm row kernels, AVX-512 (rmsnorm.h): 16-lane sums, masked tails.
#include <immintrin.h>

#include <cmath>

#include "common/avx512_math.h"
#include "norm/rmsnorm.h"

namespace nanochat {
namespace norm_kernels {
namespace {

float fwd_avx512(const float* x, const float* w, int64_t dim, float eps, float* y) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(mask16(dim - i), x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / float(dim) + eps);
  const __m512 rs = _mm512_set1_ps(rstd);
  for (int64_t i = 0; i < dim; i += 16) {
    const __mmask16 m = mask16(dim - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rs);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
  }
  return rstd;
}

void bwd_avx512(const float* gy, const float* x, const float* w, float rstd, int64_t dim,
                float* gx, float* gw_acc) {
  const __m512 rs = _mm512_set1_ps(rstd);
  __m512 dot = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 16) {
    const __mmask16 m = mask16(dim - i);
    const __m512 g =
        _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gy + i), _mm512_maskz_loadu_ps(m, w + i));
    dot = _mm512_fmadd_ps(g, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rs), dot);
  }
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / float(dim));
  for (int64_t i = 0; i < dim; i += 16) {
    const __mmask16 m = mask16(dim - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gy + i);
    const __m512 xhat = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rs);
    const __m512 gw = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + i));
    _mm512_mask_storeu_ps(gx + i, m, _mm512_mul_ps(rs, _mm512_fnmadd_ps(xhat, mean, gw)));
    _mm512_mask_storeu_ps(gw_acc + i, m,
                          _mm512_fmadd_ps(g, xhat, _mm512_maskz_loadu_ps(m, gw_acc + i)));
  }
}

}  // namespace

const Kernels avx512 = {"avx512", fwd_avx512, bwd_avx512};

}  // namespace norm_kernels
}  // namespace nanochat
