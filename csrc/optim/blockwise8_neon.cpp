// NEON 8-bit optimizer kernels (Armv8.0 Advanced SIMD), 4 elements per vector, for
// Isa::neon and neon_dotprod. Chosen at run time (blockwise8.cpp). The same float operations
// in the same order as blockwise8_scalar.cpp, unfused (-ffp-contract=off, no FMA
// intrinsics), so the results are bit-identical to the reference: FMAXNM/FMINNM return the
// number when one operand is NaN as fmax/fmin do there, FCVTNS rounds to nearest-even like
// nearbyint, FSQRT and FDIV are correctly rounded. A block's last len % 4 elements go through
// the same vector code on a zero-padded copy (padding lanes are computed and dropped; a 0
// never raises a block's absmax).
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "optim/blockwise8.h"

namespace nanochat {
namespace {

constexpr int64_t L = 4;  // lanes

inline int32x4_t load_s8x4(const int8_t* c) {
  int32_t w;
  std::memcpy(&w, c, 4);
  return vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)))));
}
inline uint32x4_t load_u8x4(const uint8_t* c) {
  uint32_t w;
  std::memcpy(&w, c, 4);
  return vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(w)))));
}
// The low byte of each lane (every lane already in the byte's range).
inline void store_x4(uint32x4_t v, void* c) {
  const uint16x4_t h = vmovn_u32(v);
  const uint8x8_t b = vmovn_u16(vcombine_u16(h, h));
  const uint32_t w = vget_lane_u32(vreinterpret_u32_u8(b), 0);
  std::memcpy(c, &w, 4);
}

// ---- the two code maps, 4 lanes ----------------------------------------------------------
inline float32x4_t dq_linear(const int8_t* c, float32x4_t absmax) {
  return vmulq_f32(vdivq_f32(vcvtq_f32_s32(load_s8x4(c)), vdupq_n_f32(127.0f)), absmax);
}
inline void q_linear(float32x4_t x, float32x4_t inv, int8_t* c) {
  float32x4_t y = vmaxnmq_f32(vmulq_f32(x, inv), vdupq_n_f32(-127.0f));  // NaN -> -127
  y = vminnmq_f32(y, vdupq_n_f32(127.0f));
  store_x4(vreinterpretq_u32_s32(vcvtnq_s32_f32(y)), c);  // in [-127, 127]: the low byte
}
inline float32x4_t dq_mini(const uint8_t* c, float32x4_t absmax) {
  const uint32x4_t ci = load_u8x4(c);
  const int32x4_t bits =
      vaddq_s32(vdupq_n_s32(kMiniLow), vshlq_n_s32(vreinterpretq_s32_u32(ci), 20));
  const uint32x4_t nz = vcgtq_u32(ci, vdupq_n_u32(0));
  return vreinterpretq_f32_u32(  // code 0: +0
      vandq_u32(vreinterpretq_u32_f32(vmulq_f32(vreinterpretq_f32_s32(bits), absmax)), nz));
}
inline void q_mini(float32x4_t x, float32x4_t inv, uint8_t* c) {
  const int32x4_t bits = vreinterpretq_s32_f32(vmulq_f32(x, inv));
  int32x4_t t = vaddq_s32(bits, vdupq_n_s32(kMiniStep / 2 - kMiniLow));
  t = vmaxq_s32(t, vdupq_n_s32(0));
  t = vbicq_s32(t, vreinterpretq_s32_u32(vcltzq_s32(bits)));  // negative: 0
  const int32x4_t code = vminq_s32(vshrq_n_s32(t, 20), vdupq_n_s32(255));
  store_x4(vreinterpretq_u32_s32(code), c);
}

// Runs step(in, out) over [0, len) in 4-lane steps; the last partial step reads `in`
// through a zero-padded copy and writes `out` through a scratch copy of which only the
// valid lanes are copied back. In/Out list the arrays (T*, bytes per element) a step
// touches at offset i.
struct Span {
  const void* p;
  int64_t elem;  // bytes per element
};
struct OutSpan {
  void* p;
  int64_t elem;
};

