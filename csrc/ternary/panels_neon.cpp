// ternary_gemm_codes' baseline NEON kernel (Armv8.0 Advanced SIMD, no extra flags; CPUs
// without SDOT). dispatch.h's 16-row panels: per 4-column group, four 16-byte vectors of
// 4 rows x 4 columns. vmlal_s8 multiplies each half (2 rows x 4 columns) by the token's 4
// activation bytes (duplicated to 8) into int16 lanes, one per (row, column); every kFlush
// groups vpadalq_s16 folds column pairs into int32, and at the end vpaddq_s32 folds the
// other pair, leaving 4 whole row dots per vector (no horizontal sums). Integer
// arithmetic: bit-identical to the scalar TK2 kernel.
#include <arm_neon.h>

#include <cstring>

#include "ternary/panels_neon.h"

namespace nanochat {
namespace {

// One product (code + 1) * q is in [-256, 254]; 128 of them sum to at least -32768 and at
// most 32512, so an int16 lane holds 128 groups without wrapping.
constexpr int64_t kFlush = 128;

// One panel (16 rows) x T tokens: 8 T int16 accumulators (24 at T = 3, with the 4 weight
// vectors and a broadcast: 29 of the 32 registers); the int32 sums are touched once per
// flush.
template <int T>
void panel_tile(const PanelArgs& a, int64_t p, int64_t t) {
  const int64_t groups = a.cols / 4;
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w + p * 16 * a.cols);
  const int8_t* x = a.q + t * a.cols;
  int32x4_t sums[T][8];
  for (int j = 0; j < T; ++j)
    for (int k = 0; k < 8; ++k) sums[j][k] = vdupq_n_s32(0);
  for (int64_t g0 = 0; g0 < groups; g0 += kFlush) {
    const int64_t g1 = g0 + kFlush < groups ? g0 + kFlush : groups;
    int16x8_t acc[T][8];
    for (int j = 0; j < T; ++j)
      for (int k = 0; k < 8; ++k) acc[j][k] = vdupq_n_s16(0);
    for (int64_t g = g0; g < g1; ++g) {
      const int8_t* wg = w + g * 64;
      const int8x16_t wv[4] = {vld1q_s8(wg), vld1q_s8(wg + 16), vld1q_s8(wg + 32),
                               vld1q_s8(wg + 48)};
      for (int j = 0; j < T; ++j) {
        int32_t four;
        std::memcpy(&four, x + j * a.cols + 4 * g, 4);
        const int8x8_t xb = vreinterpret_s8_s32(vdup_n_s32(four));
        for (int h = 0; h < 4; ++h) {
          acc[j][2 * h] = vmlal_s8(acc[j][2 * h], vget_low_s8(wv[h]), xb);
          acc[j][2 * h + 1] = vmlal_s8(acc[j][2 * h + 1], vget_high_s8(wv[h]), xb);
        }
      }
    }
    for (int j = 0; j < T; ++j)
      for (int k = 0; k < 8; ++k) sums[j][k] = vpadalq_s16(sums[j][k], acc[j][k]);
  }
  // sums[j][2h] = [row 4h columns 0+1, 2+3, row 4h+1 ...], [2h + 1] rows 4h+2, 4h+3.
  for (int j = 0; j < T; ++j)
    for (int h = 0; h < 4; ++h)
      store_rows4(a, p * 16 + 4 * h, t + j, vpaddq_s32(sums[j][2 * h], sums[j][2 * h + 1]));
}

}  // namespace

// All tokens of [t0, t1) pass over one panel while its weights stay in L1.
void gemm_panels_neon(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t t = t0;
    for (; t + 3 <= t1; t += 3) panel_tile<3>(a, p, t);
    switch (t1 - t) {
      case 2: panel_tile<2>(a, p, t); break;
      case 1: panel_tile<1>(a, p, t); break;
      default: break;
    }
  }
}

}  // namespace nanochat
