// BitNet A8: per-token absmax int8 activation quantization and its inverse.
#include <algorithm>
#include <cmath>
#include <string>

#include "common/threadpool.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"

namespace nanochat {

namespace {
void check_act(const void* a, const void* b, const void* c, int64_t tokens, int64_t k,
               const char* what) {
  if (tokens < 0 || k < 0) throw Error(std::string(what) + ": negative shape");
  if (tokens * k > 0 && (!a || !b || !c)) throw Error(std::string(what) + ": null buffer");
}
}  // namespace

namespace {

// The reference: returns the first token with a non-finite value, or -1.
int64_t quantize_rows_scalar(const float* x, int64_t t0, int64_t t1, int64_t k, int8_t* q,
                             float* x_scale) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * k;
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      // Not fmax: it drops NaN operands, so a NaN would pass the check below and
      // reach the int8 cast (undefined behaviour). A NaN ends the scan as amax.
      const float a = std::fabs(xt[i]);
      if (!(a <= amax)) {
        amax = a;
        if (std::isnan(a)) break;
      }
    }
    if (!std::isfinite(amax)) return t;
    const float s = 127.0f / (amax < 1e-5f ? 1e-5f : amax);
    int8_t* qt = q + t * k;
    for (int64_t i = 0; i < k; ++i) {
      float r = std::nearbyint(xt[i] * s);
      r = r > 127.0f ? 127.0f : (r < -128.0f ? -128.0f : r);
      qt[i] = int8_t(r);
    }
    x_scale[t] = 1.0f / s;
  }
  return -1;
}

void quantize_rows(const float* x, int64_t t0, int64_t t1, int64_t k, int8_t* q,
                   float* x_scale) {
  int64_t bad;
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (active_isa() >= Isa::avx512)
    bad = quantize_activations_avx512(x, t0, t1, k, q, x_scale);
  else
  if (active_isa() >= Isa::avx2)
    bad = quantize_activations_avx2(x, t0, t1, k, q, x_scale);
  else
#endif
    bad = quantize_rows_scalar(x, t0, t1, k, q, x_scale);
  if (bad >= 0)
    throw Error("quantize_activations: token " + std::to_string(bad) +
                " has a non-finite value");
}

}  // namespace

void quantize_activations(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale) {
  check_act(x, q, x_scale, tokens, k, "quantize_activations");
  // Training quantizes (batch x seq) rows per layer call: spread them over the pool.
  const int64_t threads = num_threads();
  if (threads == 1 || tokens * k < (int64_t(1) << 16)) {
    quantize_rows(x, 0, tokens, k, q, x_scale);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, (tokens + 4 * threads - 1) / (4 * threads));
  parallel_for((tokens + chunk - 1) / chunk, [&](int64_t i) {
    quantize_rows(x, i * chunk, std::min(tokens, (i + 1) * chunk), k, q, x_scale);
  });
}

void dequantize_activations(const int8_t* q, const float* x_scale, int64_t tokens, int64_t k,
                            float* x) {
  check_act(q, x_scale, x, tokens, k, "dequantize_activations");
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < k; ++i) x[t * k + i] = float(q[t * k + i]) * x_scale[t];
}

}  // namespace nanochat
