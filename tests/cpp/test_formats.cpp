// Weight formats: fp16, absmean quantization, TQ2_0 / TQ1_0 / TK2 packing and the
// TQ2_0 <-> TK2 conversions, and A8 activation quantization.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/threadpool.h"
#include "test_util.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;
using nanochat_test::random_codes;
using nanochat_test::random_floats;

namespace {

// ---- fp16 references, written from the IEEE binary16 definition -----------------

// Value of a finite half bit pattern, computed in double (exact).
double half_value(uint16_t h) {
  const int e = (h >> 10) & 31;
  const int m = h & 0x3ff;
  const double v = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(1024 + m), e - 25);
  return (h & 0x8000) ? -v : v;
}

// Nearest half to a non-NaN float, ties to the even pattern; |f| >= 65520 -> inf.
uint16_t ref_fp32_to_fp16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(double(f));
  if (a >= 65520.0) return uint16_t(sign | 0x7c00);
  // Largest positive finite pattern h with value(h) <= a (positive patterns are ordered).
  int lo = 0, hi = 0x7bff;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (half_value(uint16_t(mid)) <= a)
      lo = mid;
    else
      hi = mid - 1;
  }
  const double below = half_value(uint16_t(lo));
  const double above = lo == 0x7bff ? 65536.0 : half_value(uint16_t(lo + 1));
  const double d_lo = a - below, d_hi = above - a;
  int h;
  if (d_lo < d_hi)
    h = lo;
  else if (d_hi < d_lo)
    h = lo + 1;
  else
    h = (lo & 1) ? lo + 1 : lo;
  return uint16_t(sign | h);
}

float bits_to_float(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t le16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }

float fp16_round(float f) { return fp16_to_fp32(fp32_to_fp16(f)); }

}  // namespace

// ---- fp16 ------------------------------------------------------------------------

TEST(Fp16, EveryHalfPatternDecodesAndRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = uint16_t(i);
    const float f = fp16_to_fp32(h);
    const int e = (h >> 10) & 31;
    const int m = h & 0x3ff;
    if (e == 31 && m != 0) {  // NaN
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_EQ(std::signbit(f), bool(h & 0x8000)) << std::hex << h;
      const uint16_t back = fp32_to_fp16(f);
      ASSERT_EQ(back & 0x7c00, 0x7c00) << std::hex << h << " -> " << back;
      ASSERT_NE(back & 0x3ff, 0) << "NaN became inf: " << std::hex << h << " -> " << back;
      ASSERT_EQ(back & 0x8000, h & 0x8000) << std::hex << h << " -> " << back;
      continue;
    }
    if (e == 31) {
      ASSERT_TRUE(std::isinf(f)) << std::hex << h;
      ASSERT_EQ(std::signbit(f), bool(h & 0x8000)) << std::hex << h;
    } else {
      ASSERT_EQ(double(f), half_value(h)) << std::hex << h;
      ASSERT_EQ(std::signbit(f), bool(h & 0x8000)) << std::hex << h;  // -0 stays -0
    }
    ASSERT_EQ(fp32_to_fp16(f), h) << "round trip of 0x" << std::hex << h;
  }
}

TEST(Fp16, RoundsToNearestEvenAtTies) {
  const float ulp = std::ldexp(1.0f, -10);  // spacing of halves in [1, 2)
  // 1 + ulp/2: a tie between 0x3c00 (even) and 0x3c01 -> 1.0
  EXPECT_EQ(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  // 1 + 3*ulp/2: a tie between 0x3c01 and 0x3c02 (even) -> rounds up
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  // just above / below a tie goes to the nearest
  EXPECT_EQ(fp32_to_fp16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3c01);
  EXPECT_EQ(fp32_to_fp16(std::nextafter(1.0f + 3 * std::ldexp(1.0f, -11), 0.0f)), 0x3c01);
  EXPECT_EQ(fp32_to_fp16(1.0f + ulp / 4), 0x3c00);
  EXPECT_EQ(fp32_to_fp16(-(1.0f + 3 * std::ldexp(1.0f, -11))), 0xbc02);
  // integers: halves are spaced by 2 in [2048, 4096)
  EXPECT_EQ(fp32_to_fp16(2049.0f), fp32_to_fp16(2048.0f));
  EXPECT_EQ(fp16_to_fp32(fp32_to_fp16(2049.0f)), 2048.0f);
  EXPECT_EQ(fp16_to_fp32(fp32_to_fp16(2051.0f)), 2052.0f);
  // a tie whose round-up carries into the exponent: 2047.5 is between 2047 and 2048
  EXPECT_EQ(fp16_to_fp32(fp32_to_fp16(2047.5f)), 2048.0f);
  EXPECT_EQ(fp16_to_fp32(fp32_to_fp16(2046.5f)), 2046.0f);
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(fp32_to_fp16(-2.0f), 0xc000);
  EXPECT_EQ(fp32_to_fp16(0.5f), 0x3800);
  EXPECT_EQ(fp32_to_fp16(0.1f), 0x2e66);  // as numpy: float16(0.1).view(uint16)
}

TEST(Fp16, OverflowsToInfinityAt65520) {
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7bff);  // largest finite half
  EXPECT_EQ(fp32_to_fp16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7c00);  // tie with 65536 (even) -> inf
  EXPECT_EQ(fp32_to_fp16(-65520.0f), 0xfc00);
  EXPECT_EQ(fp32_to_fp16(70000.0f), 0x7c00);
  EXPECT_EQ(fp32_to_fp16(1e30f), 0x7c00);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(fp32_to_fp16(-std::numeric_limits<float>::infinity()), 0xfc00);
  const uint16_t qnan = fp32_to_fp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(qnan & 0x7c00, 0x7c00);
  EXPECT_NE(qnan & 0x3ff, 0);
  // NaNs whose payload lies only in the 13 mantissa bits fp16 drops stay NaN
  for (uint32_t bits : {0x7f800001u, 0xff800001u, 0x7f801fffu, 0x7fffffffu}) {
    const uint16_t h = fp32_to_fp16(bits_to_float(bits));
    EXPECT_EQ(h & 0x7c00, 0x7c00) << std::hex << bits;
    EXPECT_NE(h & 0x3ff, 0) << "NaN became inf: " << std::hex << bits;
    EXPECT_EQ(h & 0x8000, (bits >> 16) & 0x8000) << std::hex << bits;
  }
  EXPECT_TRUE(std::isnan(fp16_to_fp32(0x7e00)));
  EXPECT_TRUE(std::isinf(fp16_to_fp32(0x7c00)));
  EXPECT_EQ(fp16_to_fp32(0x7bff), 65504.0f);
}

