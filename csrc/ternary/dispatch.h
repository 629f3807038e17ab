// Run-time choice of the ternary kernel ISA. The build compiles every x86 kernel
// (each file with its own ISA flags); this picks the best one the CPU runs, or
// the one pinned by NANOCHAT_ISA / set_isa() so tests can force each path.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nanochat {

enum class Isa { scalar, avx2, avx512, avx512vnni };

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
// over TK2 weights (code + 1 is what TK2 stores; qsum[t] = sum_k q[t,k] removes the +1).
struct GemmArgs {
  const uint8_t* w;
  int64_t rows;  // whole matrix (kernels may prefetch rows past their tile)
  int64_t w_row_bytes;
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
void gemm_avx512(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void gemm_avx512vnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1);

}  // namespace nanochat
