// NEON i8mm kernel (built with -march=armv8.2-a+dotprod+i8mm; run only where HWCAP2 / sysctl
// report i8mm, as Isa::neon_dotprod's kernel for several tokens: prefill). SMMLA multiplies a
// 2 x 8 int8 matrix by the transpose of another into a 2 x 2 int32 tile: 32 multiply-adds
// (2 rows x 2 tokens x 8 columns) per instruction where SDOT does 16.
// The TK2 quarters unpack as in kernels_neon_dotprod.cpp (field n of quarter h = code + 1 of
// 16 contiguous columns); zipping the 64-bit halves of two rows' fields (and of two tokens'
// activations) gives SMMLA's operands. Tiles of 4 rows x 4 tokens (four 2 x 2 accumulators);
// the rows and tokens past the last whole tile run the SDOT kernel. Integer arithmetic:
// bit-identical to the scalar kernel.
#include <arm_neon.h>

#include "ternary/kernels_driver.h"

namespace nanochat {
namespace {

inline int8x16_t zip_lo(int8x16_t a, int8x16_t b) {
  return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}
inline int8x16_t zip_hi(int8x16_t a, int8x16_t b) {
  return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

// Rows [r, r + 4) x tokens [t, t + 4). acc[p][u] holds rows r + 2p, r + 2p + 1 by tokens
// t + 2u, t + 2u + 1 as [r0 t0, r0 t1, r1 t0, r1 t1].
void tile4x4(const GemmArgs& a, int64_t r, int64_t t) {
  const uint8x16_t m3 = vdupq_n_u8(3);
  int32x4_t acc[2][2];
  for (int p = 0; p < 2; ++p)
    for (int u = 0; u < 2; ++u) acc[p][u] = vdupq_n_s32(0);
  const int64_t nb = a.cols / 256;
  const uint8_t* w0 = w_row(a, r);
  const int64_t bs = w_block_step(a), rs = w_row_step(a);
  for (int64_t b = 0; b < nb; ++b) {
    for (int h = 0; h < 4; ++h) {
      uint8x16_t pk[4];
      for (int i = 0; i < 4; ++i) pk[i] = vld1q_u8(w0 + i * rs + b * bs + 16 * h);
      for (int n = 0; n < 4; ++n) {
        int8x16_t c[4];
        for (int i = 0; i < 4; ++i) {
          const uint8x16_t s = n == 0   ? pk[i]
                               : n == 1 ? vshrq_n_u8(pk[i], 2)
                               : n == 2 ? vshrq_n_u8(pk[i], 4)
                                        : vshrq_n_u8(pk[i], 6);
          c[i] = vreinterpretq_s8_u8(n == 3 ? s : vandq_u8(s, m3));
        }
        int8x16_t x[4];
        for (int j = 0; j < 4; ++j) x[j] = vld1q_s8(a.q + (t + j) * a.q_stride + b * 256 + 64 * n + 16 * h);
        for (int u = 0; u < 2; ++u) {
          const int8x16_t xl = zip_lo(x[2 * u], x[2 * u + 1]), xh = zip_hi(x[2 * u], x[2 * u + 1]);
          for (int p = 0; p < 2; ++p) {
            acc[p][u] = vmmlaq_s32(acc[p][u], zip_lo(c[2 * p], c[2 * p + 1]), xl);
            acc[p][u] = vmmlaq_s32(acc[p][u], zip_hi(c[2 * p], c[2 * p + 1]), xh);
          }
        }
      }
    }
  }
  for (int p = 0; p < 2; ++p)
    for (int u = 0; u < 2; ++u) {
      int32_t v[4];
      vst1q_s32(v, acc[p][u]);
      const int64_t rr = r + 2 * p, tt = t + 2 * u;
      a.y[tt * a.y_stride + rr] = finish(a, tt, v[0]);
      a.y[(tt + 1) * a.y_stride + rr] = finish(a, tt + 1, v[1]);
      a.y[tt * a.y_stride + rr + 1] = finish(a, tt, v[2]);
      a.y[(tt + 1) * a.y_stride + rr + 1] = finish(a, tt + 1, v[3]);
    }
}

}  // namespace

// Whole 4 x 4 tiles here; the last (r1 - r0) % 4 rows and (t1 - t0) % 4 tokens on SDOT. With
// TK2 tiles r0 is a tile boundary, so every 4-row group stays inside one tile; the SDOT
// kernel gets its leftover rows with 4 tokens or more (one row at a time) and its leftover
// tokens over the whole [r0, r1).
void gemm_neon_i8mm(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  const int64_t r4 = r0 + (r1 - r0) / 4 * 4, t4 = t0 + (t1 - t0) / 4 * 4;
  for (int64_t r = r0; r < r4; r += 4)
    for (int64_t t = t0; t < t4; t += 4) tile4x4(a, r, t);
  if (r4 < r1 && t0 < t4) gemm_neon_dotprod(a, r4, r1, t0, t4);
  if (t4 < t1) gemm_neon_dotprod(a, r0, r1, t4, t1);
}

}  // namespace nanochat