TEST(Fp16, Subnormals) {
  const float tiny = std::ldexp(1.0f, -24);  // smallest subnormal half
  EXPECT_EQ(fp16_to_fp32(0x0001), tiny);
  EXPECT_EQ(fp16_to_fp32(0x8001), -tiny);
  EXPECT_EQ(fp16_to_fp32(0x03ff), 1023 * tiny);  // largest subnormal
  EXPECT_EQ(fp16_to_fp32(0x0200), 512 * tiny);
  EXPECT_EQ(fp16_to_fp32(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(fp32_to_fp16(tiny), 0x0001);
  EXPECT_EQ(fp32_to_fp16(3 * tiny), 0x0003);
  EXPECT_EQ(fp32_to_fp16(1023 * tiny), 0x03ff);
  EXPECT_EQ(fp32_to_fp16(tiny / 2), 0x0000);                               // tie -> even 0
  EXPECT_EQ(fp32_to_fp16(std::nextafter(tiny / 2, 1.0f)), 0x0001);         // above the tie
  EXPECT_EQ(fp32_to_fp16(1.5f * tiny), 0x0002);                            // tie -> even 2
  EXPECT_EQ(fp32_to_fp16(2.5f * tiny), 0x0002);                            // tie -> even 2
  EXPECT_EQ(fp32_to_fp16(std::nextafter(2.5f * tiny, 1.0f)), 0x0003);
  EXPECT_EQ(fp32_to_fp16(1023.5f * tiny), 0x0400);  // tie between max subnormal and min normal
  EXPECT_EQ(fp32_to_fp16(std::ldexp(1.0f, -26)), 0x0000);
  EXPECT_EQ(fp32_to_fp16(1e-10f), 0x0000);
  EXPECT_EQ(fp32_to_fp16(-1e-10f), 0x8000);  // sign of zero is kept
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_fp16(0.0f), 0x0000);
}

TEST(Fp16, MatchesNearestEvenReference) {
  // Every tie point between adjacent halves, and its neighbours either side.
  for (int h = 0; h < 0x7bff; ++h) {
    const float mid = float((half_value(uint16_t(h)) + half_value(uint16_t(h + 1))) / 2);
    ASSERT_EQ(double(mid), (half_value(uint16_t(h)) + half_value(uint16_t(h + 1))) / 2);
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e6f)})
      for (float s : {f, -f}) ASSERT_EQ(fp32_to_fp16(s), ref_fp32_to_fp16(s)) << s;
  }
  std::mt19937 rng(1234);
  // Random floats over the exponents that matter (2^-30 .. 2^17), all mantissas.
  std::uniform_int_distribution<uint32_t> mant(0, 0x7fffff), ex(127 - 30, 127 + 17), sg(0, 1);
  for (int i = 0; i < 200000; ++i) {
    const float f = bits_to_float(sg(rng) << 31 | ex(rng) << 23 | mant(rng));
    ASSERT_EQ(fp32_to_fp16(f), ref_fp32_to_fp16(f)) << f;
  }
  // And random bit patterns over the whole float range (NaNs aside).
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 100000; ++i) {
    const float f = bits_to_float(any(rng));
    if (std::isnan(f)) continue;
    ASSERT_EQ(fp32_to_fp16(f), ref_fp32_to_fp16(f)) << f;
  }
}

// ---- packing shapes ----------------------------------------------------------------

namespace {

struct Shape {
  int64_t rows, cols;
};
const Shape kShapes[] = {{1, 256}, {1, 4096}, {5, 256}, {9, 4096}, {3, 768}, {64, 512}};

// Codes for a shape with a few all-zero blocks (the first and a middle one when
// there are enough blocks) so the per-block d logic is exercised.
std::vector<int8_t> codes_with_zero_blocks(std::mt19937& rng, const Shape& s) {
  auto c = random_codes(rng, s.rows * s.cols);
  const int64_t nb = s.rows * s.cols / QK;
  if (nb >= 2) std::fill(c.begin(), c.begin() + QK, int8_t(0));
  if (nb >= 3) std::fill(c.begin() + (nb / 2) * QK, c.begin() + (nb / 2 + 1) * QK, int8_t(0));
  return c;
}

bool block_all_zero(const std::vector<int8_t>& c, int64_t b) {
  for (int64_t i = 0; i < QK; ++i)
    if (c[size_t(b * QK + i)]) return false;
  return true;
}

}  // namespace

TEST(TQ2_0, PackUnpackRoundTripAndBlockScales) {
  std::mt19937 rng(1);
  const float scale = 0.0371f;  // not a half: d must be its fp16 rounding
  ASSERT_NE(fp16_round(scale), scale);
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols);
    const auto codes = codes_with_zero_blocks(rng, s);
    const int64_t nb = s.rows * s.cols / QK;
    std::vector<uint8_t> packed(size_t(nb * TQ2_0_BLOCK_BYTES));
    tq2_0_pack(codes.data(), s.rows, s.cols, scale, packed.data());
    std::vector<int8_t> back(codes.size(), 42);
    std::vector<float> d(size_t(nb), -1.0f);
    tq2_0_unpack(packed.data(), s.rows, s.cols, back.data(), d.data());
    ASSERT_EQ(back, codes);
    for (int64_t b = 0; b < nb; ++b) {
      const bool zero = block_all_zero(codes, b);
      EXPECT_EQ(d[size_t(b)], zero ? 0.0f : fp16_round(scale)) << "block " << b;
      EXPECT_EQ(le16(&packed[size_t(b * TQ2_0_BLOCK_BYTES + 64)]),
                zero ? 0 : fp32_to_fp16(scale))
          << "block " << b;
    }
    // block_scales is optional
    std::vector<int8_t> back2(codes.size(), 42);
    tq2_0_unpack(packed.data(), s.rows, s.cols, back2.data(), nullptr);
    EXPECT_EQ(back2, codes);
  }
}

