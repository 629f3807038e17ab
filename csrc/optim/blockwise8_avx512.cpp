// AVX-512 (F/BW/VL) 8-bit optimizer kernels, 16 elements per vector, masked tails. Built with
// ISA flags on this file only and chosen at run time (blockwise8.cpp). The same float
// operations in the same order as blockwise8_scalar.cpp, unfused (-ffp-contract=off, no FMA
// intrinsics), so the results are bit-identical to the reference: max/min pick the same
// operand on NaN as fmax/fmin do here, cvtps_epi32 rounds to nearest-even like nearbyint.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "optim/blockwise8.h"

namespace nanochat {
namespace {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

inline __m512 abs_ps(__m512 x) {
  return _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
}

// ---- the two code maps, 16 lanes ---------------------------------------------------------
inline __m512 dq_linear(const int8_t* c, __mmask16 k, __m512 absmax) {
  const __m512i ci = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, c));
  return _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(ci), _mm512_set1_ps(127.0f)), absmax);
}
inline void q_linear(__m512 x, __m512 inv, int8_t* c, __mmask16 k) {
  __m512 y = _mm512_max_ps(_mm512_mul_ps(x, inv), _mm512_set1_ps(-127.0f));  // NaN -> -127
  y = _mm512_min_ps(y, _mm512_set1_ps(127.0f));
  _mm512_mask_cvtepi32_storeu_epi8(c, k, _mm512_cvtps_epi32(y));
}
inline __m512 dq_mini(const uint8_t* c, __mmask16 k, __m512 absmax) {
  const __m512i ci = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, c));
  const __m512i bits = _mm512_add_epi32(_mm512_set1_epi32(kMiniLow), _mm512_slli_epi32(ci, 20));
  const __mmask16 nz = _mm512_test_epi32_mask(ci, ci);
  return _mm512_maskz_mul_ps(nz, _mm512_castsi512_ps(bits), absmax);
}
inline void q_mini(__m512 x, __m512 inv, uint8_t* c, __mmask16 k) {
  const __m512i bits = _mm512_castps_si512(_mm512_mul_ps(x, inv));
  __m512i t = _mm512_add_epi32(bits, _mm512_set1_epi32(kMiniStep / 2 - kMiniLow));
  t = _mm512_max_epi32(t, _mm512_setzero_si512());
  const __mmask16 neg = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
  t = _mm512_mask_mov_epi32(t, neg, _mm512_setzero_si512());
  const __m512i code = _mm512_min_epi32(_mm512_srli_epi32(t, 20), _mm512_set1_epi32(255));
  _mm512_mask_cvtepi32_storeu_epi8(c, k, code);
}

float absmax_of(const float* x, int64_t len) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __m512 v = abs_ps(_mm512_maskz_loadu_ps(tail_mask(len - i), x + i));
    acc = _mm512_max_ps(v, acc);  // a NaN lane keeps acc (fmax semantics)
  }
  return _mm512_reduce_max_ps(acc);
}

void quantize_block(const float* x, int64_t len, Map8 map, void* codes, float* absmax) {
  const float a = absmax_of(x, len);
  *absmax = a;
  if (map == Map8::linear) {
    const __m512 inv = _mm512_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
    int8_t* c = static_cast<int8_t*>(codes);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 k = tail_mask(len - i);
      q_linear(_mm512_maskz_loadu_ps(k, x + i), inv, c + i, k);
    }
  } else {
    const __m512 inv = _mm512_set1_ps(a > 0.0f ? 1.0f / a : 0.0f);
    uint8_t* c = static_cast<uint8_t*>(codes);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 k = tail_mask(len - i);
      q_mini(_mm512_maskz_loadu_ps(k, x + i), inv, c + i, k);
    }
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
    const __m512 a = _mm512_set1_ps(absmax[b]);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 k = tail_mask(len - i);
      const __m512 v = map == Map8::linear
                           ? dq_linear(static_cast<const int8_t*>(codes) + s + i, k, a)
                           : dq_mini(static_cast<const uint8_t*>(codes) + s + i, k, a);
      _mm512_mask_storeu_ps(x + s + i, k, v);
    }
  }
}

