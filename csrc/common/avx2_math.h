// Small AVX2/FMA helpers shared by the AVX2 and AVX-VNNI kernel files (ternary, dense, norm,
// act, attn, rows). Included only by files built with -mavx2 -mfma; everything sits in an
// anonymous namespace so each file keeps its own copy (the linker cannot pick one built
// with other ISA flags).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace nanochat {
namespace {

// Lanes [0, min(n, 8)) of an 8-lane vector set (all bits), for vmaskmov / vpmaskmov, which
// neither read nor fault past the lanes they name.
inline __m256i mask8(int64_t n) {
  const int32_t k = n >= 8 ? 8 : (n <= 0 ? 0 : int32_t(n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// An empty asm that claims to change v, so v is in a register here. It stops GCC from
// reassociating an accumulator's chain of vpaddw into trees over a whole unrolled block
// (which needs ~40 registers and spills most of them), and from coalescing accumulators
// badly when 16 are live. The kernels' chains are 8 or more independent ones already.
inline void in_register(__m256i& v) { asm("" : "+x"(v)); }

// Full-width loads and stores in the body, masked ones only on the tail (a masked store
// costs several times a plain one on Zen 2): Tail = false ignores m.
template <bool Tail>
inline __m256 load8(const float* p, __m256i m) {
  return Tail ? _mm256_maskload_ps(p, m) : _mm256_loadu_ps(p);
}
template <bool Tail>
inline void store8(float* p, __m256i m, __m256 v) {
  if (Tail)
    _mm256_maskstore_ps(p, m, v);
  else
    _mm256_storeu_ps(p, v);
}

// Calls f.template operator()<Tail>(i, mask) over [0, n) in steps of 8.
template <class F>
inline void for8(int64_t n, F&& f) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) f(std::false_type{}, i, all);
  if (i < n) f(std::true_type{}, i, mask8(n - i));
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Lane i (i < 4) of the result = the sum of the 8 lanes of v[i].
inline __m128 reduce4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// exp(x) for x in [-104, 89] (clamped), as exp_ps of avx512_math.h: 2^k * e^r with
// |r| <= ln2/2 and a degree-6 Taylor polynomial (relative error ~1e-7). Without vscalefps,
// 2^k is applied as 2^(k - k/2) * 2^(k/2), both normal floats over the whole range.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ki = _mm256_cvtps_epi32(k);
  const __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// 1 / (1 + e^-x).
inline __m256 sigmoid_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

}  // namespace
}  // namespace nanochat