TEST(TQ2_0, AllZeroBlockHasZeroScale) {
  std::vector<int8_t> codes(QK, 0);
  std::vector<uint8_t> packed(TQ2_0_BLOCK_BYTES, 0xAA);
  tq2_0_pack(codes.data(), 1, QK, 0.75f, packed.data());
  for (int i = 0; i < 64; ++i) EXPECT_EQ(packed[size_t(i)], 0x55) << i;  // every code+1 == 1
  EXPECT_EQ(packed[64], 0);
  EXPECT_EQ(packed[65], 0);
  float d = -1;
  std::vector<int8_t> back(QK, 7);
  tq2_0_unpack(packed.data(), 1, QK, back.data(), &d);
  EXPECT_EQ(d, 0.0f);
  EXPECT_EQ(back, codes);
  // one nonzero code makes the block carry the scale
  codes[200] = -1;
  tq2_0_pack(codes.data(), 1, QK, 0.75f, packed.data());
  EXPECT_EQ(le16(&packed[64]), 0x3a00);  // fp16(0.75)
}

TEST(TQ2_0, KnownBytes) {
  std::vector<int8_t> c(QK, 0);
  c[0] = 1;          // h=0, n=0, j=0: value 2 at shift 0 of qs[0]
  c[32] = -1;        // h=0, n=1, j=0: value 0 at shift 2 of qs[0]
  c[96] = 1;         // h=0, n=3, j=0: value 2 at shift 6 of qs[0]
  c[128 + 5] = -1;   // h=1, n=0, j=5: qs[37]
  c[255] = 1;        // h=1, n=3, j=31: qs[63]
  c[64 + 17] = 1;    // h=0, n=2, j=17: qs[17]
  std::vector<uint8_t> p(TQ2_0_BLOCK_BYTES);
  tq2_0_pack(c.data(), 1, QK, 0.5f, p.data());
  std::vector<uint8_t> want(TQ2_0_BLOCK_BYTES, 0x55);
  want[0] = 0x92;   // 10 01 00 10
  want[37] = 0x54;  // 01 01 01 00
  want[63] = 0x95;  // 10 01 01 01
  want[17] = 0x65;  // 01 10 01 01
  want[64] = 0x00;  // fp16(0.5) = 0x3800, little-endian
  want[65] = 0x38;
  EXPECT_EQ(p, want);
}

TEST(TQ2_0, LayoutMatchesGgmlOnRandomCodes) {
  std::mt19937 rng(2);
  const int64_t rows = 3, cols = 512;
  const auto c = random_codes(rng, rows * cols);
  std::vector<uint8_t> p(size_t(rows * cols / QK * TQ2_0_BLOCK_BYTES));
  tq2_0_pack(c.data(), rows, cols, 1.0f, p.data());
  for (int64_t b = 0; b < rows * cols / QK; ++b)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 32; ++j) {
        const uint8_t byte = p[size_t(b * TQ2_0_BLOCK_BYTES + h * 32 + j)];
        for (int n = 0; n < 4; ++n)
          ASSERT_EQ((byte >> (2 * n)) & 3, c[size_t(b * QK + h * 128 + n * 32 + j)] + 1)
              << "block " << b << " h " << h << " j " << j << " n " << n;
      }
}

namespace {
int tq1_byte(int v) { return (v * 256 + 242) / 243; }  // ceil(v * 256 / 243)
}  // namespace

TEST(TQ1_0, PackUnpackRoundTripAndBlockScales) {
  std::mt19937 rng(3);
  const float scale = 1.2345f;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols);
    const auto codes = codes_with_zero_blocks(rng, s);
    const int64_t nb = s.rows * s.cols / QK;
    std::vector<uint8_t> packed(size_t(nb * TQ1_0_BLOCK_BYTES));
    tq1_0_pack(codes.data(), s.rows, s.cols, scale, packed.data());
    std::vector<int8_t> back(codes.size(), 42);
    std::vector<float> d(size_t(nb), -1.0f);
    tq1_0_unpack(packed.data(), s.rows, s.cols, back.data(), d.data());
    ASSERT_EQ(back, codes);
    for (int64_t b = 0; b < nb; ++b) {
      const bool zero = block_all_zero(codes, b);
      EXPECT_EQ(d[size_t(b)], zero ? 0.0f : fp16_round(scale)) << "block " << b;
      EXPECT_EQ(le16(&packed[size_t(b * TQ1_0_BLOCK_BYTES + 52)]),
                zero ? 0 : fp32_to_fp16(scale));
    }
  }
  // every one of the 3^5 digit combinations survives (weights n*32 + 0, n = 0..4)
  std::vector<int8_t> c(QK, 0), back(QK);
  std::vector<uint8_t> p(TQ1_0_BLOCK_BYTES);
  for (int v = 0; v < 243; ++v) {
    for (int n = 0, r = v; n < 5; ++n, r /= 3) c[size_t((4 - n) * 32)] = int8_t(r % 3 - 1);
    for (int n = 0, r = v; n < 4; ++n, r /= 3) c[size_t(240 + (3 - n) * 4)] = int8_t(r % 3 - 1);
    tq1_0_pack(c.data(), 1, QK, 1.0f, p.data());
    ASSERT_EQ(p[0], tq1_byte(v));
    tq1_0_unpack(p.data(), 1, QK, back.data(), nullptr);
    ASSERT_EQ(back, c) << v;
  }
}

