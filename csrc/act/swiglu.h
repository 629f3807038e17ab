// SwiGLU's gating for training, forward and backward over (rows x dim) matrices:
//   h = silu(g) * u,   silu(g) = g * sigmoid(g)        (the FFN's act(gate) * up)
// One pass per direction instead of autograd's silu, mul and their backward kernels. The
// backward can run over a list of rows only (Collider: the other rows' incoming gradient
// is zero, so their gradients are zero).
// Plain C++17; an AVX-512, AVX2 or NEON row kernel where the CPU has it, the scalar loop
// otherwise.
#pragma once

#include <cstdint>

namespace nanochat {

// h (rows x dim) from g, u (rows x dim).
void swiglu_forward(const float* g, const float* u, int64_t rows, int64_t dim, float* h);

// gg, gu (rows x dim) from gh, g, u. keep: sorted row indices (n_keep of them) to compute,
// every other row of gg and gu set to 0; nullptr: every row.
void swiglu_backward(const float* gh, const float* g, const float* u, int64_t rows,
                     int64_t dim, const int64_t* keep, int64_t n_keep, float* gg, float* gu);

// ---- per-ISA row kernels (internal; declared here for the two kernel files) -------------
// The kernel path SwiGLU forward/backward run on the active ISA ("avx2", ...).
const char* swiglu_path();

namespace swiglu_kernels {

using FwdRow = void (*)(const float* g, const float* u, int64_t n, float* h);
using BwdRow = void (*)(const float* gh, const float* g, const float* u, int64_t n,
                        float* gg, float* gu);

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
extern const Kernels neon;  // Isa::neon and neon_dotprod
#endif

}  // namespace swiglu_kernels
}  // namespace nanochat
