// AVX2 per-token absmax int8 quantization (built with -mavx2 -mfma), bit-identical to the
// scalar loop in activations.cpp for the reasons activations_avx512.cpp gives (exact max,
// the same scalar division, one rounding of x * s, vroundps half to even like nearbyint).
// 32 values per step pack to 32 int8 with two saturating packs (exact after the clamp)
// and one lane fix-up; the tail runs the scalar formula.
#include <immintrin.h>

#include <cmath>

#include "ternary/dispatch.h"

namespace nanochat {
namespace {

inline int8_t quantize_one(float x, float s) {
  float r = std::nearbyint(x * s);
  r = r > 127.0f ? 127.0f : (r < -128.0f ? -128.0f : r);
  return int8_t(r);
}

}  // namespace

int64_t quantize_activations_avx2(const float* x, int64_t t0, int64_t t1, int64_t k,
                                  int8_t* q, float* x_scale) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * k;
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xt + i), absmask);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or infinite
      m = _mm256_max_ps(m, a);
    }
    if (_mm256_movemask_ps(bad)) return t;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    for (; i < k; ++i) {  // the scalar scan's NaN handling on the tail
      const float a = std::fabs(xt[i]);
      if (!(a <= amax)) {
        amax = a;
        if (std::isnan(a)) break;
      }
    }
    if (!std::isfinite(amax)) return t;
    const float s = 127.0f / (amax < 1e-5f ? 1e-5f : amax);
    const __m256 vs = _mm256_set1_ps(s);
    int8_t* qt = q + t * k;
    auto cvt = [&](int64_t j) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xt + j), vs),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    };
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i = 0; i + 32 <= k; i += 32) {
      // packs work per 128-bit lane: bytes end in dword order 0 2 4 6 1 3 5 7; permute back
      const __m256i w01 = _mm256_packs_epi32(cvt(i), cvt(i + 8));
      const __m256i w23 = _mm256_packs_epi32(cvt(i + 16), cvt(i + 24));
      const __m256i b = _mm256_packs_epi16(w01, w23);
      __m256i* out = reinterpret_cast<__m256i*>(qt + i);
      _mm256_storeu_si256(out, _mm256_permutevar8x32_epi32(b, order));
    }
    for (; i < k; ++i) qt[i] = quantize_one(xt[i], s);
    x_scale[t] = 1.0f / s;
  }
  return -1;
}

}  // namespace nanochat
