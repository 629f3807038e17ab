// Small NEON helpers shared by the aarch64 kernel files (dense, act, attn, loss). Advanced
// SIMD is baseline on AArch64, so these need no ISA flag; everything sits in an anonymous
// namespace so each file keeps its own copy (no inline function is shared between files
// built with different flags).
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

namespace nanochat {
namespace {

// exp(x) for x in [-104, 89] (clamped), as avx512_math.h's exp_ps: 2^k * e^r with |r| <=
// ln2/2 and a degree-6 Taylor polynomial (relative error ~1e-7). k reaches -150 and 128,
// past one float exponent, so 2^k is applied as 2^(k/2) * 2^(k - k/2).
inline float32x4_t exp_ps(float32x4_t x) {
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-104.0f)), vdupq_n_f32(89.0f));
  const float32x4_t k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504089f)));
  float32x4_t r = vfmsq_f32(x, k, vdupq_n_f32(0.693145751953125f));
  r = vfmsq_f32(r, k, vdupq_n_f32(1.428606765330187e-06f));
  float32x4_t p = vdupq_n_f32(1.0f / 720);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
  p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  const int32x4_t ki = vcvtq_s32_f32(k);
  const int32x4_t k1 = vshrq_n_s32(ki, 1), k2 = vsubq_s32(ki, k1);
  const int32x4_t bias = vdupq_n_s32(127);
  const float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k1, bias), 23));
  const float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k2, bias), 23));
  return vmulq_f32(vmulq_f32(p, s1), s2);
}

// 1 / (1 + e^-x).
inline float32x4_t sigmoid_ps(float32x4_t x) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  return vdivq_f32(one, vaddq_f32(one, exp_ps(vnegq_f32(x))));
}

// Calls f(tail, i, n) over [0, n) in steps of 4: tail = false for whole vectors at i, true
// for the last n % 4 elements, which the caller reads and writes through 4-float copies
// (load4 / store4 below), as AArch64 has no masked loads.
template <class F>
inline void for4(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) f(false, i, int64_t(4));
  if (i < n) f(true, i, n - i);
}

// The tail's partial loads (zero-padded) and stores (the first `left` lanes).
inline float32x4_t load4(const float* p, bool tail, int64_t left) {
  if (!tail) return vld1q_f32(p);
  float b[4] = {};
  std::memcpy(b, p, size_t(left) * sizeof(float));
  return vld1q_f32(b);
}
inline void store4(float* p, bool tail, int64_t left, float32x4_t v) {
  if (!tail) return vst1q_f32(p, v);
  float b[4];
  vst1q_f32(b, v);
  std::memcpy(p, b, size_t(left) * sizeof(float));
}

}  // namespace
}  // namespace nanochat
