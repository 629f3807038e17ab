// AVX-512 dense kernels (built with -mavx512f/bw/vl/vnni -mf16c -mfma; chosen at run time
// only on CPUs with AVX-512 VNNI, see dense.cpp). Same results as dense_scalar.cpp up to
// float reassociation (and ~1 ulp in silu's exp).
//
// The GEMMs walk 4-row x up-to-4-token tiles (2-row tiles for one token): each weight
// vector is loaded once per tile and each activation vector once per tile.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/avx512_math.h"
#include "dense/dense.h"
#include "ternary/ternary.h"  // quantize_activations (its errors)

namespace nanochat {
namespace {

// Prefetch distance of the weight streams (into L2). One core keeps too few misses in
// flight, and hardware prefetchers stop at 4 KiB pages; 8 KiB ahead is what the ternary
// GEMV measured best on Zen 4 (kernels_avx512vnni.cpp), and the head is the same stream.
constexpr int64_t kPrefetchBytes = 8192;
inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1);
}

// Lane i (i < 4) of the result = the sum of the 16 lanes of v[i].
inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  // Per 128-bit lane: [v0 a+c, v1 a+c, v0 b+d, v1 b+d], then [v0, v1, v2, v3] partials.
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512d a = _mm512_castps_pd(t0), b = _mm512_castps_pd(t1);
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int R, int T>
inline void store_tile(const __m512 (&acc)[R][T], int64_t r, int64_t t, float* y, int64_t ldy) {
  for (int j = 0; j < T; ++j) {
    if constexpr (R == 4) {
      _mm_storeu_ps(y + (t + j) * ldy + r, reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
    } else {
      for (int i = 0; i < R; ++i) y[(t + j) * ldy + r + i] = _mm512_reduce_add_ps(acc[i][j]);
    }
  }
}

// ---- F32: 16 columns per step -------------------------------------------------------------
template <int R, int T>
struct TileF32 {
  static void run(const DenseMatrix& w, const DenseActs& a, int64_t r, int64_t t, float* y,
                  int64_t ldy) {
    const int64_t n = w.cols, ld = w.row_stride();
    const float* W = static_cast<const float*>(w.data) + r * ld;
    __m512 acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 m = mask16(n - k);
      __m512 x[T];
      for (int j = 0; j < T; ++j) x[j] = _mm512_maskz_loadu_ps(m, a.x + (t + j) * n + k);
      for (int i = 0; i < R; ++i) {
        prefetch(W + i * ld + k);
        const __m512 wv = _mm512_maskz_loadu_ps(m, W + i * ld + k);
        for (int j = 0; j < T; ++j) acc[i][j] = _mm512_fmadd_ps(wv, x[j], acc[i][j]);
      }
    }
    store_tile<R, T>(acc, r, t, y, ldy);
  }
};

// ---- F16: 32 columns (64 bytes) per step, converted with F16C -----------------------------
template <int R, int T>
struct TileF16 {
  static void run(const DenseMatrix& w, const DenseActs& a, int64_t r, int64_t t, float* y,
                  int64_t ldy) {
    const int64_t n = w.cols, ld = w.row_stride();
    const uint16_t* W = static_cast<const uint16_t*>(w.data) + r * ld;
    __m512 acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 32) {
      const __mmask16 m0 = mask16(n - k), m1 = mask16(n - k - 16 < 0 ? 0 : n - k - 16);
      __m512 x0[T], x1[T];
      for (int j = 0; j < T; ++j) {
        x0[j] = _mm512_maskz_loadu_ps(m0, a.x + (t + j) * n + k);
        x1[j] = _mm512_maskz_loadu_ps(m1, a.x + (t + j) * n + k + 16);
      }
      for (int i = 0; i < R; ++i) {
        prefetch(W + i * ld + k);
        const __m512 w0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, W + i * ld + k));
        const __m512 w1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, W + i * ld + k + 16));
        for (int j = 0; j < T; ++j) {
          acc[i][j] = _mm512_fmadd_ps(w0, x0[j], acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(w1, x1[j], acc[i][j]);
        }
      }
    }
    store_tile<R, T>(acc, r, t, y, ldy);
  }
};

