// bf16 row kernels, AVX2 (bf16_rows.h): round-to-nearest-even in integer ops, so the bits
// equal the scalar reference's; 8 floats per step, the scalar formula on the tail.
#include <immintrin.h>

#include <cstring>

#include "rows/bf16_rows.h"

namespace nanochat {
namespace bf16_kernels {
namespace {

inline uint16_t rne_one(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// 8 floats -> 8 bf16 (rounded to nearest even, NaN -> 0x7FC0) in the low 128 bits.
inline __m128i bf16_rne(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // every lane is <= 0xFFFF: the unsigned-saturating pack is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

void to_bf16_avx2(const float* x, int64_t n, float mul, uint16_t* out) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     bf16_rne(_mm256_mul_ps(_mm256_loadu_ps(x + i), m)));
  for (; i < n; ++i) out[i] = rne_one(x[i] * mul);
}

void int8_to_bf16_avx2(const int8_t* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + i));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), bf16_rne(f));  // small ints: exact
  }
  for (; i < n; ++i) out[i] = rne_one(float(x[i]));
}

void from_bf16_avx2(const uint16_t* x, int64_t n, float mul, float* out) {
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), m));
  }
  for (; i < n; ++i) {
    const uint32_t u = uint32_t(x[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    out[i] = f * mul;
  }
}

}  // namespace

const Kernels avx2 = {"avx2", to_bf16_avx2, int8_to_bf16_avx2, from_bf16_avx2};

}  // namespace bf16_kernels
}  // namespace nanochat
