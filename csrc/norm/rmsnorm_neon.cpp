// RMSNorm row kernels, NEON (rmsnorm.h; Armv8.0 Advanced SIMD, no extra flags): 4-lane sums,
// the last dim % 4 elements in scalar code.
#include <arm_neon.h>

#include <cmath>

#include "norm/rmsnorm.h"

namespace nanochat {
namespace norm_kernels {
namespace {

float fwd_neon(const float* x, const float* w, int64_t dim, float eps, float* y) {
  float32x4_t ss = vdupq_n_f32(0.0f);
  int64_t i = 0;
  for (; i + 4 <= dim; i += 4) {
    const float32x4_t v = vld1q_f32(x + i);
    ss = vfmaq_f32(ss, v, v);
  }
  float s = vaddvq_f32(ss);
  for (int64_t j = i; j < dim; ++j) s += x[j] * x[j];
  const float rstd = 1.0f / std::sqrt(s / float(dim) + eps);
  const float32x4_t rs = vdupq_n_f32(rstd);
  for (i = 0; i + 4 <= dim; i += 4)
    vst1q_f32(y + i, vmulq_f32(vmulq_f32(vld1q_f32(x + i), rs), vld1q_f32(w + i)));
  for (; i < dim; ++i) y[i] = x[i] * rstd * w[i];
  return rstd;
}

// gx = rstd * (gy*w - xhat * mean(gy*w*xhat)), xhat = x * rstd; gw += gy * xhat.
void bwd_neon(const float* gy, const float* x, const float* w, float rstd, int64_t dim, float* gx,
              float* gw_acc) {
  const float32x4_t rs = vdupq_n_f32(rstd);
  float32x4_t dv = vdupq_n_f32(0.0f);
  int64_t i = 0;
  for (; i + 4 <= dim; i += 4) {
    const float32x4_t g = vmulq_f32(vld1q_f32(gy + i), vld1q_f32(w + i));
    dv = vfmaq_f32(dv, g, vmulq_f32(vld1q_f32(x + i), rs));
  }
  float dot = vaddvq_f32(dv);
  for (int64_t j = i; j < dim; ++j) dot += gy[j] * w[j] * (x[j] * rstd);
  const float m = dot / float(dim);
  const float32x4_t mv = vdupq_n_f32(m);
  for (i = 0; i + 4 <= dim; i += 4) {
    const float32x4_t g = vld1q_f32(gy + i);
    const float32x4_t xhat = vmulq_f32(vld1q_f32(x + i), rs);
    const float32x4_t gw = vmulq_f32(g, vld1q_f32(w + i));
    vst1q_f32(gx + i, vmulq_f32(rs, vfmsq_f32(gw, xhat, mv)));
    vst1q_f32(gw_acc + i, vfmaq_f32(vld1q_f32(gw_acc + i), g, xhat));
  }
  for (; i < dim; ++i) {
    const float xhat = x[i] * rstd;
    gx[i] = rstd * (gy[i] * w[i] - xhat * m);
    gw_acc[i] += gy[i] * xhat;
  }
}

}  // namespace

const Kernels neon = {"neon", fwd_neon, bwd_neon};

}  // namespace norm_kernels
}  // namespace nanochat