TEST(TQ1_0, KnownBytes) {
  std::vector<int8_t> c(QK, 0);
  // All-zero codes: every digit is 1; 5 digits: 11111_3 = 121 -> ceil(121*256/243) = 128,
  // 4 digits in qh: 1111_3 * 3 = 120 -> 127.
  std::vector<uint8_t> p(TQ1_0_BLOCK_BYTES);
  tq1_0_pack(c.data(), 1, QK, 1.0f, p.data());
  for (int j = 0; j < 48; ++j) EXPECT_EQ(p[size_t(j)], 128) << j;
  for (int j = 48; j < 52; ++j) EXPECT_EQ(p[size_t(j)], 127) << j;
  EXPECT_EQ(p[52], 0);  // all-zero block: d = 0
  EXPECT_EQ(p[53], 0);

  c[0] = 1;               // qs[0], first (most significant) digit 2: 21111_3 = 202 -> 213
  c[4 * 32 + 1] = -1;     // qs[1], last digit 0: 11110_3 = 120 -> 127
  c[160 + 2 * 16 + 3] = 1;  // qs[35], middle digit 2: 11211_3 = 130 -> 137
  c[240 + 0 * 4 + 2] = -1;  // qh[2], first digit 0: 0111_3 = 13, *3 = 39 -> 42
  c[240 + 3 * 4 + 3] = 1;   // qh[3], last digit 2: 1112_3 = 41, *3 = 123 -> 130
  tq1_0_pack(c.data(), 1, QK, 1.0f, p.data());
  std::vector<uint8_t> want(TQ1_0_BLOCK_BYTES, 128);
  for (int j = 48; j < 52; ++j) want[size_t(j)] = 127;
  want[0] = 213;
  want[1] = 127;
  want[35] = 137;
  want[50] = 42;
  want[51] = 130;
  want[52] = 0x00;  // fp16(1.0) = 0x3c00
  want[53] = 0x3c;
  EXPECT_EQ(p, want);
}

TEST(TQ1_0, LayoutMatchesGgmlOnRandomCodes) {
  std::mt19937 rng(4);
  const int64_t rows = 2, cols = 768;
  const auto c = random_codes(rng, rows * cols);
  std::vector<uint8_t> p(size_t(rows * cols / QK * TQ1_0_BLOCK_BYTES));
  tq1_0_pack(c.data(), rows, cols, 1.0f, p.data());
  for (int64_t b = 0; b < rows * cols / QK; ++b) {
    const int8_t* cb = c.data() + b * QK;
    const uint8_t* pb = p.data() + b * TQ1_0_BLOCK_BYTES;
    for (int j = 0; j < 32; ++j) {
      int v = 0;
      for (int n = 0; n < 5; ++n) v = v * 3 + cb[n * 32 + j] + 1;
      ASSERT_EQ(pb[j], tq1_byte(v)) << "block " << b << " qs " << j;
    }
    for (int j = 0; j < 16; ++j) {
      int v = 0;
      for (int n = 0; n < 5; ++n) v = v * 3 + cb[160 + n * 16 + j] + 1;
      ASSERT_EQ(pb[32 + j], tq1_byte(v)) << "block " << b << " qs " << 32 + j;
    }
    for (int j = 0; j < 4; ++j) {
      int v = 0;
      for (int n = 0; n < 4; ++n) v = v * 3 + cb[240 + n * 4 + j] + 1;
      ASSERT_EQ(pb[48 + j], tq1_byte(3 * v)) << "block " << b << " qh " << j;
    }
  }
}

TEST(TK2, PackUnpackRoundTrip) {
  std::mt19937 rng(5);
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols);
    const auto codes = random_codes(rng, s.rows * s.cols);
    ASSERT_EQ(tk2_row_bytes(s.cols), s.cols / 4);
    std::vector<uint8_t> packed(size_t(s.rows * tk2_row_bytes(s.cols)));
    tk2_pack(codes.data(), s.rows, s.cols, packed.data());
    std::vector<int8_t> back(codes.size(), 42);
    tk2_unpack(packed.data(), s.rows, s.cols, back.data());
    ASSERT_EQ(back, codes);
  }
}

TEST(TK2, KnownBytesAndLayout) {
  std::vector<int8_t> c(QK, 0);
  c[0] = 1;            // byte 0, shift 0
  c[64 + 1] = -1;      // byte 1, shift 2
  c[128 + 2] = -1;     // byte 2, shift 4
  c[192 + 63] = 1;     // byte 63, shift 6
  c[192 + 0] = -1;     // byte 0, shift 6
  std::vector<uint8_t> p(TK2_BLOCK_BYTES);
  tk2_pack(c.data(), 1, QK, p.data());
  std::vector<uint8_t> want(TK2_BLOCK_BYTES, 0x55);
  want[0] = 0x16;   // 00 01 01 10
  want[1] = 0x51;   // 01 01 00 01
  want[2] = 0x45;   // 01 00 01 01
  want[63] = 0x95;  // 10 01 01 01
  EXPECT_EQ(p, want);

  // Random multi-block rows: byte j of block b holds columns b*256 + j + 64n at shift 2n.
  std::mt19937 rng(6);
  const int64_t rows = 3, cols = 1024;
  const auto r = random_codes(rng, rows * cols);
  std::vector<uint8_t> q(size_t(rows * tk2_row_bytes(cols)));
  tk2_pack(r.data(), rows, cols, q.data());
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t b = 0; b < cols / QK; ++b)
      for (int j = 0; j < 64; ++j) {
        const uint8_t byte = q[size_t(row * tk2_row_bytes(cols) + b * 64 + j)];
        for (int n = 0; n < 4; ++n)
          ASSERT_EQ((byte >> (2 * n)) & 3, r[size_t(row * cols + b * QK + j + 64 * n)] + 1);
      }
}

