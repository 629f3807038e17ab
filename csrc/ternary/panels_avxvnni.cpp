// ternary_gemm_codes' AVX-VNNI kernel (built with -mavx2 -mfma -mavxvnni: Alder Lake and
// later Intel cores, Zen 5): panels_avx2.cpp's 16-row panels read as two 8-row halves, with
// the VEX vpdpbusd in place of vpmaddubsw + vpaddw + vpmaddwd: one instruction adds each
// row's 4-column dot into its int32 lane, so there are no int16 partial sums to flush.
// Integer arithmetic: bit-identical to the scalar TK2 kernel.
#include <immintrin.h>

#include <cstring>

#include "common/avx2_math.h"  // mask8
#include "ternary/dispatch.h"

namespace nanochat {
namespace {

// ternary_gemm's finish() for rows [r, r + 8) of token t: float(acc - qsum) * (w_scale *
// x_scale), rows past a.rows left alone.
inline void store_rows(const PanelArgs& a, int64_t r, int64_t t, __m256i acc) {
  const int64_t n = a.rows - r;
  if (n <= 0) return;
  const __m256i d = _mm256_sub_epi32(acc, _mm256_set1_epi32(a.qsum[t]));
  const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(a.w_scale * a.x_scale[t]));
  float* y = a.y + t * a.rows + r;
  if (n >= 8) {
    _mm256_storeu_ps(y, v);
  } else {
    const __m256i m = mask8(n);
    _mm256_maskstore_ps(y, m, v);
  }
}

// One panel (16 rows) x T tokens: 2 T int32 accumulators, 2 weight vectors and a broadcast
// fit the 16 ymm registers at T = 6. |sum| <= 2 * 128 * cols <= 2^30 (cols <= 2^22).
template <int T>
void panel_tile(const PanelArgs& a, int64_t p, int64_t t) {
  const int64_t panel = 16 * a.cols, groups = a.cols / 4;
  const uint8_t* w = a.w + p * panel;
  const int8_t* x = a.q + t * a.cols;
  __m256i acc[T][2];
#pragma GCC unroll 8
  for (int j = 0; j < T; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + 32));
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) {
      int32_t four;
      std::memcpy(&four, x + j * a.cols + 4 * g, 4);
      const __m256i xb = _mm256_set1_epi32(four);
      acc[j][0] = _mm256_dpbusd_avx_epi32(acc[j][0], w0, xb);
      acc[j][1] = _mm256_dpbusd_avx_epi32(acc[j][1], w1, xb);
    }
  }
  // Fully unrolled, so the accumulators stay registers (a run-time index into acc would
  // make GCC keep the array in memory and store it every iteration).
#pragma GCC unroll 8
  for (int j = 0; j < T; ++j) {
    store_rows(a, p * 16, t + j, acc[j][0]);
    store_rows(a, p * 16 + 8, t + j, acc[j][1]);
  }
}

void panel_tokens(const PanelArgs& a, int64_t p, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 6 <= t1; t += 6) panel_tile<6>(a, p, t);
  switch (t1 - t) {
    case 5: panel_tile<5>(a, p, t); break;
    case 4: panel_tile<4>(a, p, t); break;
    case 3: panel_tile<3>(a, p, t); break;
    case 2: panel_tile<2>(a, p, t); break;
    case 1: panel_tile<1>(a, p, t); break;
    default: break;
  }
}

}  // namespace

void gemm_panels_avxvnni(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  for (int64_t p = p0; p < p1; ++p) panel_tokens(a, p, t0, t1);
}

}  // namespace nanochat