template <int NI, int NO, typename Step>
inline void lanes(int64_t len, const Span (&in)[NI], const OutSpan (&out)[NO], Step step) {
  int64_t i = 0;
  const void* ip[NI];
  void* op[NO];
  for (; i + L <= len; i += L) {
    for (int a = 0; a < NI; ++a) ip[a] = static_cast<const char*>(in[a].p) + i * in[a].elem;
    for (int a = 0; a < NO; ++a) op[a] = static_cast<char*>(out[a].p) + i * out[a].elem;
    step(ip, op);
  }
  if (i == len) return;
  const int64_t left = len - i;
  alignas(16) char ib[NI][L * 4] = {}, ob[NO][L * 4];
  for (int a = 0; a < NI; ++a) {
    std::memcpy(ib[a], static_cast<const char*>(in[a].p) + i * in[a].elem, size_t(left * in[a].elem));
    ip[a] = ib[a];
  }
  for (int a = 0; a < NO; ++a) op[a] = ob[a];
  step(ip, op);
  for (int a = 0; a < NO; ++a)
    std::memcpy(static_cast<char*>(out[a].p) + i * out[a].elem, ob[a], size_t(left * out[a].elem));
}

inline const float* F(const void* p) { return static_cast<const float*>(p); }
inline float* Fw(void* p) { return static_cast<float*>(p); }
inline const int8_t* S8(const void* p) { return static_cast<const int8_t*>(p); }
inline const uint8_t* U8(const void* p) { return static_cast<const uint8_t*>(p); }

float absmax_of(const float* x, int64_t len) {
  float32x4_t acc = vdupq_n_f32(0.0f);
  int64_t i = 0;
  for (; i + L <= len; i += L)
    acc = vmaxnmq_f32(vabsq_f32(vld1q_f32(x + i)), acc);  // a NaN lane keeps acc
  if (i < len) {
    float t[L] = {};
    std::memcpy(t, x + i, size_t(len - i) * sizeof(float));
    acc = vmaxnmq_f32(vabsq_f32(vld1q_f32(t)), acc);
  }
  return vmaxnmvq_f32(acc);
}

void quantize_block(const float* x, int64_t len, Map8 map, void* codes, float* absmax) {
  const float a = absmax_of(x, len);
  *absmax = a;
  if (map == Map8::linear) {
    const float32x4_t inv = vdupq_n_f32(a > 0.0f ? 127.0f / a : 0.0f);
    lanes<1, 1>(len, {Span{x, 4}}, {OutSpan{codes, 1}}, [&](const void* const* in, void* const* out) {
      q_linear(vld1q_f32(F(in[0])), inv, static_cast<int8_t*>(out[0]));
    });
  } else {
    const float32x4_t inv = vdupq_n_f32(a > 0.0f ? 1.0f / a : 0.0f);
    lanes<1, 1>(len, {Span{x, 4}}, {OutSpan{codes, 1}}, [&](const void* const* in, void* const* out) {
      q_mini(vld1q_f32(F(in[0])), inv, static_cast<uint8_t*>(out[0]));
    });
  }
}

void quantize(const float* x, int64_t n, int64_t block, Map8 map, void* codes, float* absmax,
              int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * block, len = std::min(block, n - s);
    quantize_block(x + s, len, map, static_cast<char*>(codes) + s, absmax + b);
  }
}

void dequantize(const void* codes, const float* absmax, int64_t n, int64_t block, Map8 map,
                float* x, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * block, len = std::min(block, n - s);
    const float32x4_t a = vdupq_n_f32(absmax[b]);
    const Span in[1] = {{static_cast<const char*>(codes) + s, 1}};
    const OutSpan out[1] = {{x + s, 4}};
    if (map == Map8::linear)
      lanes<1, 1>(len, in, out, [&](const void* const* i, void* const* o) {
        vst1q_f32(Fw(o[0]), dq_linear(S8(i[0]), a));
      });
    else
      lanes<1, 1>(len, in, out, [&](const void* const* i, void* const* o) {
        vst1q_f32(Fw(o[0]), dq_mini(U8(i[0]), a));
      });
  }
}

