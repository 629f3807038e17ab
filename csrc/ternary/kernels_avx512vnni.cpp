// AVX-512 VNNI kernel (built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni).
// vpdpbusd multiplies the unsigned TK2 code (0..2) by the signed int8 activation
// and adds groups of 4 into int32 lanes; the +1 offset is removed by qsum later.
#include <immintrin.h>

#include <cstring>

#include "common/avx512_vnni.h"
#include "ternary/kernels_avx512_reduce.h"

namespace nanochat {
namespace {

// How far ahead of the GEMV's weight reads to prefetch over row-major TK2 (Pf = true): the
// hardware prefetcher does not follow its 4 or 8 interleaved row streams. TK2 tiles are one
// sequential stream per tile, which it does follow; software prefetches on top of that
// only cost issue slots (Pf = false). `nanochat bench kernels` times both from DRAM
// ("dram", "tiles dram").
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
          __m512i s = acc[i][j];
          s = dpbusd(s, c0, _mm512_loadu_si512(x));
          s = dpbusd(s, c1, _mm512_loadu_si512(x + 64));
          s = dpbusd(s, c2, _mm512_loadu_si512(x + 128));
          s = dpbusd(s, c3, _mm512_loadu_si512(x + 192));
          acc[i][j] = s;
        }
      }
    }
    store_tile<R, T>(a, r, t, acc);
  }
};


// One token (GEMV), 4 rows: no shifts. Masking with 0x03, 0x0C, 0x30, 0xC0 leaves
// code<<2n, so accumulator n holds 4^n times its partial sum; four independent
// accumulators per row also break the vpdpbusd dependency chain. Every 256 blocks
// the 16 accumulators are summed in one reduce16 (lane 4i+n = row i, accumulator n)
// and shifted back by 2n (exact: every lane is a multiple of 4^n; |sum| <= 16 *
// 128*128*4*256 = 2^28 fits int32). The epilogue is a fixed ~40 instructions for the
// 4 rows, against ~200 for a 1536-wide row's dot products: the GEMV runs close to
// its arithmetic limit even with the weights in L3, so the epilogue matters.
template <bool Pf>
void gemv4(const GemmArgs& a, int64_t r, int64_t t) {
  const __m512i m0 = _mm512_set1_epi8(0x03);
  const __m512i m1 = _mm512_set1_epi8(0x0C);
  const __m512i m2 = _mm512_set1_epi8(0x30);
  const __m512i m3 = _mm512_set1_epi8(char(0xC0));
  const int8_t* x = a.q + t * a.q_stride;
  const uint8_t* w0 = w_row(a, r);
  const int64_t ld = w_row_step(a), bs = w_block_step(a);
  __m512i total = _mm512_setzero_si512();
  const int64_t nb = a.cols / 256;
  for (int64_t b0 = 0; b0 < nb; b0 += 256) {
    const int64_t b1 = b0 + 256 < nb ? b0 + 256 : nb;
    __m512i acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int n = 0; n < 4; ++n) acc[i][n] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) {
      // Decode is a stream through every weight matrix, one pass per token: over
      // row-major TK2, fetch kPrefetchBytes ahead of each row stream by hand (into L2:
      // L1 is too small to hold it). Prefetches never fault, so running past the end
      // is safe.
      if (Pf)
        for (int i = 0; i < 4; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(w0 + i * ld + b * bs + kPrefetchBytes),
                       _MM_HINT_T1);
      const __m512i x0 = _mm512_loadu_si512(x + b * 256);
      const __m512i x1 = _mm512_loadu_si512(x + b * 256 + 64);
      const __m512i x2 = _mm512_loadu_si512(x + b * 256 + 128);
      const __m512i x3 = _mm512_loadu_si512(x + b * 256 + 192);
      for (int i = 0; i < 4; ++i) {
        const __m512i p = _mm512_loadu_si512(w0 + i * ld + b * bs);
        acc[i][0] = dpbusd(acc[i][0], _mm512_and_si512(p, m0), x0);
        acc[i][1] = dpbusd(acc[i][1], _mm512_and_si512(p, m1), x1);
        acc[i][2] = dpbusd(acc[i][2], _mm512_and_si512(p, m2), x2);
        acc[i][3] = dpbusd(acc[i][3], _mm512_and_si512(p, m3), x3);
      }
    }
    const __m512i shifts = _mm512_set_epi32(6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0);
    total = _mm512_add_epi32(total, _mm512_srav_epi32(reduce16(&acc[0][0]), shifts));
  }
  // Row i's four sums sit in 128-bit lane i: add within each, then lanes 0, 4, 8, 12.
  total = _mm512_add_epi32(total, _mm512_shuffle_epi32(total, _MM_PERM_BADC));
  total = _mm512_add_epi32(total, _mm512_shuffle_epi32(total, _MM_PERM_CDAB));
  const __m128i dots = _mm512_castsi512_si128(
      _mm512_permutexvar_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0),
                               total));
  const __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(_mm_sub_epi32(dots, _mm_set1_epi32(a.qsum[t]))),
                              _mm_set1_ps(a.w_scale * a.x_scale[t]));
  _mm_storeu_ps(a.y + t * a.y_stride + r, v);
}

