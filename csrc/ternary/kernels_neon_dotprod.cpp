// NEON SDOT kernel (built with -march=armv8.2-a+dotprod; run only where HWCAP / sysctl report
// dotprod). Each 64-byte TK2 block is four 16-byte quarters; in quarter h the 2-bit field at
// shift 2n holds code + 1 of columns 64n + 16h .. 64n + 16h + 15, so each field vector lines
// up with 16 contiguous activations. vdotq_s32 multiplies signed bytes: code + 1 (0..2) is a
// valid signed operand as it is, and qsum removes the +1 (finish).
#include <arm_neon.h>

#include "ternary/kernels_driver.h"

namespace nanochat {
namespace {

// R rows x T tokens: each quarter is unpacked once per row and reused for T tokens. One
// token (the GEMV) keeps two accumulators per row (fields 0-1 and 2-3) to halve the sdot
// dependency chain.
template <int R, int T>
struct Tile {
  static constexpr int S = T == 1 ? 2 : 1;
  static void run(const GemmArgs& a, int64_t r, int64_t t) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t acc[R][T][S];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j)
        for (int s = 0; s < S; ++s) acc[i][j][s] = vdupq_n_s32(0);
    const int64_t nb = a.cols / 256;
    const uint8_t* w0 = w_row(a, r);
    const int64_t bs = w_block_step(a), rs = w_row_step(a);
    for (int64_t b = 0; b < nb; ++b) {
      for (int h = 0; h < 4; ++h) {
        for (int i = 0; i < R; ++i) {
          const uint8x16_t p = vld1q_u8(w0 + i * rs + b * bs + 16 * h);
          const int8x16_t c0 = vreinterpretq_s8_u8(vandq_u8(p, m3));
          const int8x16_t c1 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 2), m3));
          const int8x16_t c2 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 4), m3));
          const int8x16_t c3 = vreinterpretq_s8_u8(vshrq_n_u8(p, 6));
          for (int j = 0; j < T; ++j) {
            const int8_t* x = a.q + (t + j) * a.q_stride + b * 256 + 16 * h;
            int32x4_t& lo = acc[i][j][0];
            int32x4_t& hi = acc[i][j][S - 1];
            lo = vdotq_s32(lo, c0, vld1q_s8(x));
            lo = vdotq_s32(lo, c1, vld1q_s8(x + 64));
            hi = vdotq_s32(hi, c2, vld1q_s8(x + 128));
            hi = vdotq_s32(hi, c3, vld1q_s8(x + 192));
          }
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) {
        int32x4_t s = acc[i][j][0];
        if (S == 2) s = vaddq_s32(s, acc[i][j][S - 1]);
        a.y[(t + j) * a.y_stride + r + i] = finish(a, t + j, vaddvq_s32(s));
      }
  }
};

}  // namespace

// One token (decode): 8 rows, so a TK2 tile's blocks are read in one sequential pass;
// 16 accumulators. Several tokens: 4 x 4 tiles, 16 accumulators, 4 codes and 4 activation
// vectors in the 32 registers.
void gemm_neon_dotprod(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  if (t1 - t0 == 1)
    drive<Tile, 8, 1>(a, r0, r1, t0, t1);
  else
    drive<Tile, 4, 4>(a, r0, r1, t0, t1);
}

}  // namespace nanochat
