// SwiGLU row kernels, NEON (swiglu.h; Armv8.0 Advanced SIMD, no extra flags): the vector
// sigmoid of common/neon_math.h, 4 floats per step, the tail through padded copies. Within
// float rounding and the exp polynomial's ~1e-7 relative error of the scalar reference
// (tests/cpp/test_rowwise.cpp bounds both against double math).
#include <arm_neon.h>

#include "act/swiglu.h"
#include "common/neon_math.h"

namespace nanochat {
namespace swiglu_kernels {
namespace {

void fwd_neon(const float* g, const float* u, int64_t n, float* h) {
  for4(n, [&](bool tail, int64_t i, int64_t left) {
    const float32x4_t gv = load4(g + i, tail, left);
    const float32x4_t silu = vmulq_f32(gv, sigmoid_ps(gv));
    store4(h + i, tail, left, vmulq_f32(silu, load4(u + i, tail, left)));
  });
}

void bwd_neon(const float* gh, const float* g, const float* u, int64_t n, float* gg,
              float* gu) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  for4(n, [&](bool tail, int64_t i, int64_t left) {
    const float32x4_t gv = load4(g + i, tail, left);
    const float32x4_t d = load4(gh + i, tail, left);
    const float32x4_t s = sigmoid_ps(gv);
    store4(gu + i, tail, left, vmulq_f32(d, vmulq_f32(gv, s)));
    const float32x4_t ds = vmulq_f32(s, vfmaq_f32(one, gv, vsubq_f32(one, s)));
    const float32x4_t du = vmulq_f32(d, load4(u + i, tail, left));
    store4(gg + i, tail, left, vmulq_f32(du, ds));
  });
}

}  // namespace

const Kernels neon = {"neon", fwd_neon, bwd_neon};

}  // namespace swiglu_kernels
}  // namespace nanochat
