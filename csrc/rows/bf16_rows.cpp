// bf16 row gather / scatter drivers (bf16_rows.h) and the scalar reference rows.
#include "rows/bf16_rows.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "common/row_list.h"
#include "common/threadpool.h"
#include "nanochat/error.hpp"

namespace nanochat {
namespace bf16_kernels {
namespace {

uint16_t bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

void to_bf16_scalar(const float* x, int64_t n, float mul, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_rne(x[i] * mul);
}

void int8_to_bf16_scalar(const int8_t* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_rne(float(x[i]));  // exact
}

void from_bf16_scalar(const uint16_t* x, int64_t n, float mul, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(x[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    out[i] = f * mul;
  }
}

}  // namespace

const Kernels scalar = {"scalar", to_bf16_scalar, int8_to_bf16_scalar, from_bf16_scalar};

}  // namespace bf16_kernels

namespace {

const bf16_kernels::Kernels& kernels() {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (active_isa() >= Isa::avx512) return bf16_kernels::avx512;
  if (active_isa() >= Isa::avx2) return bf16_kernels::avx2;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (is_arm(active_isa())) return bf16_kernels::neon;
#endif
  return bf16_kernels::scalar;
}

void check_rows(const char* fn, const int64_t* rows, int64_t n, int64_t total) {
  if (n < 0 || total < 0 || (!rows && n != total))
    throw Error(std::string(fn) + ": row count " + std::to_string(n) + " does not match " +
                std::to_string(total) + " rows");
  if (rows) check_row_list(fn, "rows", rows, n, total);
}

constexpr int64_t kRowsPerTask = 32;

}  // namespace

const char* bf16_rows_path() { return kernels().name; }

void gather_backward_operands(const float* gy, int64_t out_cols, const int8_t* q,
                              int64_t in_cols, const float* x_scale, int64_t total_rows,
                              const int64_t* rows, int64_t n, uint16_t* g, uint16_t* gs,
                              uint16_t* qb) {
  check_rows("gather_backward_operands", rows, n, total_rows);
  const auto& k = kernels();
  parallel_for((n + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t i = task * kRowsPerTask; i < std::min(n, (task + 1) * kRowsPerTask); ++i) {
      const int64_t r = rows ? rows[i] : i;
      k.to_bf16(gy + r * out_cols, out_cols, 1.0f, g + i * out_cols);
      k.to_bf16(gy + r * out_cols, out_cols, x_scale[r], gs + i * out_cols);
      k.int8_to_bf16(q + r * in_cols, in_cols, qb + i * in_cols);
    }
  });
}

void scatter_scaled_rows(const uint16_t* src, int64_t cols, const int64_t* rows, int64_t n,
                         int64_t total_rows, float scale, float* dst) {
  check_rows("scatter_scaled_rows", rows, n, total_rows);
  const auto& k = kernels();
  // Task t writes destination rows [t * kRowsPerTask, ...): the listed ones from src, the
  // others zero, so every row is written exactly once and in parallel.
  parallel_for((total_rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(total_rows, r0 + kRowsPerTask);
    int64_t i = rows ? int64_t(std::lower_bound(rows, rows + n, r0) - rows) : r0;
    for (int64_t r = r0; r < r1; ++r) {
      float* out = dst + r * cols;
      if (i < n && (rows ? rows[i] : i) == r) {
        k.from_bf16(src + i * cols, cols, scale, out);
        ++i;
      } else {
        std::memset(out, 0, size_t(cols) * sizeof(float));
      }
    }
  });
}

}  // namespace nanochat
