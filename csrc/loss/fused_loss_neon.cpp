// NEON kernels of the fused loss (Armv8.0 Advanced SIMD, no extra flags; chosen at run time
// for the neon and neon_dotprod ISAs, see fused_loss.cpp). The micro-tile is 6 x 16, the
// AVX2 file's shape: 24 accumulators (6 rows x four 4-float vectors), 4 B vectors and an A
// value (FMLA by element) fit in the 32 registers.
//   F32:  the same FMAs in the same k order as the scalar reference, so a tile is
//         bit-identical to it at that shape (scalar_6x16).
// No bf16 tile (the Armv8.6 BFMMLA/BFDOT instructions are not assumed): precision bf16 runs
// these f32 tiles over operands the driver rounds to bf16, as on AVX2.
// The cross-entropy row uses a polynomial exp (as the AVX2 and AVX-512 files) with 2^n built
// in the exponent bits; its sum runs in f32 lanes, so it differs from the scalar reference's
// double sum by float rounding only (tests/cpp/test_fused_loss.cpp bounds it).
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "loss/fused_loss.h"

namespace nanochat::loss_kernels {
namespace {

constexpr int R = 6;   // tile rows
constexpr int C = 16;  // tile columns

void micro_f32(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
               bool accumulate) {
  float32x4_t acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = vdupq_n_f32(0.0f);
  for (int64_t k = 0; k < kc; ++k, ap += R, bp += C) {
    const float32x4_t b0 = vld1q_f32(bp), b1 = vld1q_f32(bp + 4), b2 = vld1q_f32(bp + 8),
                      b3 = vld1q_f32(bp + 12);
    for (int r = 0; r < R; ++r) {
      const float av = ap[r];
      acc[r][0] = vfmaq_n_f32(acc[r][0], b0, av);
      acc[r][1] = vfmaq_n_f32(acc[r][1], b1, av);
      acc[r][2] = vfmaq_n_f32(acc[r][2], b2, av);
      acc[r][3] = vfmaq_n_f32(acc[r][3], b3, av);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* p = c + r * ldc;
    for (int v = 0; v < 4; ++v)
      vst1q_f32(p + 4 * v, accumulate ? vaddq_f32(vld1q_f32(p + 4 * v), acc[r][v]) : acc[r][v]);
  }
}

// exp(x) for x <= 0 (a logit minus the row max), as fused_loss_avx2.cpp: x = n ln2 + r,
// |r| <= ln2/2, degree-7 Taylor polynomial of e^r, then times 2^n written into the exponent
// field. x is clamped at -87, so n >= -126 and 2^n is a normal float.
inline float32x4_t exp_nonpos(float32x4_t x) {
  x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.0f / 5040);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 720), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
  p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

float ce_row(float* x, int64_t n, int32_t t, float scale, bool grad) {
  const int64_t n4 = n & ~int64_t(3), left = n - n4;
  float32x4_t vm = vdupq_n_f32(-INFINITY);
  for (int64_t j = 0; j < n4; j += 4) vm = vmaxq_f32(vm, vld1q_f32(x + j));
  float m = vmaxvq_f32(vm);
  for (int64_t j = n4; j < n; ++j) m = std::max(m, x[j]);
  const float xt = x[t];
  const float32x4_t mv = vdupq_n_f32(m);
  // two chains: the adds are not one long dependency
  float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float32x4_t e0 = exp_nonpos(vsubq_f32(vld1q_f32(x + j), mv));
    const float32x4_t e1 = exp_nonpos(vsubq_f32(vld1q_f32(x + j + 4), mv));
    s0 = vaddq_f32(s0, e0);
    s1 = vaddq_f32(s1, e1);
    if (grad) {
      vst1q_f32(x + j, e0);
      vst1q_f32(x + j + 4, e1);
    }
  }
  if (j < n4) {
    const float32x4_t e = exp_nonpos(vsubq_f32(vld1q_f32(x + j), mv));
    s0 = vaddq_f32(s0, e);
    if (grad) vst1q_f32(x + j, e);
  }
  if (left) {  // padding lanes: exp of the clamp would add ~1e-38 each, so zero them
    float b[4] = {};
    std::memcpy(b, x + n4, size_t(left) * sizeof(float));
    const uint32x4_t lane = {0, 1, 2, 3};
    const uint32x4_t valid = vcltq_u32(lane, vdupq_n_u32(uint32_t(left)));
    const float32x4_t e = vreinterpretq_f32_u32(vandq_u32(
        vreinterpretq_u32_f32(exp_nonpos(vsubq_f32(vld1q_f32(b), mv))), valid));
    s1 = vaddq_f32(s1, e);
    if (grad) {
      vst1q_f32(b, e);
      std::memcpy(x + n4, b, size_t(left) * sizeof(float));
    }
  }
  const float sum = vaddvq_f32(vaddq_f32(s0, s1));
  const float lse = m + std::log(sum);
  if (grad) {
    const float f = scale / sum;
    const float32x4_t fv = vdupq_n_f32(f);
    for (int64_t i = 0; i < n4; i += 4) vst1q_f32(x + i, vmulq_f32(vld1q_f32(x + i), fv));
    for (int64_t i = n4; i < n; ++i) x[i] *= f;
    x[t] -= scale;
  }
  return lse - xt;
}

}  // namespace

const Kernels neon = {"neon", R, C, micro_f32, nullptr, ce_row};

}  // namespace nanochat::loss_kernels
