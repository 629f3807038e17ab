// SwiGLU row kernels, AVX-512 (swiglu.h): a vector exp for the sigmoid, masked tails.
#include <immintrin.h>

#include "act/swiglu.h"

namespace nanochat {
namespace swiglu_kernels {
namespace {

inline __mmask16 tail(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// exp(x): x = n ln2 + r, |r| <= ln2/2 (ln2 split in two for an exact product), a degree-6
// Taylor polynomial for e^r (relative error ~2e-7), then r's result scaled by 2^n. x is
// clamped to [-87, 88], where e^x stays a finite normal float.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 sigmoid_ps(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

void fwd_avx512(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 silu = _mm512_mul_ps(gv, sigmoid_ps(gv));
    _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i)));
  }
}

void bwd_avx512(const float* gh, const float* g, const float* u, int64_t n, float* gg,
                float* gu) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 d = _mm512_maskz_loadu_ps(m, gh + i);
    const __m512 s = sigmoid_ps(gv);
    _mm512_mask_storeu_ps(gu + i, m, _mm512_mul_ps(d, _mm512_mul_ps(gv, s)));
    const __m512 ds = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
    const __m512 du = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, u + i));
    _mm512_mask_storeu_ps(gg + i, m, _mm512_mul_ps(du, ds));
  }
}

}  // namespace

const Kernels avx512 = {fwd_avx512, bwd_avx512};

}  // namespace swiglu_kernels
}  // namespace nanochat
