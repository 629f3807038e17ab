// AVX2 8-bit optimizer kernels, 8 elements per vector, for CPUs without AVX-512 (Zen 2,
// Zen 3, Haswell to Skylake clients). Built with ISA flags on this file only and chosen at
// run time (blockwise8.cpp). The same float operations in the same order as
// blockwise8_scalar.cpp, unfused (-ffp-contract=off, no FMA intrinsics), so the results are
// bit-identical to the reference: max/min pick the second operand on NaN as fmax/fmin do
// there, cvtps_epi32 rounds to nearest-even like nearbyint. AVX2 has no masked loads of
// bytes, so a block's last len % 8 elements go through the same vector code on a zero-padded
// copy (padding lanes are computed and dropped; a 0 never raises a block's absmax).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "optim/blockwise8.h"

namespace nanochat {
namespace {

constexpr int64_t L = 8;  // lanes

inline __m256 abs_ps(__m256 x) {
  return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
}

// ---- the two code maps, 8 lanes ----------------------------------------------------------
inline __m256 dq_linear(const int8_t* c, __m256 absmax) {
  const __m256i ci = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  return _mm256_mul_ps(_mm256_div_ps(_mm256_cvtepi32_ps(ci), _mm256_set1_ps(127.0f)), absmax);
}
inline void q_linear(__m256 x, __m256 inv, int8_t* c) {
  __m256 y = _mm256_max_ps(_mm256_mul_ps(x, inv), _mm256_set1_ps(-127.0f));  // NaN -> -127
  y = _mm256_min_ps(y, _mm256_set1_ps(127.0f));
  const __m256i q = _mm256_cvtps_epi32(y);  // in [-127, 127]: the packs do not saturate
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(c), _mm_packs_epi16(w, w));
}
inline __m256 dq_mini(const uint8_t* c, __m256 absmax) {
  const __m256i ci = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  const __m256i bits = _mm256_add_epi32(_mm256_set1_epi32(kMiniLow), _mm256_slli_epi32(ci, 20));
  const __m256 nz = _mm256_castsi256_ps(_mm256_cmpgt_epi32(ci, _mm256_setzero_si256()));
  return _mm256_and_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), absmax), nz);  // code 0: +0
}
inline void q_mini(__m256 x, __m256 inv, uint8_t* c) {
  const __m256i bits = _mm256_castps_si256(_mm256_mul_ps(x, inv));
  __m256i t = _mm256_add_epi32(bits, _mm256_set1_epi32(kMiniStep / 2 - kMiniLow));
  t = _mm256_max_epi32(t, _mm256_setzero_si256());
  t = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), bits), t);  // negative: 0
  const __m256i code = _mm256_min_epi32(_mm256_srli_epi32(t, 20), _mm256_set1_epi32(255));
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(code),
                                     _mm256_extracti128_si256(code, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(c), _mm_packus_epi16(w, w));
}

// Runs step(i, in, out) over [0, len) in 8-lane steps; the last partial step reads `in`
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
  alignas(32) char ib[NI][L * 4] = {}, ob[NO][L * 4];
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

float absmax_of(const float* x, int64_t len) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + L <= len; i += L)
    acc = _mm256_max_ps(abs_ps(_mm256_loadu_ps(x + i)), acc);  // a NaN lane keeps acc
  if (i < len) {
    alignas(32) float t[L] = {};
    std::memcpy(t, x + i, size_t(len - i) * sizeof(float));
    acc = _mm256_max_ps(abs_ps(_mm256_load_ps(t)), acc);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

void quantize_block(const float* x, int64_t len, Map8 map, void* codes, float* absmax) {
  const float a = absmax_of(x, len);
  *absmax = a;
  if (map == Map8::linear) {
    const __m256 inv = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
    lanes<1, 1>(len, {Span{x, 4}}, {OutSpan{codes, 1}}, [&](const void* const* in, void* const* out) {
      q_linear(_mm256_loadu_ps(F(in[0])), inv, static_cast<int8_t*>(out[0]));
    });
  } else {
    const __m256 inv = _mm256_set1_ps(a > 0.0f ? 1.0f / a : 0.0f);
    lanes<1, 1>(len, {Span{x, 4}}, {OutSpan{codes, 1}}, [&](const void* const* in, void* const* out) {
      q_mini(_mm256_loadu_ps(F(in[0])), inv, static_cast<uint8_t*>(out[0]));
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
    const __m256 a = _mm256_set1_ps(absmax[b]);
    const Span in[1] = {{static_cast<const char*>(codes) + s, 1}};
    const OutSpan out[1] = {{x + s, 4}};
    if (map == Map8::linear)
      lanes<1, 1>(len, in, out, [&](const void* const* i, void* const* o) {
        _mm256_storeu_ps(Fw(o[0]), dq_linear(static_cast<const int8_t*>(i[0]), a));
      });
    else
      lanes<1, 1>(len, in, out, [&](const void* const* i, void* const* o) {
        _mm256_storeu_ps(Fw(o[0]), dq_mini(static_cast<const uint8_t*>(i[0]), a));
      });
  }
}

void adamw(const AdamW8Args& a, int64_t b0, int64_t b1) {
  const __m256 b1v = _mm256_set1_ps(a.beta1), b2v = _mm256_set1_ps(a.beta2);
  const __m256 omb1 = _mm256_set1_ps(1.0f - a.beta1), omb2 = _mm256_set1_ps(1.0f - a.beta2);
  const __m256 decay = _mm256_set1_ps(1.0f - a.lr * a.weight_decay);
  const __m256 step = _mm256_set1_ps(a.lr / a.bias_correction1);
  const __m256 sbc2 = _mm256_set1_ps(std::sqrt(a.bias_correction2));
  const __m256 eps = _mm256_set1_ps(a.eps);
  float* mf = optim8_scratch(2 * a.block);
  float* vf = mf + a.block;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const __m256 ma = _mm256_set1_ps(a.m_absmax[b]), va = _mm256_set1_ps(a.v_absmax[b]);
    // in: g, m codes, v codes, p; out: p, m, v
    lanes<4, 3>(len, {Span{a.g + s, 4}, Span{a.m + s, 1}, Span{a.v + s, 1}, Span{a.p + s, 4}},
                {OutSpan{a.p + s, 4}, OutSpan{mf, 4}, OutSpan{vf, 4}},
                [&](const void* const* in, void* const* out) {
                  const __m256 g = _mm256_loadu_ps(F(in[0]));
                  const __m256 m =
                      _mm256_add_ps(_mm256_mul_ps(dq_linear(static_cast<const int8_t*>(in[1]), ma), b1v),
                                    _mm256_mul_ps(g, omb1));
                  const __m256 v = _mm256_add_ps(
                      _mm256_mul_ps(dq_mini(static_cast<const uint8_t*>(in[2]), va), b2v),
                      _mm256_mul_ps(_mm256_mul_ps(g, g), omb2));
                  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), sbc2), eps);
                  const __m256 p = _mm256_loadu_ps(F(in[3]));
                  _mm256_storeu_ps(Fw(out[0]),
                                   _mm256_sub_ps(_mm256_mul_ps(p, decay),
                                                 _mm256_mul_ps(step, _mm256_div_ps(m, denom))));
                  _mm256_storeu_ps(Fw(out[1]), m);
                  _mm256_storeu_ps(Fw(out[2]), v);
                });
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
    quantize_block(vf, len, Map8::minifloat, a.v + s, a.v_absmax + b);
  }
}

