// bf16 row kernels, NEON (bf16_rows.h; Armv8.0 Advanced SIMD, no extra flags; the Armv8.6
// BFCVT instructions are not assumed): round-to-nearest-even in integer ops, so the bits
// equal the scalar reference's; 8 floats per step, the scalar formula on the tail.
#include <arm_neon.h>

#include <cstring>

#include "rows/bf16_rows.h"

namespace nanochat {
namespace bf16_kernels {
namespace {

inline uint16_t rne_one(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// 4 floats -> 4 bf16 (rounded to nearest even, NaN -> 0x7FC0).
inline uint16x4_t bf16_rne(float32x4_t x) {
  const uint32x4_t u = vreinterpretq_u32_f32(x);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7FFF))), 16);
  const uint32x4_t ordered = vceqq_f32(x, x);  // all ones unless NaN
  r = vbslq_u32(ordered, r, vdupq_n_u32(0x7FC0));
  return vmovn_u32(r);  // every lane is <= 0xFFFF: the narrowing is exact
}

void to_bf16_neon(const float* x, int64_t n, float mul, uint16_t* out) {
  const float32x4_t m = vdupq_n_f32(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    vst1q_u16(out + i, vcombine_u16(bf16_rne(vmulq_f32(vld1q_f32(x + i), m)),
                                    bf16_rne(vmulq_f32(vld1q_f32(x + i + 4), m))));
  for (; i < n; ++i) out[i] = rne_one(x[i] * mul);
}

void int8_to_bf16_neon(const int8_t* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const int16x8_t w = vmovl_s8(vld1_s8(x + i));
    const float32x4_t lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
    const float32x4_t hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(w)));
    vst1q_u16(out + i, vcombine_u16(bf16_rne(lo), bf16_rne(hi)));  // small ints: exact
  }
  for (; i < n; ++i) out[i] = rne_one(float(x[i]));
}

void from_bf16_neon(const uint16_t* x, int64_t n, float mul, float* out) {
  const float32x4_t m = vdupq_n_f32(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint16x8_t w = vld1q_u16(x + i);
    const float32x4_t lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w), 16));
    const float32x4_t hi = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(w), 16));
    vst1q_f32(out + i, vmulq_f32(lo, m));
    vst1q_f32(out + i + 4, vmulq_f32(hi, m));
  }
  for (; i < n; ++i) {
    const uint32_t u = uint32_t(x[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    out[i] = f * mul;
  }
}

}  // namespace

const Kernels neon = {"neon", to_bf16_neon, int8_to_bf16_neon, from_bf16_neon};

}  // namespace bf16_kernels
}  // namespace nanochat
