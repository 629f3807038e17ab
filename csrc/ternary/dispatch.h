// Run-time choice of the kernel ISA. The build compiles every kernel of the target
// architecture (each file with its own ISA flags); this picks the best one the CPU runs,
// or the one pinned by NANOCHAT_ISA / set_isa() so tests can force each path. Every op
// family (ternary, dense, loss, norms, ...) maps the one active ISA to its own kernels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nanochat {

// Ascending within each architecture; an x86 ISA never runs on ARM and vice versa, so
// `isa >= Isa::avx2` is an x86 test (the ARM entries sort below every x86 one).
//   neon_dotprod: Armv8.2 SDOT;  avx_vnni: AVX2 + the VEX vpdpbusd (Alder Lake, Zen 5, ...)
enum class Isa { scalar, neon, neon_dotprod, avx2, avx_vnni, avx512, avx512vnni };
constexpr Isa kAllIsas[] = {Isa::scalar,   Isa::neon,   Isa::neon_dotprod, Isa::avx2,
                            Isa::avx_vnni, Isa::avx512, Isa::avx512vnni};
inline bool is_x86(Isa i) { return i >= Isa::avx2; }
inline bool is_arm(Isa i) { return i == Isa::neon || i == Isa::neon_dotprod; }

const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);  // throws Error on unknown names
bool isa_supported(Isa isa);                 // compiled in and runs on this CPU
std::vector<Isa> supported_isas();           // ascending, scalar first
Isa best_isa();

// The ISA ternary_gemm uses now: NANOCHAT_ISA if set (must be supported), else best.
Isa active_isa();
void set_isa(Isa isa);  // throws Error if unsupported
void reset_isa();       // back to the default

// One ISA's kernel. Computes y for rows [r0, r1) and tokens [t0, t1):
//   y[t * y_stride + r] = (sum_k (code[r,k] + 1) * q[t,k] - qsum[t]) * w_scale * x_scale[t]
// over TK2 weights (code + 1 is what TK2 stores; qsum[t] = sum_k q[t,k] removes the +1),
// row-major or in tiles of w_tile_rows rows (ternary.h); with tiles, r0 is a multiple of
// the tile, so a kernel's 1-, 4- and 8-row groups never straddle two tiles.
struct GemmArgs {
  const uint8_t* w;
  int64_t rows;  // whole matrix (kernels may prefetch rows past their tile)
  int64_t w_row_bytes;  // tk2_row_bytes(cols)
  int64_t w_tile_rows;  // 1 (row-major TK2) or TK2_TILE_ROWS
  int64_t cols;
  const int8_t* q;
  int64_t q_stride;
  const int32_t* qsum;
  const float* x_scale;
  float w_scale;
  float* y;
  int64_t y_stride;
};
using GemmKernel = void (*)(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);

GemmKernel gemm_kernel(Isa isa);

// Per-ISA entry points, defined in kernels_<isa>.cpp.
void gemm_scalar(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void gemm_avx2(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void gemm_avxvnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void gemm_avx512(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void gemm_avx512vnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void gemm_neon(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void gemm_neon_dotprod(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
// SMMLA (kernels_neon_i8mm.cpp): Isa::neon_dotprod's kernel on a CPU with i8mm; 4 x 4 tiles,
// the rest on gemm_neon_dotprod.
void gemm_neon_i8mm(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);

// ternary_gemm_codes' AVX-512 VNNI kernel. Weights as panels of 16 rows: panel p at
// w + p * 16 * cols, its 4-column group g the 64 bytes at + g * 64, byte 4 * i + j =
// code[16 p + i][4 g + j] + 1 (0 in rows past `rows`). Computes panels [p0, p1) x tokens
// [t0, t1) of y with ternary_gemm's formula.
struct PanelArgs {
  const uint8_t* w;
  int64_t rows;
  int64_t cols;  // multiple of 4
  const int8_t* q;  // tokens x cols
  const int32_t* qsum;
  const float* x_scale;
  float w_scale;
  float* y;  // tokens x rows
};
void gemm_panels_avx512vnni(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1);
// The same on AVX2 (panels_avx2.cpp: vpmaddubsw, each 16-row panel as two 8-row halves).
void gemm_panels_avx2(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1);
// And with the VEX vpdpbusd (panels_avxvnni.cpp).
void gemm_panels_avxvnni(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1);
// On NEON: SDOT (panels_neon_dotprod.cpp) and Armv8.0 vmlal_s8 (panels_neon.cpp).
void gemm_panels_neon_dotprod(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0,
                              int64_t t1);
void gemm_panels_neon(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1);

// quantize_activations for tokens [t0, t1) on AVX-512 / AVX2, bit-identical to the scalar loop.
// Returns the first token holding a non-finite value (its row is left unwritten), or -1.
int64_t quantize_activations_avx512(const float* x, int64_t t0, int64_t t1, int64_t k,
                                    int8_t* q, float* x_scale);
int64_t quantize_activations_avx2(const float* x, int64_t t0, int64_t t1, int64_t k, int8_t* q,
                                  float* x_scale);
// The same on NEON (activations_neon.cpp), for Isa::neon and Isa::neon_dotprod.
int64_t quantize_activations_neon(const float* x, int64_t t0, int64_t t1, int64_t k, int8_t* q,
                                  float* x_scale);

}  // namespace nanochat