TEST(TK2, RowBytes) {
  EXPECT_EQ(tk2_row_bytes(0), 0);
  EXPECT_EQ(tk2_row_bytes(256), 64);
  EXPECT_EQ(tk2_row_bytes(4096), 1024);
  EXPECT_THROW(tk2_row_bytes(100), Error);
  EXPECT_THROW(tk2_row_bytes(257), Error);
  EXPECT_THROW(tk2_row_bytes(-256), Error);
}

TEST(TK2, TilesInterleaveEightRowsBlockByBlock) {
  // Tile i, block b, slot j (64 bytes each, in that order) is row 8i + j's block b; rows
  // past the matrix are zero.
  std::mt19937 rng(7);
  for (int64_t rows : {int64_t(1), int64_t(8), int64_t(13), int64_t(24)}) {
    const int64_t cols = 768, rb = tk2_row_bytes(cols);
    SCOPED_TRACE(testing::Message() << rows << " rows");
    const auto c = random_codes(rng, rows * cols);
    std::vector<uint8_t> tk(size_t(rows * rb));
    tk2_pack(c.data(), rows, cols, tk.data());
    const int64_t ntiles = (rows + 7) / 8;
    ASSERT_EQ(tk2_tiled_bytes(rows, cols), ntiles * 8 * rb);
    std::vector<uint8_t> tiles(size_t(tk2_tiled_bytes(rows, cols)), 0xAA);
    tk2_tile(tk.data(), rows, cols, tiles.data());
    for (int64_t i = 0; i < ntiles; ++i)
      for (int64_t b = 0; b < cols / QK; ++b)
        for (int64_t j = 0; j < 8; ++j) {
          const uint8_t* got = tiles.data() + ((i * (cols / QK) + b) * 8 + j) * 64;
          const int64_t r = 8 * i + j;
          for (int k = 0; k < 64; ++k)
            ASSERT_EQ(got[k], r < rows ? tk[size_t(r * rb + b * 64 + k)] : 0)
                << "tile " << i << " block " << b << " slot " << j;
        }
  }
  EXPECT_EQ(tk2_tiled_bytes(0, 256), 0);
  EXPECT_THROW(tk2_tiled_bytes(8, 100), Error);
  EXPECT_THROW(tk2_tiled_bytes(-1, 256), Error);
  std::vector<uint8_t> b(64);
  EXPECT_THROW(tk2_tile(b.data(), 1, 256, nullptr), Error);
  EXPECT_NO_THROW(tk2_tile(nullptr, 0, 256, nullptr));
}

// ---- TQ2_0 <-> TK2 -------------------------------------------------------------------

TEST(Convert, TQ2_0ToTK2AndBackIsByteExact) {
  std::mt19937 rng(7);
  const float scale = 0.0213f;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols);
    const auto codes = codes_with_zero_blocks(rng, s);
    const int64_t nb = s.rows * s.cols / QK;
    std::vector<uint8_t> tq(size_t(nb * TQ2_0_BLOCK_BYTES));
    tq2_0_pack(codes.data(), s.rows, s.cols, scale, tq.data());
    std::vector<uint8_t> tk(size_t(s.rows * tk2_row_bytes(s.cols)), 0xEE);
    const float got = tq2_0_to_tk2(tq.data(), s.rows, s.cols, tk.data());
    EXPECT_EQ(got, fp16_round(scale));
    std::vector<uint8_t> tk_direct(tk.size());
    tk2_pack(codes.data(), s.rows, s.cols, tk_direct.data());
    ASSERT_EQ(tk, tk_direct);
    std::vector<uint8_t> tq_back(tq.size(), 0xEE);
    tk2_to_tq2_0(tk.data(), s.rows, s.cols, got, tq_back.data());
    ASSERT_EQ(tq_back, tq);
  }
}

TEST(Convert, AllZeroTensorGivesScaleZero) {
  std::vector<int8_t> codes(2 * 512, 0);
  std::vector<uint8_t> tq(4 * TQ2_0_BLOCK_BYTES), tk(2 * 128);
  tq2_0_pack(codes.data(), 2, 512, 3.0f, tq.data());
  EXPECT_EQ(tq2_0_to_tk2(tq.data(), 2, 512, tk.data()), 0.0f);
  for (uint8_t b : tk) EXPECT_EQ(b, 0x55);
}

TEST(Convert, ZeroScaleBlockBecomesZeroCodes) {
  // A block whose d is 0 stands for all-zero weights, whatever its qs bytes say.
  std::mt19937 rng(8);
  auto codes = random_codes(rng, 512, 0.0);  // no zeros at all
  std::vector<uint8_t> tq(2 * TQ2_0_BLOCK_BYTES), tk(128);
  tq2_0_pack(codes.data(), 1, 512, 0.5f, tq.data());
  tq[TQ2_0_BLOCK_BYTES + 64] = 0;  // d of block 1 := +0
  tq[TQ2_0_BLOCK_BYTES + 65] = 0;
  EXPECT_EQ(tq2_0_to_tk2(tq.data(), 1, 512, tk.data()), 0.5f);
  std::fill(codes.begin() + 256, codes.end(), int8_t(0));
  std::vector<int8_t> back(512);
  tk2_unpack(tk.data(), 1, 512, back.data());
  EXPECT_EQ(back, codes);
}

