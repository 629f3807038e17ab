// Dense kernels of the engine (embedding lookup, LM head, attention helpers): every ISA
// kernel against the scalar reference on odd sizes, the scalar reference against plain
// double-precision math, Q8_0 repacking, activation preparation and argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "dense/dense.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"
#include "test_util.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;
using nanochat_test::random_floats;

namespace {

// Every kernel set this machine runs (the scalar one first): what each supported ISA maps to.
std::vector<const DenseKernels*> kernel_sets() {
  std::vector<const DenseKernels*> k = {&kDenseScalar};
  for (Isa isa : supported_isas()) {
    const DenseKernels* s = &dense_kernels(isa);
    if (std::find(k.begin(), k.end(), s) == k.end()) k.push_back(s);
  }
  return k;
}

// A random matrix in one dense type, with the float values it stands for.
struct Matrix {
  DenseType type;
  int64_t rows, cols;
  bool strided;  // rows padded (F32/F16); Q8_0: codes and scales interleaved per row
  std::vector<float> f32;
  std::vector<uint16_t> f16;
  std::vector<uint8_t> codes;  // Q8_0 (strided: whole rows with their scales)
  std::vector<uint16_t> scales;
  std::vector<double> value;  // rows x cols, what the weights mean

  int64_t ld() const {  // row stride in elements
    if (!strided) return cols;
    return type == DenseType::Q8_0 ? (cols + cols / 16 + 63) / 64 * 64 : cols + 3;
  }
  DenseMatrix view() const {
    DenseMatrix m;
    m.type = type;
    m.rows = rows;
    m.cols = cols;
    m.data = type == DenseType::F32   ? static_cast<const void*>(f32.data())
             : type == DenseType::F16 ? static_cast<const void*>(f16.data())
                                      : static_cast<const void*>(codes.data());
    m.ld = ld();
    m.scales = scales.data();
    if (strided && type == DenseType::Q8_0) {
      m.scales = reinterpret_cast<const uint16_t*>(codes.data() + cols);
      m.ld_scales = ld() / 2;
    }
    return m;
  }
};

Matrix make_matrix(std::mt19937& rng, DenseType type, int64_t rows, int64_t cols,
                   bool strided = false) {
  Matrix m{type, rows, cols, strided, {}, {}, {}, {}, {}};
  const std::vector<float> x = random_floats(rng, rows * cols, -1.0f, 1.0f);
  m.value.resize(size_t(rows * cols));
  const int64_t ld = m.ld();
  if (type == DenseType::F32) {
    m.f32.assign(size_t(rows * ld), std::nanf(""));  // padding must not be read
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) {
        m.f32[size_t(r * ld + k)] = x[size_t(r * cols + k)];
        m.value[size_t(r * cols + k)] = x[size_t(r * cols + k)];
      }
  } else if (type == DenseType::F16) {
    m.f16.assign(size_t(rows * ld), 0x7e00);  // NaN padding
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) {
        const uint16_t h = fp32_to_fp16(x[size_t(r * cols + k)]);
        m.f16[size_t(r * ld + k)] = h;
        m.value[size_t(r * cols + k)] = fp16_to_fp32(h);
      }
  } else {
    // ggml blocks with every code in [-128, 127] (not only the quantizer's [-127, 127]).
    std::uniform_int_distribution<int> q(-128, 127);
    std::vector<uint8_t> blocks(size_t(rows * cols / 32 * Q8_0_BLOCK_BYTES));
    for (int64_t b = 0; b < rows * cols / 32; ++b) {
      const uint16_t d = fp32_to_fp16(std::uniform_real_distribution<float>(1e-3f, 2e-2f)(rng));
      uint8_t* p = blocks.data() + b * Q8_0_BLOCK_BYTES;
      p[0] = uint8_t(d & 0xff);
      p[1] = uint8_t(d >> 8);
      for (int k = 0; k < 32; ++k) {
        const int8_t v = int8_t(q(rng));
        p[2 + k] = uint8_t(v);
        m.value[size_t(b * 32 + k)] = double(fp16_to_fp32(d)) * v;
      }
    }
    if (strided) {
      m.codes.assign(size_t(rows * ld), 0xAB);
      const DenseMatrix v = m.view();
      q8_0_repack(blocks.data(), rows, cols, m.codes.data(), ld, const_cast<uint16_t*>(v.scales),
                  v.ld_scales);
    } else {
      m.codes.resize(size_t(rows * cols));
      m.scales.resize(size_t(rows * cols / 32));
      q8_0_repack(blocks.data(), rows, cols, m.codes.data(), cols, m.scales.data(), cols / 32);
    }
  }
  return m;
}

