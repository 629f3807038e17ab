// ternary_gemm: validation, the per-token sums, and work split over the pool.
// The ISA kernels only see GemmArgs and a [rows) x [tokens) tile range.
#include <algorithm>
#include <string>
#include <vector>

#include "common/threadpool.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"

namespace nanochat {

// Integer accumulation bound: |sum (code+1) * q| <= 256 * cols must fit int32.
constexpr int64_t kMaxCols = int64_t(1) << 22;

void ternary_gemm(const TernaryMatrixView& w, const int8_t* q, const float* x_scale,
                  int64_t tokens, float* y) {
  if (w.rows < 0 || w.cols < 0 || tokens < 0) throw Error("ternary_gemm: negative shape");
  if (w.cols % QK != 0)
    throw Error("ternary_gemm: weight row length " + std::to_string(w.cols) +
                " is not a multiple of the 256-weight block");
  if (w.cols > kMaxCols)
    throw Error("ternary_gemm: row length " + std::to_string(w.cols) + " exceeds " +
                std::to_string(kMaxCols));
  if (w.rows == 0 || tokens == 0) return;
  if (!y || (w.cols > 0 && (!w.data || !q || !x_scale))) throw Error("ternary_gemm: null buffer");
  if (w.cols == 0) {
    std::fill(y, y + tokens * w.rows, 0.0f);
    return;
  }

  std::vector<int32_t> qsum(size_t(tokens), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    int32_t s = 0;
    const int8_t* qt = q + t * w.cols;
    for (int64_t i = 0; i < w.cols; ++i) s += qt[i];
    qsum[size_t(t)] = s;
  }

  GemmArgs a{w.data, w.rows, tk2_row_bytes(w.cols), w.cols, q, w.cols, qsum.data(), x_scale,
             w.scale, y, w.rows};
  const GemmKernel kernel = gemm_kernel(active_isa());

  // Split into (row chunk, token chunk) tasks: row chunks of >= 16 rows (a
  // multiple of the 4-row tiles), about 4 tasks per thread for balance; token
  // chunks of 64 keep a chunk's activations in L2 while its weight rows stream.
  const int64_t threads = num_threads();
  const int64_t work = w.rows * w.cols * tokens;
  if (threads == 1 || work < (int64_t(1) << 18)) {
    kernel(a, 0, w.rows, 0, tokens);
    return;
  }
  const int64_t tchunk = 64;
  const int64_t ntc = (tokens + tchunk - 1) / tchunk;
  const int64_t want_rc = std::max<int64_t>(1, (4 * threads + ntc - 1) / ntc);
  int64_t rchunk = (w.rows + want_rc - 1) / want_rc;
  rchunk = std::max<int64_t>(16, (rchunk + 15) / 16 * 16);
  const int64_t nrc = (w.rows + rchunk - 1) / rchunk;
  parallel_for(nrc * ntc, [&](int64_t i) {
    const int64_t rc = i % nrc, tc = i / nrc;
    const int64_t r0 = rc * rchunk, t0 = tc * tchunk;
    kernel(a, r0, std::min(w.rows, r0 + rchunk), t0, std::min(tokens, t0 + tchunk));
  });
}

}  // namespace nanochat
