// Weight formats: fp16, absmean quantization, ggml TQ2_0/TQ1_0 and the TK2 kernel
// layout. All scalar; packing is not on a hot path.
#include <cmath>
#include <cstring>
#include <string>

#include "ternary/ternary.h"

namespace nanochat {

uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)  // inf / nan (keep a quiet-nan payload bit)
    return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504
  if (ax < 0x38800000u) {                                  // fp16 subnormal or zero
    if (ax < 0x33000000u) return uint16_t(sign);           // < 2^-25 rounds to 0
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // in [14, 24]
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return uint16_t(sign | r);
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t x;
  if (e == 0) {
    if (m == 0) {
      x = sign;
    } else {  // subnormal: normalize
      int shift = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++shift;
      }
      x = sign | uint32_t(127 - 15 + 1 - shift) << 23 | (m & 0x3ffu) << 13;
    }
  } else if (e == 31) {
    x = sign | 0x7f800000u | m << 13;
  } else {
    x = sign | (e + 112) << 23 | m << 13;
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

namespace {

void check_matrix(const void* in, const void* out, int64_t rows, int64_t cols, const char* what) {
  if (rows < 0 || cols < 0)
    throw Error(std::string(what) + ": negative shape (" + std::to_string(rows) + ", " +
                std::to_string(cols) + ")");
  if (cols % QK != 0)
    throw Error(std::string(what) + ": row length " + std::to_string(cols) +
                " is not a multiple of the 256-weight block");
  if (rows * cols > 0 && (!in || !out)) throw Error(std::string(what) + ": null buffer");
}

void check_codes(const int8_t* codes, int64_t n, const char* what) {
  for (int64_t i = 0; i < n; ++i)
    if (codes[i] < -1 || codes[i] > 1)
      throw Error(std::string(what) + ": code " + std::to_string(int(codes[i])) + " at index " +
                  std::to_string(i) + " is not ternary (-1, 0, +1)");
}

bool block_has_nonzero(const int8_t* c) {
  for (int64_t i = 0; i < QK; ++i)
    if (c[i]) return true;
  return false;
}

void put_fp16(uint8_t* p, uint16_t h) {
  p[0] = uint8_t(h & 0xff);
  p[1] = uint8_t(h >> 8);
}
uint16_t get_fp16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }

uint16_t checked_scale(float scale, const char* what) {
  if (!std::isfinite(scale)) throw Error(std::string(what) + ": scale is not finite");
  return fp32_to_fp16(scale);
}

}  // namespace

float absmean_quantize(const float* w, int64_t n, int8_t* codes) {
  if (n < 0) throw Error("absmean_quantize: negative size");
  if (n > 0 && (!w || !codes)) throw Error("absmean_quantize: null buffer");
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::fabs(double(w[i]));
  float mean = n ? float(sum / double(n)) : 0.0f;
  if (!std::isfinite(mean)) throw Error("absmean_quantize: weights are not finite");
  const float scale = mean < 1e-5f ? 1e-5f : mean;
  const float inv = 1.0f / scale;
  for (int64_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(w[i] * inv);
    codes[i] = int8_t(r > 1.0f ? 1 : (r < -1.0f ? -1 : int(r)));
  }
  return scale;
}

// ---- TQ2_0 ----------------------------------------------------------------------
// qs byte (c*32 + j) holds block weights c*128 + n*32 + j at shift 2n (c in 0..1).

void tq2_0_pack(const int8_t* codes, int64_t rows, int64_t cols, float scale, uint8_t* out) {
  check_matrix(codes, out, rows, cols, "tq2_0_pack");
  check_codes(codes, rows * cols, "tq2_0_pack");
  const uint16_t d = checked_scale(scale, "tq2_0_pack");
  const int64_t nblocks = rows * cols / QK;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int8_t* c = codes + b * QK;
    uint8_t* o = out + b * TQ2_0_BLOCK_BYTES;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 32; ++j) {
        uint8_t byte = 0;
        for (int n = 0; n < 4; ++n) byte |= uint8_t((c[h * 128 + n * 32 + j] + 1) << (2 * n));
        o[h * 32 + j] = byte;
      }
    put_fp16(o + 64, block_has_nonzero(c) ? d : 0);
  }
}

void tq2_0_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes,
                  float* block_scales) {
  check_matrix(in, codes, rows, cols, "tq2_0_unpack");
  const int64_t nblocks = rows * cols / QK;
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* p = in + b * TQ2_0_BLOCK_BYTES;
    int8_t* c = codes + b * QK;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 32; ++j)
        for (int n = 0; n < 4; ++n) {
          const int v = (p[h * 32 + j] >> (2 * n)) & 3;
          if (v == 3)
            throw Error("tq2_0_unpack: invalid 2-bit code 3 in block " + std::to_string(b) +
                        " (row " + std::to_string(b / (cols / QK)) + "): data is corrupt");
          c[h * 128 + n * 32 + j] = int8_t(v - 1);
        }
    if (block_scales) block_scales[b] = fp16_to_fp32(get_fp16(p + 64));
  }
}