std::vector<float> run_gemm(const DenseKernels& k, const Matrix& m, DenseActBuffer& buf,
                            const std::vector<float>& x, int64_t tokens, int64_t r0, int64_t r1) {
  const DenseActs& a = buf.prepare(m.type, x.data(), tokens, m.cols);
  const int64_t ldy = m.rows + 3;  // a stride wider than the rows
  std::vector<float> y(size_t(tokens * ldy), -7.0f);
  k.gemm(m.view(), a, r0, r1, y.data(), ldy);
  // Outside [r0, r1) nothing is written.
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < ldy; ++r)
      if (r < r0 || r >= r1) {
        EXPECT_EQ(y[size_t(t * ldy + r)], -7.0f) << "wrote row " << r;
      }
  return y;
}

}  // namespace

TEST(Dense, Q8RepackRoundTrip) {
  std::mt19937 rng(1);
  const int64_t rows = 3, cols = 96;
  const std::vector<float> x = random_floats(rng, rows * cols, -2.0f, 2.0f);
  std::vector<uint8_t> blocks(size_t(rows * cols / 32 * Q8_0_BLOCK_BYTES));
  // A block quantized by hand as ggml does: d = amax/127, q = round(x/d).
  for (int64_t b = 0; b < rows * cols / 32; ++b) {
    float amax = 0;
    for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(x[size_t(b * 32 + k)]));
    const uint16_t d = fp32_to_fp16(amax / 127);
    uint8_t* p = blocks.data() + b * Q8_0_BLOCK_BYTES;
    p[0] = uint8_t(d & 0xff);
    p[1] = uint8_t(d >> 8);
    for (int k = 0; k < 32; ++k)
      p[2 + k] = uint8_t(int8_t(std::round(x[size_t(b * 32 + k)] * 127 / amax)));
  }
  std::vector<uint8_t> codes(size_t(rows * cols));
  std::vector<uint16_t> scales(size_t(rows * cols / 32));
  q8_0_repack(blocks.data(), rows, cols, codes.data(), cols, scales.data(), cols / 32);
  DenseMatrix m{DenseType::Q8_0, rows, cols, codes.data(), scales.data()};
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    dense_row(m, r, row.data());
    for (int64_t k = 0; k < cols; ++k) {
      const uint8_t* p = blocks.data() + (r * cols + k) / 32 * Q8_0_BLOCK_BYTES;
      const float want = fp16_to_fp32(uint16_t(p[0] | p[1] << 8)) * float(int8_t(p[2 + k % 32]));
      ASSERT_EQ(row[size_t(k)], want) << r << "," << k;
      EXPECT_NEAR(row[size_t(k)], x[size_t(r * cols + k)], 2.0 / 127);
    }
  }
  EXPECT_THROW(dense_row(m, rows, row.data()), Error);
  EXPECT_THROW(dense_row(m, -1, row.data()), Error);
  EXPECT_THROW(q8_0_repack(blocks.data(), 1, 33, codes.data(), 33, scales.data(), 1), Error);
  EXPECT_THROW(q8_0_repack(blocks.data(), 1, 64, codes.data(), 32, scales.data(), 2), Error);
}