TEST(Convert, MixedBlockScalesThrow) {
  std::mt19937 rng(9);
  const auto codes = random_codes(rng, 2 * 256, 0.0);
  std::vector<uint8_t> tq(2 * TQ2_0_BLOCK_BYTES), tk(128);
  tq2_0_pack(codes.data(), 1, 256, 1.0f, tq.data());
  tq2_0_pack(codes.data() + 256, 1, 256, 2.0f, tq.data() + TQ2_0_BLOCK_BYTES);
  EXPECT_THROW(tq2_0_to_tk2(tq.data(), 2, 256, tk.data()), Error);
  // the same scale twice is fine
  tq2_0_pack(codes.data() + 256, 1, 256, 1.0f, tq.data() + TQ2_0_BLOCK_BYTES);
  EXPECT_EQ(tq2_0_to_tk2(tq.data(), 2, 256, tk.data()), 1.0f);
  // scales that differ by one fp16 ulp differ too
  tq[TQ2_0_BLOCK_BYTES + 64] = 0x01;  // 0x3c01
  EXPECT_THROW(tq2_0_to_tk2(tq.data(), 2, 256, tk.data()), Error);
  // a non-finite d throws
  tq[TQ2_0_BLOCK_BYTES + 64] = 0x00;
  tq[TQ2_0_BLOCK_BYTES + 65] = 0x7c;
  EXPECT_THROW(tq2_0_to_tk2(tq.data(), 2, 256, tk.data()), Error);
}

TEST(Convert, InvalidCode3Throws) {
  std::vector<int8_t> codes(512, 0);
  std::vector<uint8_t> tq(2 * TQ2_0_BLOCK_BYTES), tk(128);
  std::vector<int8_t> out(512);
  tq2_0_pack(codes.data(), 1, 512, 1.0f, tq.data());
  tk2_pack(codes.data(), 1, 512, tk.data());
  // one 2-bit field set to 3 (shift 4 of the last qs byte of block 1)
  tq[TQ2_0_BLOCK_BYTES + 63] = 0x55 | (3 << 4);
  EXPECT_THROW(tq2_0_unpack(tq.data(), 1, 512, out.data(), nullptr), Error);
  EXPECT_THROW(tq2_0_to_tk2(tq.data(), 1, 512, tk.data()), Error);
  tk[64 + 10] = 0x55 | (3 << 6);
  EXPECT_THROW(tk2_unpack(tk.data(), 1, 512, out.data()), Error);
  EXPECT_THROW(tk2_to_tq2_0(tk.data(), 1, 512, 1.0f, tq.data()), Error);
  tk[64 + 10] = 0x03;  // shift 0
  EXPECT_THROW(tk2_unpack(tk.data(), 1, 512, out.data()), Error);
}

TEST(Formats, RowLengthNotMultipleOf256Throws) {
  std::vector<int8_t> c(2 * 512, 0);
  std::vector<uint8_t> b(4096);
  std::vector<float> d(8);
  for (int64_t cols : {100, 255, 257, 384}) {
    SCOPED_TRACE(cols);
    EXPECT_THROW(tq2_0_pack(c.data(), 1, cols, 1.0f, b.data()), Error);
    EXPECT_THROW(tq2_0_unpack(b.data(), 1, cols, c.data(), d.data()), Error);
    EXPECT_THROW(tq1_0_pack(c.data(), 1, cols, 1.0f, b.data()), Error);
    EXPECT_THROW(tq1_0_unpack(b.data(), 1, cols, c.data(), d.data()), Error);
    EXPECT_THROW(tk2_pack(c.data(), 1, cols, b.data()), Error);
    EXPECT_THROW(tk2_unpack(b.data(), 1, cols, c.data()), Error);
    EXPECT_THROW(tq2_0_to_tk2(b.data(), 1, cols, b.data() + 2048), Error);
    EXPECT_THROW(tk2_to_tq2_0(b.data(), 1, cols, 1.0f, b.data() + 2048), Error);
  }
}

TEST(Formats, BadArgumentsThrow) {
  std::vector<int8_t> c(256, 0);
  std::vector<uint8_t> b(256);
  EXPECT_THROW(tq2_0_pack(c.data(), -1, 256, 1.0f, b.data()), Error);
  EXPECT_THROW(tq2_0_pack(nullptr, 1, 256, 1.0f, b.data()), Error);
  EXPECT_THROW(tq2_0_pack(c.data(), 1, 256, 1.0f, nullptr), Error);
  EXPECT_THROW(tq1_0_unpack(nullptr, 1, 256, c.data(), nullptr), Error);
  EXPECT_THROW(tk2_pack(c.data(), 1, 256, nullptr), Error);
  EXPECT_THROW(tk2_unpack(b.data(), 1, -256, c.data()), Error);
  // non-finite scales cannot be stored
  EXPECT_THROW(tq2_0_pack(c.data(), 1, 256, std::nanf(""), b.data()), Error);
  EXPECT_THROW(tq1_0_pack(c.data(), 1, 256, std::numeric_limits<float>::infinity(), b.data()),
               Error);
  // empty shapes are fine with null buffers
  EXPECT_NO_THROW(tq2_0_pack(nullptr, 0, 256, 1.0f, nullptr));
  EXPECT_NO_THROW(tk2_unpack(nullptr, 3, 0, nullptr));
}

TEST(Formats, NonTernaryCodesThrowOnPack) {
  std::vector<uint8_t> b(1024);
  for (int8_t bad : {int8_t(2), int8_t(-2), int8_t(127), int8_t(-128)}) {
    for (int64_t at : {int64_t(0), int64_t(300), int64_t(511)}) {
      std::vector<int8_t> c(512, 1);
      c[size_t(at)] = bad;
      SCOPED_TRACE(testing::Message() << "code " << int(bad) << " at " << at);
      EXPECT_THROW(tq2_0_pack(c.data(), 1, 512, 1.0f, b.data()), Error);
      EXPECT_THROW(tq1_0_pack(c.data(), 1, 512, 1.0f, b.data()), Error);
      EXPECT_THROW(tk2_pack(c.data(), 2, 256, b.data()), Error);
    }
  }
}

// ---- absmean_quantize ---------------------------------------------------------------

