// Scalar reference of the dense kernels: plain loops in a fixed order. Every ISA
// kernel must match these up to float reassociation (tests/cpp/test_dense.cpp).
#include <cmath>

#include "dense/dense.h"
#include "ternary/ternary.h"  // fp16_to_fp32

namespace nanochat {
namespace {

float dot_f32(const float* w, const float* x, int64_t n) {
  float s = 0.0f;
  for (int64_t k = 0; k < n; ++k) s += w[k] * x[k];
  return s;
}

float dot_f16(const uint16_t* w, const float* x, int64_t n) {
  float s = 0.0f;
  for (int64_t k = 0; k < n; ++k) s += fp16_to_fp32(w[k]) * x[k];
  return s;
}

// sum over blocks of (d_w * d_x) * (integer dot of the block), as ggml's q8_0 x q8_0.
// Weights and activations share the Q8R order, so the block's codes sit at the same offsets.
float dot_q8(const uint8_t* codes, const uint16_t* scales, const int8_t* q, const float* xd,
             int64_t n) {
  const int64_t nb = n / QK8_0;
  float s = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t isum = 0;
    for (int64_t k = 0; k < QK8_0; ++k) {
      const int64_t o = q8r_offset(nb, b, k);
      isum += int32_t(int8_t(codes[o] ^ 0x80)) * int32_t(q[o]);
    }
    s += fp16_to_fp32(scales[b]) * xd[b] * float(isum);
  }
  return s;
}

void gemm(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const int64_t n = w.cols, ld = w.row_stride();
  for (int64_t t = 0; t < a.tokens; ++t)
    for (int64_t r = r0; r < r1; ++r) {
      float v = 0.0f;
      switch (w.type) {
        case DenseType::F32:
          v = dot_f32(static_cast<const float*>(w.data) + r * ld, a.x + t * n, n);
          break;
        case DenseType::F16:
          v = dot_f16(static_cast<const uint16_t*>(w.data) + r * ld, a.x + t * n, n);
          break;
        case DenseType::Q8_0:
          v = dot_q8(static_cast<const uint8_t*>(w.data) + r * ld, w.scales + r * w.scale_stride(),
                     a.q + t * n, a.block_d + t * (n / QK8_0), n);
          break;
      }
      y[t * ldy + r] = v;
    }
}

void scores(const float* q, int64_t nq, const float* k, int64_t stride, int64_t n, int64_t d,
            float scale, float* out) {
  for (int64_t h = 0; h < nq; ++h)
    for (int64_t j = 0; j < n; ++j) out[h * n + j] = scale * dot_f32(q + h * d, k + j * stride, d);
}

void accumulate(const float* p, int64_t nq, const float* v, int64_t stride, int64_t n, int64_t d,
                float* acc) {
  for (int64_t h = 0; h < nq; ++h)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < d; ++i) acc[h * d + i] += p[h * n + j] * v[j * stride + i];
}

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

float exp_sum(float* p, int64_t n, float m) {
  float s = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    s += p[j];
  }
  return s;
}

void quantize(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale, int32_t* qsum) {
  quantize_activations(x, tokens, k, q, x_scale);
  for (int64_t t = 0; t < tokens; ++t) {
    int32_t s = 0;
    for (int64_t i = 0; i < k; ++i) s += q[t * k + i];
    qsum[t] = s;
  }
}

}  // namespace

const DenseKernels kDenseScalar = {"scalar", gemm, scores, accumulate, silu_mul, exp_sum, quantize};

}  // namespace nanochat
