// SwiGLU row kernels, AVX2/FMA (swiglu.h): the vector sigmoid of common/avx2_math.h.
#include <immintrin.h>

#include "act/swiglu.h"
#include "common/avx2_math.h"

namespace nanochat {
namespace swiglu_kernels {
namespace {

void fwd_avx2(const float* g, const float* u, int64_t n, float* h) {
  for8(n, [&](auto tail, int64_t i, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    const __m256 gv = load8<T>(g + i, m);
    const __m256 silu = _mm256_mul_ps(gv, sigmoid_ps(gv));
    store8<T>(h + i, m, _mm256_mul_ps(silu, load8<T>(u + i, m)));
  });
}

void bwd_avx2(const float* gh, const float* g, const float* u, int64_t n, float* gg,
              float* gu) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for8(n, [&](auto tail, int64_t i, __m256i m) {
    constexpr bool T = decltype(tail)::value;
    const __m256 gv = load8<T>(g + i, m);
    const __m256 d = load8<T>(gh + i, m);
    const __m256 s = sigmoid_ps(gv);
    store8<T>(gu + i, m, _mm256_mul_ps(d, _mm256_mul_ps(gv, s)));
    const __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
    const __m256 du = _mm256_mul_ps(d, load8<T>(u + i, m));
    store8<T>(gg + i, m, _mm256_mul_ps(du, ds));
  });
}

}  // namespace

const Kernels avx2 = {"avx2", fwd_avx2, bwd_avx2};

}  // namespace swiglu_kernels
}  // namespace nanochat
