// AVX-512 VNNI kernel (built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni).
// vpdpbusd multiplies the unsigned TK2 code (0..2) by the signed int8 activation
// and adds groups of 4 into int32 lanes; the +1 offset is removed by qsum later.
#include <immintrin.h>

#include <cstring>

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

// ---- ternary_gemm_codes: P 16-row panels x T tokens ------------------------------------
// Per 4-column group: P weight loads, T 4-byte activation broadcasts and P * T vpdpbusd,
// each giving 16 rows' partial dots in its lanes. 2 x 8 keeps 16 accumulators in flight
// (vpdpbusd latency) and is bound by vpdpbusd, not loads. Lanes end as whole dots, so
// the store is a subtract, convert and scale: ternary_gemm's finish(), 16 rows at once.
template <int P, int T>
inline void panel_tile(const PanelArgs& a, int64_t p, int64_t t) {
  __m512i acc[P][T];
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_si512();
  const int64_t panel = 16 * a.cols, groups = a.cols / 4;
  const uint8_t* w = a.w + p * panel;
  const int8_t* x = a.q + t * a.cols;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[P];
    for (int i = 0; i < P; ++i) wv[i] = _mm512_loadu_si512(w + i * panel + g * 64);
    for (int j = 0; j < T; ++j) {
      int32_t four;
      std::memcpy(&four, x + j * a.cols + 4 * g, 4);
      const __m512i xb = _mm512_set1_epi32(four);
      for (int i = 0; i < P; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[i], xb);
    }
  }
  for (int j = 0; j < T; ++j) {
    const __m512i qs = _mm512_set1_epi32(a.qsum[t + j]);
    const __m512 sc = _mm512_set1_ps(a.w_scale * a.x_scale[t + j]);
    for (int i = 0; i < P; ++i) {
      const int64_t r = (p + i) * 16, n = a.rows - r;
      const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], qs)), sc);
      _mm512_mask_storeu_ps(a.y + (t + j) * a.rows + r, m, v);
    }
  }
}

// All tokens of [t0, t1) pass over a panel pair while its weights stay in L1/L2.
template <int P>
inline void panel_tokens(const PanelArgs& a, int64_t p, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 8 <= t1; t += 8) panel_tile<P, 8>(a, p, t);
  switch (t1 - t) {
    case 7: panel_tile<P, 7>(a, p, t); break;
    case 6: panel_tile<P, 6>(a, p, t); break;
    case 5: panel_tile<P, 5>(a, p, t); break;
    case 4: panel_tile<P, 4>(a, p, t); break;
    case 3: panel_tile<P, 3>(a, p, t); break;
    case 2: panel_tile<P, 2>(a, p, t); break;
    case 1: panel_tile<P, 1>(a, p, t); break;
    default: break;
  }
}

}  // namespace

void gemm_avx512vnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  drive<Tile, 4, 4>(a, r0, r1, t0, t1);
}

void gemm_panels_avx512vnni(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) panel_tokens<2>(a, p, t0, t1);
  if (p < p1) panel_tokens<1>(a, p, t0, t1);
}

}  // namespace nanochat
