// 8-bit optimizer state: argument checks, run-time kernel choice and the threaded driver
// (blocks split into chunks on the kernel thread pool). Kernels: blockwise8_scalar.cpp
// (the reference), blockwise8_avx2.cpp, blockwise8_avx512.cpp and blockwise8_neon.cpp.
#include "optim/blockwise8.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "common/cpu.h"
#include "common/threadpool.h"
#include "nanochat/error.hpp"

namespace nanochat {

const Optim8Kernels& optim8_kernels(Isa isa) {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if ((isa == Isa::avx512 || isa == Isa::avx512vnni) && cpu_features().avx512bw)
    return kOptim8Avx512;
  if (is_x86(isa) && cpu_features().avx2) return kOptim8Avx2;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (is_arm(isa)) return kOptim8Neon;
#endif
  (void)isa;
  return kOptim8Scalar;
}

const Optim8Kernels& optim8_kernels() { return optim8_kernels(active_isa()); }

float* optim8_scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < floats) buf.resize(size_t(floats));
  return buf.data();
}

int64_t optim8_num_blocks(int64_t n, int64_t block) {
  if (block <= 0 || block % kOptim8BlockMultiple != 0 || block > kOptim8MaxBlock)
    throw Error("block_size must be a positive multiple of " +
                std::to_string(kOptim8BlockMultiple) + " up to " +
                std::to_string(kOptim8MaxBlock) + ", got " + std::to_string(block));
  if (n < 0) throw Error("8-bit state: negative element count " + std::to_string(n));
  return (n + block - 1) / block;
}

namespace {

// Runs fn(b0, b1) over [0, nblocks) in chunks of about 64K elements, on the pool.
void for_blocks(int64_t nblocks, int64_t block, const std::function<void(int64_t, int64_t)>& fn) {
  if (nblocks == 0) return;
  const int64_t per = std::max<int64_t>(1, (int64_t(1) << 16) / block);
  const int64_t chunks = (nblocks + per - 1) / per;
  if (chunks == 1) return fn(0, nblocks);
  parallel_for(chunks, [&](int64_t c) { fn(c * per, std::min(nblocks, (c + 1) * per)); });
}

void need(const void* p, int64_t n, const char* name) {
  if (n > 0 && p == nullptr) throw Error(std::string("8-bit state: ") + name + " is null");
}

void check_hyper(float v, float lo, float hi, const char* name, bool hi_open = false) {
  if (!(v >= lo && (hi_open ? v < hi : v <= hi)))
    throw Error(std::string("8-bit optimizer: ") + name + " = " + std::to_string(v) +
                " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) +
                (hi_open ? ")" : "]"));
}

}  // namespace

void quantize_blockwise(const float* x, int64_t n, int64_t block, Map8 map, void* codes,
                        float* absmax) {
  const int64_t nb = optim8_num_blocks(n, block);
  need(x, n, "x");
  need(codes, n, "codes");
  need(absmax, nb, "absmax");
  const Optim8Kernels& k = optim8_kernels();
  for_blocks(nb, block, [&](int64_t b0, int64_t b1) { k.quantize(x, n, block, map, codes, absmax, b0, b1); });
}

void dequantize_blockwise(const void* codes, const float* absmax, int64_t n, int64_t block,
                          Map8 map, float* x) {
  const int64_t nb = optim8_num_blocks(n, block);
  need(x, n, "x");
  need(codes, n, "codes");
  need(absmax, nb, "absmax");
  const Optim8Kernels& k = optim8_kernels();
  for_blocks(nb, block, [&](int64_t b0, int64_t b1) { k.dequantize(codes, absmax, n, block, map, x, b0, b1); });
}

void adamw8_step(const AdamW8Args& a) {
  const int64_t nb = optim8_num_blocks(a.n, a.block);
  need(a.p, a.n, "param");
  need(a.g, a.n, "grad");
  need(a.m, a.n, "exp_avg codes");
  need(a.v, a.n, "exp_avg_sq codes");
  need(a.m_absmax, nb, "exp_avg absmax");
  need(a.v_absmax, nb, "exp_avg_sq absmax");
  check_hyper(a.beta1, 0.0f, 1.0f, "beta1", true);
  check_hyper(a.beta2, 0.0f, 1.0f, "beta2", true);
  check_hyper(a.bias_correction1, 1e-30f, 1.0f, "bias_correction1");
  check_hyper(a.bias_correction2, 1e-30f, 1.0f, "bias_correction2");
  if (!(a.eps > 0.0f)) throw Error("8-bit AdamW: eps must be > 0");
  const Optim8Kernels& k = optim8_kernels();
  for_blocks(nb, a.block, [&](int64_t b0, int64_t b1) { k.adamw(a, b0, b1); });
}

void lion8_step(const Lion8Args& a) {
  const int64_t nb = optim8_num_blocks(a.n, a.block);
  need(a.p, a.n, "param");
  need(a.g, a.n, "grad");
  need(a.m, a.n, "exp_avg codes");
  need(a.m_absmax, nb, "exp_avg absmax");
  check_hyper(a.beta1, 0.0f, 1.0f, "beta1");
  check_hyper(a.beta2, 0.0f, 1.0f, "beta2", true);
  const Optim8Kernels& k = optim8_kernels();
  for_blocks(nb, a.block, [&](int64_t b0, int64_t b1) { k.lion(a, b0, b1); });
}

void momentum8_step(const Momentum8Args& a) {
  const int64_t nb = optim8_num_blocks(a.n, a.block);
  need(a.g, a.n, "grad");
  need(a.m, a.n, "momentum codes");
  need(a.m_absmax, nb, "momentum absmax");
  need(a.u, a.n, "update");
  check_hyper(a.beta, 0.0f, 1.0f, "momentum", true);
  const Optim8Kernels& k = optim8_kernels();
  for_blocks(nb, a.block, [&](int64_t b0, int64_t b1) { k.momentum(a, b0, b1); });
}

}  // namespace nanochat
