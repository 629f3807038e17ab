// Row gathers and scatters with bf16 conversion around BitLinear's bf16 backward GEMMs
// (python/nanochat/ops/bitlinear.py). The backward multiplies bf16 operands:
//   grad_x = (bf16(gy) @ bf16(codes)) * s            grad_w = bf16(gy * x_scale)^T @ bf16(q)
// and, inside a Collider micro-batch, only over the rows that carry gradient (gathered
// before, scattered back after, the other rows of grad_x zero). In torch that is a dozen
// passes (index_select, casts, multiplies, zeros, index_copy); here it is one pass to build
// the three operands and one to write grad_x. Results are bit-identical to the torch
// sequence: bf16 rounding is round-to-nearest-even, as torch's (a NaN becomes the quiet
// NaN 0x7FC0, c10's scalar convention; torch's vector path writes 0xFFFF, also a NaN).
// Plain C++17 drivers over the thread pool; scalar, AVX2, AVX-512 and NEON row kernels.
#pragma once

#include <cstdint>

#include "ternary/dispatch.h"  // Isa

namespace nanochat {

// For i < n, with r = rows ? rows[i] : i:
//   g[i]  = bf16(gy[r])                 gs[i] = bf16(gy[r] * x_scale[r])   (out_cols each)
//   qb[i] = bf16(q[r])                                                      (in_cols each)
// rows: sorted indices below total_rows (n of them), or nullptr (n == total_rows).
// Throws nanochat::Error on a bad row list.
void gather_backward_operands(const float* gy, int64_t out_cols, const int8_t* q,
                              int64_t in_cols, const float* x_scale, int64_t total_rows,
                              const int64_t* rows, int64_t n, uint16_t* g, uint16_t* gs,
                              uint16_t* qb);

// dst (total_rows x cols) float: row rows[i] = float(src[i]) * scale for i < n, every other
// row 0. rows nullptr: n == total_rows, row i from src[i].
void scatter_scaled_rows(const uint16_t* src, int64_t cols, const int64_t* rows, int64_t n,
                         int64_t total_rows, float scale, float* dst);

// ---- per-ISA row kernels (internal; declared here for the kernel files) ---------------
// The kernel path the bf16 row ops run on the active ISA ("avx2", ...).
const char* bf16_rows_path();

namespace bf16_kernels {

using ToBf16 = void (*)(const float* x, int64_t n, float mul, uint16_t* out);  // bf16(x * mul)
using Int8ToBf16 = void (*)(const int8_t* x, int64_t n, uint16_t* out);
using FromBf16 = void (*)(const uint16_t* x, int64_t n, float mul, float* out);  // x * mul

struct Kernels {
  const char* name;  // the ISA path, as `nanochat info` reports it
  ToBf16 to_bf16;
  Int8ToBf16 int8_to_bf16;
  FromBf16 from_bf16;
};

extern const Kernels scalar;
#ifdef NANOCHAT_HAVE_X86_KERNELS
extern const Kernels avx2;
extern const Kernels avx512;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
extern const Kernels neon;  // Isa::neon and neon_dotprod
#endif

}  // namespace bf16_kernels
}  // namespace nanochat
