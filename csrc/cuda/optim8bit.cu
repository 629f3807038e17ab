// CUDA fused 8-bit optimizer steps: one thread block per quantization block. Pass 1
// dequantizes, updates the parameter with the fresh fp32 moments and reduces the new
// absmax; pass 2 recomputes the same moments from the still-unchanged old codes (cheaper
// than a block-sized shared-memory scratch, and any block size fits) and writes the new
// codes. Each element is owned by one thread in both passes, so reads of old codes never
// race with writes of new ones. Arithmetic uses __fmul_rn/__fadd_rn/__fdiv_rn/__fsqrt_rn
// (never contracted into FMA) in the order of csrc/optim/blockwise8_scalar.cpp.
#include <cuda_runtime.h>

#include <string>

#include "cuda/optim8bit_cuda.h"
#include "nanochat/error.hpp"

namespace nanochat {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float dq_linear(int8_t c, float absmax) {
  return __fmul_rn(__fdiv_rn(float(c), 127.0f), absmax);
}
__device__ __forceinline__ int8_t q_linear(float x, float inv) {
  const float y = fminf(fmaxf(__fmul_rn(x, inv), -127.0f), 127.0f);
  return int8_t(__float2int_rn(y));
}
__device__ __forceinline__ float dq_mini(uint8_t c, float absmax) {
  if (c == 0) return 0.0f;
  return __fmul_rn(__int_as_float(kMiniLow + int32_t(c) * kMiniStep), absmax);
}
__device__ __forceinline__ uint8_t q_mini(float x, float inv) {
  const int32_t bits = __float_as_int(__fmul_rn(x, inv));
  if (bits < 0) return 0;
  const int32_t t = bits - kMiniLow + kMiniStep / 2;
  if (t < 0) return 0;
  const int32_t c = t >> 20;
  return uint8_t(c > 255 ? 255 : c);
}

// Block-wide max of non-negative values (fmaxf drops NaN, as the CPU code does).
__device__ float block_max(float v) {
  __shared__ float warp_max[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, warp_max[w]);
  __syncthreads();  // warp_max is reused by the next call
  return r;
}

__device__ __forceinline__ float inv_linear(float a) { return a > 0.0f ? __fdiv_rn(127.0f, a) : 0.0f; }
__device__ __forceinline__ float inv_mini(float a) { return a > 0.0f ? __fdiv_rn(1.0f, a) : 0.0f; }

__global__ void quantize_kernel(const float* x, int64_t n, int64_t block, bool linear,
                                void* codes, float* absmax) {
  const int64_t b = blockIdx.x, s = b * block, len = min(block, n - s);
  float a = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) a = fmaxf(a, fabsf(x[s + i]));
  a = block_max(a);
  if (linear) {
    const float inv = inv_linear(a);
    for (int64_t i = threadIdx.x; i < len; i += kThreads)
      static_cast<int8_t*>(codes)[s + i] = q_linear(x[s + i], inv);
  } else {
    const float inv = inv_mini(a);
    for (int64_t i = threadIdx.x; i < len; i += kThreads)
      static_cast<uint8_t*>(codes)[s + i] = q_mini(x[s + i], inv);
  }
  if (threadIdx.x == 0) absmax[b] = a;
}

__global__ void dequantize_kernel(const void* codes, const float* absmax, int64_t n,
                                  int64_t block, bool linear, float* x) {
  const int64_t b = blockIdx.x, s = b * block, len = min(block, n - s);
  const float a = absmax[b];
  for (int64_t i = threadIdx.x; i < len; i += kThreads)
    x[s + i] = linear ? dq_linear(static_cast<const int8_t*>(codes)[s + i], a)
                      : dq_mini(static_cast<const uint8_t*>(codes)[s + i], a);
}

__global__ void adamw_kernel(AdamW8Args a) {
  const int64_t b = blockIdx.x, s = b * a.block, len = min(a.block, a.n - s);
  const float omb1 = 1.0f - a.beta1, omb2 = 1.0f - a.beta2;
  const float decay = 1.0f - __fmul_rn(a.lr, a.weight_decay);
  const float step = __fdiv_rn(a.lr, a.bias_correction1);
  const float sbc2 = __fsqrt_rn(a.bias_correction2);
  const float ma = a.m_absmax[b], va = a.v_absmax[b];
  float mmax = 0.0f, vmax = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float g = a.g[s + i];
    const float m = __fadd_rn(__fmul_rn(dq_linear(a.m[s + i], ma), a.beta1), __fmul_rn(g, omb1));
    const float v = __fadd_rn(__fmul_rn(dq_mini(a.v[s + i], va), a.beta2),
                              __fmul_rn(__fmul_rn(g, g), omb2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), sbc2), a.eps);
    a.p[s + i] = __fsub_rn(__fmul_rn(a.p[s + i], decay), __fmul_rn(step, __fdiv_rn(m, denom)));
    mmax = fmaxf(mmax, fabsf(m));
    vmax = fmaxf(vmax, fabsf(v));
  }
  mmax = block_max(mmax);
  vmax = block_max(vmax);
  const float minv = inv_linear(mmax), vinv = inv_mini(vmax);
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float g = a.g[s + i];
    const float m = __fadd_rn(__fmul_rn(dq_linear(a.m[s + i], ma), a.beta1), __fmul_rn(g, omb1));
    const float v = __fadd_rn(__fmul_rn(dq_mini(a.v[s + i], va), a.beta2),
                              __fmul_rn(__fmul_rn(g, g), omb2));
    a.m[s + i] = q_linear(m, minv);
    a.v[s + i] = q_mini(v, vinv);
  }
  if (threadIdx.x == 0) {
    a.m_absmax[b] = mmax;
    a.v_absmax[b] = vmax;
  }
}