TEST(Absmean, MatchesReferenceOnRandomData) {
  std::mt19937 rng(10);
  for (int64_t n : {1, 7, 256, 1000, 65536}) {
    SCOPED_TRACE(n);
    const auto w = random_floats(rng, n, -0.3f, 0.3f);
    std::vector<int8_t> codes(size_t(n), 42);
    const float scale = absmean_quantize(w.data(), n, codes.data());
    double sum = 0;
    for (float v : w) sum += std::fabs(double(v));
    const double mean = sum / double(n);
    EXPECT_NEAR(scale, std::max(mean, 1e-5), 1e-6 * mean);
    EXPECT_EQ(scale, std::max(float(mean), 1e-5f));
    int ambiguous = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double r = double(w[size_t(i)]) / double(scale);
      const double rr = std::nearbyint(r);
      const int want = int(std::max(-1.0, std::min(1.0, rr)));
      // w / scale within float rounding of a .5 tie may go either way
      if (std::fabs(std::fabs(r - std::trunc(r)) - 0.5) < 1e-6) {
        ++ambiguous;
        ASSERT_LE(std::abs(codes[size_t(i)] - want), 1) << i;
        continue;
      }
      ASSERT_EQ(codes[size_t(i)], want) << "w " << w[size_t(i)] << " scale " << scale;
    }
    EXPECT_LE(ambiguous, 2);
  }
}

TEST(Absmean, HandExample) {
  // mean |w| = 6 / 6 = 1: codes are round-half-even(w) clamped to [-1, 1]
  const float w[6] = {2.0f, -0.6f, 0.4f, 0.0f, -2.5f, 0.5f};
  int8_t c[6];
  EXPECT_EQ(absmean_quantize(w, 6, c), 1.0f);
  const int8_t want[6] = {1, -1, 0, 0, -1, 0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c[i], want[i]) << i;
}

TEST(Absmean, ZeroAndTinyInputs) {
  std::vector<float> w(1000, 0.0f);
  std::vector<int8_t> c(1000, 42);
  EXPECT_EQ(absmean_quantize(w.data(), 1000, c.data()), 1e-5f);
  for (int8_t v : c) ASSERT_EQ(v, 0);
  // below the floor: scale stays 1e-5 and weights are measured against it
  std::fill(w.begin(), w.end(), 2e-6f);
  w[3] = -8e-6f;  // -0.8 -> -1
  EXPECT_EQ(absmean_quantize(w.data(), 1000, c.data()), 1e-5f);
  EXPECT_EQ(c[0], 0);
  EXPECT_EQ(c[3], -1);
  EXPECT_EQ(absmean_quantize(nullptr, 0, nullptr), 1e-5f);
}

TEST(Absmean, BadInputsThrow) {
  std::vector<float> w(16, 1.0f);
  std::vector<int8_t> c(16);
  EXPECT_THROW(absmean_quantize(w.data(), -1, c.data()), Error);
  EXPECT_THROW(absmean_quantize(nullptr, 16, c.data()), Error);
  EXPECT_THROW(absmean_quantize(w.data(), 16, nullptr), Error);
  w[5] = std::nanf("");
  EXPECT_THROW(absmean_quantize(w.data(), 16, c.data()), Error);
  w[5] = -std::numeric_limits<float>::infinity();
  EXPECT_THROW(absmean_quantize(w.data(), 16, c.data()), Error);
}

// ---- activations ---------------------------------------------------------------------

namespace {
void ref_quantize(const std::vector<float>& x, int64_t tokens, int64_t k, std::vector<int8_t>& q,
                  std::vector<float>& xs) {
  q.assign(size_t(tokens * k), 0);
  xs.assign(size_t(tokens), 0.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    float amax = 0;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[size_t(t * k + i)]));
    const float s = 127.0f / std::max(amax, 1e-5f);
    for (int64_t i = 0; i < k; ++i) {
      const float r = std::nearbyint(x[size_t(t * k + i)] * s);
      q[size_t(t * k + i)] = int8_t(std::min(127.0f, std::max(-128.0f, r)));
    }
    xs[size_t(t)] = 1.0f / s;
  }
}
}  // namespace

TEST(Activations, MatchesReferenceAndAbsmaxMapsTo127) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  for (auto [tokens, k] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 256}, {3, 100}, {17, 768}, {64, 2304}, {2, 1}}) {
    SCOPED_TRACE(testing::Message() << tokens << "x" << k);
    auto x = random_floats(rng, tokens * k, -3.0f, 3.0f);
    // each token's absmax at a known place, alternating sign, varying magnitude
    std::vector<int64_t> at(static_cast<size_t>(tokens));
    for (int64_t t = 0; t < tokens; ++t) {
      at[size_t(t)] = pick(rng) % k;
      x[size_t(t * k + at[size_t(t)])] = (t % 2 ? -1.0f : 1.0f) * (5.0f + float(t));
    }
    std::vector<int8_t> q(size_t(tokens * k), 42);
    std::vector<float> xs(size_t(tokens), -1.0f);
    quantize_activations(x.data(), tokens, k, q.data(), xs.data());
    std::vector<int8_t> rq;
    std::vector<float> rxs;
    ref_quantize(x, tokens, k, rq, rxs);
    ASSERT_EQ(q, rq);
    ASSERT_EQ(std::memcmp(xs.data(), rxs.data(), xs.size() * sizeof(float)), 0);
    for (int64_t t = 0; t < tokens; ++t) {
      EXPECT_EQ(q[size_t(t * k + at[size_t(t)])], t % 2 ? -127 : 127) << t;
      EXPECT_FLOAT_EQ(xs[size_t(t)], (5.0f + float(t)) / 127.0f);
      for (int64_t i = 0; i < k; ++i) ASSERT_LE(std::abs(int(q[size_t(t * k + i)])), 127);
    }
    // dequantize is q * x_scale, exactly
    std::vector<float> deq(x.size());
    dequantize_activations(q.data(), xs.data(), tokens, k, deq.data());
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < k; ++i) {
        ASSERT_EQ(deq[size_t(t * k + i)], float(q[size_t(t * k + i)]) * xs[size_t(t)]);
        // and it approximates x to half a quantization step
        ASSERT_LE(std::fabs(deq[size_t(t * k + i)] - x[size_t(t * k + i)]),
                  0.5f * xs[size_t(t)] * 1.0001f);
      }
  }
}

