// RMSNorm drivers (rmsnorm.h): row blocks over the thread pool, the scalar reference rows.
#include "norm/rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/row_list.h"
#include "common/threadpool.h"

namespace nanochat {
namespace norm_kernels {
namespace {

float fwd_scalar(const float* x, const float* w, int64_t dim, float eps, float* y) {
  float ss = 0.0f;
  for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
  const float rstd = 1.0f / std::sqrt(ss / float(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * rstd * w[i];
  return rstd;
}

// gx = rstd * (gy*w - xhat * mean(gy*w*xhat)), xhat = x * rstd; gw += gy * xhat.
void bwd_scalar(const float* gy, const float* x, const float* w, float rstd, int64_t dim,
                float* gx, float* gw_acc) {
  float dot = 0.0f;
  for (int64_t i = 0; i < dim; ++i) dot += gy[i] * w[i] * (x[i] * rstd);
  const float m = dot / float(dim);
  for (int64_t i = 0; i < dim; ++i) {
    const float xhat = x[i] * rstd;
    gx[i] = rstd * (gy[i] * w[i] - xhat * m);
    gw_acc[i] += gy[i] * xhat;
  }
}

}  // namespace

const Kernels scalar = {"scalar", fwd_scalar, bwd_scalar};

}  // namespace norm_kernels

namespace {

const norm_kernels::Kernels& kernels() {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (active_isa() >= Isa::avx512) return norm_kernels::avx512;
  if (active_isa() >= Isa::avx2) return norm_kernels::avx2;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (is_arm(active_isa())) return norm_kernels::neon;
#endif
  return norm_kernels::scalar;
}

int64_t blocks_of(int64_t n) { return (n + kRowBlock - 1) / kRowBlock; }

}  // namespace

const char* rmsnorm_path() { return kernels().name; }

float rms_norm_row(const float* x, const float* w, int64_t dim, float eps, float* y) {
  return kernels().fwd(x, w, dim, eps, y);
}

void rms_norm_forward(const float* x, const float* w, int64_t rows, int64_t dim, float eps,
                      float* y, float* rstd) {
  const auto& k = kernels();
  parallel_for(blocks_of(rows), [&](int64_t b) {
    for (int64_t r = b * kRowBlock; r < std::min(rows, (b + 1) * kRowBlock); ++r)
      rstd[r] = k.fwd(x + r * dim, w, dim, eps, y + r * dim);
  });
}

void rms_norm_backward(const float* gy, const float* x, const float* w, const float* rstd,
                       int64_t rows, int64_t dim, const int64_t* keep, int64_t n_keep,
                       float* gx, float* gw) {
  const auto& k = kernels();
  if (keep) check_row_list("rms_norm_backward", "keep", keep, n_keep, rows);
  // One pass over the destination rows in parallel blocks of kRowBlock: listed rows
  // computed (their gy * xhat summed into the block's gw partial), the others zeroed, in
  // address order. gw then sums the block partials in block order, so results do not depend
  // on the thread count.
  const int64_t nb = blocks_of(rows);
  std::vector<float> part(size_t(std::max<int64_t>(nb, 1) * dim), 0.0f);
  parallel_for(nb, [&](int64_t b) {
    float* acc = part.data() + b * dim;
    const int64_t r0 = b * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
    int64_t i = keep ? int64_t(std::lower_bound(keep, keep + n_keep, r0) - keep) : r0;
    for (int64_t r = r0; r < r1; ++r) {
      if (!keep || (i < n_keep && keep[i] == r)) {
        k.bwd(gy + r * dim, x + r * dim, w, rstd[r], dim, gx + r * dim, acc);
        ++i;
      } else {
        std::memset(gx + r * dim, 0, size_t(dim) * sizeof(float));
      }
    }
  });
  const int64_t cols_per = 256;
  parallel_for((dim + cols_per - 1) / cols_per, [&](int64_t c) {
    const int64_t c0 = c * cols_per, c1 = std::min(dim, c0 + cols_per);
    for (int64_t j = c0; j < c1; ++j) {
      float s = 0.0f;
      for (int64_t b = 0; b < nb; ++b) s += part[size_t(b * dim + j)];
      gw[j] = s;
    }
  });
}

}  // namespace nanochat
