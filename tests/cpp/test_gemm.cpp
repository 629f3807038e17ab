// ternary_gemm: every ISA kernel against the scalar kernel (bit for bit), the scalar
// kernel against a double-precision reference, thread-count independence, argument
// checks, and the ISA dispatch API.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "act/swiglu.h"
#include "attn/attention.h"
#include "common/cpu.h"
#include "common/threadpool.h"
#include "dense/dense.h"
#include "loss/fused_loss.h"
#include "norm/rmsnorm.h"
#include "optim/blockwise8.h"
#include "rows/bf16_rows.h"
#include "test_util.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;
using nanochat_test::random_codes;
using nanochat_test::random_floats;
using nanochat_test::random_q;

namespace {

// One GEMM problem with exactly sized buffers (so ASan sees any over-read).
struct Problem {
  int64_t rows, cols, tokens;
  std::vector<int8_t> codes;  // rows x cols
  std::vector<uint8_t> w;      // TK2
  std::vector<uint8_t> tiles;  // the same matrix as TK2 tiles
  float w_scale;
  std::vector<int8_t> q;  // tokens x cols
  std::vector<float> x_scale;

  TernaryMatrixView view() const { return {w.data(), rows, cols, w_scale}; }
  TernaryMatrixView tiled_view() const {
    return {tiles.data(), rows, cols, w_scale, TK2_TILE_ROWS};
  }

  std::vector<float> run(bool tiled = false) const {
    std::vector<float> y(size_t(tokens * rows), std::numeric_limits<float>::quiet_NaN());
    ternary_gemm(tiled ? tiled_view() : view(), q.data(), x_scale.data(), tokens, y.data());
    return y;
  }
};

std::vector<uint8_t> tile(const std::vector<uint8_t>& tk2, int64_t rows, int64_t cols) {
  std::vector<uint8_t> out(size_t(tk2_tiled_bytes(rows, cols)));
  tk2_tile(tk2.data(), rows, cols, out.data());
  return out;
}

Problem make_problem(std::mt19937& rng, int64_t rows, int64_t cols, int64_t tokens) {
  Problem p;
  p.rows = rows;
  p.cols = cols;
  p.tokens = tokens;
  p.codes = random_codes(rng, rows * cols);
  p.w.resize(size_t(rows * tk2_row_bytes(cols)));
  tk2_pack(p.codes.data(), rows, cols, p.w.data());
  p.tiles = tile(p.w, rows, cols);
  p.w_scale = std::uniform_real_distribution<float>(0.01f, 0.1f)(rng);
  p.q = random_q(rng, tokens * cols);
  p.x_scale = random_floats(rng, tokens, 1e-3f, 0.05f);
  return p;
}

// y[t, r] = w_scale * x_scale[t] * sum_k code[r, k] * q[t, k], in double.
std::vector<double> reference(const Problem& p) {
  std::vector<double> y(size_t(p.tokens * p.rows));
  for (int64_t t = 0; t < p.tokens; ++t)
    for (int64_t r = 0; r < p.rows; ++r) {
      int64_t acc = 0;
      for (int64_t k = 0; k < p.cols; ++k)
        acc += int64_t(p.codes[size_t(r * p.cols + k)]) * p.q[size_t(t * p.cols + k)];
      y[size_t(t * p.rows + r)] = double(acc) * double(p.w_scale) * double(p.x_scale[size_t(t)]);
    }
  return y;
}

void expect_near_reference(const std::vector<float>& y, const std::vector<double>& ref) {
  ASSERT_EQ(y.size(), ref.size());
  for (size_t i = 0; i < y.size(); ++i) {
    // two float roundings (w_scale * x_scale, then the product) on an exact integer sum
    const double tol = 3e-7 * std::fabs(ref[i]);
    ASSERT_LE(std::fabs(double(y[i]) - ref[i]), tol) << "index " << i << ": " << y[i]
                                                      << " vs " << ref[i];
  }
}

::testing::AssertionResult bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size differs";
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0)
    return ::testing::AssertionSuccess();
  for (size_t i = 0; i < a.size(); ++i) {
    uint32_t x, y;
    std::memcpy(&x, &a[i], 4);
    std::memcpy(&y, &b[i], 4);
    if (x != y)
      return ::testing::AssertionFailure()
             << "first difference at " << i << ": " << a[i] << " vs " << b[i];
  }
  return ::testing::AssertionFailure() << "memcmp differs";
}

