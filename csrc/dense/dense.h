// Dense (non-ternary) weights of the inference engine: the token embedding, which is
// also the tied LM head, stored as ggml F32, F16 or Q8_0. Plain C++17.
//
//   Q8_0 (ggml type 8): blocks of 32 weights, 34 bytes each: fp16 d, then int8 qs[32];
//   x = d * q. Quantization is ggml's reference: d = absmax / 127, q = roundf(x / d)
//   (half away from zero), d = 0 for an all-zero block; byte-identical to gguf.quants.
#pragma once

#include <cstdint>
#include <vector>

#include "ternary/dispatch.h"  // Isa

namespace nanochat {

constexpr int64_t QK8_0 = 32;
constexpr int64_t Q8_0_BLOCK_BYTES = 34;

// x: rows x cols floats (cols % 32 == 0) -> rows * cols/32 blocks.
void q8_0_quantize(const float* x, int64_t rows, int64_t cols, uint8_t* out);
void q8_0_dequantize(const uint8_t* in, int64_t rows, int64_t cols, float* x);

// ---- the engine's dense matrices (embedding lookup and LM head) -----------------------
//
// F32 / F16: row-major rows x cols, read in place (e.g. from the GGUF mapping).
// Q8_0 is repacked at load ("Q8R") so the VNNI kernel needs no shuffles:
//   codes:  rows x cols bytes, each q + 128 (= q ^ 0x80, unsigned: vpdpbusd multiplies
//           unsigned by signed bytes; the +128 is removed exactly via the activations'
//           block sums, see DenseActs::block_bias). Within a row, each group of 16 blocks
//           (512 codes) is stored as 8 slices of 64 bytes: slice c holds codes 4c..4c+3 of
//           block 0, then of block 1, ..., block 15, so int32 lane l of a 64-byte vector
//           always belongs to block l and integer sums run across the whole group. A last
//           group of gb < 16 blocks is stored the same way with 4*gb-byte slices.
//   scales: rows x cols/32 fp16 d, row-major.
// The values are ggml's exactly: W[r, k] = d[r, k/32] * q[r, k].
// Offset of code k (0..31) of block b within a Q8R row of nb blocks (activations too).
inline int64_t q8r_offset(int64_t nb, int64_t b, int64_t k) {
  const int64_t g = b / 16, gb = nb - 16 * g < 16 ? nb - 16 * g : 16;
  return g * 512 + (k / 4) * (4 * gb) + (b % 16) * 4 + k % 4;
}

enum class DenseType { F32, F16, Q8_0 };
const char* dense_type_name(DenseType t);  // "F32", "F16", "Q8_0"

struct DenseMatrix {
  DenseType type = DenseType::F32;
  int64_t rows = 0;
  int64_t cols = 0;                  // Q8_0: a multiple of 32
  const void* data = nullptr;        // F32 floats / F16 halfs / Q8_0 biased codes
  const uint16_t* scales = nullptr;  // Q8_0 only
  int64_t ld = 0;                    // row stride of data in elements (0: cols)
  int64_t ld_scales = 0;             // row stride of scales (0: cols/32)
  int64_t row_stride() const { return ld ? ld : cols; }
  int64_t scale_stride() const { return ld_scales ? ld_scales : cols / 32; }
};

// ggml Q8_0 blocks (rows x cols/32 of them) -> Q8R codes and scales, row r's codes at
// codes + r * ld and its scales at scales + r * ld_scales (ld >= cols, ld_scales >= cols/32;
// the two may interleave in one buffer).
void q8_0_repack(const uint8_t* blocks, int64_t rows, int64_t cols, uint8_t* codes, int64_t ld,
                 uint16_t* scales, int64_t ld_scales);
// Row r of w as floats (the embedding lookup); exact (d * q in float for Q8_0).
void dense_row(const DenseMatrix& w, int64_t r, float* out);

// Activations prepared for one DenseMatrix type. F32/F16 weights read x (f32). Q8_0
// weights read x quantized as llama.cpp does for its q8_0 dot products: per block of 32,
// d = absmax/127, q = round(x/d) (|q| <= 127; d kept in f32 rather than ggml's fp16),
// with the codes in the Q8R order, and per block -128 * the block's code sum, so
// sum((q_w + 128) * q_x) + block_bias is the exact integer dot of a block.
struct DenseActs {
  int64_t tokens = 0;
  int64_t cols = 0;
  const float* x = nullptr;             // tokens x cols
  const int8_t* q = nullptr;            // Q8_0: tokens x cols, Q8R order
  const float* block_d = nullptr;       // Q8_0: tokens x cols/32
  const int32_t* block_bias = nullptr;  // Q8_0: tokens x cols/32
};

// Owns the storage of prepared activations; sized once (no allocation per token).
class DenseActBuffer {
 public:
  void reserve(int64_t tokens, int64_t cols);
  // x: tokens x cols floats, kept by pointer (must outlive the returned view's use).
  const DenseActs& prepare(DenseType type, const float* x, int64_t tokens, int64_t cols);

