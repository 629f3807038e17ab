// RMSNorm row kernels, AVX2/FMA (rmsnorm.h): 8-lane sums, masked tails.
#include <immintrin.h>

#include <cmath>

#include "common/avx2_math.h"
#include "norm/rmsnorm.h"

namespace nanochat {
namespace norm_kernels {
namespace {

float fwd_avx2(const float* x, const float* w, int64_t dim, float eps, float* y) {
  __m256 ss = _mm256_setzero_ps();
  for8(dim, [&](auto tail, int64_t i, __m256i m) {
    const __m256 v = load8<decltype(tail)::value>(x + i, m);
    ss = _mm256_fmadd_ps(v, v, ss);
  });
  const float rstd = 1.0f / std::sqrt(hsum_ps(ss) / float(dim) + eps);
  const __m256 rs = _mm256_set1_ps(rstd);
  for8(dim, [&](auto tail, int64_t i, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    const __m256 v = _mm256_mul_ps(load8<T>(x + i, m), rs);
    store8<T>(y + i, m, _mm256_mul_ps(v, load8<T>(w + i, m)));
  });
  return rstd;
}

void bwd_avx2(const float* gy, const float* x, const float* w, float rstd, int64_t dim,
              float* gx, float* gw_acc) {
  const __m256 rs = _mm256_set1_ps(rstd);
  __m256 dot = _mm256_setzero_ps();
  for8(dim, [&](auto tail, int64_t i, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    const __m256 g = _mm256_mul_ps(load8<T>(gy + i, m), load8<T>(w + i, m));
    dot = _mm256_fmadd_ps(g, _mm256_mul_ps(load8<T>(x + i, m), rs), dot);
  });
  const __m256 mean = _mm256_set1_ps(hsum_ps(dot) / float(dim));
  for8(dim, [&](auto tail, int64_t i, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    const __m256 g = load8<T>(gy + i, m);
    const __m256 xhat = _mm256_mul_ps(load8<T>(x + i, m), rs);
    const __m256 gw = _mm256_mul_ps(g, load8<T>(w + i, m));
    store8<T>(gx + i, m, _mm256_mul_ps(rs, _mm256_fnmadd_ps(xhat, mean, gw)));
    store8<T>(gw_acc + i, m, _mm256_fmadd_ps(g, xhat, load8<T>(gw_acc + i, m)));
  });
}

}  // namespace

const Kernels avx2 = {"avx2", fwd_avx2, bwd_avx2};

}  // namespace norm_kernels
}  // namespace nanochat
