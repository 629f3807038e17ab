// The fused linear cross-entropy driver (see fused_loss.h): argument checks, the chunk loop
// over each head's non-ignored tokens, and a blocked GEMM (Goto/BLIS order: KC x NC panels
// of B and MC x KC panels of A packed per thread, MR x NR micro-tiles from the per-ISA
// files), threaded over output blocks on the project pool. Every output block is owned by
// one task and summed in a fixed order, so results do not depend on the thread count.
#include "loss/fused_loss.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu.h"
#include "common/threadpool.h"
#include "nanochat/error.hpp"

namespace nanochat {
namespace {

using loss_kernels::Kernels;

// Block sizes: a KC x nr B panel (32 KiB at nr 32, 16 KiB at 16) stays in L1 while MC x KC
// of A (120 KiB) sits in L2 next to the KC x NC B block (256 KiB). MC and NC are multiples
// of every table's tile shape (12 x 32, 6 x 16).
constexpr int64_t KC = 256;
constexpr int64_t MC = 120;
constexpr int64_t NC = 256;

// Element (i, k) of a matrix at p[i * rs + k * cs]: one view covers a matrix and its
// transpose, so the three GEMMs of the loss (h W^T, G W, G^T h) share the packers.
struct View {
  const float* p;
  int64_t rs, cs;
};

inline uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_value(float f) {  // f rounded to bf16, as a float
  const uint32_t u = uint32_t(to_bf16(f)) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// One panel: W lines (line l at src + l * ls, step k at + k * ks; lines >= n are zero) x
// kc steps into d[k][W] (F32; with round, each value rounded to bf16) or d[k/2][W][2] (BF16
// pairs, kc rounded up to even). Step by step, so the writes are sequential and the reads
// are either contiguous (ls == 1: G^T, W in G W) or W streams that each reuse a cache line
// over 16 steps (ks == 1).
template <typename T>
void pack_panel(const float* src, int64_t ls, int64_t ks, int64_t W, int64_t n, int64_t kc,
                bool round, T* d) {
  constexpr bool f32 = std::is_same<T, float>::value;
  const int64_t kp = f32 ? kc : (kc + 1) & ~int64_t(1);
  for (int64_t k = 0; k < kp; ++k) {
    T* dk = f32 ? d + k * W : d + (k / 2) * 2 * W + (k & 1);
    constexpr int64_t step = f32 ? 1 : 2;
    const float* s = src + k * ks;
    const int64_t m = k < kc ? n : 0;
    for (int64_t l = 0; l < m; ++l) {
      if constexpr (f32)
        dk[l] = round ? bf16_value(s[l * ls]) : s[l * ls];
      else
        dk[l * step] = to_bf16(s[l * ls]);
    }
    for (int64_t l = m; l < W; ++l) dk[l * step] = T(0);
  }
}

// Rows [i0, i0 + rows) x k [k0, k0 + kc) of A into one mr-row panel.
template <typename T>
void pack_a(View a, int64_t mr, int64_t i0, int64_t rows, int64_t k0, int64_t kc, bool round,
            T* d) {
  pack_panel<T>(a.p + i0 * a.rs + k0 * a.cs, a.rs, a.cs, mr, rows, kc, round, d);
}

// k [k0, k0 + kc) x columns [j0, j0 + cols) of B into one nr-column panel.
template <typename T>
void pack_b(View b, int64_t nr, int64_t k0, int64_t kc, int64_t j0, int64_t cols, bool round,
            T* d) {
  pack_panel<T>(b.p + k0 * b.rs + j0 * b.cs, b.cs, b.rs, nr, cols, kc, round, d);
}

// C (M x N, row stride ldc) = (accumulate ? C : 0) + A (M x K) B (K x N). Per KC block of
// K, all of A and B are packed once into shared buffers (in parallel, by panel; (M + N) x KC
// elements, 32 MiB at vocab 32768), then the MC x NC output blocks run in parallel.
template <typename T>
void gemm(const Kernels& kern, int64_t M, int64_t N, int64_t K, View a, View b, float* c,
          int64_t ldc, bool accumulate, bool round, std::vector<T>& ap, std::vector<T>& bp) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.0f);
    return;
  }
  const int64_t MR = kern.mr, NR = kern.nr;
  const int64_t mpan = (M + MR - 1) / MR, npan = (N + NR - 1) / NR;
  ap.resize(size_t(mpan * MR * (KC + 1)));
  bp.resize(size_t(npan * NR * (KC + 1)));
  const int64_t mb = (M + MC - 1) / MC, nb = (N + NC - 1) / NC;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const int64_t kp = std::is_same<T, float>::value ? kc : (kc + 1) & ~int64_t(1);
    const bool acc = accumulate || k0 > 0;
    parallel_for(mpan + npan, [&](int64_t p) {
      if (p < mpan)
        pack_a(a, MR, p * MR, std::min<int64_t>(MR, M - p * MR), k0, kc, round,
               ap.data() + p * MR * kp);
      else
        pack_b(b, NR, k0, kc, (p - mpan) * NR, std::min<int64_t>(NR, N - (p - mpan) * NR),
               round, bp.data() + (p - mpan) * NR * kp);
    });
    parallel_for(mb * nb, [&](int64_t task) {
      const int64_t i0 = (task % mb) * MC, j0 = (task / mb) * NC;
      const int64_t mc = std::min(MC, M - i0), nc = std::min(NC, N - j0);
      alignas(64) float tile[loss_kernels::kMaxTile];
      for (int64_t jr = 0; jr < nc; jr += NR) {
        const T* bpanel = bp.data() + (j0 + jr) * kp;
        const int64_t cols = std::min<int64_t>(NR, nc - jr);
        for (int64_t ir = 0; ir < mc; ir += MR) {
          const T* apanel = ap.data() + (i0 + ir) * kp;
          const int64_t rows = std::min<int64_t>(MR, mc - ir);
          float* cp = c + (i0 + ir) * ldc + j0 + jr;
          if (rows == MR && cols == NR) {
            if constexpr (std::is_same<T, float>::value)
              kern.f32(kp, apanel, bpanel, cp, ldc, acc);
            else
              kern.bf16(kp, apanel, bpanel, cp, ldc, acc);
            continue;
          }
          if constexpr (std::is_same<T, float>::value)
            kern.f32(kp, apanel, bpanel, tile, NR, false);
          else
            kern.bf16(kp, apanel, bpanel, tile, NR, false);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j)
              cp[r * ldc + j] = (acc ? cp[r * ldc + j] : 0.0f) + tile[r * NR + j];
        }
      }
    });
  }
}