template <>
struct Tile<4, 1> {
  static void run(const GemmArgs& a, int64_t r, int64_t t) { gemv4<true>(a, r, t); }
};

// One token, 8 rows, two accumulators per row: the byte's low nibble (codes 0, 1) and,
// after one 16-bit shift, its high nibble (codes 2, 3) are masked with 0x03 (code,
// weight 1) and 0x0C (code << 2, weight 4): `lo` gathers codes 0 and 2, `hi` 4x codes 1
// and 3, and the row's dot is lo + hi / 4 (exact: every lane of hi is a multiple of 4).
// Sixteen accumulators cover 8 rows, so the epilogue (one reduce of 8 vectors, ~40
// instructions) is shared by twice the rows of gemv4: with 1536-wide rows the GEMV
// is bound by vpdpbusd issue, not memory, and the epilogue was a third of its time.
// Every 256 blocks the lanes are folded: |lane| <= 2 * 4*128*128*4*256 = 2^25.
inline __m256i reduce8(const __m512i v[8]) {
  __m512i h[4];
  for (int g = 0; g < 4; ++g)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    h[g] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * g], v[2 * g + 1]),
                            _mm512_unpackhi_epi32(v[2 * g], v[2 * g + 1]));
  // per 128-bit lane: [a, b, c, d] and [e, f, g, h] partial sums
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(h[0], h[1]),
                                        _mm512_unpackhi_epi64(h[0], h[1]));
  const __m512i efgh = _mm512_add_epi32(_mm512_unpacklo_epi64(h[2], h[3]),
                                        _mm512_unpackhi_epi64(h[2], h[3]));
  const __m512i t = _mm512_add_epi32(_mm512_shuffle_i32x4(abcd, efgh, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_i32x4(abcd, efgh, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i u = _mm512_add_epi32(_mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_castsi512_si256(u);
}

template <bool Pf>
void gemv8(const GemmArgs& a, int64_t r, int64_t t) {
  const __m512i m03 = _mm512_set1_epi8(0x03);
  const __m512i m0c = _mm512_set1_epi8(0x0C);
  const int8_t* x = a.q + t * a.q_stride;
  const uint8_t* w0 = w_row(a, r);
  const int64_t ld = w_row_step(a), bs = w_block_step(a);
  __m256i total = _mm256_setzero_si256();
  const int64_t nb = a.cols / 256;
  for (int64_t b0 = 0; b0 < nb; b0 += 256) {
    const int64_t b1 = b0 + 256 < nb ? b0 + 256 : nb;
    __m512i lo[8], hi[8];
    for (int i = 0; i < 8; ++i) lo[i] = hi[i] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) {
      if (Pf)
        for (int i = 0; i < 8; ++i)  // see gemv4
          _mm_prefetch(reinterpret_cast<const char*>(w0 + i * ld + b * bs + kPrefetchBytes),
                       _MM_HINT_T1);
      const __m512i x0 = _mm512_loadu_si512(x + b * 256);
      const __m512i x1 = _mm512_loadu_si512(x + b * 256 + 64);
      const __m512i x2 = _mm512_loadu_si512(x + b * 256 + 128);
      const __m512i x3 = _mm512_loadu_si512(x + b * 256 + 192);
      for (int i = 0; i < 8; ++i) {
        const __m512i p = _mm512_loadu_si512(w0 + i * ld + b * bs);
        const __m512i p4 = _mm512_srli_epi16(p, 4);
        lo[i] = dpbusd(lo[i], _mm512_and_si512(p, m03), x0);
        hi[i] = dpbusd(hi[i], _mm512_and_si512(p, m0c), x1);
        lo[i] = dpbusd(lo[i], _mm512_and_si512(p4, m03), x2);
        hi[i] = dpbusd(hi[i], _mm512_and_si512(p4, m0c), x3);
      }
    }
    for (int i = 0; i < 8; ++i) lo[i] = _mm512_add_epi32(lo[i], _mm512_srai_epi32(hi[i], 2));
    total = _mm256_add_epi32(total, reduce8(lo));
  }
  const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(total, _mm256_set1_epi32(a.qsum[t]))),
                                 _mm256_set1_ps(a.w_scale * a.x_scale[t]));
  _mm256_storeu_ps(a.y + t * a.y_stride + r, v);
}

