// CUDA fused linear cross-entropy (compiled when nvcc is found: NANOCHAT_HAVE_CUDA). The
// CPU version's algorithm (csrc/loss/fused_loss.h) over chunks of consecutive tokens:
// logits = h_c W^T into a caller-provided workspace (chunk x vocab floats), one block per
// row for max / logsumexp / loss and the softmax gradient in place (ignored rows become
// zero rows), then grad_h_c = G W straight into grad_hidden and grad_W += G^T h_c. The
// GEMMs are shared-memory tiled (16 x 16 tiles; correctness first, cuBLAS-class speed is
// not the aim). Kernels never allocate: the caller passes the workspace.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <string>

#include "loss/fused_loss.h"
#include "nanochat/error.hpp"

namespace nanochat {
namespace {

constexpr int kTile = 16;
constexpr int kRowThreads = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(e));
}

// C[i, j] (row stride ldc) = (accumulate ? C : 0) + sum_k A(i, k) B(k, j), with
// A(i, k) = a[i * ars + k * acs] and B(k, j) = b[k * brs + j * bcs].
__global__ void gemm_kernel(int64_t M, int64_t N, int64_t K, const float* __restrict__ a,
                            int64_t ars, int64_t acs, const float* __restrict__ b, int64_t brs,
                            int64_t bcs, float* __restrict__ c, int64_t ldc, bool accumulate) {
  __shared__ float as[kTile][kTile + 1];
  __shared__ float bs[kTile][kTile + 1];
  const int64_t i = int64_t(blockIdx.y) * kTile + threadIdx.y;
  const int64_t j = int64_t(blockIdx.x) * kTile + threadIdx.x;
  float acc = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;
    as[threadIdx.y][threadIdx.x] = (i < M && ka < K) ? a[i * ars + ka * acs] : 0.0f;
    bs[threadIdx.y][threadIdx.x] = (kb < K && j < N) ? b[kb * brs + j * bcs] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) acc = fmaf(as[threadIdx.y][k], bs[k][threadIdx.x], acc);
    __syncthreads();
  }
  if (i < M && j < N) c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0.0f) + acc;
}

__device__ float block_reduce(float v, bool is_max, float* sh) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_down_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kRowThreads / 32 ? sh[lane] : (is_max ? -FLT_MAX : 0.0f);
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_down_sync(0xffffffffu, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  const float r = sh[0];
  __syncthreads();
  return r;
}

// One block per logits row: row_loss = logsumexp - x[t] (0 if t < 0); with grad, the row
// becomes (softmax - onehot(t)) * scale (row_scale[row] when given), or zeros for an
// ignored row.
__global__ void ce_rows_kernel(float* __restrict__ logits, int64_t V,
                               const int32_t* __restrict__ targets, float scale,
                               const float* __restrict__ row_scale, bool grad,
                               float* __restrict__ row_loss) {
  __shared__ float sh[32];
  float* x = logits + int64_t(blockIdx.x) * V;
  const int32_t t = targets[blockIdx.x];
  if (row_scale) scale = row_scale[blockIdx.x];
  if (t < 0) {
    if (grad)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) x[j] = 0.0f;
    if (threadIdx.x == 0) row_loss[blockIdx.x] = 0.0f;
    return;
  }
  float m = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, x[j]);
  m = block_reduce(m, true, sh);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += expf(x[j] - m);
  s = block_reduce(s, false, sh);
  const float lse = m + logf(s);
  const float xt = x[t];
  __syncthreads();  // every thread read x[t] before any overwrites it
  if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - xt;
  if (!grad) return;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
    x[j] = expf(x[j] - lse) * scale - (j == t ? scale : 0.0f);
}

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs,
          const float* b, int64_t brs, int64_t bcs, float* c, int64_t ldc, bool accumulate,
          cudaStream_t s) {
  if (M == 0 || N == 0) return;
  const dim3 grid(unsigned((N + kTile - 1) / kTile), unsigned((M + kTile - 1) / kTile));
  gemm_kernel<<<grid, dim3(kTile, kTile), 0, s>>>(M, N, K, a, ars, acs, b, brs, bcs, c, ldc,
                                                  accumulate);
  check(cudaGetLastError(), "cuda_fused_linear_cross_entropy: gemm launch");
}

}  // namespace

void cuda_fused_linear_cross_entropy(const CudaFusedLossArgs& a, uintptr_t stream) {
  const std::string f = "cuda_fused_linear_cross_entropy: ";
  if (a.vocab <= 0 || a.dim <= 0 || a.heads <= 0 || a.tokens < 0 || a.chunk <= 0)
    throw Error(f + "vocab, dim, heads and chunk must be > 0, tokens >= 0");
  if (!a.weight || (!a.head_scales && !a.row_scale) || !a.row_loss || !a.workspace ||
      (a.tokens > 0 && (!a.hidden || !a.targets)))
    throw Error(f + "null buffer");
  const bool grad = a.grad_hidden != nullptr;
  if (grad != (a.grad_weight != nullptr))
    throw Error(f + "grad_hidden and grad_weight must be given together");
  if (a.chunk > 2147483647) throw Error(f + "chunk too large for one grid");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t V = a.vocab, D = a.dim, T = a.tokens;
  if (grad) check(cudaMemsetAsync(a.grad_weight, 0, sizeof(float) * V * D, s), f.c_str());
  for (int64_t i = 0; i < a.heads; ++i) {
    float scale = 0.0f;  // the caller's w_i / n_i, read once per head
    if (!a.row_scale) {
      check(cudaMemcpyAsync(&scale, a.head_scales + i, sizeof(float), cudaMemcpyDeviceToHost,
                            s),
            f.c_str());
      check(cudaStreamSynchronize(s), f.c_str());
    }
    for (int64_t t0 = 0; t0 < T; t0 += a.chunk) {
      const int64_t c = std::min(a.chunk, T - t0);
      const float* h = a.hidden + (i * T + t0) * D;
      gemm(c, V, D, h, D, 1, a.weight, 1, D, a.workspace, V, false, s);
      ce_rows_kernel<<<unsigned(c), kRowThreads, 0, s>>>(
          a.workspace, V, a.targets + i * T + t0, scale,
          a.row_scale ? a.row_scale + i * T + t0 : nullptr, grad, a.row_loss + i * T + t0);
      check(cudaGetLastError(), "cuda_fused_linear_cross_entropy: rows launch");
      if (!grad) continue;
      gemm(c, D, V, a.workspace, V, 1, a.weight, D, 1, a.grad_hidden + (i * T + t0) * D, D,
           false, s);
      gemm(V, D, c, a.workspace, 1, V, h, D, 1, a.grad_weight, D, true, s);
    }
  }
}

}  // namespace nanochat
