// AVX2 per-token absmax int8 quantization (built with -mavx2 -mfma). Bit-identical to the
// scalar loop in activations.cpp: the max of |x| is exact in any order, the scale is the
// same scalar division, x * s is one rounding either way, vroundps rounds half to even like
// nearbyint in the default rounding mode, and the clamp to [-128, 127] comes before the
// narrowing (vpackssdw / vpacksswb), which is then exact.
#include <immintrin.h>

#include <algorithm>

#include "common/avx2_math.h"
#include "ternary/dispatch.h"

namespace nanochat {

int64_t quantize_activations_avx2(const float* x, int64_t t0, int64_t t1, int64_t k, int8_t* q,
                                  float* x_scale) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * k;
    auto load = [&](int64_t i) {  // 8 floats from i, 0 past k
      return k - i >= 8 ? _mm256_loadu_ps(xt + i) : _mm256_maskload_ps(xt + i, mask8(k - i));
    };
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) {
      const __m256 v = _mm256_and_ps(load(i), absmask);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, _mm256_set1_ps(3.402823466e38f), _CMP_NLE_UQ));
      amax = _mm256_max_ps(amax, v);
    }
    if (_mm256_movemask_ps(bad)) return t;  // NaN or infinite
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float m = _mm_cvtss_f32(m4);
    const float s = 127.0f / (m < 1e-5f ? 1e-5f : m);
    const __m256 sv = _mm256_set1_ps(s);
    auto codes = [&](int64_t i) {  // 8 codes as int32
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(load(i), sv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    };
    int8_t* qt = q + t * k;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(codes(i), codes(i + 8)),
                                           _mm256_packs_epi32(codes(i + 16), codes(i + 24)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qt + i), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; i < k; i += 8) {
      alignas(32) int32_t c[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(c), codes(i));
      for (int64_t e = 0; e < std::min<int64_t>(8, k - i); ++e) qt[i + e] = int8_t(c[e]);
    }
    x_scale[t] = 1.0f / s;
  }
  return -1;
}

}  // namespace nanochat
