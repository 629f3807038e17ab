// Dense matrices of the engine: Q8_0 repacking, row lookup, activation preparation,
// run-time kernel choice and the threaded GEMM driver.
#include "dense/dense.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include "common/cpu.h"
#include "common/threadpool.h"
#include "ternary/ternary.h"

namespace nanochat {

const char* dense_type_name(DenseType t) {
  switch (t) {
    case DenseType::F32: return "F32";
    case DenseType::F16: return "F16";
    case DenseType::Q8_0: return "Q8_0";
  }
  return "?";
}

void q8_0_repack(const uint8_t* blocks, int64_t rows, int64_t cols, uint8_t* codes, int64_t ld,
                 uint16_t* scales, int64_t ld_scales) {
  if (rows < 0 || cols < 0 || cols % QK8_0 != 0)
    throw Error("q8_0_repack: bad shape (" + std::to_string(rows) + ", " + std::to_string(cols) +
                "): columns must be a multiple of 32");
  if (ld < cols || ld_scales < cols / QK8_0) throw Error("q8_0_repack: row stride below the row");
  if (rows * cols > 0 && (!blocks || !codes || !scales)) throw Error("q8_0_repack: null buffer");
  const int64_t nb = cols / QK8_0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = blocks + (r * nb + b) * Q8_0_BLOCK_BYTES;
      scales[r * ld_scales + b] = uint16_t(p[0] | (p[1] << 8));
      for (int64_t k = 0; k < QK8_0; ++k)
        codes[r * ld + q8r_offset(nb, b, k)] = uint8_t(p[2 + k] ^ 0x80);
    }
}

void dense_row(const DenseMatrix& w, int64_t r, float* out) {
  if (r < 0 || r >= w.rows)
    throw Error("dense_row: row " + std::to_string(r) + " out of range [0, " +
                std::to_string(w.rows) + ")");
  const int64_t n = w.cols, ld = w.row_stride();
  switch (w.type) {
    case DenseType::F32:
      std::memcpy(out, static_cast<const float*>(w.data) + r * ld, size_t(n) * sizeof(float));
      break;
    case DenseType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.data) + r * ld;
      for (int64_t k = 0; k < n; ++k) out[k] = fp16_to_fp32(p[k]);
      break;
    }
    case DenseType::Q8_0: {
      const int64_t nb = n / QK8_0;
      const uint8_t* c = static_cast<const uint8_t*>(w.data) + r * ld;
      const uint16_t* s = w.scales + r * w.scale_stride();
      for (int64_t b = 0; b < nb; ++b) {
        const float d = fp16_to_fp32(s[b]);
        for (int64_t k = 0; k < QK8_0; ++k)
          out[b * QK8_0 + k] = d * float(int8_t(c[q8r_offset(nb, b, k)] ^ 0x80));
      }
      break;
    }
  }
}

void DenseActBuffer::reserve(int64_t tokens, int64_t cols) {
  if (tokens < 0 || cols < 0) throw Error("DenseActBuffer::reserve: negative size");
  cap_tokens_ = tokens;
  cap_cols_ = cols;
  q_.assign(size_t(tokens * cols), 0);
  block_d_.assign(size_t(tokens * (cols / QK8_0)), 0.0f);
  block_bias_.assign(size_t(tokens * (cols / QK8_0)), 0);
}