// ---- I2_S (ternary.h) -------------------------------------------------------------
float i2_s_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes) {
  check_matrix(in, codes, rows, cols, "i2_s_unpack");
  const int64_t n = rows * cols, nblocks = n / I2_S_BLOCK;  // cols % 256 == 0: whole blocks
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* p = in + b * (I2_S_BLOCK / 4);
    int8_t* c = codes + b * I2_S_BLOCK;
    for (int g = 0; g < 4; ++g)
      for (int j = 0; j < 32; ++j) {
        const int v = (p[j] >> (6 - 2 * g)) & 3;
        if (v == 3)
          throw Error("i2_s_unpack: invalid 2-bit code 3 in block " + std::to_string(b) +
                      " (row " + std::to_string(b * I2_S_BLOCK / cols) + "): data is corrupt");
        c[g * 32 + j] = int8_t(v - 1);
      }
  }
  float scale;
  std::memcpy(&scale, in + n / 4, sizeof scale);
  if (!std::isfinite(scale) || scale < 0.0f)
    throw Error("i2_s_unpack: the tensor scale " + std::to_string(scale) +
                " is not a finite number >= 0");
  return scale;
}

// ---- TQ1_0 ----------------------------------------------------------------------
// qs[0..31]: weights n*32 + j (n 0..4), qs[32..47]: 160 + n*16 + j (n 0..4),
// qh[0..3]: 240 + n*4 + j (n 0..3). Digits are base-3 with the first weight most
// significant, stored as ceil(v * 256 / 243) so decoding is ((uint8)(b*3^n)*3)>>8.

namespace {
const uint8_t kPow3[5] = {1, 3, 9, 27, 81};

uint8_t tq1_scale_byte(int v) { return uint8_t((v * 256 + 242) / 243); }
int8_t tq1_trit(uint8_t byte, int n) {
  const uint8_t v = uint8_t(byte * kPow3[n]);
  return int8_t(((uint16_t(v) * 3) >> 8) - 1);
}
}  // namespace

void tq1_0_pack(const int8_t* codes, int64_t rows, int64_t cols, float scale, uint8_t* out) {
  check_matrix(codes, out, rows, cols, "tq1_0_pack");
  check_codes(codes, rows * cols, "tq1_0_pack");
  const uint16_t d = checked_scale(scale, "tq1_0_pack");
  const int64_t nblocks = rows * cols / QK;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int8_t* c = codes + b * QK;
    uint8_t* o = out + b * TQ1_0_BLOCK_BYTES;
    for (int j = 0; j < 32; ++j) {
      int v = 0;
      for (int n = 0; n < 5; ++n) v = v * 3 + (c[n * 32 + j] + 1);
      o[j] = tq1_scale_byte(v);
    }
    for (int j = 0; j < 16; ++j) {
      int v = 0;
      for (int n = 0; n < 5; ++n) v = v * 3 + (c[160 + n * 16 + j] + 1);
      o[32 + j] = tq1_scale_byte(v);
    }
    for (int j = 0; j < 4; ++j) {
      int v = 0;
      for (int n = 0; n < 4; ++n) v = v * 3 + (c[240 + n * 4 + j] + 1);
      o[48 + j] = tq1_scale_byte(v * 3);  // 4 trits, aligned as the top 4 of 5
    }
    put_fp16(o + 52, block_has_nonzero(c) ? d : 0);
  }
}

void tq1_0_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes,
                  float* block_scales) {
  check_matrix(in, codes, rows, cols, "tq1_0_unpack");
  const int64_t nblocks = rows * cols / QK;
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* p = in + b * TQ1_0_BLOCK_BYTES;
    int8_t* c = codes + b * QK;
    for (int j = 0; j < 32; ++j)
      for (int n = 0; n < 5; ++n) c[n * 32 + j] = tq1_trit(p[j], n);
    for (int j = 0; j < 16; ++j)
      for (int n = 0; n < 5; ++n) c[160 + n * 16 + j] = tq1_trit(p[32 + j], n);
    for (int j = 0; j < 4; ++j)
      for (int n = 0; n < 4; ++n) c[240 + n * 4 + j] = tq1_trit(p[48 + j], n);
    if (block_scales) block_scales[b] = fp16_to_fp32(get_fp16(p + 52));
  }
}

// ---- TK2 ------------------------------------------------------------------------

