// ternary_gemm_codes' AVX2 kernel (built with -mavx2 -mfma): the 16-row panels of
// dispatch.h's PanelArgs, read as two 8-row halves (one 32-byte vector = 8 rows x 4
// columns). Per 4-column group: broadcast the token's 4 activation bytes, vpmaddubsw the
// (code + 1) bytes by them (16 int16 lanes: row i's columns 0+1 and 2+3), and vpaddw into
// int16 accumulators; every kFlush groups one vpmaddwd by ones folds each row's two lanes
// into an int32 sum. Lanes end as whole dots, so there are no horizontal sums, which is what
// makes training's short rows (256-768 columns) fast without VNNI. Integer arithmetic: the
// results are bit-identical to the scalar TK2 kernel's.
#include <immintrin.h>

#include <cstring>

#include "common/avx2_math.h"  // mask8
#include "ternary/dispatch.h"

namespace nanochat {
namespace {

// |(c0 + 1) q0 + (c1 + 1) q1| <= 2 * 2 * 128 = 512 per vpmaddubsw lane (never saturates),
// so 64 groups sum to at most 32768 in magnitude: -32768 is the only extreme and int16
// holds it.
constexpr int64_t kFlush = 64;

// One panel (16 rows) x T tokens: 2 T int16 accumulators, 2 weight vectors and the
// broadcasts stay in the 16 ymm registers at T = 4 (at T = 6 GCC hoists all six broadcasts
// and spills accumulators); the int32 sums live in memory (touched once per flush).
template <int T>
void panel_tile(const PanelArgs& a, int64_t p, int64_t t) {
  const int64_t panel = 16 * a.cols, groups = a.cols / 4;
  const uint8_t* w = a.w + p * panel;
  const int8_t* x = a.q + t * a.cols;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) int32_t sums[T][2][8] = {};
  for (int64_t g0 = 0; g0 < groups; g0 += kFlush) {
    const int64_t g1 = g0 + kFlush < groups ? g0 + kFlush : groups;
    __m256i acc[T][2];
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_si256();
    for (int64_t g = g0; g < g1; ++g) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + 32));
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        int32_t four;
        std::memcpy(&four, x + j * a.cols + 4 * g, 4);
        const __m256i xb = _mm256_set1_epi32(four);
        acc[j][0] = _mm256_add_epi16(acc[j][0], _mm256_maddubs_epi16(w0, xb));
        acc[j][1] = _mm256_add_epi16(acc[j][1], _mm256_maddubs_epi16(w1, xb));
        in_register(acc[j][0]);
        in_register(acc[j][1]);
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j)
      for (int h = 0; h < 2; ++h) {
        __m256i* s = reinterpret_cast<__m256i*>(sums[j][h]);
        _mm256_store_si256(s, _mm256_add_epi32(_mm256_load_si256(s),
                                               _mm256_madd_epi16(acc[j][h], ones)));
      }
  }
  // ternary_gemm's finish(): float(acc - qsum) * (w_scale * x_scale), 8 rows at once.
  const int64_t r0 = p * 16;
  for (int j = 0; j < T; ++j) {
    const __m256i qs = _mm256_set1_epi32(a.qsum[t + j]);
    const __m256 sc = _mm256_set1_ps(a.w_scale * a.x_scale[t + j]);
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r0 + 8 * h, n = a.rows - r;
      if (n <= 0) break;
      const __m256i s = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[j][h]));
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, qs)), sc);
      float* y = a.y + (t + j) * a.rows + r;
      if (n >= 8) {
        _mm256_storeu_ps(y, v);
      } else {
        const __m256i m = mask8(n);
        _mm256_maskstore_ps(y, m, v);
      }
    }
  }
}

// All tokens of [t0, t1) pass over one panel while its weights stay in L1/L2.
void panel_tokens(const PanelArgs& a, int64_t p, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) panel_tile<4>(a, p, t);
  switch (t1 - t) {
    case 3: panel_tile<3>(a, p, t); break;
    case 2: panel_tile<2>(a, p, t); break;
    case 1: panel_tile<1>(a, p, t); break;
    default: break;
  }
}

}  // namespace

void gemm_panels_avx2(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  for (int64_t p = p0; p < p1; ++p) panel_tokens(a, p, t0, t1);
}

}  // namespace nanochat