// One row, one token: the ragged edge of the 4-row tiles (same arithmetic).
template <bool Pf>
void gemv1(const GemmArgs& a, int64_t r, int64_t t) {
  const __m512i m0 = _mm512_set1_epi8(0x03);
  const __m512i m1 = _mm512_set1_epi8(0x0C);
  const __m512i m2 = _mm512_set1_epi8(0x30);
  const __m512i m3 = _mm512_set1_epi8(char(0xC0));
  const int8_t* x = a.q + t * a.q_stride;
  const uint8_t* w = w_row(a, r);
  const int64_t bs = w_block_step(a);
  int32_t total = 0;
  const int64_t nb = a.cols / 256;
  for (int64_t b0 = 0; b0 < nb; b0 += 256) {
    const int64_t b1 = b0 + 256 < nb ? b0 + 256 : nb;
    __m512i acc[4];
    for (int n = 0; n < 4; ++n) acc[n] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) {
      if (Pf)
        _mm_prefetch(reinterpret_cast<const char*>(w + b * bs + kPrefetchBytes), _MM_HINT_T1);
      const __m512i p = _mm512_loadu_si512(w + b * bs);
      acc[0] = dpbusd(acc[0], _mm512_and_si512(p, m0), _mm512_loadu_si512(x + b * 256));
      acc[1] = dpbusd(acc[1], _mm512_and_si512(p, m1), _mm512_loadu_si512(x + b * 256 + 64));
      acc[2] = dpbusd(acc[2], _mm512_and_si512(p, m2), _mm512_loadu_si512(x + b * 256 + 128));
      acc[3] = dpbusd(acc[3], _mm512_and_si512(p, m3), _mm512_loadu_si512(x + b * 256 + 192));
    }
    __m512i s = _mm512_add_epi32(acc[0], _mm512_srai_epi32(acc[1], 2));
    s = _mm512_add_epi32(s, _mm512_srai_epi32(acc[2], 4));
    s = _mm512_add_epi32(s, _mm512_srai_epi32(acc[3], 6));
    total += _mm512_reduce_add_epi32(s);
  }
  a.y[t * a.y_stride + r] = finish(a, t, total);
}

template <>
struct Tile<1, 1> {
  static void run(const GemmArgs& a, int64_t r, int64_t t) { gemv1<true>(a, r, t); }
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
      for (int i = 0; i < P; ++i) acc[i][j] = dpbusd(acc[i][j], wv[i], xb);
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

// One token over rows [r0, r1): 8-row tiles, then the 4- and 1-row edges.
template <bool Pf>
void gemv(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t) {
  int64_t r = r0;
  for (; r + 8 <= r1; r += 8) gemv8<Pf>(a, r, t);
  for (; r + 4 <= r1; r += 4) gemv4<Pf>(a, r, t);
  for (; r < r1; ++r) gemv1<Pf>(a, r, t);
}

}  // namespace

void gemm_avx512vnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  if (t1 - t0 == 1) {
    if (a.w_tile_rows == 1)
      gemv<true>(a, r0, r1, t0);
    else
      gemv<false>(a, r0, r1, t0);
    return;
  }
  drive<Tile, 4, 4>(a, r0, r1, t0, t1);
}

void gemm_panels_avx512vnni(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) panel_tokens<2>(a, p, t0, t1);
  if (p < p1) panel_tokens<1>(a, p, t0, t1);
}

}  // namespace nanochat
