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
#include "common/avx512_vnni.h"  // dpbusd
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
// The one-token GEMV (T = 1, single rows) issues no software prefetch: its loads are one
// sequential stream, which the hardware prefetchers follow better (30-33 GB/s against
// 22-23 GB/s with 2-row tiles and 8 KiB prefetches, 1 thread, 32768 x 1536 head).
template <int R, int T>
struct TileQ8 {
  // The integer dots of one group of gb blocks: the first `gb` lanes of dot[i][j]. Full
  // groups (gb = 16, every group of a row of 512-multiple length) use constant offsets
  // and no masks; two accumulators per row and token (even / odd slices) halve the
  // vpdpbusd dependency chain.
  template <bool Full>
  static void group(const uint8_t* W, int64_t ld, const DenseActs& a, int64_t t, int64_t n,
                    int64_t off, int64_t gb, __m512i (&dot)[R][T]) {
    const __mmask64 cm = Full ? ~__mmask64(0) : (__mmask64(1) << (4 * gb)) - 1;
    const int64_t step = Full ? 64 : 4 * gb;
    __m512i odd[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) odd[i][j] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {
      const int64_t o = off + c * step;
      __m512i x[T];
      for (int j = 0; j < T; ++j)
        x[j] = Full ? _mm512_loadu_si512(a.q + (t + j) * n + o)
                    : _mm512_maskz_loadu_epi8(cm, a.q + (t + j) * n + o);
      for (int i = 0; i < R; ++i) {
        if constexpr (T > 1) prefetch(W + i * ld + o);
        const __m512i wv = Full ? _mm512_loadu_si512(W + i * ld + o)
                                : _mm512_maskz_loadu_epi8(cm, W + i * ld + o);
        for (int j = 0; j < T; ++j) {
          if (c % 2)
            odd[i][j] = dpbusd(odd[i][j], wv, x[j]);
          else
            dot[i][j] = dpbusd(dot[i][j], wv, x[j]);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) dot[i][j] = _mm512_add_epi32(dot[i][j], odd[i][j]);
  }

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
      __m512i dot[R][T];
      for (int j = 0; j < T; ++j) {
        const __m512i bias = _mm512_maskz_loadu_epi32(lm, a.block_bias + (t + j) * nb + g);
        for (int i = 0; i < R; ++i) dot[i][j] = bias;
      }
      if (gb == 16)
        group<true>(W, ld, a, t, n, g * 32, gb, dot);
      else
        group<false>(W, ld, a, t, n, g * 32, gb, dot);
      for (int i = 0; i < R; ++i) {
        if constexpr (T > 1)  // the scales: 1/16 of the codes' bytes
          _mm_prefetch(reinterpret_cast<const char*>(S + i * lds + g) + kPrefetchBytes / 16,
                       _MM_HINT_T1);
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

// GemvRows: the row tile of a one-token GEMV, which streams from DRAM. F32 / F16: 2-row
// tiles keep the access pattern close to one sequential stream and measured 15-20% more
// bandwidth than 4-row tiles (Q8_0 head, 1 thread: ~25 vs ~21.5 GB/s of a 32 GB/s read
// loop). Q8_0: single rows, no software prefetch (TileQ8), one purely sequential stream
// that the hardware prefetchers follow: 30-33 GB/s, 95-100% of the read loop.
template <template <int, int> class Tile, int GemvRows>
void drive(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y,
           int64_t ldy) {
  int64_t r = r0;
  if (a.tokens == 1) {
    for (; r + GemvRows <= r1; r += GemvRows) tokens_for<Tile, GemvRows>(w, a, r, y, ldy);
  } else {
    for (; r + 4 <= r1; r += 4) tokens_for<Tile, 4>(w, a, r, y, ldy);
  }
  for (; r < r1; ++r) tokens_for<Tile, 1>(w, a, r, y, ldy);
}

void gemm(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  switch (w.type) {
    case DenseType::F32: drive<TileF32, 2>(w, a, r0, r1, y, ldy); break;
    case DenseType::F16: drive<TileF16, 2>(w, a, r0, r1, y, ldy); break;
    case DenseType::Q8_0: drive<TileQ8, 1>(w, a, r0, r1, y, ldy); break;
  }
}

// ---- attention helpers --------------------------------------------------------------------
// Key/value rows to prefetch ahead of the attention loops (8 KiB of 128-float rows): decode
// reads each layer's KV cache once per token, after ~180 MB of weights have pushed it out of
// L3, and one core's demand misses alone do not keep enough of them in flight.
constexpr int64_t kKvAhead = 16;

// Prefetches row j of a strided matrix (d floats).
inline void prefetch_row(const float* base, int64_t j, int64_t stride, int64_t d) {
  const char* p = reinterpret_cast<const char*>(base + j * stride);
  for (int64_t b = 0; b < d * 4; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

// NQ heads x 4 keys: 4*NQ accumulators; each 16-float slice of the 4 key rows is loaded
// once for the NQ heads. Full: d - c0 covers whole slices (no masks).
template <int NQ, bool Full>
inline void scores_tile(const float* q, const float* k, int64_t stride, int64_t d, float scale,
                        int64_t n, int64_t j, float* out) {
  __m512 acc[NQ][4];
  for (int h = 0; h < NQ; ++h)
    for (int i = 0; i < 4; ++i) acc[h][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 m = Full ? __mmask16(0xFFFF) : mask16(d - c);
    __m512 kv[4];
    for (int i = 0; i < 4; ++i)
      kv[i] = Full ? _mm512_loadu_ps(k + (j + i) * stride + c)
                   : _mm512_maskz_loadu_ps(m, k + (j + i) * stride + c);
    for (int h = 0; h < NQ; ++h) {
      const __m512 qv = Full ? _mm512_loadu_ps(q + h * d + c) : _mm512_maskz_loadu_ps(m, q + h * d + c);
      for (int i = 0; i < 4; ++i) acc[h][i] = _mm512_fmadd_ps(kv[i], qv, acc[h][i]);
    }
  }
  for (int h = 0; h < NQ; ++h)
    _mm_storeu_ps(out + h * n + j,
                  _mm_mul_ps(reduce4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]), _mm_set1_ps(scale)));
}

template <int NQ>
inline void scores_tile(const float* q, const float* k, int64_t stride, int64_t d, float scale,
                        int64_t n, int64_t j, float* out) {
  if (d % 16 == 0)
    scores_tile<NQ, true>(q, k, stride, d, scale, n, j, out);
  else
    scores_tile<NQ, false>(q, k, stride, d, scale, n, j, out);
}

// Keys in 4s; for each 4 keys the query heads in 3s while the rows sit in L1.
void scores(const float* q, int64_t nq, const float* k, int64_t stride, int64_t n, int64_t d,
            float scale, float* out) {
  int64_t j = 0;
  for (int64_t i = 0; i < std::min<int64_t>(n, kKvAhead); ++i) prefetch_row(k, i, stride, d);
  for (; j + 4 <= n; j += 4) {
    for (int64_t i = j + kKvAhead; i < std::min(n, j + kKvAhead + 4); ++i)
      prefetch_row(k, i, stride, d);
    for (int64_t h = 0; h < nq; h += 3) {
      switch (std::min<int64_t>(3, nq - h)) {
        case 1: scores_tile<1>(q + h * d, k, stride, d, scale, n, j, out + h * n); break;
        case 2: scores_tile<2>(q + h * d, k, stride, d, scale, n, j, out + h * n); break;
        default: scores_tile<3>(q + h * d, k, stride, d, scale, n, j, out + h * n); break;
      }
    }
  }
  for (; j < n; ++j) {
    for (int64_t h = 0; h < nq; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < d; c += 16) {
        const __mmask16 m = mask16(d - c);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, k + j * stride + c),
                              _mm512_maskz_loadu_ps(m, q + h * d + c), acc);
      }
      out[h * n + j] = scale * _mm512_reduce_add_ps(acc);
    }
  }
}

// NQ heads x C vectors (16*C floats of each head's acc) stay in registers while the n value
// rows stream past; each row vector is loaded once for the NQ heads. The first pass over
// the rows (pf) prefetches them ahead. Full: all C slices whole (no masks, which would
// otherwise take more mask registers than there are and spill the accumulators).
template <int NQ, int C, bool Full>
void accumulate_group(const float* p, int64_t n_p, const float* v, int64_t stride, int64_t n,
                      int64_t d, int64_t c0, float* acc, bool pf) {
  __m512 s[NQ][C];
  __mmask16 m[C];
  for (int c = 0; c < C; ++c) {
    const int64_t off = c0 + 16 * c;
    m[c] = Full ? __mmask16(0xFFFF) : mask16(d - off);
    for (int h = 0; h < NQ; ++h)
      s[h][c] = Full ? _mm512_loadu_ps(acc + h * d + off)
                     : _mm512_maskz_loadu_ps(m[c], acc + h * d + off);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (pf && j + kKvAhead < n) prefetch_row(v, j + kKvAhead, stride, d);
    __m512 pj[NQ];
    for (int h = 0; h < NQ; ++h) pj[h] = _mm512_set1_ps(p[h * n_p + j]);
    const float* vj = v + j * stride + c0;
    for (int c = 0; c < C; ++c) {
      const __m512 vv =
          Full ? _mm512_loadu_ps(vj + 16 * c) : _mm512_maskz_loadu_ps(m[c], vj + 16 * c);
      for (int h = 0; h < NQ; ++h) s[h][c] = _mm512_fmadd_ps(pj[h], vv, s[h][c]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int h = 0; h < NQ; ++h) {
      if (Full)
        _mm512_storeu_ps(acc + h * d + c0 + 16 * c, s[h][c]);
      else
        _mm512_mask_storeu_ps(acc + h * d + c0 + 16 * c, m[c], s[h][c]);
    }
}

template <int NQ>
void accumulate_heads(const float* p, int64_t n_p, const float* v, int64_t stride, int64_t n,
                      int64_t d, float* acc, bool pf) {
  for (int64_t c0 = 0; c0 < d; c0 += 128, pf = false) {
    if (d - c0 >= 128) {
      accumulate_group<NQ, 8, true>(p, n_p, v, stride, n, d, c0, acc, pf);
      continue;
    }
    switch ((d - c0 + 15) / 16) {
      case 1: accumulate_group<NQ, 1, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
      case 2: accumulate_group<NQ, 2, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
      case 3: accumulate_group<NQ, 3, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
      case 4: accumulate_group<NQ, 4, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
      case 5: accumulate_group<NQ, 5, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
      case 6: accumulate_group<NQ, 6, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
      case 7: accumulate_group<NQ, 7, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
      default: accumulate_group<NQ, 8, false>(p, n_p, v, stride, n, d, c0, acc, pf); break;
    }
  }
}

// Heads in 3s (24 accumulators of 16 floats).
void accumulate(const float* p, int64_t nq, const float* v, int64_t stride, int64_t n, int64_t d,
                float* acc) {
  for (int64_t j = 0; j < std::min<int64_t>(n, kKvAhead); ++j) prefetch_row(v, j, stride, d);
  for (int64_t h = 0; h < nq; h += 3) {
    const float* ph = p + h * n;
    float* ah = acc + h * d;
    switch (std::min<int64_t>(3, nq - h)) {
      case 1: accumulate_heads<1>(ph, n, v, stride, n, d, ah, h == 0); break;
      case 2: accumulate_heads<2>(ph, n, v, stride, n, d, ah, h == 0); break;
      default: accumulate_heads<3>(ph, n, v, stride, n, d, ah, h == 0); break;
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