TEST(Dense, RowEveryType) {
  std::mt19937 rng(2);
  for (DenseType t : {DenseType::F32, DenseType::F16, DenseType::Q8_0})
    for (bool strided : {false, true}) {
      const int64_t cols = t == DenseType::Q8_0 ? 544 : 37;
      const Matrix m = make_matrix(rng, t, 5, cols, strided);
      std::vector<float> row(static_cast<size_t>(cols));
      dense_row(m.view(), 4, row.data());
      for (int64_t k = 0; k < cols; ++k)
        ASSERT_EQ(double(row[size_t(k)]), m.value[size_t(4 * cols + k)]) << dense_type_name(t);
    }
}

// Activation preparation: ggml's q8_0 quantizer, and the lane helpers.
TEST(Dense, PrepareQ8) {
  std::mt19937 rng(3);
  const int64_t cols = 64, tokens = 2;
  std::vector<float> x = random_floats(rng, tokens * cols, -3.0f, 3.0f);
  for (int k = 32; k < 64; ++k) x[size_t(k)] = 0.0f;  // an all-zero block: d = 0, q = 0
  DenseActBuffer buf;
  buf.reserve(tokens, cols);
  const DenseActs& a = buf.prepare(DenseType::Q8_0, x.data(), tokens, cols);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t b = 0; b < 2; ++b) {
      float amax = 0;
      for (int k = 0; k < 32; ++k)
        amax = std::max(amax, std::fabs(x[size_t(t * cols + b * 32 + k)]));
      const float d = amax / 127;
      EXPECT_EQ(a.block_d[t * 2 + b], d);
      int32_t s = 0;
      for (int k = 0; k < 32; ++k) {
        const int8_t q = a.q[t * cols + q8r_offset(2, b, k)];
        const float xv = x[size_t(t * cols + b * 32 + k)];
        const int want = d > 0 ? int(std::round(xv / d)) : 0;
        EXPECT_LE(std::abs(q - want), 1);  // x*(1/d) vs x/d may round apart
        EXPECT_LE(std::abs(int(q)), 127);
        s += q;
      }
      EXPECT_EQ(a.block_bias[t * 2 + b], -128 * s);
    }
  EXPECT_THROW(buf.prepare(DenseType::Q8_0, x.data(), tokens + 1, cols), Error);
  EXPECT_THROW(buf.prepare(DenseType::Q8_0, x.data(), tokens, cols - 32), Error);
  x[5] = std::nanf("");
  EXPECT_THROW(buf.prepare(DenseType::Q8_0, x.data(), tokens, cols), Error);
  x[5] = INFINITY;
  EXPECT_THROW(buf.prepare(DenseType::Q8_0, x.data(), tokens, cols), Error);
  // F16/F32 weights read x as is.
  EXPECT_EQ(buf.prepare(DenseType::F16, x.data(), tokens, cols).x, x.data());
}

