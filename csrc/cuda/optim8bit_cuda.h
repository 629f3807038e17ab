// CUDA versions of the fused 8-bit optimizer steps (csrc/optim/blockwise8.h), compiled only
// when nvcc is found (NANOCHAT_HAVE_CUDA). Every pointer in the Args is a device pointer;
// `stream` is a cudaStream_t passed as an integer. Launch-only: no host round trip, no
// allocation, no synchronization. Same codes and values as the CPU kernels, bit for bit
// (unfused __fmul_rn/__fadd_rn arithmetic in the same order).
#pragma once

#include <cstdint>

#include "optim/blockwise8.h"

namespace nanochat {

void cuda_quantize_blockwise(const float* x, int64_t n, int64_t block, Map8 map, void* codes,
                             float* absmax, uintptr_t stream);
void cuda_dequantize_blockwise(const void* codes, const float* absmax, int64_t n, int64_t block,
                               Map8 map, float* x, uintptr_t stream);
void cuda_adamw8_step(const AdamW8Args& a, uintptr_t stream);
void cuda_lion8_step(const Lion8Args& a, uintptr_t stream);
void cuda_momentum8_step(const Momentum8Args& a, uintptr_t stream);

}  // namespace nanochat
