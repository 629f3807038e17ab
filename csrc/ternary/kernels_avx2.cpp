// AVX2 kernel (built with -mavx2 -mfma). Each 64-byte TK2 block is two 32-byte
// halves; half h, shift 2n lines up with activations [64n + 32h, 64n + 32h + 32).
// vpmaddubsw/vpmaddwd as in the AVX-512BW kernel. 2 x 4 tiles fit 16 ymm registers.
#include <immintrin.h>

#include "ternary/kernels_driver.h"

namespace nanochat {
namespace {

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int R, int T>
struct Tile {
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_si256();
    const int64_t nb = a.cols / 256;
    const uint8_t* w0 = w_row(a, r);
    const int64_t bs = w_block_step(a), rs = w_row_step(a);
    for (int64_t b = 0; b < nb; ++b) {
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < R; ++i) {
          const __m256i p = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(w0 + i * rs + b * bs + h * 32));
          const __m256i c0 = _mm256_and_si256(p, m3);
          const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(p, 2), m3);
          const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(p, 4), m3);
          const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(p, 6), m3);
          for (int j = 0; j < T; ++j) {
            const int8_t* x = a.q + (t + j) * a.q_stride + b * 256 + h * 32;
            auto ld = [](const int8_t* p8) {
              return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p8));
            };
            __m256i s = _mm256_maddubs_epi16(c0, ld(x));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c1, ld(x + 64)));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c2, ld(x + 128)));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c3, ld(x + 192)));
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(s, ones));
          }
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j)
        a.y[(t + j) * a.y_stride + r + i] = finish(a, t + j, hsum(acc[i][j]));
  }
};

}  // namespace

void gemm_avx2(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  drive<Tile, 2, 4>(a, r0, r1, t0, t1);
}

}  // namespace nanochat
