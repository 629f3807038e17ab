// AVX2 dense kernels (built with -mavx2 -mfma -mf16c; chosen at run time for the avx2 ISA,
// see dense.cpp). Same results as dense_scalar.cpp up to float reassociation (and ~1 ulp in
// silu's exp); the Q8_0 blocks' integer dots are exact. dense_avxvnni.cpp reuses every
// kernel here except the Q8_0 GEMM.
//
// The F32 / F16 GEMMs walk 2-row x up-to-4-token tiles (2 rows for one token, whose loads
// then stay close to one sequential stream); each weight vector is loaded once per tile and
// each activation vector once per row.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/avx2_math.h"
#include "dense/dense.h"
#include "dense/dense_avx2.h"
#include "dense/dense_q8_avx2.h"
#include "ternary/dispatch.h"  // quantize_activations_avx2
#include "ternary/ternary.h"   // quantize_activations (its errors)

namespace nanochat {
namespace {

// Up to 8 floats at p: all of them (n >= 8) or the first n, reading no further (load_f16:
// dense_q8_avx2.h).
inline __m256 load_f32(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask8(n));
}

template <int R, int T>
inline void store_tile(const __m256 (&acc)[R][T], int64_t r, int64_t t, float* y, int64_t ldy) {
  for (int j = 0; j < T; ++j) {
    if constexpr (R == 4) {
      _mm_storeu_ps(y + (t + j) * ldy + r, reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
    } else {
      for (int i = 0; i < R; ++i) y[(t + j) * ldy + r + i] = hsum_ps(acc[i][j]);
    }
  }
}

// F32 (f16: false) or F16 (true) weights, 8 columns per step.
template <bool F16>
inline __m256 load_w(const void* base, int64_t off, int64_t n) {
  if constexpr (F16)
    return load_f16(static_cast<const uint16_t*>(base) + off, n);
  else
    return load_f32(static_cast<const float*>(base) + off, n);
}

template <bool F16, int R, int T>
struct TileF {
  static void run(const DenseMatrix& w, const DenseActs& a, int64_t r, int64_t t, float* y,
                  int64_t ldy) {
    const int64_t n = w.cols, ld = w.row_stride();
    __m256 acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
      const int64_t left = n - k;
      __m256 x[T];
      for (int j = 0; j < T; ++j) x[j] = load_f32(a.x + (t + j) * n + k, left);
      for (int i = 0; i < R; ++i) {
        const __m256 wv = load_w<F16>(w.data, (r + i) * ld + k, left);
        for (int j = 0; j < T; ++j) acc[i][j] = _mm256_fmadd_ps(wv, x[j], acc[i][j]);
      }
    }
    store_tile<R, T>(acc, r, t, y, ldy);
  }
};

template <bool F16>
void gemm_f(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y,
            int64_t ldy) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    int64_t t = 0;
    for (; t + 4 <= a.tokens; t += 4) TileF<F16, 2, 4>::run(w, a, r, t, y, ldy);
    for (; t < a.tokens; ++t) TileF<F16, 2, 1>::run(w, a, r, t, y, ldy);
  }
  for (; r < r1; ++r)
    for (int64_t t = 0; t < a.tokens; ++t) TileF<F16, 1, 1>::run(w, a, r, t, y, ldy);
}

// ---- attention helpers --------------------------------------------------------------------

// NQ heads x 4 keys: 4*NQ accumulators; each 8-float slice of the 4 key rows is loaded once
// for the NQ heads.
template <int NQ>
inline void scores_tile(const float* q, const float* k, int64_t stride, int64_t d, float scale,
                        int64_t n, int64_t j, float* out) {
  __m256 acc[NQ][4];
  for (int h = 0; h < NQ; ++h)
    for (int i = 0; i < 4; ++i) acc[h][i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    __m256 kv[4];
    for (int i = 0; i < 4; ++i) kv[i] = load_f32(k + (j + i) * stride + c, d - c);
    for (int h = 0; h < NQ; ++h) {
      const __m256 qv = load_f32(q + h * d + c, d - c);
      for (int i = 0; i < 4; ++i) acc[h][i] = _mm256_fmadd_ps(kv[i], qv, acc[h][i]);
    }
  }
  for (int h = 0; h < NQ; ++h)
    _mm_storeu_ps(out + h * n + j,
                  _mm_mul_ps(reduce4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]), _mm_set1_ps(scale)));
}