const int64_t kRows[] = {1, 2, 3, 4, 5, 7, 16, 33, 100};
const int64_t kCols[] = {256, 512, 768, 2304};
const int64_t kTokens[] = {1, 2, 3, 4, 5, 9, 64, 65, 130};

}  // namespace

// ---- the Triangle of Truth: ISA kernels == scalar kernel ~= double reference ------------

TEST(Gemm, TriangleOfTruthAllIsasAllShapes) {
  GlobalStateGuard guard;
  const auto isas = supported_isas();
  ASSERT_FALSE(isas.empty());
  ASSERT_EQ(isas.front(), Isa::scalar);
  std::mt19937 rng(100);
  int compared = 0;
  for (int64_t cols : kCols)
    for (int64_t rows : kRows)
      for (int64_t tokens : kTokens) {
        SCOPED_TRACE(testing::Message() << "rows " << rows << " cols " << cols << " tokens "
                                        << tokens);
        const Problem p = make_problem(rng, rows, cols, tokens);
        set_isa(Isa::scalar);
        const auto y_scalar = p.run();
        expect_near_reference(y_scalar, reference(p));
        ASSERT_TRUE(bit_identical(p.run(true), y_scalar)) << "scalar, TK2 tiles";
        for (Isa isa : isas) {
          if (isa == Isa::scalar) continue;
          set_isa(isa);
          ASSERT_EQ(active_isa(), isa);
          ASSERT_TRUE(bit_identical(p.run(), y_scalar)) << "ISA " << isa_name(isa);
          ASSERT_TRUE(bit_identical(p.run(true), y_scalar)) << "ISA " << isa_name(isa) << " tiles";
          ++compared;
        }
      }
  if (isas.size() == 1) GTEST_SKIP() << "only the scalar kernel runs here";
  EXPECT_GT(compared, 0);
}

TEST(Gemm, ExtremeValuesDoNotOverflowOrSaturate) {
  // All codes +1 (TK2 value 2) against q = -128 or 127 everywhere: the largest
  // partial sums a kernel ever forms (vpmaddubsw pairs of 2 * -128 twice, ...).
  GlobalStateGuard guard;
  for (int64_t cols : {int64_t(256), int64_t(8192)})
    for (int sign : {1, -1})
      for (int8_t qv : {int8_t(-128), int8_t(127)}) {
        SCOPED_TRACE(testing::Message() << "cols " << cols << " code " << sign << " q "
                                        << int(qv));
        Problem p;
        p.rows = 6;
        p.cols = cols;
        p.tokens = 5;
        p.codes.assign(size_t(p.rows * cols), int8_t(sign));
        p.codes[3] = 0;  // one non-constant entry
        p.w.resize(size_t(p.rows * tk2_row_bytes(cols)));
        tk2_pack(p.codes.data(), p.rows, cols, p.w.data());
        p.w_scale = 1.0f;
        p.q.assign(size_t(p.tokens * cols), qv);
        p.x_scale.assign(size_t(p.tokens), 1.0f);
        const auto ref = reference(p);
        for (Isa isa : supported_isas()) {
          set_isa(isa);
          const auto y = p.run();
          for (size_t i = 0; i < y.size(); ++i)
            ASSERT_EQ(double(y[i]), ref[i]) << isa_name(isa) << " index " << i;  // exact
        }
      }
}

TEST(Gemm, LongRowsAllIsas) {
  // Rows longer than 256 blocks (65536 weights): the VNNI GEMV folds its lanes
  // every 256 blocks; check the fold boundary and a remainder after it.
  GlobalStateGuard guard;
  std::mt19937 rng(101);
  for (int64_t cols : {int64_t(65536), int64_t(65536 + 512), int64_t(3 * 65536 + 256)})
    for (int64_t tokens : {int64_t(1), int64_t(2), int64_t(5)}) {
      SCOPED_TRACE(testing::Message() << "cols " << cols << " tokens " << tokens);
      const Problem p = make_problem(rng, 5, cols, tokens);
      set_isa(Isa::scalar);
      const auto y_scalar = p.run();
      expect_near_reference(y_scalar, reference(p));
      for (Isa isa : supported_isas()) {
        set_isa(isa);
        ASSERT_TRUE(bit_identical(p.run(), y_scalar)) << isa_name(isa);
        ASSERT_TRUE(bit_identical(p.run(true), y_scalar)) << isa_name(isa) << " tiles";
      }
    }
}

