// ggml Q8_0 (de)quantization for the token embedding / tied LM head. Scalar: it runs
// once per export (quantize) or once per model load (dequantize), never per token.
//
// Quantization follows ggml's quantize_row_q8_0_ref operation for operation, in float32:
// d = amax / 127, id = d ? 1/d : 0, q = roundf(x * id), stored d = fp16(d) (round to
// nearest even). Multiplying by the reciprocal (not dividing by d) matters: x * (1/d)
// and x / d round differently near .5 and give different bytes than gguf.quants.
#include <cmath>
#include <cstring>
#include <string>

#include "dense/dense.h"
#include "ternary/ternary.h"  // fp16 conversions, nanochat::Error

namespace nanochat {

namespace {

void check_shape(const char* fn, const void* data, const void* other, int64_t rows,
                 int64_t cols) {
  if (rows < 0 || cols < 0)
    throw Error(std::string(fn) + ": negative shape (" + std::to_string(rows) + ", " +
                std::to_string(cols) + ")");
  if (cols % QK8_0 != 0)
    throw Error(std::string(fn) + ": row length " + std::to_string(cols) +
                " is not a multiple of the 32-weight Q8_0 block");
  if (rows > 0 && cols > 0 && (data == nullptr || other == nullptr))
    throw Error(std::string(fn) + ": null buffer");
}

}  // namespace

void q8_0_quantize(const float* x, int64_t rows, int64_t cols, uint8_t* out) {
  check_shape("q8_0_quantize", x, out, rows, cols);
  const int64_t nb = cols / QK8_0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * cols + b * QK8_0;
      uint8_t* ob = out + (r * nb + b) * Q8_0_BLOCK_BYTES;
      float amax = 0.0f;
      for (int64_t j = 0; j < QK8_0; ++j) {
        // NaN/inf would make roundf's result unrepresentable in int8 (undefined
        // behaviour); a model with them is broken, so say where instead of writing junk.
        if (!std::isfinite(xb[j]))
          throw Error("q8_0_quantize: non-finite value at row " + std::to_string(r) +
                      ", column " + std::to_string(b * QK8_0 + j));
        amax = std::fmax(amax, std::fabs(xb[j]));
      }
      const float d = amax / 127.0f;
      // ggml: id = d ? 1/d : 0. When d is so small (subnormal) that 1/d overflows, x * id
      // would be inf and the int8 cast undefined; such a block's fp16 d is 0 anyway, so
      // q = 0 reads back the same as any other choice.
      const float inv = d != 0.0f ? 1.0f / d : 0.0f;
      const float id = std::isfinite(inv) ? inv : 0.0f;
      const uint16_t dh = fp32_to_fp16(d);
      std::memcpy(ob, &dh, 2);  // little-endian host, as ggml
      for (int64_t j = 0; j < QK8_0; ++j) {
        // |x * id| exceeds 127 by a few ulps at most (< 127.5): the cast is in range.
        ob[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(xb[j] * id)));
      }
    }
  }
}

void q8_0_dequantize(const uint8_t* in, int64_t rows, int64_t cols, float* x) {
  check_shape("q8_0_dequantize", in, x, rows, cols);
  const int64_t nb = cols / QK8_0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* ib = in + (r * nb + b) * Q8_0_BLOCK_BYTES;
      float* xb = x + r * cols + b * QK8_0;
      uint16_t dh;
      std::memcpy(&dh, ib, 2);
      const float d = fp16_to_fp32(dh);
      for (int64_t j = 0; j < QK8_0; ++j) xb[j] = d * static_cast<float>(int8_t(ib[2 + j]));
    }
  }
}

}  // namespace nanochat