void adamw(const AdamW8Args& a, int64_t b0, int64_t b1) {
  const __m512 b1v = _mm512_set1_ps(a.beta1), b2v = _mm512_set1_ps(a.beta2);
  const __m512 omb1 = _mm512_set1_ps(1.0f - a.beta1), omb2 = _mm512_set1_ps(1.0f - a.beta2);
  const __m512 decay = _mm512_set1_ps(1.0f - a.lr * a.weight_decay);
  const __m512 step = _mm512_set1_ps(a.lr / a.bias_correction1);
  const __m512 sbc2 = _mm512_set1_ps(std::sqrt(a.bias_correction2));
  const __m512 eps = _mm512_set1_ps(a.eps);
  float* mf = optim8_scratch(2 * a.block);
  float* vf = mf + a.block;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const __m512 ma = _mm512_set1_ps(a.m_absmax[b]), va = _mm512_set1_ps(a.v_absmax[b]);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 k = tail_mask(len - i);
      const __m512 g = _mm512_maskz_loadu_ps(k, a.g + s + i);
      const __m512 m = _mm512_add_ps(_mm512_mul_ps(dq_linear(a.m + s + i, k, ma), b1v),
                                     _mm512_mul_ps(g, omb1));
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(dq_mini(a.v + s + i, k, va), b2v),
                                     _mm512_mul_ps(_mm512_mul_ps(g, g), omb2));
      const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), sbc2), eps);
      const __m512 p = _mm512_maskz_loadu_ps(k, a.p + s + i);
      _mm512_mask_storeu_ps(a.p + s + i, k,
                            _mm512_sub_ps(_mm512_mul_ps(p, decay),
                                          _mm512_mul_ps(step, _mm512_div_ps(m, denom))));
      _mm512_mask_storeu_ps(mf + i, k, m);
      _mm512_mask_storeu_ps(vf + i, k, v);
    }
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
    quantize_block(vf, len, Map8::minifloat, a.v + s, a.v_absmax + b);
  }
}

void lion(const Lion8Args& a, int64_t b0, int64_t b1) {
  const __m512 b1v = _mm512_set1_ps(a.beta1), b2v = _mm512_set1_ps(a.beta2);
  const __m512 omb1 = _mm512_set1_ps(1.0f - a.beta1), omb2 = _mm512_set1_ps(1.0f - a.beta2);
  const __m512 decay = _mm512_set1_ps(1.0f - a.lr * a.weight_decay);
  const __m512 lr = _mm512_set1_ps(a.lr), zero = _mm512_setzero_ps();
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const __m512 ma = _mm512_set1_ps(a.m_absmax[b]);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 k = tail_mask(len - i);
      const __m512 g = _mm512_maskz_loadu_ps(k, a.g + s + i);
      const __m512 m = dq_linear(a.m + s + i, k, ma);
      const __m512 c = _mm512_add_ps(_mm512_mul_ps(m, b1v), _mm512_mul_ps(g, omb1));
      __m512 sgn = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(c, zero, _CMP_GT_OQ),
                                      _mm512_set1_ps(1.0f));
      sgn = _mm512_mask_mov_ps(sgn, _mm512_cmp_ps_mask(c, zero, _CMP_LT_OQ),
                               _mm512_set1_ps(-1.0f));
      const __m512 p = _mm512_maskz_loadu_ps(k, a.p + s + i);
      _mm512_mask_storeu_ps(a.p + s + i, k,
                            _mm512_sub_ps(_mm512_mul_ps(p, decay), _mm512_mul_ps(lr, sgn)));
      _mm512_mask_storeu_ps(mf + i, k, _mm512_add_ps(_mm512_mul_ps(m, b2v), _mm512_mul_ps(g, omb2)));
    }
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

void momentum(const Momentum8Args& a, int64_t b0, int64_t b1) {
  const __m512 beta = _mm512_set1_ps(a.beta), omb = _mm512_set1_ps(1.0f - a.beta);
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const __m512 ma = _mm512_set1_ps(a.m_absmax[b]);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 k = tail_mask(len - i);
      const __m512 g = _mm512_maskz_loadu_ps(k, a.g + s + i);
      const __m512 m = _mm512_add_ps(_mm512_mul_ps(dq_linear(a.m + s + i, k, ma), beta),
                                     _mm512_mul_ps(g, omb));
      const __m512 u =
          a.nesterov ? _mm512_add_ps(g, _mm512_mul_ps(_mm512_sub_ps(m, g), beta)) : m;
      _mm512_mask_storeu_ps(a.u + s + i, k, u);
      _mm512_mask_storeu_ps(mf + i, k, m);
    }
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

}  // namespace

const Optim8Kernels kOptim8Avx512 = {"avx512", quantize, dequantize, adamw, lion, momentum};

}  // namespace nanochat
