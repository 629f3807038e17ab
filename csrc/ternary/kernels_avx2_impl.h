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
#include <cstdint>

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
inline __m256i dot(__m256i acc, __m256i c, __m256i x) { return _mm256_dpbusd_avx_epi32(acc, c, x); }
// vpdpbusd accumulates in int32: the tile never has to fold.
constexpr int64_t kFoldBlocks = INT64_MAX;
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
inline __m256i dot(__m256i acc, __m256i c, __m256i x) {
  return _mm256_add_epi16(acc, _mm256_maddubs_epi16(c, x));
}
// A vpmaddubsw lane is at most 2 * 2 * 128 = 512 in magnitude and a block adds 8 of them
// per lane: int16 partials hold 7 blocks (28672) before they are widened to int32.
constexpr int64_t kFoldBlocks = 7;
#endif

// R rows x T tokens, any layout (in_register: see avx2_math.h). The loop keeps only the R x T partials, the R packed halves
// and their R unpacked code vectors in registers (15 of 16 for 2 x 4): the products of one
// code vector with the T tokens are added in as they come, so nothing spills; the int32
// totals are touched once per kFoldBlocks blocks.
template <int R, int T>
struct Tile {
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    const __m256i m3 = _mm256_set1_epi8(3);
    const int64_t nb = a.cols / 256;
    const uint8_t* w0 = w_row(a, r);
    const int8_t* x0 = a.q + t * a.q_stride;
    const int64_t bs = w_block_step(a), rs = w_row_step(a), qs = a.q_stride;
    int32_t total[R][T] = {};
    for (int64_t b0 = 0; b0 < nb; b0 += kFoldBlocks) {
      const int64_t b1 = std::min(nb, b0 + kFoldBlocks);
      __m256i acc[R][T];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_si256();
      for (int64_t b = b0; b < b1; ++b) {
        for (int h = 0; h < 2; ++h) {
          __m256i packed[R];
          for (int i = 0; i < R; ++i) packed[i] = ld32(w0 + i * rs + b * bs + h * 32);
          const int8_t* x = x0 + b * 256 + h * 32;
          for (int n = 0; n < 4; ++n) {
            __m256i c[R];
            for (int i = 0; i < R; ++i)
              c[i] = _mm256_and_si256(_mm256_srli_epi16(packed[i], 2 * n), m3);
            for (int j = 0; j < T; ++j) {
              const __m256i xv = ld32(x + j * qs + 64 * n);
              for (int i = 0; i < R; ++i) {
                acc[i][j] = dot(acc[i][j], c[i], xv);
                in_register(acc[i][j]);
              }
            }
          }
        }
      }
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j) total[i][j] += hsum_epi32(widen(acc[i][j]));
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j)
        a.y[(t + j) * a.y_stride + r + i] = finish(a, t + j, total[i][j]);
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