__global__ void lion_kernel(Lion8Args a) {
  const int64_t b = blockIdx.x, s = b * a.block, len = min(a.block, a.n - s);
  const float omb1 = 1.0f - a.beta1, omb2 = 1.0f - a.beta2;
  const float decay = 1.0f - __fmul_rn(a.lr, a.weight_decay);
  const float ma = a.m_absmax[b];
  float mmax = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float g = a.g[s + i];
    const float m = dq_linear(a.m[s + i], ma);
    const float c = __fadd_rn(__fmul_rn(m, a.beta1), __fmul_rn(g, omb1));
    const float sgn = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    a.p[s + i] = __fsub_rn(__fmul_rn(a.p[s + i], decay), __fmul_rn(a.lr, sgn));
    mmax = fmaxf(mmax, fabsf(__fadd_rn(__fmul_rn(m, a.beta2), __fmul_rn(g, omb2))));
  }
  mmax = block_max(mmax);
  const float inv = inv_linear(mmax);
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float g = a.g[s + i];
    const float m = dq_linear(a.m[s + i], ma);
    a.m[s + i] = q_linear(__fadd_rn(__fmul_rn(m, a.beta2), __fmul_rn(g, omb2)), inv);
  }
  if (threadIdx.x == 0) a.m_absmax[b] = mmax;
}

__global__ void momentum_kernel(Momentum8Args a) {
  const int64_t b = blockIdx.x, s = b * a.block, len = min(a.block, a.n - s);
  const float omb = 1.0f - a.beta;
  const float ma = a.m_absmax[b];
  float mmax = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float g = a.g[s + i];
    const float m = __fadd_rn(__fmul_rn(dq_linear(a.m[s + i], ma), a.beta), __fmul_rn(g, omb));
    a.u[s + i] = a.nesterov ? __fadd_rn(g, __fmul_rn(__fsub_rn(m, g), a.beta)) : m;
    mmax = fmaxf(mmax, fabsf(m));
  }
  mmax = block_max(mmax);
  const float inv = inv_linear(mmax);
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float g = a.g[s + i];
    const float m = __fadd_rn(__fmul_rn(dq_linear(a.m[s + i], ma), a.beta), __fmul_rn(g, omb));
    a.m[s + i] = q_linear(m, inv);
  }
  if (threadIdx.x == 0) a.m_absmax[b] = mmax;
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(e));
}

unsigned grid(int64_t n, int64_t block, const char* what) {
  const int64_t nb = optim8_num_blocks(n, block);
  if (nb > 0x7fffffff) throw Error(std::string(what) + ": too many blocks");
  return unsigned(nb);
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void cuda_quantize_blockwise(const float* x, int64_t n, int64_t block, Map8 map, void* codes,
                             float* absmax, uintptr_t stream) {
  const unsigned g = grid(n, block, "cuda_quantize_blockwise");
  if (g == 0) return;
  quantize_kernel<<<g, kThreads, 0, as_stream(stream)>>>(x, n, block, map == Map8::linear, codes,
                                                         absmax);
  check_launch("cuda_quantize_blockwise");
}

void cuda_dequantize_blockwise(const void* codes, const float* absmax, int64_t n, int64_t block,
                               Map8 map, float* x, uintptr_t stream) {
  const unsigned g = grid(n, block, "cuda_dequantize_blockwise");
  if (g == 0) return;
  dequantize_kernel<<<g, kThreads, 0, as_stream(stream)>>>(codes, absmax, n, block,
                                                           map == Map8::linear, x);
  check_launch("cuda_dequantize_blockwise");
}

void cuda_adamw8_step(const AdamW8Args& a, uintptr_t stream) {
  const unsigned g = grid(a.n, a.block, "cuda_adamw8_step");
  if (g == 0) return;
  adamw_kernel<<<g, kThreads, 0, as_stream(stream)>>>(a);
  check_launch("cuda_adamw8_step");
}

void cuda_lion8_step(const Lion8Args& a, uintptr_t stream) {
  const unsigned g = grid(a.n, a.block, "cuda_lion8_step");
  if (g == 0) return;
  lion_kernel<<<g, kThreads, 0, as_stream(stream)>>>(a);
  check_launch("cuda_lion8_step");
}

void cuda_momentum8_step(const Momentum8Args& a, uintptr_t stream) {
  const unsigned g = grid(a.n, a.block, "cuda_momentum8_step");
  if (g == 0) return;
  momentum_kernel<<<g, kThreads, 0, as_stream(stream)>>>(a);
  check_launch("cuda_momentum8_step");
}

}  // namespace nanochat
