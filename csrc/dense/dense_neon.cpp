// NEON dense kernels (Armv8.0 Advanced SIMD, no extra flags; chosen for Isa::neon and, with
// dense_neon_dotprod.cpp's Q8_0 GEMM, Isa::neon_dotprod, see dense.cpp). Same results as
// dense_scalar.cpp up to float reassociation and FMA (and ~1 ulp in silu's and exp_sum's exp).
#include <arm_neon.h>

#include <cstring>

#include "common/neon_math.h"  // exp_ps
#include "dense/dense_neon_q8.h"
#include "ternary/dispatch.h"  // quantize_activations_neon
#include "ternary/ternary.h"   // fp16_to_fp32, quantize_activations (its errors)

namespace nanochat {
namespace {

// ---- F32 / F16: 8 columns per step, two accumulators per row and token; the last
// cols % 8 columns in scalar code. ---------------------------------------------------------
struct F32Row {
  using Elem = float;
  static void load8(const float* p, float32x4_t& lo, float32x4_t& hi) {
    lo = vld1q_f32(p);
    hi = vld1q_f32(p + 4);
  }
  static float at(const float* p, int64_t k) { return p[k]; }
};

struct F16Row {
  using Elem = uint16_t;
  static void load8(const uint16_t* p, float32x4_t& lo, float32x4_t& hi) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p));
    lo = vcvt_f32_f16(vget_low_f16(h));
    hi = vcvt_high_f32_f16(h);
  }
  static float at(const uint16_t* p, int64_t k) { return fp16_to_fp32(p[k]); }
};

template <class Row>
struct Float {
  template <int R, int T>
  struct Tile {
    static void run(const DenseMatrix& w, const DenseActs& a, int64_t r, int64_t t, float* y,
                    int64_t ldy) {
      using E = typename Row::Elem;
      const int64_t n = w.cols, ld = w.row_stride();
      const E* W = static_cast<const E*>(w.data) + r * ld;
      const float* X = a.x + t * n;
      float32x4_t acc[R][T][2];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j) acc[i][j][0] = acc[i][j][1] = vdupq_n_f32(0.0f);
      int64_t k = 0;
      for (; k + 8 <= n; k += 8) {
        float32x4_t x0[T], x1[T];
        for (int j = 0; j < T; ++j) {
          x0[j] = vld1q_f32(X + j * n + k);
          x1[j] = vld1q_f32(X + j * n + k + 4);
        }
        for (int i = 0; i < R; ++i) {
          float32x4_t w0, w1;
          Row::load8(W + i * ld + k, w0, w1);
          for (int j = 0; j < T; ++j) {
            acc[i][j][0] = vfmaq_f32(acc[i][j][0], w0, x0[j]);
            acc[i][j][1] = vfmaq_f32(acc[i][j][1], w1, x1[j]);
          }
        }
      }
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j) {
          float s = vaddvq_f32(vaddq_f32(acc[i][j][0], acc[i][j][1]));
          for (int64_t kk = k; kk < n; ++kk) s += Row::at(W + i * ld, kk) * X[j * n + kk];
          y[(t + j) * ldy + r + i] = s;
        }
    }
  };
};

// ---- Q8_0 without SDOT: vmull_s8 (int16 products, |p| <= 128 * 128) and vpadalq_s16 pair
// sums. Bytes 0-7 of a quad's 16 are blocks 4v and 4v+1, bytes 8-15 blocks 4v+2 and 4v+3,
// so the low and high halves' pair sums are [b0, b0, b1, b1] and [b2, b2, b3, b3], and one
// pairwise add gives [b0, b1, b2, b3]. ------------------------------------------------------
struct DotMull {
  struct Acc {
    int32x4_t lo, hi;
  };
  static void zero(Acc& s) { s.lo = s.hi = vdupq_n_s32(0); }
  static void add(Acc& s, int8x16_t w, int8x16_t x) {
    s.lo = vpadalq_s16(s.lo, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
    s.hi = vpadalq_s16(s.hi, vmull_high_s8(w, x));
  }
  static int32x4_t sum(const Acc& s) { return vpaddq_s32(s.lo, s.hi); }
};

void gemm(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  switch (w.type) {
    case DenseType::F32: neon_drive<Float<F32Row>::Tile>(w, a, r0, r1, y, ldy); break;
    case DenseType::F16: neon_drive<Float<F16Row>::Tile>(w, a, r0, r1, y, ldy); break;
    case DenseType::Q8_0: neon_drive<Q8<DotMull>::Tile>(w, a, r0, r1, y, ldy); break;
  }
}

void gemm_dotprod(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y,
                  int64_t ldy) {
  if (w.type == DenseType::Q8_0)
    dense_q8_gemm_neon_dotprod(w, a, r0, r1, y, ldy);
  else
    gemm(w, a, r0, r1, y, ldy);
}

// ---- attention helpers --------------------------------------------------------------------
// Dot of d floats, 4 per step (the last d % 4 in scalar code).
inline float dot(const float* a, const float* b, int64_t d) {
  float32x4_t s = vdupq_n_f32(0.0f);
  int64_t c = 0;
  for (; c + 4 <= d; c += 4) s = vfmaq_f32(s, vld1q_f32(a + c), vld1q_f32(b + c));
  float r = vaddvq_f32(s);
  for (; c < d; ++c) r += a[c] * b[c];
  return r;
}

// Keys in 4s: each query vector is loaded once for 4 key rows.
void scores(const float* q, int64_t nq, const float* k, int64_t stride, int64_t n, int64_t d,
            float scale, float* out) {
  const int64_t d4 = d / 4 * 4;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int64_t h = 0; h < nq; ++h) {
      const float* qh = q + h * d;
      float32x4_t acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = vdupq_n_f32(0.0f);
      for (int64_t c = 0; c < d4; c += 4) {
        const float32x4_t qv = vld1q_f32(qh + c);
        for (int i = 0; i < 4; ++i)
          acc[i] = vfmaq_f32(acc[i], vld1q_f32(k + (j + i) * stride + c), qv);
      }
      for (int i = 0; i < 4; ++i) {
        float s = vaddvq_f32(acc[i]);
        for (int64_t c = d4; c < d; ++c) s += qh[c] * k[(j + i) * stride + c];
        out[h * n + j + i] = scale * s;
      }
    }
  for (; j < n; ++j)
    for (int64_t h = 0; h < nq; ++h) out[h * n + j] = scale * dot(q + h * d, k + j * stride, d);
}

