// AVX-512 kernels of the fused loss (built with -mavx512f/bw/vl -mavx512bf16 -mfma; chosen
// at run time, see fused_loss.cpp): the 12 x 32 F32 micro-tile (24 accumulators, bit-equal
// to the scalar reference: the same FMAs in the same order), the AVX512-BF16 micro-tile
// (vdpbf16ps, f32 accumulation) and the cross-entropy row with a polynomial exp.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "common/avx512_math.h"
#include "common/cpu.h"
#include "loss/fused_loss.h"

namespace nanochat::loss_kernels {
namespace {

void micro_f32(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
               bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, ap += MR, bp += NR) {
    const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(ap[r]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* p = c + r * ldc;
    if (accumulate) {
      c0[r] = _mm512_add_ps(_mm512_loadu_ps(p), c0[r]);
      c1[r] = _mm512_add_ps(_mm512_loadu_ps(p + 16), c1[r]);
    }
    _mm512_storeu_ps(p, c0[r]);
    _mm512_storeu_ps(p + 16, c1[r]);
  }
}

void micro_bf16(int64_t kc, const uint16_t* ap, const uint16_t* bp, float* c, int64_t ldc,
                bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);  // one bf16 pair per row
  for (int64_t k = 0; k < kc; k += 2, a32 += MR, bp += 2 * NR) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(a32[r]);
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* p = c + r * ldc;
    if (accumulate) {
      c0[r] = _mm512_add_ps(_mm512_loadu_ps(p), c0[r]);
      c1[r] = _mm512_add_ps(_mm512_loadu_ps(p + 16), c1[r]);
    }
    _mm512_storeu_ps(p, c0[r]);
    _mm512_storeu_ps(p + 16, c1[r]);
  }
}

// exp(x) for x <= 0 (a logit minus the row max): x = n ln2 + r, |r| <= ln2/2, a degree-7
// Taylor polynomial of e^r (truncation < 1e-8 relative), then 2^n by vscalefps. Below -87
// the result is clamped to about 1.6e-38 instead of going subnormal.
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

float ce_row(float* x, int64_t n, int32_t t, float scale, bool grad) {
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask16(n - j), x + j));
  const float m = _mm512_reduce_max_ps(vm);
  const float xt = x[t];
  const __m512 mv = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {  // two chains: the adds are not one long dependency
    const __m512 e0 = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv));
    const __m512 e1 = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), mv));
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
    if (grad) {
      _mm512_storeu_ps(x + j, e0);
      _mm512_storeu_ps(x + j + 16, e1);
    }
  }
  for (; j < n; j += 16) {
    const __mmask16 k = mask16(n - j);
    const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mv));
    s0 = _mm512_mask_add_ps(s0, k, s0, e);
    if (grad) _mm512_mask_storeu_ps(x + j, k, e);
  }
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  const float lse = m + std::log(sum);
  if (grad) {
    const __m512 f = _mm512_set1_ps(scale / sum);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = mask16(n - i);
      _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), f));
    }
    x[t] -= scale;
  }
  return lse - xt;
}

}  // namespace

const Kernels avx512 = {"avx512", MR, NR, micro_f32, micro_bf16, ce_row};

bool avx512_supported() { return cpu_features().avx512bw; }

}  // namespace nanochat::loss_kernels
