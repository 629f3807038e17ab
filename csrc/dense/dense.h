// Dense (non-ternary) weights of the inference engine: the token embedding, which is
// also the tied LM head, stored as ggml F32, F16 or Q8_0. Plain C++17.
//
//   Q8_0 (ggml type 8): blocks of 32 weights, 34 bytes each: fp16 d, then int8 qs[32];
//   x = d * q. Quantization is ggml's reference: d = absmax / 127, q = roundf(x / d)
//   (half away from zero), d = 0 for an all-zero block; byte-identical to gguf.quants.
#pragma once

#include <cstdint>

namespace nanochat {

constexpr int64_t QK8_0 = 32;
constexpr int64_t Q8_0_BLOCK_BYTES = 34;

// x: rows x cols floats (cols % 32 == 0) -> rows * cols/32 blocks.
void q8_0_quantize(const float* x, int64_t rows, int64_t cols, uint8_t* out);
void q8_0_dequantize(const uint8_t* in, int64_t rows, int64_t cols, float* x);

}  // namespace nanochat