// The scalar reference against double-precision math on the weights' values (and for
// Q8_0, the quantized activations' values).
TEST(Dense, ScalarMatchesDouble) {
  std::mt19937 rng(4);
  for (DenseType type : {DenseType::F32, DenseType::F16, DenseType::Q8_0}) {
    const int64_t rows = 9, cols = 160, tokens = 3;
    const Matrix m = make_matrix(rng, type, rows, cols);
    const std::vector<float> x = random_floats(rng, tokens * cols, -1.0f, 1.0f);
    DenseActBuffer buf;
    buf.reserve(tokens, cols);
    const std::vector<float> y = run_gemm(kDenseScalar, m, buf, x, tokens, 0, rows);
    const DenseActs& a = buf.prepare(type, x.data(), tokens, cols);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        double want = 0, mag = 0;
        for (int64_t k = 0; k < cols; ++k) {
          const double xv = type == DenseType::Q8_0
                                ? double(a.q[t * cols + q8r_offset(cols / 32, k / 32, k % 32)]) *
                                      a.block_d[(t * cols + k) / 32]
                                : double(x[size_t(t * cols + k)]);
          want += m.value[size_t(r * cols + k)] * xv;
          mag += std::fabs(m.value[size_t(r * cols + k)] * xv);
        }
        EXPECT_NEAR(y[size_t(t * (rows + 3) + r)], want, 1e-5 * mag + 1e-7)
            << dense_type_name(type) << " t" << t << " r" << r;
      }
    // The Q8_0 activations themselves are close to x (half a step of d per element).
    if (type == DenseType::Q8_0) {
      for (int64_t i = 0; i < tokens * cols; ++i) {
        const int64_t t = i / cols, k = i % cols;
        const float d = a.block_d[i / 32];
        EXPECT_NEAR(a.q[t * cols + q8r_offset(cols / 32, k / 32, k % 32)] * d, x[size_t(i)],
                    d * 0.5001);
      }
    }
  }
}

// Every ISA's GEMM equals the scalar one (float reassociation only) on odd shapes,
// row sub-ranges and 1..9 tokens.
TEST(Dense, KernelsMatchScalar) {
  std::mt19937 rng(5);
  const auto sets = kernel_sets();
  if (sets.size() == 1) GTEST_SKIP() << "only the scalar dense kernels run on this CPU";
  struct Shape {
    int64_t rows, cols;
  };
  for (DenseType type : {DenseType::F32, DenseType::F16, DenseType::Q8_0})
    for (bool strided : {false, true})
      // Q8_0 rows of 1, 3, 17, 24, 33, 22 blocks: last Q8R groups of 1, 3, 1, 8, 1, 6 blocks.
      for (Shape s : {Shape{1, 32}, Shape{7, 96}, Shape{13, 544}, Shape{66, 768}, Shape{5, 1056},
                      Shape{3, 704}}) {
        int64_t cols = s.cols;
        if (type != DenseType::Q8_0) cols += 3;  // F32/F16: any width, incl. ragged tails
        const Matrix m = make_matrix(rng, type, s.rows, cols, strided);
        for (int64_t tokens : {1, 2, 3, 4, 5, 9}) {
          const std::vector<float> x = random_floats(rng, tokens * cols, -1.0f, 1.0f);
          DenseActBuffer buf;
          buf.reserve(tokens, cols);
          for (auto range : {std::pair<int64_t, int64_t>{0, s.rows},
                             std::pair<int64_t, int64_t>{s.rows / 3, s.rows - s.rows / 4}}) {
            const auto ref = run_gemm(kDenseScalar, m, buf, x, tokens, range.first, range.second);
            for (size_t ks = 1; ks < sets.size(); ++ks) {
              const auto got = run_gemm(*sets[ks], m, buf, x, tokens, range.first, range.second);
              for (int64_t t = 0; t < tokens; ++t)
                for (int64_t r = range.first; r < range.second; ++r) {
                  // Bound: n * eps * sum |w x| (reassociation of the float sums).
                  const float* xt = x.data() + t * cols;
                  double mag = 0;
                  for (int64_t k = 0; k < cols; ++k)
                    mag += std::fabs(m.value[size_t(r * cols + k)] * xt[k]);
                  const size_t i = size_t(t * (s.rows + 3) + r);
                  ASSERT_NEAR(got[i], ref[i], 2e-6 * mag + 1e-6)
                      << sets[ks]->name << " " << dense_type_name(type) << " " << s.rows << "x"
                      << cols << " tokens " << tokens << " t" << t << " r" << r
                      << (strided ? " strided" : "");
                }
            }
          }
        }
      }
}

