// ternary_gemm_codes' SDOT kernel (built with -march=armv8.2-a+dotprod; run only where HWCAP /
// sysctl report dotprod): dispatch.h's 16-row panels as four 16-byte vectors per 4-column
// group, each vector 4 rows x 4 columns, which is exactly SDOT's shape: one vdotq adds each
// row's 4-column dot into its int32 lane. A 16-byte load of a token's activations covers 4
// groups, and vdotq_laneq_s32 picks each group's 4 bytes from it by lane (no broadcasts).
// code + 1 (0..2) is a valid signed operand as it is; qsum removes the +1. Integer
// arithmetic: bit-identical to the scalar TK2 kernel.
#include <arm_neon.h>

#include <cstring>

#include "ternary/panels_neon.h"

namespace nanochat {
namespace {

// Group g + L of a 4-group step: its 4 weight vectors times lane L of each token's vector.
template <int L, int T>
inline void step(const int8_t* wg, const int8x16_t (&x)[T], int32x4_t (&acc)[T][4]) {
  const int8x16_t w0 = vld1q_s8(wg), w1 = vld1q_s8(wg + 16), w2 = vld1q_s8(wg + 32),
                  w3 = vld1q_s8(wg + 48);
  for (int j = 0; j < T; ++j) {
    acc[j][0] = vdotq_laneq_s32(acc[j][0], w0, x[j], L);
    acc[j][1] = vdotq_laneq_s32(acc[j][1], w1, x[j], L);
    acc[j][2] = vdotq_laneq_s32(acc[j][2], w2, x[j], L);
    acc[j][3] = vdotq_laneq_s32(acc[j][3], w3, x[j], L);
  }
}

// One panel (16 rows) x T tokens: 4 T int32 accumulators; at T = 4 they, the 4 weight
// vectors and the 4 activation vectors take 24 of the 32 registers.
template <int T>
void panel_tile(const PanelArgs& a, int64_t p, int64_t t) {
  const int64_t groups = a.cols / 4;
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w + p * 16 * a.cols);
  const int8_t* x = a.q + t * a.cols;
  int32x4_t acc[T][4];
  for (int j = 0; j < T; ++j)
    for (int h = 0; h < 4; ++h) acc[j][h] = vdupq_n_s32(0);
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) {
    int8x16_t xv[T];
    for (int j = 0; j < T; ++j) xv[j] = vld1q_s8(x + j * a.cols + 4 * g);
    step<0>(w + g * 64, xv, acc);
    step<1>(w + (g + 1) * 64, xv, acc);
    step<2>(w + (g + 2) * 64, xv, acc);
    step<3>(w + (g + 3) * 64, xv, acc);
  }
  for (; g < groups; ++g) {  // the last groups % 4: one broadcast per token
    int8x16_t xv[T];
    for (int j = 0; j < T; ++j) {
      int32_t four;
      std::memcpy(&four, x + j * a.cols + 4 * g, 4);
      xv[j] = vreinterpretq_s8_s32(vdupq_n_s32(four));
    }
    step<0>(w + g * 64, xv, acc);
  }
  for (int j = 0; j < T; ++j)
    for (int h = 0; h < 4; ++h) store_rows4(a, p * 16 + 4 * h, t + j, acc[j][h]);
}

}  // namespace

// All tokens of [t0, t1) pass over one panel while its weights stay in L1.
void gemm_panels_neon_dotprod(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0,
                              int64_t t1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) panel_tile<4>(a, p, t);
    switch (t1 - t) {
      case 3: panel_tile<3>(a, p, t); break;
      case 2: panel_tile<2>(a, p, t); break;
      case 1: panel_tile<1>(a, p, t); break;
      default: break;
    }
  }
}

}  // namespace nanochat
