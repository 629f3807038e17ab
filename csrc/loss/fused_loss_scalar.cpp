// Scalar reference kernels of the fused loss (no ISA flags): the micro-tile GEMMs over the
// packed panels (at any tile shape) and the cross-entropy row. The SIMD files compute the
// same sums in the same order with FMAs (their F32 tiles are bit-identical to these at the
// same shape); their exp is a polynomial (~1 ulp).
#include <cmath>
#include <cstring>

#include "loss/fused_loss.h"

namespace nanochat::loss_kernels {
namespace {

using namespace nanochat;

template <int R, int C>
void micro_f32(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
               bool accumulate) {
  float acc[R][C] = {};
  for (int64_t k = 0; k < kc; ++k, ap += R, bp += C)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) acc[r][j] = std::fma(ap[r], bp[j], acc[r][j]);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) c[r * ldc + j] = (accumulate ? c[r * ldc + j] : 0.0f) + acc[r][j];
}

inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// vdpbf16ps: acc += a0 * b0 + a1 * b1 per lane, products exact in f32.
template <int R, int C>
void micro_bf16(int64_t kc, const uint16_t* ap, const uint16_t* bp, float* c, int64_t ldc,
                bool accumulate) {
  float acc[R][C] = {};
  for (int64_t k = 0; k < kc; k += 2, ap += 2 * R, bp += 2 * C)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j)
        acc[r][j] += bf16_to_f32(ap[2 * r]) * bf16_to_f32(bp[2 * j]) +
                     bf16_to_f32(ap[2 * r + 1]) * bf16_to_f32(bp[2 * j + 1]);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) c[r * ldc + j] = (accumulate ? c[r * ldc + j] : 0.0f) + acc[r][j];
}

float ce_row(float* x, int64_t n, int32_t t, float scale, bool grad) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  const float xt = x[t];
  double sum = 0.0;  // the reference: exact enough that only the SIMD file's order differs
  for (int64_t j = 0; j < n; ++j) {
    const float e = std::exp(x[j] - m);
    sum += e;
    if (grad) x[j] = e;
  }
  const float lse = m + float(std::log(sum));
  if (grad) {
    const float f = float(scale / sum);
    for (int64_t j = 0; j < n; ++j) x[j] *= f;
    x[t] -= scale;
  }
  return lse - xt;
}

}  // namespace

const Kernels scalar = {"scalar", MR, NR, micro_f32<MR, NR>, micro_bf16<MR, NR>, ce_row};
const Kernels scalar_6x16 = {"scalar", 6, 16, micro_f32<6, 16>, nullptr, ce_row};

}  // namespace nanochat::loss_kernels
