// The epilogue shared by the two NEON panel kernels (panels_neon.cpp: Armv8.0 vmlal_s8,
// panels_neon_dotprod.cpp: SDOT). Included only by those two files; everything sits in an
// anonymous namespace, so no inline function is shared between files built with different
// ISA flags.
#pragma once

#include <arm_neon.h>

#include <cstdint>

#include "ternary/dispatch.h"

namespace nanochat {
namespace {

// ternary_gemm's finish() for rows [r, r + 4) of token t: float(acc - qsum) * (w_scale *
// x_scale), the same two roundings as the scalar kernel; rows past a.rows left alone.
inline void store_rows4(const PanelArgs& a, int64_t r, int64_t t, int32x4_t acc) {
  const int64_t n = a.rows - r;
  if (n <= 0) return;
  const float32x4_t v = vmulq_f32(vcvtq_f32_s32(vsubq_s32(acc, vdupq_n_s32(a.qsum[t]))),
                                  vdupq_n_f32(a.w_scale * a.x_scale[t]));
  float* y = a.y + t * a.rows + r;
  if (n >= 4) {
    vst1q_f32(y, v);
  } else {
    float b[4];
    vst1q_f32(b, v);
    for (int64_t i = 0; i < n; ++i) y[i] = b[i];
  }
}

}  // namespace
}  // namespace nanochat