const Kernels& kernels_for(Isa isa) {
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if ((isa == Isa::avx512 || isa == Isa::avx512vnni) && loss_kernels::avx512_supported())
    return loss_kernels::avx512;
  if (is_x86(isa) && cpu_features().avx2) return loss_kernels::avx2;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (is_arm(isa)) return loss_kernels::neon;
#endif
  (void)isa;
  return loss_kernels::scalar;
}

std::string num(int64_t v) { return std::to_string(v); }

}  // namespace

const char* fused_loss_path() { return kernels_for(active_isa()).name; }

const char* loss_precision_name(LossPrecision p) {
  return p == LossPrecision::bf16 ? "bf16" : "f32";
}

LossPrecision loss_precision_from_name(const char* name) {
  const std::string n = name ? name : "";
  if (n == "f32" || n == "float32") return LossPrecision::f32;
  if (n == "bf16") return LossPrecision::bf16;
  throw Error("fused loss precision: expected 'f32' or 'bf16', got '" + n + "'");
}

bool loss_precision_supported(LossPrecision p, Isa isa) {
  if (p == LossPrecision::f32) return true;
  // bf16 runs on the scalar reference tile, on the AVX2 and NEON f32 tiles over bf16-rounded
  // operands, and on the AVX-512 tables only with vdpbf16ps.
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (&kernels_for(isa) == &loss_kernels::avx512) return cpu_features().avx512bf16;
#else
  (void)isa;
#endif
  return true;
}

float fused_linear_cross_entropy(const FusedLossArgs& a) {
  return fused_linear_cross_entropy(a, active_isa());
}