const DenseActs& DenseActBuffer::prepare(DenseType type, const float* x, int64_t tokens,
                                         int64_t cols) {
  if (tokens < 0 || tokens > cap_tokens_ || cols != cap_cols_)
    throw Error("DenseActBuffer::prepare: " + std::to_string(tokens) + " x " +
                std::to_string(cols) + " exceeds the reserved " + std::to_string(cap_tokens_) +
                " x " + std::to_string(cap_cols_));
  if (tokens > 0 && !x) throw Error("DenseActBuffer::prepare: null input");
  acts_ = DenseActs{};
  acts_.tokens = tokens;
  acts_.cols = cols;
  acts_.x = x;
  if (type != DenseType::Q8_0) return acts_;
  if (cols % QK8_0 != 0)
    throw Error("DenseActBuffer::prepare: Q8_0 needs columns in multiples of 32, got " +
                std::to_string(cols));
  const int64_t nb = cols / QK8_0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * cols + b * QK8_0;
      float amax = 0.0f;
      for (int64_t k = 0; k < QK8_0; ++k) {
        if (!std::isfinite(xb[k]))  // would reach the int8 cast (undefined behaviour)
          throw Error("dense activations: token " + std::to_string(t) + " has a non-finite value");
        amax = std::max(amax, std::fabs(xb[k]));
      }
      const float d = amax / 127.0f;
      // 1/d overflows for a subnormal d; then every |x| is ~0 and q = 0 is right.
      const float inv = d > 0.0f ? 1.0f / d : 0.0f;
      const float id = std::isfinite(inv) ? inv : 0.0f;
      int8_t* qt = q_.data() + t * cols;
      int32_t sum = 0;
      for (int64_t k = 0; k < QK8_0; ++k) {
        const int8_t v = int8_t(std::round(xb[k] * id));
        qt[q8r_offset(nb, b, k)] = v;
        sum += v;
      }
      block_d_[size_t(t * nb + b)] = d;
      block_bias_[size_t(t * nb + b)] = -128 * sum;
    }
  acts_.q = q_.data();
  acts_.block_d = block_d_.data();
  acts_.block_bias = block_bias_.data();
  return acts_;
}

bool dense_avx512_supported() {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  return cpu_features().avx512vnni;
#else
  return false;
#endif
}

const DenseKernels& dense_kernels(Isa isa) {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if ((isa == Isa::avx512 || isa == Isa::avx512vnni) && dense_avx512_supported())
    return kDenseAvx512;
  if (isa == Isa::avx_vnni && cpu_features().avx_vnni) return kDenseAvxVnni;
  if (is_x86(isa) && cpu_features().avx2) return kDenseAvx2;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (isa == Isa::neon_dotprod && cpu_features().dotprod) return kDenseNeonDotprod;
  if (is_arm(isa) && cpu_features().neon) return kDenseNeon;
#endif
  (void)isa;  // unused where neither kernel family is built
  return kDenseScalar;
}

const DenseKernels& dense_kernels() { return dense_kernels(active_isa()); }

void dense_gemm(const DenseMatrix& w, const DenseActs& a, float* y, int64_t ldy) {
  if (w.rows < 0 || w.cols < 0 || a.tokens < 0) throw Error("dense_gemm: negative shape");
  if (a.cols != w.cols)
    throw Error("dense_gemm: activations have " + std::to_string(a.cols) + " columns, the matrix " +
                std::to_string(w.cols));
  if (ldy < w.rows) throw Error("dense_gemm: output stride below the row count");
  if (w.row_stride() < w.cols || (w.type == DenseType::Q8_0 && w.scale_stride() < w.cols / 32))
    throw Error("dense_gemm: row stride below the row length");
  if (w.type == DenseType::Q8_0 &&
      (w.cols % QK8_0 != 0 || (w.rows * w.cols > 0 && !w.scales) || (a.tokens > 0 && !a.q)))
    throw Error("dense_gemm: Q8_0 needs 32-column blocks, scales and prepared activations");
  if (w.rows == 0 || a.tokens == 0) return;
  if (!y || !w.data || !a.x) throw Error("dense_gemm: null buffer");
  const DenseKernels& k = dense_kernels();
  const int64_t threads = num_threads();
  if (threads == 1 || w.rows * w.cols * a.tokens < (int64_t(1) << 18)) {
    k.gemm(w, a, 0, w.rows, y, ldy);
    return;
  }
  // ~8 chunks per thread (multiples of 64 rows) balance a shared, noisy machine.
  int64_t chunk = (w.rows + 8 * threads - 1) / (8 * threads);
  chunk = std::max<int64_t>(64, (chunk + 63) / 64 * 64);
  const int64_t n = (w.rows + chunk - 1) / chunk;
  auto body = [&](int64_t i) {
    const int64_t r0 = i * chunk;
    k.gemm(w, a, r0, std::min(w.rows, r0 + chunk), y, ldy);
  };
  parallel_for(n, std::ref(body));  // std::ref: the std::function does not allocate
}

}  // namespace nanochat