 private:
  int64_t cap_tokens_ = 0, cap_cols_ = 0;
  std::vector<int8_t> q_;
  std::vector<float> block_d_;
  std::vector<int32_t> block_bias_;
  DenseActs acts_;
};

// ---- kernels, one set per ISA ----------------------------------------------------------
// gemm: y[t * ldy + r] = sum_k W[r, k] * x[t, k] for rows [r0, r1) and every token.
// scores: out[h * n + j] = scale * dot(q + h * d, k + j * stride) for h < nq, j < n (d
//   floats each): the nq query heads that share a KV head read each key row once.
// accumulate: acc[h * d + i] += sum_j p[h * n + j] * v[j * stride + i] for h < nq, i < d.
// silu_mul: out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u.
// exp_sum: p[j] = exp(p[j] - m) for j < n (p[j] <= m), returns their sum (softmax).
// quantize: ternary.h's quantize_activations (BitNet per-token absmax int8, bit for bit,
// including its error on a non-finite value), plus each token's code sum in qsum.
struct DenseKernels {
  const char* name;
  void (*gemm)(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y,
               int64_t ldy);
  void (*scores)(const float* q, int64_t nq, const float* k, int64_t stride, int64_t n, int64_t d,
                 float scale, float* out);
  void (*accumulate)(const float* p, int64_t nq, const float* v, int64_t stride, int64_t n,
                     int64_t d, float* acc);
  void (*silu_mul)(const float* g, const float* u, int64_t n, float* out);
  float (*exp_sum)(float* p, int64_t n, float m);
  void (*quantize)(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale,
                   int32_t* qsum);
};
// The kernels an ISA choice maps to: AVX-512 (F16C, FMA, VNNI) for avx512 / avx512_vnni
// on a CPU with AVX-512 VNNI, AVX-VNNI for avx_vnni, AVX2 (FMA, F16C) for avx2 and for
// avx512 without VNNI, NEON for neon / neon_dotprod (SDOT for the latter's Q8_0), else the
// scalar reference (so pinning the ISA to scalar also pins these).
const DenseKernels& dense_kernels(Isa isa);
const DenseKernels& dense_kernels();  // for active_isa()
bool dense_avx512_supported();

// Checked GEMM over all rows of w on the thread pool (rows split in chunks).
void dense_gemm(const DenseMatrix& w, const DenseActs& a, float* y, int64_t ldy);

// Per-ISA tables, defined in dense_<isa>.cpp.
extern const DenseKernels kDenseScalar;
extern const DenseKernels kDenseAvx2;
extern const DenseKernels kDenseAvxVnni;
extern const DenseKernels kDenseAvx512;
#ifdef NANOCHAT_HAVE_ARM_KERNELS
// neon: Armv8.0 Advanced SIMD; neon_dotprod: the same with the Q8_0 GEMM on SDOT
// (dense_neon_dotprod.cpp, its only entry point below).
extern const DenseKernels kDenseNeon;
extern const DenseKernels kDenseNeonDotprod;
void dense_q8_gemm_neon_dotprod(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1,
                                float* y, int64_t ldy);
#endif

}  // namespace nanochat
