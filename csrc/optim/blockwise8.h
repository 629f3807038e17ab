// Blockwise 8-bit optimizer state (Dettmers et al. 2021, "8-bit optimizers via block-wise
// quantization"), with the dequantize -> update -> requantize step fused into one pass.
//
// A state tensor of n floats is cut into blocks of `block` elements (the last may be shorter).
// Each block stores one fp32 absmax and n 8-bit codes, so 8-bit state costs 1 + 4/block bytes
// per element (1.002 at the default block of 2048) against 4 for fp32.
//
// Two code maps:
//   Map8::linear    int8 in [-127, 127], x = (code / 127) * absmax. Momenta (AdamW m, Lion,
//                   Muon): signed, roughly Gaussian, linear is enough (8-bit Muon paper).
//   Map8::minifloat uint8, for AdamW's second moment v >= 0, which spans many orders of
//                   magnitude inside a block (a linear map would round most of it to 0 and
//                   blow up m / sqrt(v)). Code c > 0 is an unsigned float with a 5-bit
//                   exponent and 3-bit mantissa relative to the absmax: the IEEE bits of
//                   x/absmax are rounded to steps of 2^20 (1/8 octave), so
//                   x = bits_to_float(0x3F800000 - (255 - c) * 2^20) * absmax; c = 0 is 0.
//                   Code 255 is exactly the absmax; the smallest nonzero level is 1.25*2^-32
//                   of it; the relative rounding error is at most 6.25% on v (3.1% on the
//                   sqrt(v) Adam divides by). Like bitsandbytes' dynamic map it spends its
//                   codes on orders of magnitude, but quantizing is integer arithmetic on
//                   the float's bits, identical in scalar, AVX-512 and CUDA code (no search).
// Both maps keep each block's absmax exactly, and an outlier only coarsens its own block.
//
// Fused steps (fp32 parameters and gradients; the update uses the fresh fp32 moments, only
// the stored state is quantized; torch.optim semantics, decoupled weight decay):
//   adamw:    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p *= 1 - lr wd;
//             p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
//   lion:     c = b1 m + (1-b1) g;  p *= 1 - lr wd;  p -= lr sign(c);  m = b2 m + (1-b2) g
//   momentum: m = beta m + (1-beta) g;  u = nesterov ? g + beta (m - g) : m  (Muon's input
//             to Newton-Schulz, written to u)
// Memory traffic per element: adamw reads p, g, 2 codes and writes p, 2 codes (14 bytes vs
// 28 for fp32 AdamW's p, g, m, v).
#pragma once

#include <cstdint>

#include "ternary/dispatch.h"  // Isa

namespace nanochat {

enum class Map8 { linear, minifloat };

constexpr int64_t kOptim8DefaultBlock = 2048;
constexpr int64_t kOptim8BlockMultiple = 64;      // SIMD width granularity
constexpr int64_t kOptim8MaxBlock = int64_t(1) << 20;

// The minifloat map's constants, shared by every implementation.
constexpr int32_t kMiniOne = 0x3F800000;               // bits of 1.0f: code 255
constexpr int32_t kMiniStep = 1 << 20;                 // 1/8 octave in float bits
constexpr int32_t kMiniLow = kMiniOne - 255 * kMiniStep;  // bits of code 0's level

struct AdamW8Args {
  float* p;
  const float* g;
  int8_t* m;
  float* m_absmax;
  uint8_t* v;
  float* v_absmax;
  int64_t n, block;
  float lr, beta1, beta2, eps, weight_decay;
  float bias_correction1, bias_correction2;  // 1 - beta^t, in (0, 1]
};

struct Lion8Args {
  float* p;
  const float* g;
  int8_t* m;
  float* m_absmax;
  int64_t n, block;
  float lr, beta1, beta2, weight_decay;
};

struct Momentum8Args {
  const float* g;
  int8_t* m;
  float* m_absmax;
  float* u;
  int64_t n, block;
  float beta;
  bool nesterov;
};

// ---- checked, multithreaded entry points (throw nanochat::Error naming the argument) ---
int64_t optim8_num_blocks(int64_t n, int64_t block);  // checks block; ceil(n / block)
// codes: int8 for linear, uint8 for minifloat (passed as bytes); absmax: num_blocks floats.
void quantize_blockwise(const float* x, int64_t n, int64_t block, Map8 map, void* codes,
                        float* absmax);
void dequantize_blockwise(const void* codes, const float* absmax, int64_t n, int64_t block,
                          Map8 map, float* x);
void adamw8_step(const AdamW8Args& a);
void lion8_step(const Lion8Args& a);
void momentum8_step(const Momentum8Args& a);

// ---- kernels, one table per ISA; each handles whole blocks [b0, b1) ---------------------
// The calling thread's scratch for one block's fresh fp32 state before it is requantized
// (grown once per thread, reused by every step); for the ISA files.
float* optim8_scratch(int64_t floats);

struct Optim8Kernels {
  const char* name;
  void (*quantize)(const float* x, int64_t n, int64_t block, Map8 map, void* codes,
                   float* absmax, int64_t b0, int64_t b1);
  void (*dequantize)(const void* codes, const float* absmax, int64_t n, int64_t block, Map8 map,
                     float* x, int64_t b0, int64_t b1);
  void (*adamw)(const AdamW8Args& a, int64_t b0, int64_t b1);
  void (*lion)(const Lion8Args& a, int64_t b0, int64_t b1);
  void (*momentum)(const Momentum8Args& a, int64_t b0, int64_t b1);
};
// AVX-512 (F/BW/VL) for Isa::avx512 and avx512_vnni on a CPU with AVX-512 BW, AVX2 for the
// other x86 ISAs (avx2, avx_vnni), NEON for neon and neon_dotprod, else scalar.
// Every table gives bit-identical results (same float operations in the same order, no FMA
// contraction), which tests/cpp/test_optim.cpp checks.
const Optim8Kernels& optim8_kernels(Isa isa);
const Optim8Kernels& optim8_kernels();  // for active_isa()

extern const Optim8Kernels kOptim8Scalar;
extern const Optim8Kernels kOptim8Avx2;
extern const Optim8Kernels kOptim8Avx512;
extern const Optim8Kernels kOptim8Neon;  // aarch64 builds only

}  // namespace nanochat
