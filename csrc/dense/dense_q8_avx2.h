// The Q8R x q8 GEMM on 256-bit vectors, included by dense_avx2.cpp (AVX2: vpsignb +
// vpmaddubsw + vpmaddwd) and dense_avxvnni.cpp (built with -mavxvnni: one VEX vpdpbusd).
// In an anonymous namespace: each file compiles its own copy with its own ISA flags.
//
// In the Q8R order (dense.h) int32 lane l of a 64-byte slice of a 16-block group belongs to
// block l, so a 32-byte half h of each slice carries blocks 8h .. 8h+7 and an int32 lane
// accumulates its block's exact integer dot over the group's 8 slices. A half then costs
// one int->float conversion and one FMA with d_w * d_x per row and token.
//   AVX2: codes ^ 0x80 are the signed weights; |w| (u8) x sign(x, w) (s8) through
//   vpmaddubsw, whose int16 pairs stay within 2 * 128 * 127 < 2^15, then vpmaddwd.
//   AVX-VNNI: vpdpbusd on the biased codes (u8) x q (s8), starting from block_bias, which
//   removes the +128 exactly (as the AVX-512 kernel).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/avx2_math.h"
#include "dense/dense.h"
#include "ternary/ternary.h"

namespace nanochat {
namespace {

// dot + the per-int32-lane integer dot of 32 weight codes (biased) and 32 activations.
inline __m256i q8_dot(__m256i dot, __m256i codes, __m256i x) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(dot, codes, x);
#else
  const __m256i w = _mm256_xor_si256(codes, _mm256_set1_epi8(char(0x80)));
  const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(dot, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

// Up to 8 fp16 values as floats: all of them (n >= 8) or the first n, reading no further.
inline __m256 load_f16(const uint16_t* s, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::copy(s, s + n, tmp);
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// R rows x T tokens. Per group of gb <= 16 blocks and per half h (blocks 8h ..), lanes
// [0, nl) are live (nl = min(8, gb - 8h)); a partial group's slices are 4 * gb bytes apart
// and its loads are dword-masked, so nothing past a row's codes is read.
template <int R, int T>
struct TileQ8Avx2 {
  static void run(const DenseMatrix& w, const DenseActs& a, int64_t r, int64_t t, float* y,
                  int64_t ldy) {
    const int64_t n = w.cols, nb = n / 32, ld = w.row_stride(), lds = w.scale_stride();
    const uint8_t* W = static_cast<const uint8_t*>(w.data) + r * ld;
    const uint16_t* S = w.scales + r * lds;
    __m256 acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g += 16) {
      const int64_t gb = std::min<int64_t>(16, nb - g), step = 4 * gb;
      for (int64_t h = 0; h * 8 < gb; ++h) {
        const int64_t nl = std::min<int64_t>(8, gb - 8 * h), off = g * 32 + h * 32;
        const __m256i lm = mask8(nl);
        __m256i dot[R][T];
        for (int j = 0; j < T; ++j) {
#if defined(__AVXVNNI__)
          const __m256i bias = _mm256_maskload_epi32(a.block_bias + (t + j) * nb + g + 8 * h, lm);
#else
          const __m256i bias = _mm256_setzero_si256();
#endif
          for (int i = 0; i < R; ++i) dot[i][j] = bias;
        }
        if (nl == 8) {
          for (int c = 0; c < 8; ++c) {
            const int64_t o = off + c * step;
            for (int i = 0; i < R; ++i) {
              const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + i * ld + o));
              for (int j = 0; j < T; ++j)
                dot[i][j] = q8_dot(dot[i][j], wv,
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                       a.q + (t + j) * n + o)));
            }
          }
        } else {
          for (int c = 0; c < 8; ++c) {
            const int64_t o = off + c * step;
            for (int i = 0; i < R; ++i) {
              const __m256i wv =
                  _mm256_maskload_epi32(reinterpret_cast<const int*>(W + i * ld + o), lm);
              for (int j = 0; j < T; ++j)
                dot[i][j] = q8_dot(dot[i][j], wv,
                                   _mm256_maskload_epi32(
                                       reinterpret_cast<const int*>(a.q + (t + j) * n + o), lm));
            }
          }
        }
        for (int i = 0; i < R; ++i) {
          const __m256 ws = load_f16(S + i * lds + g + 8 * h, nl);
          for (int j = 0; j < T; ++j) {
            const __m256 xd = _mm256_maskload_ps(a.block_d + (t + j) * nb + g + 8 * h, lm);
            acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][j]), _mm256_mul_ps(ws, xd),
                                        acc[i][j]);
          }
        }
      }
    }
    for (int j = 0; j < T; ++j)
      for (int i = 0; i < R; ++i) y[(t + j) * ldy + r + i] = hsum_ps(acc[i][j]);
  }
};

// Rows in 2s (single rows for one token: a one-token GEMV then reads one sequential stream,
// as the AVX-512 kernel found best), tokens in 2s.
inline void gemm_q8_avx2(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1,
                         float* y, int64_t ldy) {
  auto tokens = [&](auto rows_tag, int64_t r) {
    constexpr int R = decltype(rows_tag)::value;
    int64_t t = 0;
    for (; t + 2 <= a.tokens; t += 2) TileQ8Avx2<R, 2>::run(w, a, r, t, y, ldy);
    if (t < a.tokens) TileQ8Avx2<R, 1>::run(w, a, r, t, y, ldy);
  };
  int64_t r = r0;
  if (a.tokens > 1)
    for (; r + 2 <= r1; r += 2) tokens(std::integral_constant<int, 2>{}, r);
  for (; r < r1; ++r) tokens(std::integral_constant<int, 1>{}, r);
}

}  // namespace
}  // namespace nanochat
