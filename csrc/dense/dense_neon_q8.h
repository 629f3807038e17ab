// The NEON Q8R x q8 GEMM and the row/token walk of the NEON dense GEMMs, shared by
// dense_neon.cpp (Armv8.0: vmull_s8) and dense_neon_dotprod.cpp (SDOT) through the Dot
// policy. Included only by those two files; everything sits in an anonymous namespace and
// reads DenseMatrix's fields directly (not its inline members), so no inline function is
// shared between files built with different ISA flags.
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "dense/dense.h"

namespace nanochat {
namespace {

// Rows in 2s and, inside each row pair, tokens in 2s (the remainders singly): each weight
// vector is loaded once per tile and each activation vector once per tile.
template <template <int, int> class Tile, int R>
inline void neon_tokens(const DenseMatrix& w, const DenseActs& a, int64_t r, float* y,
                        int64_t ldy) {
  int64_t t = 0;
  for (; t + 2 <= a.tokens; t += 2) Tile<R, 2>::run(w, a, r, t, y, ldy);
  if (t < a.tokens) Tile<R, 1>::run(w, a, r, t, y, ldy);
}

template <template <int, int> class Tile>
inline void neon_drive(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y,
                       int64_t ldy) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) neon_tokens<Tile, 2>(w, a, r, y, ldy);
  for (; r < r1; ++r) neon_tokens<Tile, 1>(w, a, r, y, ldy);
}

// 16 bytes at p of which only the first len may be read (Full: all 16); the rest are zero.
template <bool Full>
inline uint8x16_t load_bytes(const void* p, int64_t len) {
  if (Full || len >= 16) return vld1q_u8(static_cast<const uint8_t*>(p));
  uint8_t b[16] = {};
  std::memcpy(b, p, size_t(len));
  return vld1q_u8(b);
}

// The first n (<= 4 read, the rest zero) fp16 scales as floats / floats.
inline float32x4_t load_halfs(const uint16_t* p, int64_t n) {
  uint16_t b[4] = {};
  std::memcpy(b, p, size_t(n < 4 ? n : 4) * sizeof(uint16_t));
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(b)));
}
inline float32x4_t load_floats(const float* p, int64_t n) {
  if (n >= 4) return vld1q_f32(p);
  float b[4] = {};
  std::memcpy(b, p, size_t(n) * sizeof(float));
  return vld1q_f32(b);
}

// Q8R (dense.h): in a group of 16 blocks, the 64-byte slice c holds codes 4c..4c+3 of each
// block in turn, so bytes 16v..16v+15 of every slice belong to blocks 4v..4v+3 ("quad" v)
// and int32 lane m of a quad's dot is block 4v + m's. Over the 8 slices each lane sums its
// block's exact integer dot; then one conversion and one FMA with d_w * d_x per quad, row
// and token. The codes are q + 128: flipping the top bit gives q back, so signed
// multiplies need no block_bias. Dot: Acc, zero(Acc&), add(Acc&, w, x), sum(Acc) -> lanes.
template <class Dot>
struct Q8 {
  template <int R, int T>
  struct Tile {
    // Quad v of the group at block g (gb blocks, slices of 4 * gb bytes). Not Full (a last
    // group of gb < 16 blocks): bytes past the slice read as zero, so those lanes are 0 and
    // their (zero) scales add nothing.
    template <bool Full>
    static void quad(const uint8_t* W, int64_t ld, const uint16_t* S, int64_t lds,
                     const int8_t* X, const float* D, int64_t n, int64_t nb, int64_t g,
                     int64_t gb, int v, float32x4_t (&acc)[R][T]) {
      const int64_t step = 4 * gb, len = step - 16 * v;
      const uint8x16_t top = vdupq_n_u8(0x80);
      typename Dot::Acc s[R][T];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j) Dot::zero(s[i][j]);
      for (int c = 0; c < 8; ++c) {
        const int64_t o = g * 32 + c * step + 16 * v;
        int8x16_t x[T];
        for (int j = 0; j < T; ++j) x[j] = vreinterpretq_s8_u8(load_bytes<Full>(X + j * n + o, len));
        for (int i = 0; i < R; ++i) {
          const int8x16_t wv =
              vreinterpretq_s8_u8(veorq_u8(load_bytes<Full>(W + i * ld + o, len), top));
          for (int j = 0; j < T; ++j) Dot::add(s[i][j], wv, x[j]);
        }
      }
      const int64_t nq = gb - 4 * v;  // blocks in this quad (>= 4 when Full)
      float32x4_t xd[T];
      for (int j = 0; j < T; ++j) xd[j] = load_floats(D + j * nb + g + 4 * v, nq);
      for (int i = 0; i < R; ++i) {
        const float32x4_t ws = load_halfs(S + i * lds + g + 4 * v, nq);
        for (int j = 0; j < T; ++j)
          acc[i][j] = vfmaq_f32(acc[i][j], vcvtq_f32_s32(Dot::sum(s[i][j])), vmulq_f32(ws, xd[j]));
      }
    }

    static void run(const DenseMatrix& w, const DenseActs& a, int64_t r, int64_t t, float* y,
                    int64_t ldy) {
      const int64_t n = w.cols, nb = n / 32;
      const int64_t ld = w.ld ? w.ld : n, lds = w.ld_scales ? w.ld_scales : nb;
      const uint8_t* W = static_cast<const uint8_t*>(w.data) + r * ld;
      const uint16_t* S = w.scales + r * lds;
      const int8_t* X = a.q + t * n;
      const float* D = a.block_d + t * nb;
      float32x4_t acc[R][T];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j) acc[i][j] = vdupq_n_f32(0.0f);
      for (int64_t g = 0; g < nb; g += 16) {
        const int64_t gb = nb - g < 16 ? nb - g : 16;
        if (gb == 16) {
          for (int v = 0; v < 4; ++v) quad<true>(W, ld, S, lds, X, D, n, nb, g, gb, v, acc);
        } else {
          for (int v = 0; 4 * v < gb; ++v) quad<false>(W, ld, S, lds, X, D, n, nb, g, gb, v, acc);
        }
      }
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j) y[(t + j) * ldy + r + i] = vaddvq_f32(acc[i][j]);
    }
  };
};

}  // namespace
}  // namespace nanochat
