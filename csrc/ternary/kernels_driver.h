// Where a row's TK2 blocks are (row-major or tiles), and a walk over a [r0, r1) x [t0, t1)
// range in Tile<R, T> steps, finishing ragged edges with Tile<1, T> rows and Tile<R, 1> /
// Tile<1, 1> tokens. Included by the
// per-ISA kernel files; each passes its own Tile from an anonymous namespace, so
// no inline function is shared between translation units built with different
// ISA flags (the linker could otherwise keep an AVX-512 copy for everyone).
#pragma once

#include <cstdint>

#include "ternary/dispatch.h"
#include "ternary/ternary.h"

namespace nanochat {
namespace {

// Where row r's first block starts; its block b is at + b * w_block_step(a), and row r + i
// (in the same tile) at + i * w_row_step(a).
inline const uint8_t* w_row(const GemmArgs& a, int64_t r) {
  const int64_t n = a.w_tile_rows;
  return a.w + (r / n) * n * a.w_row_bytes + (r % n) * TK2_BLOCK_BYTES;
}
inline int64_t w_block_step(const GemmArgs& a) { return a.w_tile_rows * TK2_BLOCK_BYTES; }
inline int64_t w_row_step(const GemmArgs& a) {
  return a.w_tile_rows == 1 ? a.w_row_bytes : TK2_BLOCK_BYTES;
}

inline float finish(const GemmArgs& a, int64_t t, int32_t acc) {
  return float(acc - a.qsum[t]) * (a.w_scale * a.x_scale[t]);
}

template <template <int, int> class Tile, int R, int T>
inline void drive_tokens(const GemmArgs& a, int64_t r, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + T <= t1; t += T) Tile<R, T>::run(a, r, t);
  for (; t < t1; ++t) Tile<R, 1>::run(a, r, t);
}

template <template <int, int> class Tile, int R, int T>
inline void drive(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) drive_tokens<Tile, R, T>(a, r, t0, t1);
  for (; r < r1; ++r) drive_tokens<Tile, 1, T>(a, r, t0, t1);
}

}  // namespace
}  // namespace nanochat