TEST(Activations, EveryIsaAndThreadCountBitIdenticalToScalar) {
  // The AVX-512 quantizer and the pool split (large inputs) against the scalar loop,
  // with row lengths that leave a partial 16-float tail.
  GlobalStateGuard guard;
  std::mt19937 rng(57);
  for (auto [tokens, k] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 256}, {3, 100}, {2, 1}, {17, 768}, {300, 256}, {129, 1000}}) {
    SCOPED_TRACE(testing::Message() << tokens << "x" << k);
    auto x = random_floats(rng, tokens * k, -3.0f, 3.0f);
    x[0] = 0.5f * 3.0f;  // ties of x * s land on .5 for some tokens
    set_isa(Isa::scalar);
    set_num_threads(1);
    std::vector<int8_t> want(size_t(tokens * k));
    std::vector<float> want_s(static_cast<size_t>(tokens));
    quantize_activations(x.data(), tokens, k, want.data(), want_s.data());
    for (Isa isa : supported_isas())
      for (int threads : {1, 2}) {
        set_isa(isa);
        set_num_threads(threads);
        std::vector<int8_t> q(want.size(), 42);
        std::vector<float> xs(want_s.size(), -1.0f);
        quantize_activations(x.data(), tokens, k, q.data(), xs.data());
        ASSERT_EQ(q, want) << isa_name(isa) << " threads " << threads;
        ASSERT_EQ(std::memcmp(xs.data(), want_s.data(), xs.size() * sizeof(float)), 0)
            << isa_name(isa);
      }
  }
}

TEST(Activations, ZeroTokenUsesTheFloor) {
  std::vector<float> x(2 * 64, 0.0f);
  x[64 + 3] = -0.5f;
  std::vector<int8_t> q(x.size(), 42);
  float xs[2];
  quantize_activations(x.data(), 2, 64, q.data(), xs);
  EXPECT_EQ(xs[0], 1.0f / (127.0f / 1e-5f));
  EXPECT_EQ(xs[1], 1.0f / (127.0f / 0.5f));
  for (int i = 0; i < 64; ++i) EXPECT_EQ(q[size_t(i)], 0);
  EXPECT_EQ(q[64 + 3], -127);
}

TEST(Activations, NonFiniteInputThrows) {
  GlobalStateGuard guard;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (float bad : {nan, -nan, inf, -inf}) {
    for (int64_t pos : {int64_t(0), int64_t(77), int64_t(255), int64_t(256 + 10)}) {
      std::vector<float> x(512, 0.25f);
      x[100] = 4.0f;  // a large finite value before/after the bad one
      x[256 + 100] = -4.0f;
      x[size_t(pos)] = bad;
      std::vector<int8_t> q(512);
      float xs[2];
      SCOPED_TRACE(testing::Message() << bad << " at " << pos);
      for (Isa isa : supported_isas()) {
        set_isa(isa);
        EXPECT_THROW(quantize_activations(x.data(), 2, 256, q.data(), xs), Error)
            << isa_name(isa);
      }
    }
  }
}

TEST(Activations, BadArgumentsThrow) {
  std::vector<float> x(64, 1.0f);
  std::vector<int8_t> q(64);
  float xs[1];
  EXPECT_THROW(quantize_activations(x.data(), -1, 64, q.data(), xs), Error);
  EXPECT_THROW(quantize_activations(nullptr, 1, 64, q.data(), xs), Error);
  EXPECT_THROW(quantize_activations(x.data(), 1, 64, nullptr, xs), Error);
  EXPECT_THROW(quantize_activations(x.data(), 1, 64, q.data(), nullptr), Error);
  EXPECT_THROW(dequantize_activations(q.data(), nullptr, 1, 64, x.data()), Error);
  EXPECT_NO_THROW(quantize_activations(nullptr, 0, 64, nullptr, nullptr));
}

// bitnet.cpp's I2_S, x86 layout (quantize_i2_s in its src/ggml-bitnet-mad.cpp): weight
// 128b + 32g + j sits in byte 32b + j at shift 6 - 2g, as code + 1; a float32 scale follows.
TEST(Formats, I2SUnpackReadsBitnetCppLayout) {
  const int64_t rows = 2, cols = 256, n = rows * cols;
  std::vector<int8_t> codes(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) codes[size_t(i)] = int8_t((i * 7 + i / 5) % 3 - 1);
  std::vector<uint8_t> file(static_cast<size_t>(n / 4 + 32), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / 128, g = (i % 128) / 32, j = i % 32;
    file[size_t(32 * b + j)] |= uint8_t((codes[size_t(i)] + 1) << (6 - 2 * g));
  }
  const float scale = 0.8125f;
  std::memcpy(file.data() + n / 4, &scale, 4);
  // One hand-checked byte: weights 0, 32, 64, 96 -> byte 0 = (c0+1)<<6 | (c32+1)<<4 | ...
  EXPECT_EQ(file[0], uint8_t(((codes[0] + 1) << 6) | ((codes[32] + 1) << 4) |
                             ((codes[64] + 1) << 2) | (codes[96] + 1)));
  std::vector<int8_t> back(static_cast<size_t>(n));
  EXPECT_EQ(i2_s_unpack(file.data(), rows, cols, back.data()), scale);
  EXPECT_EQ(back, codes);

  file[5] |= 0xC0;  // code 3 in weight 5
  EXPECT_THROW(i2_s_unpack(file.data(), rows, cols, back.data()), Error);
  file[5] &= 0x3F;
  const float bad = -1.0f;
  std::memcpy(file.data() + n / 4, &bad, 4);
  EXPECT_THROW(i2_s_unpack(file.data(), rows, cols, back.data()), Error);
}
