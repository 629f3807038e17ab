// Ternary (BitNet b1.58) core: weight formats, activation quantization and the
// W1.58 x A8 GEMV/GEMM. Plain C++17; no Python, no torch.
//
// Conventions (shared by every function here):
//   - A weight matrix is `rows x cols` (out_features x in_features), row-major.
//   - Ternary codes are int8 in {-1, 0, +1}; the real weight is code * scale.
//   - `cols` must be a multiple of QK (256) for every packed format.
//   - Quantized activations: x ~= q * x_scale with q int8, one x_scale per token.
//   - Every function validates its arguments and throws nanochat::Error on misuse.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "nanochat/error.hpp"  // nanochat::Error; bindings map it to ValueError

namespace nanochat {

constexpr int64_t QK = 256;  // weights per block, as ggml's QK_K

// ---- fp16 (IEEE binary16, round-to-nearest-even, as numpy's astype(float16)) ----
uint16_t fp32_to_fp16(float f);
float fp16_to_fp32(uint16_t h);

// ---- BitNet absmean weight quantization -------------------------------------
// scale = max(mean|W|, 1e-5); code = clamp(round(W / scale), -1, 1). Returns scale.
float absmean_quantize(const float* w, int64_t n, int8_t* codes);

// ---- ggml TQ2_0: 66 bytes per 256 weights (qs[64], fp16 d) -------------------
// ---- ggml TQ1_0: 54 bytes per 256 weights (qs[48], qh[4], fp16 d) ------------
// pack: d = fp16(scale) for blocks holding a nonzero code, 0 for all-zero blocks
// (what ggml's absmax quantizer yields for codes * scale). unpack: codes, and the
// per-block d as float when `block_scales` is not null (rows * cols/QK entries).
constexpr int64_t TQ2_0_BLOCK_BYTES = 66;
constexpr int64_t TQ1_0_BLOCK_BYTES = 54;
void tq2_0_pack(const int8_t* codes, int64_t rows, int64_t cols, float scale, uint8_t* out);
void tq2_0_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes,
                  float* block_scales);
void tq1_0_pack(const int8_t* codes, int64_t rows, int64_t cols, float scale, uint8_t* out);
void tq1_0_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes,
                  float* block_scales);

// ---- bitnet.cpp I2_S, as its x86 builds write it ----------------------------------
// 2 bits per weight over the whole (flattened) matrix in blocks of 128 weights in 32
// bytes: byte j of block b holds weights 128b + 32g + j (g = 0..3) at bit shift 6 - 2g,
// as code + 1 (3 is invalid). After the blocks: one float32 scale for the tensor, then
// padding to 32 bytes. (Its ARM builds write 64-weight blocks of 16 bytes, and the file
// does not say which build wrote it: docs/interop.md.) Returns the scale; a non-finite
// or negative one throws.
constexpr int64_t I2_S_BLOCK = 128;
float i2_s_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes);

// ---- TK2: this project's kernel layout ---------------------------------------
// 2 bits per weight, code+1 in {0,1,2}; 64 bytes per 256-weight block, no
// per-block scale (one float scale per tensor travels beside the bytes). Byte j
// of a block holds columns j, j+64, j+128, j+192 at bit shifts 0, 2, 4, 6, so one
// 64-byte load split by 2-bit masks yields four vectors that line up with four
// contiguous 64-byte slices of the activation row.
constexpr int64_t TK2_BLOCK_BYTES = 64;
int64_t tk2_row_bytes(int64_t cols);
void tk2_pack(const int8_t* codes, int64_t rows, int64_t cols, uint8_t* out);
void tk2_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes);
// TQ2_0 -> TK2 is lossless only when every block's d is 0 or one common value
// (a BitNet per-tensor scale); otherwise it throws. Returns that scale as float.
float tq2_0_to_tk2(const uint8_t* tq, int64_t rows, int64_t cols, uint8_t* out);
void tk2_to_tq2_0(const uint8_t* tk, int64_t rows, int64_t cols, float scale, uint8_t* out);

// ---- TK2 tiles: the inference engine's layout ------------------------------------
// The same 64-byte blocks, TK2_TILE_ROWS rows at a time interleaved block by block:
// tile i holds block 0 of rows 8i .. 8i+7, then block 1 of each, and so on; a matrix
// is ceil(rows / 8) tiles, rows past `rows` zero padding (never multiplied into y).
// A one-token GEMV over a tile then reads one sequential stream, which the hardware
// prefetcher follows at the machine's read bandwidth; over row-major TK2 it reads 8
// interleaved row streams, which it does not (`nanochat bench kernels`: "dram" vs
// "tiles dram").
constexpr int64_t TK2_TILE_ROWS = 8;
int64_t tk2_tiled_bytes(int64_t rows, int64_t cols);
// Row-major TK2 (rows * tk2_row_bytes(cols) bytes) -> tiles (tk2_tiled_bytes bytes).
void tk2_tile(const uint8_t* tk2, int64_t rows, int64_t cols, uint8_t* out);

// ---- activations: per-token absmax int8 (BitNet A8) ---------------------------
// s = 127 / max(absmax(x_t), 1e-5); q = clamp(round(x * s), -128, 127); x_scale = 1/s.
void quantize_activations(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale);
const char* quantize_activations_path();  // the kernel it runs on the active ISA ("avx2", ...)
void dequantize_activations(const int8_t* q, const float* x_scale, int64_t tokens, int64_t k,
                            float* x);

// ---- ternary GEMM/GEMV ---------------------------------------------------------
// y[t, r] = w_scale * x_scale[t] * sum_k code[r, k] * q[t, k], integer accumulation.
// w: TK2 bytes, rows * tk2_row_bytes(cols) (tile_rows 1), or TK2 tiles, tk2_tiled_bytes
// (tile_rows TK2_TILE_ROWS). q: tokens x cols int8. y: tokens x rows.
// tokens == 1 is the GEMV. Runs on the active ISA (see dispatch.h) and thread pool.
struct TernaryMatrixView {
  const uint8_t* data;  // TK2 bytes
  int64_t rows;
  int64_t cols;
  float scale;
  int64_t tile_rows = 1;  // 1: row-major TK2; TK2_TILE_ROWS: TK2 tiles
};
void ternary_gemm(const TernaryMatrixView& w, const int8_t* q, const float* x_scale,
                  int64_t tokens, float* y);

// The same y from int8 codes (rows x cols, values -1/0/+1, cols % 4 == 0) instead of TK2
// bytes: training re-quantizes every weight each step, so packing the codes into TK2
// buys nothing there. On x86 and ARM the codes are laid out per call in 16-row panels (one
// 64-byte vector = 16 rows x 4 columns, vpdpbusd's operand order; AVX2 and AVX-VNNI read
// it as two 8-row halves for vpmaddubsw / the VEX vpdpbusd, NEON as four 4-row vectors for
// SDOT / vmlal_s8), so each instruction yields 4 to 16 outputs and no horizontal sums are
// needed, which is what makes short rows (256-768 columns) fast. The scalar ISA packs to
// TK2 and runs ternary_gemm (then cols % 256 == 0).
// Bit-identical to ternary_gemm on the same codes.
void ternary_gemm_codes(const int8_t* codes, int64_t rows, int64_t cols, float scale,
                        const int8_t* q, const float* x_scale, int64_t tokens, float* y);
const char* ternary_gemm_codes_path();  // the kernel it runs on the active ISA

}  // namespace nanochat