// ---- Q8R x q8 activations: one group of 16 blocks (512 codes) per step, vpdpbusd -----------
// In the Q8R order int32 lane l of every 64-byte slice of a group belongs to block l, so
// each lane accumulates its block's exact integer dot over the group's 8 slices (starting
// from block_bias removes the +128 of the codes), and the group costs one int->float
// conversion and one FMA with d_w * d_x per row and token. |lane| <= 32*255*128 < 2^21.
template <int R, int T>
struct TileQ8 {
  static void run(const DenseMatrix& w, const DenseActs& a, int64_t r, int64_t t, float* y,
                  int64_t ldy) {
    const int64_t n = w.cols, nb = n / 32, ld = w.row_stride(), lds = w.scale_stride();
    const uint8_t* W = static_cast<const uint8_t*>(w.data) + r * ld;
    const uint16_t* S = w.scales + r * lds;
    __m512 acc[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nb; g += 16) {
      const int64_t gb = std::min<int64_t>(16, nb - g);
      const __mmask16 lm = mask16(gb);
      const __mmask64 cm = gb == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * gb)) - 1;
      const int64_t off = g * 32;  // the group's first byte in the row
      __m512i dot[R][T];
      for (int j = 0; j < T; ++j) {
        const __m512i bias = _mm512_maskz_loadu_epi32(lm, a.block_bias + (t + j) * nb + g);
        for (int i = 0; i < R; ++i) dot[i][j] = bias;
      }
      for (int c = 0; c < 8; ++c) {
        const int64_t o = off + c * 4 * gb;
        __m512i x[T];
        for (int j = 0; j < T; ++j) x[j] = _mm512_maskz_loadu_epi8(cm, a.q + (t + j) * n + o);
        for (int i = 0; i < R; ++i) {
          prefetch(W + i * ld + o);
          const __m512i wv = _mm512_maskz_loadu_epi8(cm, W + i * ld + o);
          for (int j = 0; j < T; ++j) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], wv, x[j]);
        }
      }
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(S + i * lds + g) + kPrefetchBytes / 16,
                     _MM_HINT_T1);  // the scales: 1/16 of the codes' bytes
        const __m512 ws = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, S + i * lds + g));
        for (int j = 0; j < T; ++j) {
          const __m512 xd = _mm512_maskz_loadu_ps(lm, a.block_d + (t + j) * nb + g);
          acc[i][j] =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), _mm512_mul_ps(ws, xd), acc[i][j]);
        }
      }
    }
    store_tile<R, T>(acc, r, t, y, ldy);
  }
};

// Rows in 4s (then singles), tokens in 4s (then the remainder) inside each row tile, so a
// row tile's weights stay in L1 while every token passes over them.
template <template <int, int> class Tile, int R>
inline void tokens_for(const DenseMatrix& w, const DenseActs& a, int64_t r, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + 4 <= a.tokens; t += 4) Tile<R, 4>::run(w, a, r, t, y, ldy);
  switch (a.tokens - t) {
    case 3: Tile<R, 3>::run(w, a, r, t, y, ldy); break;
    case 2: Tile<R, 2>::run(w, a, r, t, y, ldy); break;
    case 1: Tile<R, 1>::run(w, a, r, t, y, ldy); break;
    default: break;
  }
}

template <template <int, int> class Tile>
void drive(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y,
           int64_t ldy) {
  int64_t r = r0;
  if (a.tokens == 1) {
    // The GEMV streams from DRAM: 2-row tiles keep the access pattern close to one
    // sequential stream and measured 15-20% more bandwidth than 4-row tiles (Q8_0 head,
    // 1 thread: ~25 vs ~21.5 GB/s of a 32 GB/s read loop).
    for (; r + 2 <= r1; r += 2) tokens_for<Tile, 2>(w, a, r, y, ldy);
  } else {
    for (; r + 4 <= r1; r += 4) tokens_for<Tile, 4>(w, a, r, y, ldy);
  }
  for (; r < r1; ++r) tokens_for<Tile, 1>(w, a, r, y, ldy);
}

void gemm(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  switch (w.type) {
    case DenseType::F32: drive<TileF32>(w, a, r0, r1, y, ldy); break;
    case DenseType::F16: drive<TileF16>(w, a, r0, r1, y, ldy); break;
    case DenseType::Q8_0: drive<TileQ8>(w, a, r0, r1, y, ldy); break;
  }
}

