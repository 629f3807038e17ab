// CUDA ternary GEMV over the TK2 layout. Each warp owns one (row, token) pair;
// lane l reads 4 packed bytes at a time (16 weights). For shift 2n, those 4 bytes
// hold the codes+1 of 4 consecutive columns 64n + j .. 64n + j + 3, which meet 4
// consecutive int8 activations: one __dp4a each (codes 0..2 read the same as int8). The +1 offset
// is removed with a second dp4a of the activations against ones.
#include <cuda_runtime.h>

#include <string>

#include "cuda/ternary_cuda.h"
#include "ternary/ternary.h"

namespace nanochat {

namespace {

constexpr int kWarpsPerBlock = 4;

__global__ void ternary_gemv_kernel(const uint8_t* __restrict__ w, int64_t rows, int64_t cols,
                                    float w_scale, const int8_t* __restrict__ q,
                                    const float* __restrict__ x_scale, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t tok = blockIdx.y;
  if (row >= rows) return;
  const int64_t row_words = cols / 16;  // 4-byte words per TK2 row
  const uint32_t* wr = reinterpret_cast<const uint32_t*>(w + row * (cols / 4));
  const int8_t* x = q + tok * cols;
  int acc = 0, xsum = 0;
  for (int64_t i = lane; i < row_words; i += 32) {
    const uint32_t packed = __ldg(wr + i);
    const int64_t block = i / 16;           // 16 words = 64 bytes per block
    const int64_t j = (i % 16) * 4;         // byte offset inside the block
    const int8_t* xb = x + block * 256 + j;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int codes = int((packed >> (2 * n)) & 0x03030303u);  // 0..2: same as signed
      const int xv = *reinterpret_cast<const int*>(xb + 64 * n);
      acc = __dp4a(codes, xv, acc);
      xsum = __dp4a(0x01010101, xv, xsum);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    acc += __shfl_down_sync(0xffffffffu, acc, off);
    xsum += __shfl_down_sync(0xffffffffu, xsum, off);
  }
  if (lane == 0) y[tok * rows + row] = float(acc - xsum) * (w_scale * x_scale[tok]);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

void cuda_ternary_gemm(const uint8_t* w, int64_t rows, int64_t cols, float w_scale,
                       const int8_t* q, const float* x_scale, int64_t tokens, float* y,
                       uintptr_t stream) {
  if (rows < 0 || cols < 0 || tokens < 0) throw Error("cuda_ternary_gemm: negative shape");
  if (cols % QK != 0)
    throw Error("cuda_ternary_gemm: row length " + std::to_string(cols) +
                " is not a multiple of the 256-weight block");
  if (tokens > 65535) throw Error("cuda_ternary_gemm: at most 65535 tokens per call");
  if (rows == 0 || tokens == 0 || cols == 0) {
    if (rows && tokens) check(cudaMemsetAsync(y, 0, sizeof(float) * rows * tokens,
                                              reinterpret_cast<cudaStream_t>(stream)),
                              "cuda_ternary_gemm");
    return;
  }
  if (!w || !q || !x_scale || !y) throw Error("cuda_ternary_gemm: null buffer");
  const dim3 grid(unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock), unsigned(tokens));
  ternary_gemv_kernel<<<grid, kWarpsPerBlock * 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      w, rows, cols, w_scale, q, x_scale, y);
  check(cudaGetLastError(), "cuda_ternary_gemm launch");
}

}  // namespace nanochat
