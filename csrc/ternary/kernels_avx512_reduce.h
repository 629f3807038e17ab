// Horizontal sums of 16 AVX-512 int32 accumulators at once, for the 4x4 GEMM tiles
// (included by the AVX-512 kernel files only; every function here has internal
// linkage so no AVX-512 code leaks into other translation units). One reduction
// per accumulator costs ~10 shuffles+adds; for short rows (768 columns = 3 blocks)
// that rivals the dot products, so the tile reduces all 16 in ~30 instructions.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "ternary/kernels_driver.h"

namespace nanochat {
namespace {

// Returns a vector whose lane k is the sum of the 16 lanes of v[k].
inline __m512i reduce16(const __m512i v[16]) {
  __m512i w[4];
  for (int g = 0; g < 4; ++g) {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [sum a, sum b, sum c, sum d].
    const __m512i* a = v + 4 * g;
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]),
                                        _mm512_unpackhi_epi32(a[0], a[1]));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]),
                                        _mm512_unpackhi_epi32(a[2], a[3]));
    w[g] = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  }
  // Sum the four 128-bit lanes of each w[g] into 128-bit lane g of the result.
  const __m512i y01 = _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i y23 = _mm512_add_epi32(_mm512_shuffle_i32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Writes an R x T tile of accumulators acc[i][j] (row r+i, token t+j) to y.
template <int R, int T>
inline void store_tile(const GemmArgs& a, int64_t r, int64_t t, const __m512i (&acc)[R][T]) {
  if constexpr (R == 4 && T == 4) {
    alignas(64) int32_t sums[16];
    _mm512_store_si512(sums, reduce16(&acc[0][0]));
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        a.y[(t + j) * a.y_stride + r + i] = finish(a, t + j, sums[4 * i + j]);
  } else {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j)
        a.y[(t + j) * a.y_stride + r + i] = finish(a, t + j, _mm512_reduce_add_epi32(acc[i][j]));
  }
}

}  // namespace
}  // namespace nanochat
