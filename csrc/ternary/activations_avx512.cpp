// AVX-512 per-token absmax int8 quantization (built with -mavx512f -mavx512bw -mavx512vl).
// Bit-identical to the scalar loop in activations.cpp: the max of |x| is exact, the
// scale is the same scalar division, x * s is one rounding either way, and vrndscaleps
// rounds half to even like nearbyint in the default rounding mode.
#include <immintrin.h>

#include <cmath>

#include "ternary/dispatch.h"

namespace nanochat {

int64_t quantize_activations_avx512(const float* x, int64_t t0, int64_t t1, int64_t k,
                                    int8_t* q, float* x_scale) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * k;
    __m512 m = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 lm = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
      const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(lm, xt + i));
      bad |= _mm512_mask_cmp_ps_mask(lm, a, inf, _CMP_NLT_UQ);  // NaN or infinite
      m = _mm512_max_ps(m, a);
    }
    if (bad) return t;
    const float amax = _mm512_reduce_max_ps(m);
    const float s = 127.0f / (amax < 1e-5f ? 1e-5f : amax);
    const __m512 vs = _mm512_set1_ps(s);
    int8_t* qt = q + t * k;
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 lm = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
      __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(lm, xt + i), vs),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
      _mm512_mask_cvtepi32_storeu_epi8(qt + i, lm, _mm512_cvtps_epi32(r));
    }
    x_scale[t] = 1.0f / s;
  }
  return -1;
}

}  // namespace nanochat