// 4 * C columns of one head's acc stay in registers while the n value rows stream past.
template <int C>
inline void accumulate_cols(const float* p, const float* v, int64_t stride, int64_t n,
                            float* acc) {
  float32x4_t s[C];
  for (int c = 0; c < C; ++c) s[c] = vld1q_f32(acc + 4 * c);
  for (int64_t j = 0; j < n; ++j) {
    const float32x4_t pj = vdupq_n_f32(p[j]);
    const float* vj = v + j * stride;
    for (int c = 0; c < C; ++c) s[c] = vfmaq_f32(s[c], pj, vld1q_f32(vj + 4 * c));
  }
  for (int c = 0; c < C; ++c) vst1q_f32(acc + 4 * c, s[c]);
}

void accumulate(const float* p, int64_t nq, const float* v, int64_t stride, int64_t n, int64_t d,
                float* acc) {
  for (int64_t h = 0; h < nq; ++h) {
    const float* ph = p + h * n;
    float* ah = acc + h * d;
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) accumulate_cols<8>(ph, v + i, stride, n, ah + i);
    for (; i + 4 <= d; i += 4) accumulate_cols<1>(ph, v + i, stride, n, ah + i);
    for (; i < d; ++i) {
      float s = ah[i];
      for (int64_t j = 0; j < n; ++j) s += ph[j] * v[j * stride + i];
      ah[i] = s;
    }
  }
}

inline float32x4_t silu_mul4(float32x4_t g, float32x4_t u) {
  const float32x4_t e = exp_ps(vnegq_f32(g));
  return vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), u);
}

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(out + i, silu_mul4(vld1q_f32(g + i), vld1q_f32(u + i)));
  if (i < n) {  // the last n % 4 through a zero-padded vector
    float gb[4] = {}, ub[4] = {}, ob[4];
    std::memcpy(gb, g + i, size_t(n - i) * sizeof(float));
    std::memcpy(ub, u + i, size_t(n - i) * sizeof(float));
    vst1q_f32(ob, silu_mul4(vld1q_f32(gb), vld1q_f32(ub)));
    std::memcpy(out + i, ob, size_t(n - i) * sizeof(float));
  }
}

float exp_sum(float* p, int64_t n, float m) {
  const float32x4_t mv = vdupq_n_f32(m);
  float32x4_t s = vdupq_n_f32(0.0f);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float32x4_t e = exp_ps(vsubq_f32(vld1q_f32(p + j), mv));
    vst1q_f32(p + j, e);
    s = vaddq_f32(s, e);
  }
  float sum = vaddvq_f32(s);
  if (j < n) {
    float b[4] = {};
    std::memcpy(b, p + j, size_t(n - j) * sizeof(float));
    vst1q_f32(b, exp_ps(vsubq_f32(vld1q_f32(b), mv)));
    for (int64_t l = 0; l < n - j; ++l) sum += b[l];
    std::memcpy(p + j, b, size_t(n - j) * sizeof(float));
  }
  return sum;
}

// quantize_activations' NEON kernel (bit for bit the scalar one) and the codes' sum.
// Non-finite input goes to quantize_activations, which throws its error.
void quantize(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale, int32_t* qsum) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (quantize_activations_neon(x, t, t + 1, k, q, x_scale) >= 0) {
      quantize_activations(x + t * k, 1, k, q + t * k, x_scale + t);  // throws
      continue;
    }
    const int8_t* qt = q + t * k;
    int32x4_t acc = vdupq_n_s32(0);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) acc = vpadalq_s16(acc, vpaddlq_s8(vld1q_s8(qt + i)));
    int32_t s = vaddvq_s32(acc);
    for (; i < k; ++i) s += qt[i];
    qsum[t] = s;
  }
}

}  // namespace

const DenseKernels kDenseNeon = {"neon", gemm, scores, accumulate, silu_mul, exp_sum, quantize};
const DenseKernels kDenseNeonDotprod = {"neon_dotprod", gemm_dotprod, scores, accumulate,
                                        silu_mul,       exp_sum,      quantize};

}  // namespace nanochat