void lion(const Lion8Args& a, int64_t b0, int64_t b1) {
  const __m256 b1v = _mm256_set1_ps(a.beta1), b2v = _mm256_set1_ps(a.beta2);
  const __m256 omb1 = _mm256_set1_ps(1.0f - a.beta1), omb2 = _mm256_set1_ps(1.0f - a.beta2);
  const __m256 decay = _mm256_set1_ps(1.0f - a.lr * a.weight_decay);
  const __m256 lr = _mm256_set1_ps(a.lr), zero = _mm256_setzero_ps();
  const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const __m256 ma = _mm256_set1_ps(a.m_absmax[b]);
    lanes<3, 2>(len, {Span{a.g + s, 4}, Span{a.m + s, 1}, Span{a.p + s, 4}},
                {OutSpan{a.p + s, 4}, OutSpan{mf, 4}},
                [&](const void* const* in, void* const* out) {
                  const __m256 g = _mm256_loadu_ps(F(in[0]));
                  const __m256 m = dq_linear(static_cast<const int8_t*>(in[1]), ma);
                  const __m256 c = _mm256_add_ps(_mm256_mul_ps(m, b1v), _mm256_mul_ps(g, omb1));
                  __m256 sgn = _mm256_blendv_ps(zero, one, _mm256_cmp_ps(c, zero, _CMP_GT_OQ));
                  sgn = _mm256_blendv_ps(sgn, minus_one, _mm256_cmp_ps(c, zero, _CMP_LT_OQ));
                  const __m256 p = _mm256_loadu_ps(F(in[2]));
                  _mm256_storeu_ps(Fw(out[0]),
                                   _mm256_sub_ps(_mm256_mul_ps(p, decay), _mm256_mul_ps(lr, sgn)));
                  _mm256_storeu_ps(Fw(out[1]),
                                   _mm256_add_ps(_mm256_mul_ps(m, b2v), _mm256_mul_ps(g, omb2)));
                });
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

void momentum(const Momentum8Args& a, int64_t b0, int64_t b1) {
  const __m256 beta = _mm256_set1_ps(a.beta), omb = _mm256_set1_ps(1.0f - a.beta);
  float* mf = optim8_scratch(a.block);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b * a.block, len = std::min(a.block, a.n - s);
    const __m256 ma = _mm256_set1_ps(a.m_absmax[b]);
    lanes<2, 2>(len, {Span{a.g + s, 4}, Span{a.m + s, 1}}, {OutSpan{a.u + s, 4}, OutSpan{mf, 4}},
                [&](const void* const* in, void* const* out) {
                  const __m256 g = _mm256_loadu_ps(F(in[0]));
                  const __m256 m =
                      _mm256_add_ps(_mm256_mul_ps(dq_linear(static_cast<const int8_t*>(in[1]), ma), beta),
                                    _mm256_mul_ps(g, omb));
                  const __m256 u =
                      a.nesterov ? _mm256_add_ps(g, _mm256_mul_ps(_mm256_sub_ps(m, g), beta)) : m;
                  _mm256_storeu_ps(Fw(out[0]), u);
                  _mm256_storeu_ps(Fw(out[1]), m);
                });
    quantize_block(mf, len, Map8::linear, a.m + s, a.m_absmax + b);
  }
}

}  // namespace

const Optim8Kernels kOptim8Avx2 = {"avx2", quantize, dequantize, adamw, lion, momentum};

}  // namespace nanochat
