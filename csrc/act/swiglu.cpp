// SwiGLU drivers (swiglu.h): row blocks over the thread pool, the scalar reference rows.
#include "act/swiglu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/row_list.h"
#include "common/threadpool.h"
#include "ternary/dispatch.h"

namespace nanochat {
namespace swiglu_kernels {
namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

void fwd_scalar(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

// d silu(g) / dg = s * (1 + g * (1 - s)), s = sigmoid(g).
void bwd_scalar(const float* gh, const float* g, const float* u, int64_t n, float* gg,
                float* gu) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]);
    gu[i] = gh[i] * g[i] * s;
    gg[i] = gh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}

}  // namespace

const Kernels scalar = {"scalar", fwd_scalar, bwd_scalar};

}  // namespace swiglu_kernels

namespace {

const swiglu_kernels::Kernels& kernels() {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (active_isa() >= Isa::avx512) return swiglu_kernels::avx512;
  if (active_isa() >= Isa::avx2) return swiglu_kernels::avx2;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (is_arm(active_isa())) return swiglu_kernels::neon;
#endif
  return swiglu_kernels::scalar;
}

constexpr int64_t kRows = 16;  // rows per pool task

}  // namespace

const char* swiglu_path() { return kernels().name; }

void swiglu_forward(const float* g, const float* u, int64_t rows, int64_t dim, float* h) {
  const auto& k = kernels();
  parallel_for((rows + kRows - 1) / kRows, [&](int64_t b) {
    const int64_t r0 = b * kRows, r1 = std::min(rows, r0 + kRows);
    k.fwd(g + r0 * dim, u + r0 * dim, (r1 - r0) * dim, h + r0 * dim);
  });
}

void swiglu_backward(const float* gh, const float* g, const float* u, int64_t rows,
                     int64_t dim, const int64_t* keep, int64_t n_keep, float* gg, float* gu) {
  const auto& k = kernels();
  if (!keep) {
    parallel_for((rows + kRows - 1) / kRows, [&](int64_t b) {
      const int64_t r0 = b * kRows, o = r0 * dim, n = (std::min(rows, r0 + kRows) - r0) * dim;
      k.bwd(gh + o, g + o, u + o, n, gg + o, gu + o);
    });
    return;
  }
  check_row_list("swiglu_backward", "keep", keep, n_keep, rows);
  // One pass over the destination rows in parallel blocks: listed rows computed, the others
  // zeroed, in address order (a separate zero-fill pass would write the gaps twice as slowly
  // and serially).
  const size_t row_bytes = size_t(dim) * sizeof(float);
  parallel_for((rows + kRows - 1) / kRows, [&](int64_t b) {
    const int64_t r0 = b * kRows, r1 = std::min(rows, r0 + kRows);
    int64_t i = int64_t(std::lower_bound(keep, keep + n_keep, r0) - keep);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * dim;
      if (i < n_keep && keep[i] == r) {
        k.bwd(gh + o, g + o, u + o, dim, gg + o, gu + o);
        ++i;
      } else {
        std::memset(gg + o, 0, row_bytes);
        std::memset(gu + o, 0, row_bytes);
      }
    }
  });
}

}  // namespace nanochat