TEST(Gemm, ThreadCountDoesNotChangeResults) {
  GlobalStateGuard guard;
  std::mt19937 rng(102);
  // Shapes large enough that ternary_gemm splits them over the pool, plus small ones.
  const std::vector<std::array<int64_t, 3>> shapes = {
      {100, 2304, 130}, {33, 768, 65}, {100, 2304, 1}, {16, 512, 64}, {7, 256, 9}, {100, 768, 5}};
  for (const auto& s : shapes) {
    SCOPED_TRACE(testing::Message() << "rows " << s[0] << " cols " << s[1] << " tokens " << s[2]);
    const Problem p = make_problem(rng, s[0], s[1], s[2]);
    set_isa(Isa::scalar);
    set_num_threads(1);
    ASSERT_EQ(num_threads(), 1);
    const auto y1 = p.run();
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      for (int threads : {1, 2, 4}) {
        set_num_threads(threads);
        ASSERT_EQ(num_threads(), threads);
        ASSERT_TRUE(bit_identical(p.run(), y1)) << isa_name(isa) << " threads " << threads;
        ASSERT_TRUE(bit_identical(p.run(true), y1))
            << isa_name(isa) << " threads " << threads << " tiles";
      }
    }
  }
}

// ---- ternary_gemm_codes: the training GEMM from int8 codes --------------------------------

TEST(GemmCodes, EqualsTk2GemmBitForBitEveryIsaAndThreadCount) {
  GlobalStateGuard guard;
  std::mt19937 rng(110);
  // Ragged panels (rows % 16), ragged token tiles (tokens % 8), one and many tasks.
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 256, 1},   {15, 256, 7},   {16, 512, 8},  {17, 256, 9},   {33, 768, 65},
      {100, 256, 130}, {250, 768, 37}, {64, 2304, 3}, {768, 256, 256}};
  for (const auto& s : shapes) {
    SCOPED_TRACE(testing::Message() << "rows " << s[0] << " cols " << s[1] << " tokens " << s[2]);
    const Problem p = make_problem(rng, s[0], s[1], s[2]);
    set_isa(Isa::scalar);
    set_num_threads(1);
    const auto want = p.run();
    for (Isa isa : supported_isas()) {
      set_isa(isa);
      for (int threads : {1, 2, 3}) {
        set_num_threads(threads);
        std::vector<float> y(want.size(), std::numeric_limits<float>::quiet_NaN());
        ternary_gemm_codes(p.codes.data(), p.rows, p.cols, p.w_scale, p.q.data(),
                           p.x_scale.data(), p.tokens, y.data());
        ASSERT_TRUE(bit_identical(y, want)) << isa_name(isa) << " threads " << threads;
      }
    }
  }
}

TEST(GemmCodes, ShortRowsOnThePanelKernels) {
  // Any cols % 4 == 0 runs on the panel kernels (x86 AVX2 and up, ARM NEON and SDOT; the
  // scalar ISA's TK2 route needs whole 256-blocks).
  GlobalStateGuard guard;
  std::mt19937 rng(111);
  int ran = 0;
  for (Isa isa : supported_isas()) {
    if (isa == Isa::scalar) continue;
    set_isa(isa);
    ++ran;
    for (int64_t cols : {int64_t(4), int64_t(12), int64_t(100), int64_t(260)}) {
      SCOPED_TRACE(testing::Message() << isa_name(isa) << " cols " << cols);
      Problem p;
      p.rows = 19;
      p.cols = cols;
      p.tokens = 11;
      p.codes = random_codes(rng, p.rows * cols);
      p.w_scale = 0.05f;
      p.q = random_q(rng, p.tokens * cols);
      p.x_scale = random_floats(rng, p.tokens, 1e-3f, 0.05f);
      std::vector<float> y(size_t(p.tokens * p.rows));
      ternary_gemm_codes(p.codes.data(), p.rows, cols, p.w_scale, p.q.data(), p.x_scale.data(),
                         p.tokens, y.data());
      expect_near_reference(y, reference(p));
    }
  }
  if (ran == 0) GTEST_SKIP() << "no panel kernel here";
}

