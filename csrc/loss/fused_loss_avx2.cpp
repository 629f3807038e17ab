// AVX2 kernels of the fused loss (built with -mavx2 -mfma; chosen at run time for the
// avx2 and avx_vnni ISAs, see fused_loss.cpp), for CPUs without AVX-512 (Zen 2, Zen 3,
// Haswell to Skylake clients). 16 YMM registers set the micro-tile: 6 x 16 (the BLIS
// Haswell shape), so a KC x 16 B panel (16 KiB) and a 6-row A panel (6 KiB) sit in a
// 32 KiB L1 together.
//   F32:  12 accumulators, 2 B vectors, 1 broadcast of A per step; the same FMAs in the same
//         k order as the scalar reference, so a tile is bit-identical to it (scalar_6x16).
//         Each call prefetches the C rows it adds to and the next A panel while it computes.
// No bf16 tile: without bf16 hardware, widening bf16 pairs in the loop costs more than it
// saves, so precision bf16 runs these f32 tiles over operands the driver rounds to bf16.
// The cross-entropy row uses a polynomial exp (as the AVX-512 file) with 2^n built in the
// exponent bits; its sum runs in f32 lanes, so it differs from the scalar reference's
// double sum by float rounding only (tests/cpp/test_fused_loss.cpp bounds it).
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "loss/fused_loss.h"

namespace nanochat::loss_kernels {
namespace {

constexpr int R = 6;   // tile rows
constexpr int C = 16;  // tile columns

void micro_f32(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
               bool accumulate) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  // The C rows this call adds to come from L2/L3 (C is re-read for every K block): fetch
  // them while the loop runs. The next A panel starts where this one ends: 24 B per step,
  // one line every 2 steps.
  if (accumulate)
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + C - 1), _MM_HINT_T0);
    }
  const char* next = reinterpret_cast<const char*>(ap + kc * R);
  for (int64_t k = 0; k < kc; ++k, ap += R, bp += C) {
    if ((k & 1) == 0) _mm_prefetch(next + k * R * 4, _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(ap + r);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* p = c + r * ldc;
    if (accumulate) {
      c0[r] = _mm256_add_ps(_mm256_loadu_ps(p), c0[r]);
      c1[r] = _mm256_add_ps(_mm256_loadu_ps(p + 8), c1[r]);
    }
    _mm256_storeu_ps(p, c0[r]);
    _mm256_storeu_ps(p + 8, c1[r]);
  }
}

// exp(x) for x <= 0 (a logit minus the row max), as fused_loss_avx512.cpp: x = n ln2 + r,
// |r| <= ln2/2, degree-7 Taylor polynomial of e^r, then times 2^n written into the exponent
// field. x is clamped at -87, so n >= -126 and 2^n is a normal float.
inline __m256 exp_nonpos(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lanes [0, left) set (left < 8).
inline __m256i tail_mask(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(left)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

float ce_row(float* x, int64_t n, int32_t t, float scale, bool grad) {
  const int64_t n8 = n & ~int64_t(7);
  const __m256i tm = tail_mask(n - n8);
  __m256 vm = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n8; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
  if (n8 < n)
    vm = _mm256_max_ps(vm, _mm256_blendv_ps(vm, _mm256_maskload_ps(x + n8, tm),
                                            _mm256_castsi256_ps(tm)));
  const float m = hmax(vm);
  const float xt = x[t];
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {  // two chains: the adds are not one long dependency
    const __m256 e0 = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    const __m256 e1 = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), mv));
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
    if (grad) {
      _mm256_storeu_ps(x + j, e0);
      _mm256_storeu_ps(x + j + 8, e1);
    }
  }
  if (j < n8) {
    const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    s0 = _mm256_add_ps(s0, e);
    if (grad) _mm256_storeu_ps(x + j, e);
  }
  if (n8 < n) {  // masked lanes: exp of the clamp would add ~1e-38 each, so zero them
    const __m256 e = _mm256_and_ps(exp_nonpos(_mm256_sub_ps(_mm256_maskload_ps(x + n8, tm), mv)),
                                   _mm256_castsi256_ps(tm));
    s1 = _mm256_add_ps(s1, e);
    if (grad) _mm256_maskstore_ps(x + n8, tm, e);
  }
  const float sum = hsum(_mm256_add_ps(s0, s1));
  const float lse = m + std::log(sum);
  if (grad) {
    const __m256 f = _mm256_set1_ps(scale / sum);
    for (int64_t i = 0; i < n8; i += 8)
      _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), f));
    if (n8 < n)
      _mm256_maskstore_ps(x + n8, tm, _mm256_mul_ps(_mm256_maskload_ps(x + n8, tm), f));
    x[t] -= scale;
  }
  return lse - xt;
}

}  // namespace

const Kernels avx2 = {"avx2", R, C, micro_f32, nullptr, ce_row};

}  // namespace nanochat::loss_kernels
