// Scalar reference of the 8-bit optimizer kernels: plain loops, one element at a time, in the
// order every ISA kernel must reproduce bit for bit (tests/cpp/test_optim.cpp). No FMA: the
// file is built without ISA flags and -std=c++17 keeps -ffp-contract=off.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "optim/blockwise8.h"

namespace nanochat {
namespace {

inline float clampf(float x, float lo, float hi) { return std::fmin(std::fmax(x, lo), hi); }

// ---- the two code maps -----------------------------------------------------------------
inline int8_t q_linear(float x, float inv) {
  return int8_t(std::nearbyint(clampf(x * inv, -127.0f, 127.0f)));
}
inline float dq_linear(int8_t c, float absmax) { return (float(c) / 127.0f) * absmax; }

inline uint8_t q_mini(float x, float inv) {
  const float r = x * inv;
  int32_t bits;
  std::memcpy(&bits, &r, 4);
  if (bits < 0) return 0;  // -0.0 (or a negative input): below every level
  const int32_t t = bits - kMiniLow + kMiniStep / 2;  // round to the nearest 1/8 octave
  if (t < 0) return 0;
  const int32_t c = t >> 20;
  return uint8_t(c > 255 ? 255 : c);
}
inline float dq_mini(uint8_t c, float absmax) {
  if (c == 0) return 0.0f;
  const int32_t bits = kMiniLow + int32_t(c) * kMiniStep;
  float r;
  std::memcpy(&r, &bits, 4);
  return r * absmax;
}

inline float absmax_of(const float* x, int64_t len) {
  float a = 0.0f;
  for (int64_t i = 0; i < len; ++i) a = std::fmax(a, std::fabs(x[i]));
  return a;
}
inline float inv_linear(float absmax) { return absmax > 0.0f ? 127.0f / absmax : 0.0f; }
inline float inv_mini(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

void quantize_block(const float* x, int64_t len, Map8 map, void* codes, float* absmax) {
  const float a = absmax_of(x, len);
  *absmax = a;
  if (map == Map8::linear) {
    const float inv = inv_linear(a);
    int8_t* c = static_cast<int8_t*>(codes);
    for (int64_t i = 0; i < len; ++i) c[i] = q_linear(x[i], inv);
  } else {
    const float inv = inv_mini(a);
    uint8_t* c = static_cast<uint8_t*>(codes);
    for (int64_t i = 0; i < len; ++i) c[i] = q_mini(x[i], inv);
  }
}

void quantize(const float* x, int64_t n, int64_t block, Map8 map, void* codes, float* absmax,
              int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * block, len = std::min(block, n - s);
    void* c = map == Map8::linear ? static_cast<void*>(static_cast<int8_t*>(codes) + s)
                                  : static_cast<void*>(static_cast<uint8_t*>(codes) + s);
    quantize_block(x + s, len, map, c, absmax + b);
  }
}

void dequantize(const void* codes, const float* absmax, int64_t n, int64_t block, Map8 map,
                float* x, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * block, len = std::min(block, n - s);
    if (map == Map8::linear) {
      const int8_t* c = static_cast<const int8_t*>(codes) + s;
      for (int64_t i = 0; i < len; ++i) x[s + i] = dq_linear(c[i], absmax[b]);
    } else {
      const uint8_t* c = static_cast<const uint8_t*>(codes) + s;
      for (int64_t i = 0; i < len; ++i) x[s + i] = dq_mini(c[i], absmax[b]);
    }
  }
}

void adamw(const AdamW8Args& a, int64_t b0, int64_t b1) {
  const float omb1 = 1.0f - a.beta1, omb2 = 1.0f - a.beta2;
  const float decay = 1.0f - a.lr * a.weight_decay, step = a.lr / a.bias_correction1;
  const float sbc2 = std::sqrt(a.bias_correction2);
  float* mf = optim8_scratch(2 * a.block);
  float* vf = mf + a.block;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const float ma = a.m_absmax[b], va = a.v_absmax[b];
    for (int64_t i = 0; i < len; ++i) {
      const float g = a.g[s + i];
      const float m = dq_linear(a.m[s + i], ma) * a.beta1 + g * omb1;
      const float v = dq_mini(a.v[s + i], va) * a.beta2 + (g * g) * omb2;
      const float denom = std::sqrt(v) / sbc2 + a.eps;
      a.p[s + i] = a.p[s + i] * decay - step * (m / denom);
      mf[i] = m;
      vf[i] = v;
    }
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
    quantize_block(vf, len, Map8::minifloat, a.v + s, a.v_absmax + b);
  }
}

void lion(const Lion8Args& a, int64_t b0, int64_t b1) {
  const float omb1 = 1.0f - a.beta1, omb2 = 1.0f - a.beta2;
  const float decay = 1.0f - a.lr * a.weight_decay;
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const float ma = a.m_absmax[b];
    for (int64_t i = 0; i < len; ++i) {
      const float g = a.g[s + i];
      const float m = dq_linear(a.m[s + i], ma);
      const float c = m * a.beta1 + g * omb1;
      const float sgn = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
      a.p[s + i] = a.p[s + i] * decay - a.lr * sgn;
      mf[i] = m * a.beta2 + g * omb2;
    }
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

void momentum(const Momentum8Args& a, int64_t b0, int64_t b1) {
  const float omb = 1.0f - a.beta;
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const float ma = a.m_absmax[b];
    for (int64_t i = 0; i < len; ++i) {
      const float g = a.g[s + i];
      const float m = dq_linear(a.m[s + i], ma) * a.beta + g * omb;
      a.u[s + i] = a.nesterov ? g + (m - g) * a.beta : m;
      mf[i] = m;
    }
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

}  // namespace

const Optim8Kernels kOptim8Scalar = {"scalar", quantize, dequantize, adamw, lion, momentum};

}  // namespace nanochat
