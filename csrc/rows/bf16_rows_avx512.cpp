// bf16 row kernels, AVX-512F/BW (bf16_rows.h): round-to-nearest-even in integer ops, so no
// AVX512-BF16 is needed and the bits equal the scalar reference's.
#include <immintrin.h>

#include "common/avx512_math.h"
#include "rows/bf16_rows.h"

namespace nanochat {
namespace bf16_kernels {
namespace {

inline __m256i bf16_rne(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

void to_bf16_avx512(const float* x, int64_t n, float mul, uint16_t* out) {
  const __m512 m = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = mask16(n - i);
    const __m256i b = bf16_rne(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), m));
    _mm256_mask_storeu_epi16(out + i, k, b);
  }
}

void int8_to_bf16_avx512(const int8_t* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = mask16(n - i);
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, x + i)));
    _mm256_mask_storeu_epi16(out + i, k, bf16_rne(f));  // small integers: exact
  }
}

void from_bf16_avx512(const uint16_t* x, int64_t n, float mul, float* out) {
  const __m512 m = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = mask16(n - i);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, x + i));
    const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(f, m));
  }
}

}  // namespace

const Kernels avx512 = {"avx512", to_bf16_avx512, int8_to_bf16_avx512, from_bf16_avx512};

}  // namespace bf16_kernels
}  // namespace nanochat