TEST(Dense, AttentionHelpersMatchScalar) {
  std::mt19937 rng(6);
  const auto sets = kernel_sets();
  for (int64_t nq : {1, 3, 5}) {
    for (int64_t d : {2, 16, 30, 64, 128, 200}) {
      for (int64_t n : {1, 3, 4, 7, 33}) {
        const int64_t stride = d + 5;
        const auto q = random_floats(rng, nq * d, -1.0f, 1.0f);
        const auto k = random_floats(rng, n * stride, -1.0f, 1.0f);
        const auto p = random_floats(rng, nq * n, 0.0f, 1.0f);
        const auto acc0 = random_floats(rng, nq * d + 1, -1.0f, 1.0f);
        // Double references.
        std::vector<double> s_ref(size_t(nq * n)), a_ref(size_t(nq * d));
        for (int64_t h = 0; h < nq; ++h) {
          for (int64_t j = 0; j < n; ++j) {
            double s = 0;
            for (int64_t i = 0; i < d; ++i)
              s += double(q[size_t(h * d + i)]) * k[size_t(j * stride + i)];
            s_ref[size_t(h * n + j)] = 0.125 * s;
          }
          for (int64_t i = 0; i < d; ++i) {
            double s = acc0[size_t(h * d + i)];
            for (int64_t j = 0; j < n; ++j)
              s += double(p[size_t(h * n + j)]) * k[size_t(j * stride + i)];
            a_ref[size_t(h * d + i)] = s;
          }
        }
        for (const DenseKernels* ks : sets) {
          std::vector<float> out(size_t(nq * n) + 1, -9.0f);
          ks->scores(q.data(), nq, k.data(), stride, n, d, 0.125f, out.data());
          for (int64_t j = 0; j < nq * n; ++j)
            EXPECT_NEAR(out[size_t(j)], s_ref[size_t(j)], 1e-5) << ks->name;
          EXPECT_EQ(out[size_t(nq * n)], -9.0f);
          std::vector<float> acc = acc0;
          ks->accumulate(p.data(), nq, k.data(), stride, n, d, acc.data());
          for (int64_t i = 0; i < nq * d; ++i)
            EXPECT_NEAR(acc[size_t(i)], a_ref[size_t(i)], 1e-5) << ks->name;
          EXPECT_EQ(acc[size_t(nq * d)], acc0[size_t(nq * d)]);  // past the heads: untouched
        }
      }
    }
  }
}

TEST(Dense, SiluMulMatchesScalar) {
  std::mt19937 rng(7);
  std::vector<float> g = random_floats(rng, 1000, -30.0f, 30.0f);
  g[0] = -200.0f;
  g[1] = 200.0f;
  g[2] = 0.0f;
  const std::vector<float> u = random_floats(rng, 1000, -2.0f, 2.0f);
  for (const DenseKernels* ks : kernel_sets()) {
    std::vector<float> out(1001, -9.0f);
    ks->silu_mul(g.data(), u.data(), 999, out.data());  // odd length
    for (int i = 0; i < 999; ++i) {
      const double want =
          double(g[size_t(i)]) / (1.0 + std::exp(-double(g[size_t(i)]))) * u[size_t(i)];
      EXPECT_NEAR(out[size_t(i)], want, 4e-7 * std::fabs(want) + 1e-30)
          << ks->name << " " << g[size_t(i)];
    }
    EXPECT_EQ(out[999], -9.0f);
  }
}

TEST(Dense, ExpSumMatchesScalar) {
  std::mt19937 rng(9);
  for (int64_t n : {1, 5, 16, 37, 300}) {
    std::vector<float> x = random_floats(rng, n, -40.0f, 0.0f);
    x[0] = 0.0f;  // the max
    for (const DenseKernels* ks : kernel_sets()) {
      std::vector<float> p = x;
      p.push_back(-9.0f);
      const float s = ks->exp_sum(p.data(), n, 0.0f);
      double want = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double e = std::exp(double(x[size_t(j)]));
        EXPECT_NEAR(p[size_t(j)], e, 3e-7 * e) << ks->name;
        want += e;
      }
      EXPECT_NEAR(s, want, 1e-6 * want) << ks->name;
      EXPECT_EQ(p[size_t(n)], -9.0f);
    }
  }
}