void adamw(const AdamW8Args& a, int64_t b0, int64_t b1) {
  const float32x4_t b1v = vdupq_n_f32(a.beta1), b2v = vdupq_n_f32(a.beta2);
  const float32x4_t omb1 = vdupq_n_f32(1.0f - a.beta1), omb2 = vdupq_n_f32(1.0f - a.beta2);
  const float32x4_t decay = vdupq_n_f32(1.0f - a.lr * a.weight_decay);
  const float32x4_t step = vdupq_n_f32(a.lr / a.bias_correction1);
  const float32x4_t sbc2 = vdupq_n_f32(std::sqrt(a.bias_correction2));
  const float32x4_t eps = vdupq_n_f32(a.eps);
  float* mf = optim8_scratch(2 * a.block);
  float* vf = mf + a.block;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const float32x4_t ma = vdupq_n_f32(a.m_absmax[b]), va = vdupq_n_f32(a.v_absmax[b]);
    // in: g, m codes, v codes, p; out: p, m, v
    lanes<4, 3>(len, {Span{a.g + s, 4}, Span{a.m + s, 1}, Span{a.v + s, 1}, Span{a.p + s, 4}},
                {OutSpan{a.p + s, 4}, OutSpan{mf, 4}, OutSpan{vf, 4}},
                [&](const void* const* in, void* const* out) {
                  const float32x4_t g = vld1q_f32(F(in[0]));
                  const float32x4_t m = vaddq_f32(vmulq_f32(dq_linear(S8(in[1]), ma), b1v),
                                                  vmulq_f32(g, omb1));
                  const float32x4_t v = vaddq_f32(vmulq_f32(dq_mini(U8(in[2]), va), b2v),
                                                  vmulq_f32(vmulq_f32(g, g), omb2));
                  const float32x4_t denom = vaddq_f32(vdivq_f32(vsqrtq_f32(v), sbc2), eps);
                  const float32x4_t p = vld1q_f32(F(in[3]));
                  vst1q_f32(Fw(out[0]),
                            vsubq_f32(vmulq_f32(p, decay), vmulq_f32(step, vdivq_f32(m, denom))));
                  vst1q_f32(Fw(out[1]), m);
                  vst1q_f32(Fw(out[2]), v);
                });
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
    quantize_block(vf, len, Map8::minifloat, a.v + s, a.v_absmax + b);
  }
}

void lion(const Lion8Args& a, int64_t b0, int64_t b1) {
  const float32x4_t b1v = vdupq_n_f32(a.beta1), b2v = vdupq_n_f32(a.beta2);
  const float32x4_t omb1 = vdupq_n_f32(1.0f - a.beta1), omb2 = vdupq_n_f32(1.0f - a.beta2);
  const float32x4_t decay = vdupq_n_f32(1.0f - a.lr * a.weight_decay);
  const float32x4_t lr = vdupq_n_f32(a.lr), zero = vdupq_n_f32(0.0f);
  const float32x4_t one = vdupq_n_f32(1.0f), minus_one = vdupq_n_f32(-1.0f);
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const float32x4_t ma = vdupq_n_f32(a.m_absmax[b]);
    lanes<3, 2>(len, {Span{a.g + s, 4}, Span{a.m + s, 1}, Span{a.p + s, 4}},
                {OutSpan{a.p + s, 4}, OutSpan{mf, 4}},
                [&](const void* const* in, void* const* out) {
                  const float32x4_t g = vld1q_f32(F(in[0]));
                  const float32x4_t m = dq_linear(S8(in[1]), ma);
                  const float32x4_t c = vaddq_f32(vmulq_f32(m, b1v), vmulq_f32(g, omb1));
                  // c > 0: 1, c < 0: -1, else (0 or NaN) 0
                  float32x4_t sgn = vbslq_f32(vcgtq_f32(c, zero), one, zero);
                  sgn = vbslq_f32(vcltq_f32(c, zero), minus_one, sgn);
                  const float32x4_t p = vld1q_f32(F(in[2]));
                  vst1q_f32(Fw(out[0]), vsubq_f32(vmulq_f32(p, decay), vmulq_f32(lr, sgn)));
                  vst1q_f32(Fw(out[1]), vaddq_f32(vmulq_f32(m, b2v), vmulq_f32(g, omb2)));
                });
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

void momentum(const Momentum8Args& a, int64_t b0, int64_t b1) {
  const float32x4_t beta = vdupq_n_f32(a.beta), omb = vdupq_n_f32(1.0f - a.beta);
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const float32x4_t ma = vdupq_n_f32(a.m_absmax[b]);
    lanes<2, 2>(len, {Span{a.g + s, 4}, Span{a.m + s, 1}}, {OutSpan{a.u + s, 4}, OutSpan{mf, 4}},
                [&](const void* const* in, void* const* out) {
                  const float32x4_t g = vld1q_f32(F(in[0]));
                  const float32x4_t m =
                      vaddq_f32(vmulq_f32(dq_linear(S8(in[1]), ma), beta), vmulq_f32(g, omb));
                  const float32x4_t u =
                      a.nesterov ? vaddq_f32(g, vmulq_f32(vsubq_f32(m, g), beta)) : m;
                  vst1q_f32(Fw(out[0]), u);
                  vst1q_f32(Fw(out[1]), m);
                });
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

}  // namespace

const Optim8Kernels kOptim8Neon = {"neon", quantize, dequantize, adamw, lion, momentum};

}  // namespace nanochat