// ---- attention helpers --------------------------------------------------------------------
void scores(const float* q, const float* k, int64_t stride, int64_t n, int64_t d, float scale,
            float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t c = 0; c < d; c += 16) {
      const __mmask16 m = mask16(d - c);
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + c);
      for (int i = 0; i < 4; ++i)
        acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, k + (j + i) * stride + c), qv, acc[i]);
    }
    _mm_storeu_ps(out + j, _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      const __mmask16 m = mask16(d - c);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, k + j * stride + c),
                            _mm512_maskz_loadu_ps(m, q + c), acc);
    }
    out[j] = scale * _mm512_reduce_add_ps(acc);
  }
}

// C vectors (16*C floats of acc) stay in registers while the n value rows stream past.
template <int C>
void accumulate_group(const float* p, const float* v, int64_t stride, int64_t n, int64_t d,
                      int64_t c0, float* acc) {
  __m512 s[C];
  __mmask16 m[C];
  for (int c = 0; c < C; ++c) {
    const int64_t off = c0 + 16 * c;
    m[c] = mask16(d - off);
    s[c] = _mm512_maskz_loadu_ps(m[c], acc + off);
  }
  for (int64_t j = 0; j < n; ++j) {
    const __m512 pj = _mm512_set1_ps(p[j]);
    const float* vj = v + j * stride + c0;
    for (int c = 0; c < C; ++c)
      s[c] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m[c], vj + 16 * c), s[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(acc + c0 + 16 * c, m[c], s[c]);
}

void accumulate(const float* p, const float* v, int64_t stride, int64_t n, int64_t d, float* acc) {
  for (int64_t c0 = 0; c0 < d; c0 += 128) {
    switch (std::min<int64_t>(8, (d - c0 + 15) / 16)) {
      case 1: accumulate_group<1>(p, v, stride, n, d, c0, acc); break;
      case 2: accumulate_group<2>(p, v, stride, n, d, c0, acc); break;
      case 3: accumulate_group<3>(p, v, stride, n, d, c0, acc); break;
      case 4: accumulate_group<4>(p, v, stride, n, d, c0, acc); break;
      case 5: accumulate_group<5>(p, v, stride, n, d, c0, acc); break;
      case 6: accumulate_group<6>(p, v, stride, n, d, c0, acc); break;
      case 7: accumulate_group<7>(p, v, stride, n, d, c0, acc); break;
      default: accumulate_group<8>(p, v, stride, n, d, c0, acc); break;
    }
  }
}

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
  }
}

float exp_sum(float* p, int64_t n, float m) {
  __m512 s = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = mask16(n - j);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), mv));
    _mm512_mask_storeu_ps(p + j, k, e);
    s = _mm512_add_ps(s, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(s);
}

// Same arithmetic as quantize_activations: amax (exact in any order), s = 127 / amax in
// scalar float, q = nearest-even(x * s) clamped (the saturating int32 -> int8 narrowing
// is the clamp: the rounded values are integers). Non-finite input goes to the scalar
// code, which throws its error.
void quantize(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale, int32_t* qsum) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x + t * k;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < k; i += 16) {
      const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(mask16(k - i), xt + i));
      bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.402823466e38f), _CMP_NLE_UQ);  // inf, NaN
      amax = _mm512_max_ps(amax, a);
    }
    if (bad) {
      quantize_activations(xt, 1, k, q + t * k, x_scale + t);  // throws
      continue;
    }
    const float m = _mm512_reduce_max_ps(amax);
    const float s = 127.0f / (m < 1e-5f ? 1e-5f : m);
    const __m512 sv = _mm512_set1_ps(s);
    __m512i sum = _mm512_setzero_si512();
    int8_t* qt = q + t * k;
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 mk = mask16(k - i);
      const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xt + i), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i v = _mm512_cvtps_epi32(r);
      const __m128i b = _mm512_cvtsepi32_epi8(v);
      _mm_mask_storeu_epi8(qt + i, mk, b);
      sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(b));  // the clamped codes
    }
    x_scale[t] = 1.0f / s;
    qsum[t] = _mm512_reduce_add_epi32(sum);
  }
}

}  // namespace

const DenseKernels kDenseAvx512 = {"avx512", gemm, scores, accumulate, silu_mul, exp_sum, quantize};

}  // namespace nanochat