// quantize: bit for bit ternary.h's quantize_activations, with the code sums; its errors.
TEST(Dense, QuantizeEqualsActivations) {
  std::mt19937 rng(10);
  for (int64_t k : {1, 15, 16, 17, 256, 771}) {
    const int64_t tokens = 3;
    std::vector<float> x = random_floats(rng, tokens * k, -4.0f, 4.0f);
    if (k > 4) {
      x[2] = 4.0f;  // amax: 4 -> s = 31.75, so x = 0.5/31.75 * odd is an exact .5 tie
      x[3] = 1.0f / 63.5f;
      x[4] = 3.0f / 63.5f;
    }
    for (int64_t i = 2 * k; i < 3 * k; ++i) x[size_t(i)] = 0.0f;  // an all-zero token
    std::vector<int8_t> want(size_t(tokens * k));
    std::vector<float> want_s(static_cast<size_t>(tokens));
    quantize_activations(x.data(), tokens, k, want.data(), want_s.data());
    for (const DenseKernels* ks : kernel_sets()) {
      std::vector<int8_t> q(size_t(tokens * k) + 1, 99);
      std::vector<float> sc(static_cast<size_t>(tokens));
      std::vector<int32_t> sum(static_cast<size_t>(tokens));
      ks->quantize(x.data(), tokens, k, q.data(), sc.data(), sum.data());
      EXPECT_EQ(std::vector<int8_t>(q.begin(), q.end() - 1), want) << ks->name << " k " << k;
      EXPECT_EQ(q.back(), 99);
      EXPECT_EQ(sc, want_s) << ks->name;
      for (int64_t t = 0; t < tokens; ++t) {
        int32_t s = 0;
        for (int64_t i = 0; i < k; ++i) s += want[size_t(t * k + i)];
        EXPECT_EQ(sum[size_t(t)], s);
      }
      std::vector<float> bad = x;
      bad[size_t(k - 1)] = std::nanf("");
      EXPECT_THROW(ks->quantize(bad.data(), tokens, k, q.data(), sc.data(), sum.data()), Error);
      bad[size_t(k - 1)] = -INFINITY;
      EXPECT_THROW(ks->quantize(bad.data(), tokens, k, q.data(), sc.data(), sum.data()), Error);
    }
  }
}

// The threaded driver: same result with 1 and 2 threads, on the pinned scalar path too;
// argument errors.
TEST(Dense, GemmDriver) {
  GlobalStateGuard guard;
  std::mt19937 rng(8);
  const Matrix m = make_matrix(rng, DenseType::Q8_0, 1000, 256);
  const auto x = random_floats(rng, 2 * 256, -1.0f, 1.0f);
  DenseActBuffer buf;
  buf.reserve(2, 256);
  const DenseActs& a = buf.prepare(DenseType::Q8_0, x.data(), 2, 256);
  std::vector<float> y1(2000), y2(2000), ys(2000);
  set_num_threads(1);
  dense_gemm(m.view(), a, y1.data(), 1000);
  set_num_threads(2);
  dense_gemm(m.view(), a, y2.data(), 1000);
  EXPECT_EQ(y1, y2);
  set_isa(Isa::scalar);
  EXPECT_STREQ(dense_kernels().name, "scalar");
  dense_gemm(m.view(), a, ys.data(), 1000);
  kDenseScalar.gemm(m.view(), a, 0, 1000, y1.data(), 1000);
  EXPECT_EQ(ys, y1);
  EXPECT_THROW(dense_gemm(m.view(), a, y1.data(), 999), Error);  // ldy < rows
  DenseActs bad = a;
  bad.cols = 128;
  EXPECT_THROW(dense_gemm(m.view(), bad, y1.data(), 1000), Error);
}