// NQ heads x C 8-float slices of each head's acc stay in registers while the n value rows
// stream past; each value vector is loaded once for the NQ heads.
template <int NQ, int C>
void accumulate_group(const float* p, int64_t n_p, const float* v, int64_t stride, int64_t n,
                      int64_t d, int64_t c0, float* acc) {
  __m256 s[NQ][C];
  for (int c = 0; c < C; ++c)
    for (int h = 0; h < NQ; ++h) s[h][c] = load_f32(acc + h * d + c0 + 8 * c, d - c0 - 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m256 pj[NQ];
    for (int h = 0; h < NQ; ++h) pj[h] = _mm256_set1_ps(p[h * n_p + j]);
    const float* vj = v + j * stride + c0;
    for (int c = 0; c < C; ++c) {
      const __m256 vv = load_f32(vj + 8 * c, d - c0 - 8 * c);
      for (int h = 0; h < NQ; ++h) s[h][c] = _mm256_fmadd_ps(pj[h], vv, s[h][c]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int h = 0; h < NQ; ++h) {
      const int64_t left = d - c0 - 8 * c;
      float* dst = acc + h * d + c0 + 8 * c;
      if (left >= 8)
        _mm256_storeu_ps(dst, s[h][c]);
      else
        _mm256_maskstore_ps(dst, mask8(left), s[h][c]);
    }
}

// 2 heads x 4 slices (32 floats of each head) = 8 accumulators at a time.
template <int NQ>
void accumulate_heads(const float* p, int64_t n_p, const float* v, int64_t stride, int64_t n,
                      int64_t d, float* acc) {
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    switch (std::min<int64_t>(4, (d - c0 + 7) / 8)) {
      case 1: accumulate_group<NQ, 1>(p, n_p, v, stride, n, d, c0, acc); break;
      case 2: accumulate_group<NQ, 2>(p, n_p, v, stride, n, d, c0, acc); break;
      case 3: accumulate_group<NQ, 3>(p, n_p, v, stride, n, d, c0, acc); break;
      default: accumulate_group<NQ, 4>(p, n_p, v, stride, n, d, c0, acc); break;
    }
  }
}

}  // namespace

namespace dense_avx2 {

void gemm(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  switch (w.type) {
    case DenseType::F32: gemm_f<false>(w, a, r0, r1, y, ldy); break;
    case DenseType::F16: gemm_f<true>(w, a, r0, r1, y, ldy); break;
    case DenseType::Q8_0: gemm_q8_avx2(w, a, r0, r1, y, ldy); break;
  }
}

// Keys in 4s; for each 4 keys the query heads in 2s while the rows sit in L1.
void scores(const float* q, int64_t nq, const float* k, int64_t stride, int64_t n, int64_t d,
            float scale, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int64_t h = 0; h < nq; h += 2) {
      if (nq - h >= 2)
        scores_tile<2>(q + h * d, k, stride, d, scale, n, j, out + h * n);
      else
        scores_tile<1>(q + h * d, k, stride, d, scale, n, j, out + h * n);
    }
  for (; j < n; ++j)
    for (int64_t h = 0; h < nq; ++h) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < d; c += 8)
        acc = _mm256_fmadd_ps(load_f32(k + j * stride + c, d - c), load_f32(q + h * d + c, d - c),
                              acc);
      out[h * n + j] = scale * hsum_ps(acc);
    }
}

void accumulate(const float* p, int64_t nq, const float* v, int64_t stride, int64_t n, int64_t d,
                float* acc) {
  for (int64_t h = 0; h < nq; h += 2) {
    if (nq - h >= 2)
      accumulate_heads<2>(p + h * n, n, v, stride, n, d, acc + h * d);
    else
      accumulate_heads<1>(p + h * n, n, v, stride, n, d, acc + h * d);
  }
}

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                            _mm256_loadu_ps(u + i)));
  }
  if (i < n) {
    const __m256i m = mask8(n - i);
    const __m256 gv = _mm256_maskload_ps(g + i, m);
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                                  _mm256_maskload_ps(u + i, m)));
  }
}

float exp_sum(float* p, int64_t n, float m) {
  __m256 s = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t j = 0; j < n; j += 8) {
    const __m256i k = mask8(n - j);
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(p + j, k), mv));
    _mm256_maskstore_ps(p + j, k, e);
    s = _mm256_add_ps(s, _mm256_and_ps(e, _mm256_castsi256_ps(k)));
  }
  return hsum_ps(s);
}

// quantize_activations' AVX2 kernel (bit for bit; non-finite input goes to the scalar code,
// which throws its error), then each token's code sum.
void quantize(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale, int32_t* qsum) {
  if (quantize_activations_avx2(x, 0, tokens, k, q, x_scale) >= 0)
    quantize_activations(x, tokens, k, q, x_scale);  // throws
  for (int64_t t = 0; t < tokens; ++t) {
    const int8_t* qt = q + t * k;
    __m256i sum = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {  // |sum of 32 codes| < 2^12 per int16 pair: one vpmaddubsw
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt + i));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v),
                                                    _mm256_set1_epi16(1)));
    }
    int32_t s = hsum_epi32(sum);
    for (; i < k; ++i) s += qt[i];
    qsum[t] = s;
  }
}

}  // namespace dense_avx2

const DenseKernels kDenseAvx2 = {"avx2",
                                 dense_avx2::gemm,
                                 dense_avx2::scores,
                                 dense_avx2::accumulate,
                                 dense_avx2::silu_mul,
                                 dense_avx2::exp_sum,
                                 dense_avx2::quantize};

}  // namespace nanochat
