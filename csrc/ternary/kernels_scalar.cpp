// Scalar reference kernel: the ground truth every SIMD kernel must equal bit for bit.
#include "ternary/kernels_driver.h"

namespace nanochat {

void gemm_scalar(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  const int64_t nb = a.cols / QK;
  for (int64_t t = t0; t < t1; ++t) {
    const int8_t* x = a.q + t * a.q_stride;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* w = w_row(a, r);
      int32_t acc = 0;
      for (int64_t b = 0; b < nb; ++b)
        for (int j = 0; j < 64; ++j) {
          const int byte = w[b * w_block_step(a) + j];
          for (int n = 0; n < 4; ++n) acc += ((byte >> (2 * n)) & 3) * x[b * QK + j + 64 * n];
        }
      a.y[t * a.y_stride + r] = float(acc - a.qsum[t]) * (a.w_scale * a.x_scale[t]);
    }
  }
}

}  // namespace nanochat