int64_t tk2_row_bytes(int64_t cols) {
  if (cols < 0 || cols % QK != 0)
    throw Error("TK2: row length " + std::to_string(cols) +
                " is not a multiple of the 256-weight block");
  return cols / QK * TK2_BLOCK_BYTES;
}

void tk2_pack(const int8_t* codes, int64_t rows, int64_t cols, uint8_t* out) {
  check_matrix(codes, out, rows, cols, "tk2_pack");
  check_codes(codes, rows * cols, "tk2_pack");
  const int64_t nblocks = rows * cols / QK;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int8_t* c = codes + b * QK;
    uint8_t* o = out + b * TK2_BLOCK_BYTES;
    for (int j = 0; j < 64; ++j) {
      uint8_t byte = 0;
      for (int n = 0; n < 4; ++n) byte |= uint8_t((c[j + 64 * n] + 1) << (2 * n));
      o[j] = byte;
    }
  }
}

void tk2_unpack(const uint8_t* in, int64_t rows, int64_t cols, int8_t* codes) {
  check_matrix(in, codes, rows, cols, "tk2_unpack");
  const int64_t nblocks = rows * cols / QK;
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* p = in + b * TK2_BLOCK_BYTES;
    int8_t* c = codes + b * QK;
    for (int j = 0; j < 64; ++j)
      for (int n = 0; n < 4; ++n) {
        const int v = (p[j] >> (2 * n)) & 3;
        if (v == 3)
          throw Error("tk2_unpack: invalid 2-bit code 3 in block " + std::to_string(b));
        c[j + 64 * n] = int8_t(v - 1);
      }
  }
}

int64_t tk2_tiled_bytes(int64_t rows, int64_t cols) {
  if (rows < 0) throw Error("TK2 tiles: negative row count " + std::to_string(rows));
  return (rows + TK2_TILE_ROWS - 1) / TK2_TILE_ROWS * TK2_TILE_ROWS * tk2_row_bytes(cols);
}

void tk2_tile(const uint8_t* tk2, int64_t rows, int64_t cols, uint8_t* out) {
  check_matrix(tk2, out, rows, cols, "tk2_tile");
  if (rows * cols == 0) return;
  const int64_t rb = tk2_row_bytes(cols), nb = cols / QK;
  std::memset(out, 0, size_t(tk2_tiled_bytes(rows, cols)));
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* tile = out + (r / TK2_TILE_ROWS) * TK2_TILE_ROWS * rb;
    for (int64_t b = 0; b < nb; ++b)
      std::memcpy(tile + (b * TK2_TILE_ROWS + r % TK2_TILE_ROWS) * TK2_BLOCK_BYTES,
                  tk2 + r * rb + b * TK2_BLOCK_BYTES, TK2_BLOCK_BYTES);
  }
}

float tq2_0_to_tk2(const uint8_t* tq, int64_t rows, int64_t cols, uint8_t* out) {
  check_matrix(tq, out, rows, cols, "tq2_0_to_tk2");
  const int64_t nblocks = rows * cols / QK;
  bool have = false;
  uint16_t common = 0;
  int8_t c[QK];
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* p = tq + b * TQ2_0_BLOCK_BYTES;
    const uint16_t d = get_fp16(p + 64);
    float dummy;
    tq2_0_unpack(p, 1, QK, c, &dummy);
    if ((d & 0x7fffu) == 0) {
      std::memset(c, 0, sizeof c);  // d == 0: the block's weights are all zero
    } else {
      if (!std::isfinite(fp16_to_fp32(d)))
        throw Error("tq2_0_to_tk2: block " + std::to_string(b) + " has a non-finite scale");
      if (have && d != common)
        throw Error("tq2_0_to_tk2: block " + std::to_string(b) + " has scale " +
                    std::to_string(fp16_to_fp32(d)) + " but earlier blocks have " +
                    std::to_string(fp16_to_fp32(common)) +
                    "; TK2 needs one scale per tensor (a BitNet absmean tensor)");
      have = true;
      common = d;
    }
    tk2_pack(c, 1, QK, out + b * TK2_BLOCK_BYTES);
  }
  return have ? fp16_to_fp32(common) : 0.0f;
}

void tk2_to_tq2_0(const uint8_t* tk, int64_t rows, int64_t cols, float scale, uint8_t* out) {
  check_matrix(tk, out, rows, cols, "tk2_to_tq2_0");
  const int64_t nblocks = rows * cols / QK;
  int8_t c[QK];
  for (int64_t b = 0; b < nblocks; ++b) {
    tk2_unpack(tk + b * TK2_BLOCK_BYTES, 1, QK, c);
    tq2_0_pack(c, 1, QK, scale, out + b * TQ2_0_BLOCK_BYTES);
  }
}

}  // namespace nanochat
