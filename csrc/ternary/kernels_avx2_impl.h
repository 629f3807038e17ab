// The 256-bit ternary kernels, included by kernels_avx2.cpp (AVX2: vpmaddubsw) and
// kernels_avxvnni.cpp (built with -mavxvnni: the VEX vpdpbusd). In an anonymous namespace:
// each file compiles its own copy with its own ISA flags.
//
// Each 64-byte TK2 block is two 32-byte halves; half h, shift 2n lines up with activations
// [64n + 32h, 64n + 32h + 32). The codes (0..2) are the unsigned operand as they are.
//   AVX2: vpmaddubsw pairs are within +-2 * 2 * 128, so the int16 sums of a block's 8
//   products (+-4096) cannot overflow; one vpmaddwd per block widens them.
//   AVX-VNNI: vpdpbusd accumulates in int32 directly.
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "common/avx2_math.h"
#include "ternary/kernels_driver.h"

namespace nanochat {
namespace {

inline __m256i ld32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// The 4 code vectors of a 32-byte half (shifts 0, 2, 4, 6).
struct Codes {
  __m256i c[4];
  explicit Codes(__m256i p) {
    const __m256i m3 = _mm256_set1_epi8(3);
    c[0] = _mm256_and_si256(p, m3);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(p, 2), m3);
    c[2] = _mm256_and_si256(_mm256_srli_epi16(p, 4), m3);
    c[3] = _mm256_and_si256(_mm256_srli_epi16(p, 6), m3);
  }
};

#if defined(__AVXVNNI__)
// acc (int32 lanes) + the products of one half with the activations at x.
using Partial = __m256i;
inline Partial half_dot(Partial acc, const Codes& k, const int8_t* x) {
  acc = _mm256_dpbusd_avx_epi32(acc, k.c[0], ld32(x));
  acc = _mm256_dpbusd_avx_epi32(acc, k.c[1], ld32(x + 64));
  acc = _mm256_dpbusd_avx_epi32(acc, k.c[2], ld32(x + 128));
  return _mm256_dpbusd_avx_epi32(acc, k.c[3], ld32(x + 192));
}
inline __m256i widen(Partial p) { return p; }
#else
// int16 lanes: at most one block (two halves) before widen().
using Partial = __m256i;
inline Partial half_dot(Partial acc, const Codes& k, const int8_t* x) {
  __m256i s = _mm256_maddubs_epi16(k.c[0], ld32(x));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(k.c[1], ld32(x + 64)));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(k.c[2], ld32(x + 128)));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(k.c[3], ld32(x + 192)));
  return _mm256_add_epi16(acc, s);
}
inline __m256i widen(Partial p) { return _mm256_madd_epi16(p, _mm256_set1_epi16(1)); }
#endif

// R rows x T tokens, any layout: each half's codes are unpacked once for the T tokens.
template <int R, int T>
struct Tile {
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    __m256i acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_si256();
    const int64_t nb = a.cols / 256;
    const uint8_t* w0 = w_row(a, r);
    const int64_t bs = w_block_step(a), rs = w_row_step(a);
    for (int64_t b = 0; b < nb; ++b) {
      for (int i = 0; i < R; ++i) {
        Partial p[T];
        for (int j = 0; j < T; ++j) p[j] = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
          const Codes k(ld32(w0 + i * rs + b * bs + h * 32));
          for (int j = 0; j < T; ++j)
            p[j] = half_dot(p[j], k, a.q + (t + j) * a.q_stride + b * 256 + h * 32);
        }
        for (int j = 0; j < T; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], widen(p[j]));
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j)
        a.y[(t + j) * a.y_stride + r + i] = finish(a, t + j, hsum_epi32(acc[i][j]));
  }
};

// Row sums of 8 int32 vectors, in row order.
inline __m256i reduce8(const __m256i (&v)[8]) {
  const __m256i x = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i y = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(x, y, 0x20),
                          _mm256_permute2x128_si256(x, y, 0x31));
}

// One token over a whole TK2 tile (8 rows): the tile's blocks are read in address order,
// one sequential stream, and each activation vector serves the 8 rows from L1. The int32
// row sums are folded into one vector every block, so the loop holds 8 partials.
inline void gemv_tile8(const GemmArgs& a, int64_t r, int64_t r1, int64_t t) {
  const int64_t nb = a.cols / 256;
  const uint8_t* w = w_row(a, r);
  const int8_t* x = a.q + t * a.q_stride;
  __m256i acc = _mm256_setzero_si256();
  for (int64_t b = 0; b < nb; ++b, w += 8 * TK2_BLOCK_BYTES, x += 256) {
    __m256i p[8];
    for (int i = 0; i < 8; ++i) {
      p[i] = half_dot(_mm256_setzero_si256(), Codes(ld32(w + i * 64)), x);
      p[i] = widen(half_dot(p[i], Codes(ld32(w + i * 64 + 32)), x + 32));
    }
    acc = _mm256_add_epi32(acc, reduce8(p));
  }
  alignas(32) int32_t s[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(s), acc);
  const int64_t n = std::min<int64_t>(8, r1 - r);
  for (int64_t i = 0; i < n; ++i) a.y[t * a.y_stride + r + i] = finish(a, t, s[i]);
}

inline void gemm_256(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  if (a.w_tile_rows == TK2_TILE_ROWS && t1 - t0 < 4) {
    // r0 is a multiple of the tile (dispatch.h); gemv_tile8 writes only rows below r1.
    for (int64_t r = r0; r < r1; r += TK2_TILE_ROWS)
      for (int64_t t = t0; t < t1; ++t) gemv_tile8(a, r, r1, t);
    return;
  }
  drive<Tile, 2, 4>(a, r0, r1, t0, t1);
}

}  // namespace
}  // namespace nanochat
