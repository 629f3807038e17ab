// CUDA ternary GEMV/GEMM over TK2 weights (compiled only when nvcc is found:
// NANOCHAT_HAVE_CUDA). All pointers are device pointers; `stream` is a
// cudaStream_t passed as an integer so this header needs no CUDA include.
#pragma once

#include <cstdint>

namespace nanochat {

// Number of CUDA devices the driver reports (0 when there is no driver or GPU).
int cuda_device_count();

// y[t, r] = w_scale * x_scale[t] * sum_k code[r, k] * q[t, k] for t < tokens,
// the same contract as ternary_gemm. One warp per (row, token); dp4a products.
void cuda_ternary_gemm(const uint8_t* w, int64_t rows, int64_t cols, float w_scale,
                       const int8_t* q, const float* x_scale, int64_t tokens, float* y,
                       uintptr_t stream);

}  // namespace nanochat
