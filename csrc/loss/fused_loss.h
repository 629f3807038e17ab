// Fused linear cross-entropy for the LM head and the multi-token-prediction heads: the
// output projection, softmax cross-entropy and its backward, chunked over tokens so the
// [tokens x vocab] logits are never materialized (the idea of Liger-Kernel's fused linear
// CE and Apple's Cut Cross-Entropy). Plain C++17.
//
// For head i (hidden h_i: tokens x d, targets t_i, -1 = ignore) and the tied unembedding
// W (vocab x d):
//   loss_i = mean over tokens with t_i >= 0 of  logsumexp(h_i W^T) - (h_i W^T)[t_i]
//   total  = sum_i head_weight_i * loss_i                 (0 for a head with no target)
// and, when asked, the gradients of `total`:
//   grad_h_i = G_i W,   grad_W = sum_i G_i^T h_i,   G_i = (softmax - onehot) * w_i / n_i.
// Per-token use (Collider's scoring, any caller that weights tokens itself): row_loss
// receives each token's cross-entropy; row_scale replaces w_i / n_i by a scale per token
// (the incoming gradient of row_loss: then G_i = (softmax - onehot) * row_scale_i), and
// `rows` restricts the call to a sorted subset of the token positions (a backward over
// kept rows only: the other rows get loss 0 and grad_h 0 and add nothing to grad_W).
//
// Per chunk of c non-ignored tokens of one head: gather the rows, logits = h_c W^T (GEMM),
// per row max, exp written in place, logsumexp and loss, then the softmax gradient in
// place, grad_h_c = G W (GEMM), grad_W += G^T h_c (GEMM). Memory arithmetic: the scratch
// is c * vocab floats of logits (1024 x 32768 x 4 B = 128 MiB at the default chunk) plus
// 2 * c * d floats and per-thread GEMM pack buffers (< 1 MiB each), against
// tokens * vocab * 4 B for the logits alone in the naive form (8192 tokens: 1 GiB, and
// its softmax and gradient as much again each).
//
// GEMMs: one blocked, packed driver (fused_loss.cpp) over per-ISA micro-kernels
// (fused_loss_scalar.cpp: the reference; fused_loss_avx2.cpp: AVX2 FMA; bf16 there runs
// the f32 tiles on bf16-rounded operands; fused_loss_avx512.cpp: AVX-512 F32 FMA and AVX512-BF16 vdpbf16ps with f32
// accumulation; fused_loss_neon.cpp: NEON FMA, bf16 as on AVX2), picked at run time from
// active_isa().
#pragma once

#include <cstdint>

#include "ternary/dispatch.h"  // Isa

