// Baseline NEON kernel (Armv8.0 Advanced SIMD, no extra flags): for CPUs without SDOT
// (Cortex-A53/A57/A72, Raspberry Pi 4). Same quarter layout as kernels_neon_dotprod.cpp;
// vmull_s8 / vmlal_s8 multiply code + 1 (0..2) by the int8 activations into int16 and
// vpadalq_s16 widens pairs into int32 once per block. |int16 lane| <= 16 * 2 * 128 = 4096
// over a block's 16 products, so nothing saturates or wraps.
#include <arm_neon.h>

#include "ternary/kernels_driver.h"

namespace nanochat {
namespace {

template <int R, int T>
struct Tile {
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = vdupq_n_s32(0);
    const int64_t nb = a.cols / 256;
    const uint8_t* w0 = w_row(a, r);
    const int64_t bs = w_block_step(a), rs = w_row_step(a);
    for (int64_t b = 0; b < nb; ++b) {
      for (int i = 0; i < R; ++i) {
        int16x8_t lo[T], hi[T];
        for (int j = 0; j < T; ++j) lo[j] = hi[j] = vdupq_n_s16(0);
        for (int h = 0; h < 4; ++h) {
          const uint8x16_t p = vld1q_u8(w0 + i * rs + b * bs + 16 * h);
          const int8x16_t c[4] = {vreinterpretq_s8_u8(vandq_u8(p, m3)),
                                  vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 2), m3)),
                                  vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 4), m3)),
                                  vreinterpretq_s8_u8(vshrq_n_u8(p, 6))};
          for (int j = 0; j < T; ++j) {
            const int8_t* x = a.q + (t + j) * a.q_stride + b * 256 + 16 * h;
            for (int n = 0; n < 4; ++n) {
              const int8x16_t xv = vld1q_s8(x + 64 * n);
              lo[j] = vmlal_s8(lo[j], vget_low_s8(c[n]), vget_low_s8(xv));
              hi[j] = vmlal_high_s8(hi[j], c[n], xv);
            }
          }
        }
        for (int j = 0; j < T; ++j) acc[i][j] = vpadalq_s16(vpadalq_s16(acc[i][j], lo[j]), hi[j]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j)
        a.y[(t + j) * a.y_stride + r + i] = finish(a, t + j, vaddvq_s32(acc[i][j]));
  }
};

}  // namespace

// One token: 8 rows, a TK2 tile in one sequential pass (as kernels_neon_dotprod.cpp).
void gemm_neon(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  if (t1 - t0 == 1)
    drive<Tile, 8, 1>(a, r0, r1, t0, t1);
  else
    drive<Tile, 4, 2>(a, r0, r1, t0, t1);
}

}  // namespace nanochat