TEST(GemmCodes, ExtremeValuesAreExactOnEveryIsa) {
  // Every code +1 or -1 against q = -128 or 127 everywhere: the AVX2 kernel's int16 partial
  // sums reach their bound (64 groups x -512 = -32768) and must not wrap; long rows cross
  // several flushes. The integer result is exact, so every ISA equals the double reference
  // within the two float roundings and the scalar kernel bit for bit.
  GlobalStateGuard guard;
  for (int64_t cols : {int64_t(256), int64_t(1024), int64_t(2816)})
    for (int code : {1, -1})
      for (int qv : {-128, 127}) {
        SCOPED_TRACE(testing::Message() << "cols " << cols << " code " << code << " q " << qv);
        Problem p;
        p.rows = 24;
        p.cols = cols;
        p.tokens = 7;
        p.codes.assign(size_t(p.rows * cols), int8_t(code));
        p.w_scale = 0.03f;
        p.q.assign(size_t(p.tokens * cols), int8_t(qv));
        p.x_scale.assign(size_t(p.tokens), 0.01f);
        const auto ref = reference(p);
        set_isa(Isa::scalar);
        std::vector<float> want(ref.size());
        ternary_gemm_codes(p.codes.data(), p.rows, cols, p.w_scale, p.q.data(),
                           p.x_scale.data(), p.tokens, want.data());
        expect_near_reference(want, ref);
        for (Isa isa : supported_isas()) {
          set_isa(isa);
          std::vector<float> y(ref.size(), std::numeric_limits<float>::quiet_NaN());
          ternary_gemm_codes(p.codes.data(), p.rows, cols, p.w_scale, p.q.data(),
                             p.x_scale.data(), p.tokens, y.data());
          ASSERT_TRUE(bit_identical(y, want)) << isa_name(isa);
        }
      }
}

TEST(GemmCodes, BadArgumentsThrow) {
  GlobalStateGuard guard;
  std::vector<int8_t> codes(4 * 256, 1), q(2 * 256, 3);
  std::vector<float> xs(2, 0.1f), y(8);
  codes[5 * 1 + 256] = 2;  // row 1, column 5: not ternary
  for (Isa isa : supported_isas()) {
    set_isa(isa);
    SCOPED_TRACE(isa_name(isa));
    EXPECT_THROW(ternary_gemm_codes(codes.data(), 4, 256, 1.0f, q.data(), xs.data(), 2, y.data()),
                 Error);
    EXPECT_THROW(ternary_gemm_codes(codes.data(), 4, 6, 1.0f, q.data(), xs.data(), 2, y.data()),
                 Error);
    EXPECT_THROW(ternary_gemm_codes(codes.data(), -1, 256, 1.0f, q.data(), xs.data(), 2, y.data()),
                 Error);
    EXPECT_THROW(ternary_gemm_codes(nullptr, 4, 256, 1.0f, q.data(), xs.data(), 2, y.data()),
                 Error);
    EXPECT_NO_THROW(ternary_gemm_codes(nullptr, 0, 256, 1.0f, nullptr, nullptr, 2, nullptr));
  }
  try {
    set_isa(Isa::scalar);
    ternary_gemm_codes(codes.data(), 4, 256, 1.0f, q.data(), xs.data(), 2, y.data());
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ternary"), std::string::npos) << e.what();
  }
}

