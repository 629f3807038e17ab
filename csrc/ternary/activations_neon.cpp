// NEON per-token absmax int8 quantization (Armv8.0 Advanced SIMD, no extra flags), for
// Isa::neon and Isa::neon_dotprod. Bit-identical to the scalar loop in activations.cpp: the
// max of |x| is exact in any order, the scale is the same scalar division, x * s is one
// rounding either way, vrndnq_f32 rounds half to even like nearbyint in the default mode,
// and the clamped, rounded values convert to int exactly.
#include <arm_neon.h>

#include <cfloat>
#include <cmath>

#include "ternary/dispatch.h"

namespace nanochat {

int64_t quantize_activations_neon(const float* x, int64_t t0, int64_t t1, int64_t k, int8_t* q,
                                  float* x_scale) {
  const float32x4_t fmax = vdupq_n_f32(FLT_MAX);
  const float32x4_t lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * k;
    float32x4_t m = vdupq_n_f32(0.0f);
    uint32x4_t finite = vdupq_n_u32(~0u);  // |x| <= FLT_MAX is false for NaN and infinities
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) {
      const float32x4_t a = vabsq_f32(vld1q_f32(xt + i));
      finite = vandq_u32(finite, vcleq_f32(a, fmax));
      m = vmaxq_f32(m, a);
    }
    bool bad = vminvq_u32(finite) == 0;
    float amax = vmaxvq_f32(m);
    for (; i < k; ++i) {
      const float a = std::fabs(xt[i]);
      if (!(a <= FLT_MAX)) bad = true;
      else if (a > amax) amax = a;
    }
    if (bad) return t;
    const float s = 127.0f / (amax < 1e-5f ? 1e-5f : amax);
    const float32x4_t vs = vdupq_n_f32(s);
    auto code = [&](int64_t o) {
      const float32x4_t r = vrndnq_f32(vmulq_f32(vld1q_f32(xt + o), vs));
      return vmovn_s32(vcvtq_s32_f32(vminq_f32(vmaxq_f32(r, lo), hi)));
    };
    int8_t* qt = q + t * k;
    i = 0;
    for (; i + 8 <= k; i += 8) vst1_s8(qt + i, vmovn_s16(vcombine_s16(code(i), code(i + 4))));
    for (; i < k; ++i) {
      float r = std::nearbyint(xt[i] * s);
      r = r > 127.0f ? 127.0f : (r < -128.0f ? -128.0f : r);
      qt[i] = int8_t(r);
    }
    x_scale[t] = 1.0f / s;
  }
  return -1;
}

}  // namespace nanochat
