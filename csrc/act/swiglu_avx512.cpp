// SwiGLU row kernels, AVX-512 (swiglu.h): the vector sigmoid of common/avx512_math.h.
#include <immintrin.h>

#include "act/swiglu.h"
#include "common/avx512_math.h"

namespace nanochat {
namespace swiglu_kernels {
namespace {

void fwd_avx512(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 silu = _mm512_mul_ps(gv, sigmoid_ps(gv));
    _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i)));
  }
}

void bwd_avx512(const float* gh, const float* g, const float* u, int64_t n, float* gg,
                float* gu) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 d = _mm512_maskz_loadu_ps(m, gh + i);
    const __m512 s = sigmoid_ps(gv);
    _mm512_mask_storeu_ps(gu + i, m, _mm512_mul_ps(d, _mm512_mul_ps(gv, s)));
    const __m512 ds = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
    const __m512 du = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, u + i));
    _mm512_mask_storeu_ps(gg + i, m, _mm512_mul_ps(du, ds));
  }
}

}  // namespace

const Kernels avx512 = {"avx512", fwd_avx512, bwd_avx512};

}  // namespace swiglu_kernels
}  // namespace nanochat