TEST(Gemm, KernelsHonourTileRangesAndStrides) {
  // Each ISA kernel, called directly on a sub-range with padded strides, writes
  // exactly y[t * y_stride + r] for r in [r0, r1), t in [t0, t1) and nothing else.
  std::mt19937 rng(103);
  const int64_t rows = 23, cols = 768, tokens = 11;
  const int64_t q_stride = cols + 64, y_stride = rows + 5;
  const auto codes = random_codes(rng, rows * cols);
  std::vector<uint8_t> w(size_t(rows * tk2_row_bytes(cols)));
  tk2_pack(codes.data(), rows, cols, w.data());
  const std::vector<uint8_t> tiles = tile(w, rows, cols);
  const auto q = random_q(rng, tokens * q_stride);
  const auto xs = random_floats(rng, tokens, 0.001f, 0.01f);
  std::vector<int32_t> qsum(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    int32_t s = 0;
    for (int64_t k = 0; k < cols; ++k) s += q[size_t(t * q_stride + k)];
    qsum[size_t(t)] = s;
  }
  const float w_scale = 0.03f;
  const float sentinel = -12345.0f;
  struct Range {
    int64_t r0, r1, t0, t1;
  };
  // Every ISA's kernel, and on ARM each kernel function the CPU runs: neon_dotprod's kernel is
  // the i8mm one where the CPU has i8mm, so the SDOT kernel is also called by name.
  std::vector<std::pair<std::string, GemmKernel>> kernels;
  for (Isa isa : supported_isas()) kernels.emplace_back(isa_name(isa), gemm_kernel(isa));
#if defined(__aarch64__)
  if (cpu_features().dotprod) kernels.emplace_back("sdot", &gemm_neon_dotprod);
  if (cpu_features().i8mm) kernels.emplace_back("i8mm", &gemm_neon_i8mm);
#endif
  // Row-major TK2 takes any r0; TK2 tiles need r0 on a tile boundary (dispatch.h).
  for (const Range& rg : {Range{0, rows, 0, tokens}, Range{3, 10, 2, 7}, Range{5, 6, 10, 11},
                          Range{1, 22, 0, 1}, Range{4, 4, 0, tokens}, Range{8, 23, 0, 1},
                          Range{16, 21, 0, 1}, Range{8, 13, 3, 9}, Range{0, 7, 0, 1}})
  for (int64_t tile_rows : {int64_t(1), TK2_TILE_ROWS}) {
    if (rg.r0 % tile_rows != 0) continue;
    for (const auto& [name, kernel] : kernels) {
      SCOPED_TRACE(testing::Message() << name << " rows [" << rg.r0 << ", " << rg.r1
                                      << ") tokens [" << rg.t0 << ", " << rg.t1
                                      << ") tile_rows " << tile_rows);
      std::vector<float> y(size_t(tokens * y_stride), sentinel);
      GemmArgs a{};
      a.w = tile_rows == 1 ? w.data() : tiles.data();
      a.rows = rows;
      a.w_row_bytes = tk2_row_bytes(cols);
      a.w_tile_rows = tile_rows;
      a.cols = cols;
      a.q = q.data();
      a.q_stride = q_stride;
      a.qsum = qsum.data();
      a.x_scale = xs.data();
      a.w_scale = w_scale;
      a.y = y.data();
      a.y_stride = y_stride;
      kernel(a, rg.r0, rg.r1, rg.t0, rg.t1);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t r = 0; r < y_stride; ++r) {
          const float got = y[size_t(t * y_stride + r)];
          const bool inside = r >= rg.r0 && r < rg.r1 && t >= rg.t0 && t < rg.t1;
          if (!inside) {
            ASSERT_EQ(got, sentinel) << "wrote outside its range at t " << t << " r " << r;
            continue;
          }
          int32_t acc = 0;
          for (int64_t k = 0; k < cols; ++k)
            acc += codes[size_t(r * cols + k)] * q[size_t(t * q_stride + k)];
          const float want = float(acc) * (w_scale * xs[size_t(t)]);
          ASSERT_EQ(got, want) << "t " << t << " r " << r;
        }
    }
  }
}

// ---- argument checks ------------------------------------------------------------------

TEST(Gemm, BadArgumentsThrow) {
  GlobalStateGuard guard;
  std::mt19937 rng(104);
  const Problem p = make_problem(rng, 4, 512, 3);
  std::vector<float> y(12);
  for (int64_t cols : {100, 255, 257, 640}) {
    TernaryMatrixView v{p.w.data(), 4, cols, 1.0f};
    EXPECT_THROW(ternary_gemm(v, p.q.data(), p.x_scale.data(), 3, y.data()), Error) << cols;
  }
  for (int64_t tile_rows : {int64_t(0), int64_t(4), int64_t(16)}) {
    TernaryMatrixView t = p.tiled_view();
    t.tile_rows = tile_rows;
    EXPECT_THROW(ternary_gemm(t, p.q.data(), p.x_scale.data(), 3, y.data()), Error) << tile_rows;
  }
  TernaryMatrixView v = p.view();
  EXPECT_THROW(ternary_gemm({nullptr, 4, 512, 1.0f}, p.q.data(), p.x_scale.data(), 3, y.data()),
               Error);
  EXPECT_THROW(ternary_gemm(v, nullptr, p.x_scale.data(), 3, y.data()), Error);
  EXPECT_THROW(ternary_gemm(v, p.q.data(), nullptr, 3, y.data()), Error);
  EXPECT_THROW(ternary_gemm(v, p.q.data(), p.x_scale.data(), 3, nullptr), Error);
  EXPECT_THROW(ternary_gemm({p.w.data(), -1, 512, 1.0f}, p.q.data(), p.x_scale.data(), 3,
                            y.data()),
               Error);
  EXPECT_THROW(ternary_gemm(v, p.q.data(), p.x_scale.data(), -1, y.data()), Error);
  // cols beyond the int32 accumulation bound
  EXPECT_THROW(ternary_gemm({p.w.data(), 1, int64_t(1) << 23, 1.0f}, p.q.data(),
                            p.x_scale.data(), 1, y.data()),
               Error);
}