namespace nanochat {

// GEMM operand precision: f32 (the reference) or bf16 operands rounded to nearest even
// with f32 accumulation (tests bound its error). Faster than f32 only with AVX512-BF16; the
// AVX2 table runs its f32 tiles over bf16-rounded operands (f32 speed); the AVX-512 table
// of a CPU without AVX512-BF16 does not take it.
enum class LossPrecision { f32, bf16 };

const char* loss_precision_name(LossPrecision p);
const char* fused_loss_path();  // the GEMM/CE kernels it runs on the active ISA ("avx2", ...)
LossPrecision loss_precision_from_name(const char* name);  // "f32"/"float32" or "bf16"
bool loss_precision_supported(LossPrecision p, Isa isa);   // see LossPrecision

struct FusedLossArgs {
  const float* weight = nullptr;        // vocab x dim, row-major
  int64_t vocab = 0, dim = 0;
  const float* hidden = nullptr;        // heads x tokens x dim
  const int32_t* targets = nullptr;     // heads x tokens, in [0, vocab) or -1 (ignored)
  int64_t heads = 0, tokens = 0;
  const float* head_weights = nullptr;  // heads
  float* loss = nullptr;                // out: heads, each head's unweighted mean loss
  float* grad_hidden = nullptr;         // out (optional): heads x tokens x dim
  float* grad_weight = nullptr;         // out (optional): vocab x dim, overwritten
  int64_t chunk = 1024;                 // tokens per chunk (> 0)
  LossPrecision precision = LossPrecision::f32;
  float* row_loss = nullptr;            // out (optional): heads x tokens, 0 where not computed
  const float* row_scale = nullptr;     // optional: heads x tokens gradient scales (see top)
  const int64_t* rows = nullptr;        // optional: n_rows increasing positions in [0, tokens)
  int64_t n_rows = 0;
};

// Runs the loss (and the gradients where grad_hidden / grad_weight are given: both or
// neither) on the kernels of `isa`. Returns the weighted total. Throws nanochat::Error
// naming the argument on bad shapes, null buffers or a target outside [-1, vocab).
float fused_linear_cross_entropy(const FusedLossArgs& a, Isa isa);
float fused_linear_cross_entropy(const FusedLossArgs& a);  // active_isa()

// ---- CUDA (csrc/cuda/fused_loss.cu, defined only when built with NANOCHAT_HAVE_CUDA) -----
// Device pointers. Chunks of consecutive tokens; row_loss (heads x tokens) receives each
// token's cross-entropy (0 where ignored) and the caller reduces it; head_scales[i] is
// w_i / n_i (the caller counts the non-ignored targets), or row_scale (heads x tokens, when
// given) a gradient scale per token as on the CPU. workspace: chunk x vocab floats. A row
// subset is the caller's gather (python/nanochat/ops/fused_loss.py).
struct CudaFusedLossArgs {
  const float* weight = nullptr;
  int64_t vocab = 0, dim = 0;
  const float* hidden = nullptr;
  const int32_t* targets = nullptr;
  int64_t heads = 0, tokens = 0;
  const float* head_scales = nullptr;
  const float* row_scale = nullptr;  // optional, in place of head_scales
  float* row_loss = nullptr;
  float* grad_hidden = nullptr;  // optional, with grad_weight
  float* grad_weight = nullptr;
  float* workspace = nullptr;
  int64_t chunk = 1024;
};
void cuda_fused_linear_cross_entropy(const CudaFusedLossArgs& a, uintptr_t stream);

// ---- per-ISA kernels (internal; declared here for the two kernel files) -----------------
namespace loss_kernels {

constexpr int MR = 12;  // the scalar and AVX-512 micro-tile: rows
constexpr int NR = 32;  // and columns (two 16-float vectors)
constexpr int kMaxTile = MR * NR;  // no table's tile is larger

// C (mr x nr, row stride ldc) = (accumulate ? C : 0) + A_p * B_p over kc steps, for the
// table's tile shape mr x nr. F32: A_p[k][mr], B_p[k][nr]. BF16: pairs along k,
// A_p[k/2][mr][2], B_p[k/2][nr][2] (uint16 bf16 bits), kc even. The driver packs the A
// panels of one K block back to back (a kernel may prefetch the next one past its own).
using MicroF32 = void (*)(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
                          bool accumulate);
using MicroBf16 = void (*)(int64_t kc, const uint16_t* ap, const uint16_t* bp, float* c,
                           int64_t ldc, bool accumulate);
// One row of logits x (n floats), target t >= 0: returns logsumexp(x) - x[t]; with grad,
// x becomes (softmax(x) - onehot(t)) * scale.
using CeRow = float (*)(float* x, int64_t n, int32_t t, float scale, bool grad);

struct Kernels {
  const char* name;  // the ISA path, as `nanochat info` reports it
  int mr, nr;  // micro-tile shape; divides the driver's 120 x 256 blocks
  MicroF32 f32;
  MicroBf16 bf16;  // nullptr: no bf16 tile (the driver rounds operands for the f32 tiles)
  CeRow ce_row;
};

extern const Kernels scalar;  // 12 x 32
// The scalar reference at the AVX2 tile shape (6 x 16): tests compare the AVX2 tiles to it.
extern const Kernels scalar_6x16;
#ifdef NANOCHAT_HAVE_X86_KERNELS
extern const Kernels avx2;  // AVX2 + FMA (Isa::avx2 and up), 6 x 16
extern const Kernels avx512;
bool avx512_supported();  // AVX-512 F/BW/VL on this CPU
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
extern const Kernels neon;  // Isa::neon and neon_dotprod, 6 x 16
#endif

}  // namespace loss_kernels
}  // namespace nanochat
