// AVX-512 VNNI kernel (built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni).
// vpdpbusd multiplies the unsigned TK2 code (0..2) by the signed int8 activation
// and adds groups of 4 into int32 lanes; the +1 offset is removed by qsum later.
#include <immintrin.h>

#include "ternary/kernels_avx512_reduce.h"

namespace nanochat {
namespace {

// How far ahead of the GEMV's weight reads to prefetch. Measured on Zen 4 (1 thread,
// weights in DRAM, 2 MiB pages): 4 KiB reaches ~78% of a plain read loop's rate,
// 8-16 KiB ~100%; the old next-tile prefetch ~45%.
constexpr int64_t kPrefetchBytes = 8192;

// R rows x T tokens: each 64-byte weight block is unpacked once per row and
// reused for T tokens (16 accumulators at 4 x 4).
template <int R, int T>
struct Tile {
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_si512();
    const int64_t nb = a.cols / 256;
    for (int64_t b = 0; b < nb; ++b) {
      for (int i = 0; i < R; ++i) {
        const __m512i p = _mm512_loadu_si512(a.w + (r + i) * a.w_row_bytes + b * 64);
        const __m512i c0 = _mm512_and_si512(p, m3);
        const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), m3);
        const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), m3);
        const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), m3);
        for (int j = 0; j < T; ++j) {
          const int8_t* x = a.q + (t + j) * a.q_stride + b * 256;
          __m512i s = acc[i][j];
          s = _mm512_dpbusd_epi32(s, c0, _mm512_loadu_si512(x));
          s = _mm512_dpbusd_epi32(s, c1, _mm512_loadu_si512(x + 64));
          s = _mm512_dpbusd_epi32(s, c2, _mm512_loadu_si512(x + 128));
          s = _mm512_dpbusd_epi32(s, c3, _mm512_loadu_si512(x + 192));
          acc[i][j] = s;
        }
      }
    }
    store_tile<R, T>(a, r, t, acc);
  }
};

// One token (GEMV): no shifts. Masking with 0x03, 0x0C, 0x30, 0xC0 leaves code<<2n,
// so accumulator n holds 4^n times its partial sum and is shifted back exactly
// (every lane is a multiple of 4^n). Four independent accumulators per row also
// break the vpdpbusd dependency chain. Lanes are folded every 256 blocks, so
// |lane| <= 128*128*4*256 = 2^24 stays far from overflow.
template <int R>
struct Tile<R, 1> {
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    const __m512i m0 = _mm512_set1_epi8(0x03);
    const __m512i m1 = _mm512_set1_epi8(0x0C);
    const __m512i m2 = _mm512_set1_epi8(0x30);
    const __m512i m3 = _mm512_set1_epi8(char(0xC0));
    const int8_t* x = a.q + t * a.q_stride;
    const uint8_t* w[R];
    for (int i = 0; i < R; ++i) w[i] = a.w + (r + i) * a.w_row_bytes;
    __m512i total[R];
    for (int i = 0; i < R; ++i) total[i] = _mm512_setzero_si512();
    const int64_t nb = a.cols / 256;
    for (int64_t b0 = 0; b0 < nb; b0 += 256) {
      const int64_t b1 = b0 + 256 < nb ? b0 + 256 : nb;
      __m512i acc[R][4];
      for (int i = 0; i < R; ++i)
        for (int n = 0; n < 4; ++n) acc[i][n] = _mm512_setzero_si512();
      for (int64_t b = b0; b < b1; ++b) {
        // Decode is a stream through every weight matrix, one pass per token.
        // Hardware prefetchers stop at 4 KiB pages and one core keeps too few
        // misses in flight to fill the memory pipe, so fetch kPrefetchBytes ahead
        // of each row stream by hand (into L2: L1 is too small to hold it). With
        // 768-wide rows that is ~10 tiles ahead, with 16384-wide rows 2 blocks of
        // the same row. Prefetches never fault, so running past the end is safe.
        for (int i = 0; i < R; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(w[i] + b * 64 + kPrefetchBytes),
                       _MM_HINT_T1);
        const __m512i x0 = _mm512_loadu_si512(x + b * 256);
        const __m512i x1 = _mm512_loadu_si512(x + b * 256 + 64);
        const __m512i x2 = _mm512_loadu_si512(x + b * 256 + 128);
        const __m512i x3 = _mm512_loadu_si512(x + b * 256 + 192);
        for (int i = 0; i < R; ++i) {
          const __m512i p = _mm512_loadu_si512(w[i] + b * 64);
          acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], _mm512_and_si512(p, m0), x0);
          acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], _mm512_and_si512(p, m1), x1);
          acc[i][2] = _mm512_dpbusd_epi32(acc[i][2], _mm512_and_si512(p, m2), x2);
          acc[i][3] = _mm512_dpbusd_epi32(acc[i][3], _mm512_and_si512(p, m3), x3);
        }
      }
      for (int i = 0; i < R; ++i) {
        __m512i s = _mm512_add_epi32(acc[i][0], _mm512_srai_epi32(acc[i][1], 2));
        s = _mm512_add_epi32(s, _mm512_srai_epi32(acc[i][2], 4));
        s = _mm512_add_epi32(s, _mm512_srai_epi32(acc[i][3], 6));
        total[i] = _mm512_add_epi32(total[i], s);
      }
    }
    for (int i = 0; i < R; ++i)
      a.y[t * a.y_stride + r + i] = finish(a, t, _mm512_reduce_add_epi32(total[i]));
  }
};

}  // namespace

void gemm_avx512vnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  drive<Tile, 4, 4>(a, r0, r1, t0, t1);
}

}  // namespace nanochat