TEST(Gemm, EmptyShapesAreNoOps) {
  GlobalStateGuard guard;
  std::mt19937 rng(105);
  const Problem p = make_problem(rng, 4, 512, 3);
  std::vector<float> y(12, 7.0f);
  // rows == 0 or tokens == 0: nothing is read or written, null buffers are fine
  EXPECT_NO_THROW(ternary_gemm({p.w.data(), 0, 512, 1.0f}, p.q.data(), p.x_scale.data(), 3,
                               y.data()));
  EXPECT_NO_THROW(ternary_gemm(p.view(), p.q.data(), p.x_scale.data(), 0, y.data()));
  EXPECT_NO_THROW(ternary_gemm({nullptr, 0, 512, 1.0f}, nullptr, nullptr, 3, nullptr));
  EXPECT_NO_THROW(ternary_gemm({nullptr, 4, 512, 1.0f}, nullptr, nullptr, 0, nullptr));
  for (float v : y) EXPECT_EQ(v, 7.0f);
  // cols == 0: an empty sum, y = 0
  ternary_gemm({nullptr, 4, 0, 1.0f}, nullptr, nullptr, 3, y.data());
  for (float v : y) EXPECT_EQ(v, 0.0f);
}

// ---- end to end: float activations through quantize_activations ---------------------------

TEST(Gemm, QuantizedPipelineApproximatesFloatMatmul) {
  GlobalStateGuard guard;
  std::mt19937 rng(106);
  const int64_t rows = 48, cols = 1024, tokens = 6;
  const auto wf = random_floats(rng, rows * cols, -1.0f, 1.0f);
  std::vector<int8_t> codes(wf.size());
  const float w_scale = absmean_quantize(wf.data(), rows * cols, codes.data());
  std::vector<uint8_t> w(size_t(rows * tk2_row_bytes(cols)));
  tk2_pack(codes.data(), rows, cols, w.data());
  const auto x = random_floats(rng, tokens * cols, -2.0f, 2.0f);
  std::vector<int8_t> q(x.size());
  std::vector<float> xs(static_cast<size_t>(tokens));
  quantize_activations(x.data(), tokens, cols, q.data(), xs.data());
  std::vector<float> y(size_t(tokens * rows));
  ternary_gemm({w.data(), rows, cols, w_scale}, q.data(), xs.data(), tokens, y.data());
  // against the float product of the dequantized operands
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < cols; ++k) {
        const double wv = double(codes[size_t(r * cols + k)]) * w_scale;
        const double xv = double(x[size_t(t * cols + k)]);
        acc += wv * xv;
        mag += std::fabs(wv * xv);
      }
      // activation quantization error: half a step per element
      const double bound = 0.5 * xs[size_t(t)] * w_scale * cols + 1e-6 * mag;
      ASSERT_LE(std::fabs(y[size_t(t * rows + r)] - acc), bound) << t << " " << r;
    }
}

// ---- ISA dispatch -----------------------------------------------------------------------

TEST(Dispatch, Names) {
  EXPECT_THROW(isa_from_name("bogus"), Error);
  EXPECT_THROW(isa_from_name(""), Error);
  EXPECT_THROW(isa_from_name("AVX2"), Error);
  for (Isa i : kAllIsas) EXPECT_EQ(isa_from_name(isa_name(i)), i);
  EXPECT_STREQ(isa_name(Isa::scalar), "scalar");
  EXPECT_STREQ(isa_name(Isa::avx512vnni), "avx512_vnni");
}