float fused_linear_cross_entropy(const FusedLossArgs& a, Isa isa) {
  const std::string f = "fused_linear_cross_entropy: ";
  if (a.vocab <= 0 || a.dim <= 0) throw Error(f + "vocab and dim must be > 0");
  if (a.heads <= 0) throw Error(f + "heads must be > 0, got " + num(a.heads));
  if (a.tokens < 0) throw Error(f + "tokens must be >= 0, got " + num(a.tokens));
  if (a.chunk <= 0) throw Error(f + "chunk must be > 0, got " + num(a.chunk));
  if (!a.weight) throw Error(f + "weight: null buffer");
  if (a.tokens > 0 && (!a.hidden || !a.targets)) throw Error(f + "hidden/targets: null buffer");
  if (!a.head_weights || !a.loss) throw Error(f + "head_weights/loss: null buffer");
  const bool grad = a.grad_hidden != nullptr;
  if (grad != (a.grad_weight != nullptr))
    throw Error(f + "grad_hidden and grad_weight must be given together");
  if (!loss_precision_supported(a.precision, isa))
    throw Error(f + "precision bf16 on the AVX-512 kernels needs AVX512-BF16 (this CPU lacks it)");
  const int64_t V = a.vocab, D = a.dim, T = a.tokens;
  if (a.rows) {
    if (a.n_rows < 0 || a.n_rows > T)
      throw Error(f + "n_rows must be in [0, tokens = " + num(T) + "], got " + num(a.n_rows));
    for (int64_t k = 0; k < a.n_rows; ++k)
      if (a.rows[k] < 0 || a.rows[k] >= T || (k > 0 && a.rows[k] <= a.rows[k - 1]))
        throw Error(f + "rows[" + num(k) + "] = " + num(a.rows[k]) +
                    " is not increasing inside [0, tokens = " + num(T) + ")");
  }
  const int64_t R = a.rows ? a.n_rows : T;  // the positions computed, in order
  auto position = [&](int64_t k) { return a.rows ? a.rows[k] : k; };
  for (int64_t i = 0; i < a.heads; ++i) {
    if (!std::isfinite(a.head_weights[i]))
      throw Error(f + "head_weights[" + num(i) + "] is not finite");
    for (int64_t t = 0; t < T; ++t) {
      const int32_t y = a.targets[i * T + t];
      if (y < -1 || y >= V)
        throw Error(f + "targets[" + num(i) + ", " + num(t) + "] = " + num(y) +
                    " is outside [-1, vocab = " + num(V) + ")");
    }
  }
  const Kernels& kern = kernels_for(isa);
  const bool bf16 = a.precision == LossPrecision::bf16;
  // grad_hidden rows of ignored tokens stay 0; grad_W is overwritten by the first chunk's
  // GEMM (zeroed at the end only if no head had a target).
  if (grad) std::fill(a.grad_hidden, a.grad_hidden + a.heads * T * D, 0.0f);
  if (a.row_loss) std::fill(a.row_loss, a.row_loss + a.heads * T, 0.0f);
  bool gw_written = false;
  const int64_t C = std::max<int64_t>(1, std::min(a.chunk, T));
  // The logits scratch is written by the first GEMM before it is read: no zero fill (a
  // 128 MiB memset at the default chunk).
  const std::unique_ptr<float[]> logits(new float[size_t(C * V)]);
  std::vector<float> hc(size_t(C * D)), gc(grad ? size_t(C * D) : 0);
  std::vector<int64_t> rows(static_cast<size_t>(C));
  std::vector<int32_t> tg(static_cast<size_t>(C));
  std::vector<float> row_loss(static_cast<size_t>(C)), sc(static_cast<size_t>(C));
  std::vector<float> apf, bpf;  // packed GEMM operands, reused by every GEMM of the call
  std::vector<uint16_t> aph, bph;
  // bf16 on a table without a bf16 tile (AVX2): operands rounded to bf16 while packing, then
  // the f32 tiles (a product of two bf16 values is exact in f32, so this differs from
  // vdpbf16ps only in where the sums round).
  auto run_gemm = [&](int64_t M, int64_t N, int64_t K, View x, View y, float* out, int64_t ldc,
                      bool accumulate) {
    if (bf16 && kern.bf16)
      gemm<uint16_t>(kern, M, N, K, x, y, out, ldc, accumulate, false, aph, bph);
    else
      gemm<float>(kern, M, N, K, x, y, out, ldc, accumulate, bf16, apf, bpf);
  };

  double total = 0.0;
  for (int64_t i = 0; i < a.heads; ++i) {
    const int32_t* ti = a.targets + i * T;
    const float* hi = a.hidden + i * T * D;
    int64_t n = 0;
    for (int64_t k = 0; k < R; ++k) n += ti[position(k)] >= 0;
    if (n == 0) {  // nothing to predict (e.g. a sequence shorter than the head's offset)
      a.loss[i] = 0.0f;
      continue;
    }
    const float scale = float(double(a.head_weights[i]) / double(n));
    double sum = 0.0;
    const float* si = a.row_scale ? a.row_scale + i * T : nullptr;
    int64_t k = 0;
    while (k < R) {
      int64_t c = 0;  // gather the next chunk of non-ignored tokens
      for (; k < R && c < C; ++k) {
        const int64_t t = position(k);
        if (ti[t] >= 0) {
          rows[c] = t;
          tg[c] = ti[t];
          sc[c] = si ? si[t] : scale;
          std::memcpy(hc.data() + c * D, hi + t * D, size_t(D) * sizeof(float));
          ++c;
        }
      }
      if (c == 0) break;
      // logits (c x V) = h_c (c x D) W^T
      run_gemm(c, V, D, View{hc.data(), D, 1}, View{a.weight, 1, D}, logits.get(), V, false);
      parallel_for(c, [&](int64_t r) {
        row_loss[r] = kern.ce_row(logits.get() + r * V, V, tg[r], sc[r], grad);
      });
      for (int64_t r = 0; r < c; ++r) sum += row_loss[r];
      if (a.row_loss)
        for (int64_t r = 0; r < c; ++r) a.row_loss[i * T + rows[r]] = row_loss[r];
      if (!grad) continue;
      // grad_h_c (c x D) = G (c x V) W (V x D); grad_W (V x D) += G^T h_c
      run_gemm(c, D, V, View{logits.get(), V, 1}, View{a.weight, D, 1}, gc.data(), D, false);
      run_gemm(V, D, c, View{logits.get(), 1, V}, View{hc.data(), D, 1}, a.grad_weight, D,
               gw_written);
      gw_written = true;
      float* gh = a.grad_hidden + i * T * D;
      for (int64_t r = 0; r < c; ++r)
        std::memcpy(gh + rows[r] * D, gc.data() + r * D, size_t(D) * sizeof(float));
    }
    a.loss[i] = float(sum / double(n));
    total += double(a.head_weights[i]) * double(a.loss[i]);
  }
  if (grad && !gw_written) std::fill(a.grad_weight, a.grad_weight + V * D, 0.0f);
  return float(total);
}

}  // namespace nanochat
