// RMSNorm for training, forward and backward over the rows of a (rows x dim) matrix:
//   y = x * rstd * w,   rstd = 1 / sqrt(mean(x^2) + eps)   (per row; torch.nn.functional.rms_norm)
// One pass per direction instead of the half dozen element-wise kernels autograd runs.
// The backward can run over a list of rows only (Collider: the other rows' incoming
// gradient is zero, so their gx is zero and they add nothing to gw).
// Plain C++17; an AVX-512, AVX2 or NEON row kernel where the CPU has it, the scalar loop
// otherwise.
#pragma once

#include <cstdint>

#include "ternary/dispatch.h"  // Isa

namespace nanochat {

// y (rows x dim) and rstd (rows) from x (rows x dim) and w (dim).
void rms_norm_forward(const float* x, const float* w, int64_t rows, int64_t dim, float eps,
                      float* y, float* rstd);

// gx (rows x dim) and gw (dim) from gy, x (rows x dim), w, and the forward's rstd.
// keep: sorted row indices (n_keep of them) to compute, every other row of gx set to 0;
// nullptr: every row. gw is the sum over rows in a fixed order (blocks of kRowBlock rows),
// so results do not depend on the thread count.
void rms_norm_backward(const float* gy, const float* x, const float* w, const float* rstd,
                       int64_t rows, int64_t dim, const int64_t* keep, int64_t n_keep,
                       float* gx, float* gw);

// One row of the forward (returns rstd) on the calling thread with the active ISA's kernel:
// the engine's norms, a token at a time, where a pool dispatch would cost more than the row.
float rms_norm_row(const float* x, const float* w, int64_t dim, float eps, float* y);

constexpr int64_t kRowBlock = 32;

// ---- per-ISA row kernels (internal; declared here for the two kernel files) -------------
// The kernel path RMSNorm forward/backward run on the active ISA ("avx2", ...).
const char* rmsnorm_path();

namespace norm_kernels {

// Returns rstd; writes y.
using FwdRow = float (*)(const float* x, const float* w, int64_t dim, float eps, float* y);
// Writes gx; adds gy * x * rstd into gw_acc.
using BwdRow = void (*)(const float* gy, const float* x, const float* w, float rstd,
                        int64_t dim, float* gx, float* gw_acc);

struct Kernels {
  const char* name;  // the ISA path, as `nanochat info` reports it
  FwdRow fwd;
  BwdRow bwd;
};

extern const Kernels scalar;
#ifdef NANOCHAT_HAVE_X86_KERNELS
extern const Kernels avx2;
extern const Kernels avx512;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
extern const Kernels neon;
#endif

}  // namespace norm_kernels
}  // namespace nanochat