TEST(Dispatch, SupportedIsas) {
  GlobalStateGuard guard;
  EXPECT_TRUE(isa_supported(Isa::scalar));
  const auto isas = supported_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), Isa::scalar);
  for (size_t i = 1; i < isas.size(); ++i) EXPECT_LT(int(isas[i - 1]), int(isas[i]));
  for (Isa i : kAllIsas) {
    const bool listed = std::find(isas.begin(), isas.end(), i) != isas.end();
    EXPECT_EQ(isa_supported(i), listed) << isa_name(i);
  }
  EXPECT_EQ(best_isa(), isas.back());
  for (Isa i : isas) {
    set_isa(i);
    EXPECT_EQ(active_isa(), i);
    EXPECT_NE(gemm_kernel(i), nullptr);
  }
  reset_isa();
  const char* env = std::getenv("NANOCHAT_ISA");
  if (!env || !*env) {
    EXPECT_EQ(active_isa(), best_isa());
  }
  // VNNI implies AVX-512BW implies AVX2 on every real CPU
  if (isa_supported(Isa::avx512vnni)) {
    EXPECT_TRUE(isa_supported(Isa::avx512));
  }
  if (isa_supported(Isa::avx512)) {
    EXPECT_TRUE(isa_supported(Isa::avx2));
  }
}

TEST(Dispatch, SetUnsupportedIsaThrows) {
  GlobalStateGuard guard;
  for (Isa i : kAllIsas) {
    if (isa_supported(i)) continue;
    const Isa before = active_isa();
    EXPECT_THROW(set_isa(i), Error) << isa_name(i);
    EXPECT_EQ(active_isa(), before);  // unchanged
    return;
  }
  GTEST_SKIP() << "every ISA is supported on this machine";
}

// AArch64: Advanced SIMD is part of the base architecture, so Isa::neon always runs there and
// its kernels are the NEON ones; neon_dotprod follows the CPU's SDOT (tools/arm64_test.sh runs
// this under qemu with and without it). Elsewhere neither ARM ISA is supported.
TEST(Dispatch, ArmIsasFollowTheCpu) {
#if defined(__aarch64__)
  GlobalStateGuard guard;
  EXPECT_TRUE(isa_supported(Isa::neon));
  EXPECT_EQ(isa_supported(Isa::neon_dotprod), cpu_features().dotprod);
  EXPECT_EQ(gemm_kernel(Isa::neon), &gemm_neon);
  EXPECT_STREQ(dense_kernels(Isa::neon).name, "neon");
  // Training's op families (what `nanochat info` reports per op) take their NEON kernels on
  // both ARM ISAs; the codes GEMM takes SDOT panels on neon_dotprod.
  for (Isa i : {Isa::neon, Isa::neon_dotprod}) {
    if (!isa_supported(i)) continue;
    set_isa(i);
    SCOPED_TRACE(isa_name(i));
    EXPECT_STREQ(ternary_gemm_codes_path(), isa_name(i));
    EXPECT_STREQ(fused_loss_path(), "neon");
    EXPECT_STREQ(optim8_kernels().name, "neon");
    EXPECT_STREQ(swiglu_path(), "neon");
    EXPECT_STREQ(attention_path(), "neon");
    EXPECT_STREQ(bf16_rows_path(), "neon");
    EXPECT_STREQ(rmsnorm_path(), "neon");
  }
  if (cpu_features().dotprod) {
    // SMMLA for prefill where the CPU has i8mm (qemu -cpu max), else SDOT throughout
    EXPECT_EQ(gemm_kernel(Isa::neon_dotprod),
              cpu_features().i8mm ? &gemm_neon_i8mm : &gemm_neon_dotprod);
    EXPECT_STREQ(dense_kernels(Isa::neon_dotprod).name, "neon_dotprod");
    EXPECT_EQ(best_isa(), Isa::neon_dotprod);
  } else {
    EXPECT_EQ(best_isa(), Isa::neon);
  }
  for (Isa i : kAllIsas) EXPECT_FALSE(is_x86(i) && isa_supported(i)) << isa_name(i);
#else
  EXPECT_FALSE(isa_supported(Isa::neon));
  EXPECT_FALSE(isa_supported(Isa::neon_dotprod));
#endif
}
