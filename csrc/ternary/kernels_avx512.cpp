// AVX-512BW kernel without VNNI (Skylake-X class; built with -mavx512f -mavx512bw
// -mavx512vl). vpmaddubsw: code (0..2) x int8 pairs into int16 (|.| <= 512, four
// summed <= 2048, no saturation), then vpmaddwd by ones into int32.
#include <immintrin.h>

#include "ternary/kernels_avx512_reduce.h"

namespace nanochat {
namespace {

template <int R, int T>
struct Tile {
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i ones = _mm512_set1_epi16(1);
    __m512i acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_si512();
    const int64_t nb = a.cols / 256;
    const uint8_t* w0 = w_row(a, r);
    const int64_t bs = w_block_step(a), rs = w_row_step(a);
    for (int64_t b = 0; b < nb; ++b) {
      for (int i = 0; i < R; ++i) {
        const __m512i p = _mm512_loadu_si512(w0 + i * rs + b * bs);
        const __m512i c0 = _mm512_and_si512(p, m3);
        const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), m3);
        const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), m3);
        const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), m3);
        for (int j = 0; j < T; ++j) {
          const int8_t* x = a.q + (t + j) * a.q_stride + b * 256;
          __m512i s = _mm512_maddubs_epi16(c0, _mm512_loadu_si512(x));
          s = _mm512_add_epi16(s, _mm512_maddubs_epi16(c1, _mm512_loadu_si512(x + 64)));
          s = _mm512_add_epi16(s, _mm512_maddubs_epi16(c2, _mm512_loadu_si512(x + 128)));
          s = _mm512_add_epi16(s, _mm512_maddubs_epi16(c3, _mm512_loadu_si512(x + 192)));
          acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_madd_epi16(s, ones));
        }
      }
    }
    store_tile<R, T>(a, r, t, acc);
  }
};

}  // namespace

void gemm_avx512(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  drive<Tile, 4, 4>(a, r0, r1, t0, t1);
}

}  // namespace nanochat
