// ternary_gemm and ternary_gemm_codes: validation, the per-token sums, the weight layout
// and the work split over the pool. The ISA kernels only see GemmArgs/PanelArgs and a
// [rows) x [tokens) tile range.
#include <algorithm>
#include <string>
#include <vector>

#include "common/threadpool.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"

namespace nanochat {

// Integer accumulation bound: |sum (code+1) * q| <= 256 * cols must fit int32.
constexpr int64_t kMaxCols = int64_t(1) << 22;

namespace {

// sum_k q[t, k] per token: the kernels accumulate (code + 1) * q and subtract this.
std::vector<int32_t> token_sums(const int8_t* q, int64_t tokens, int64_t cols) {
  std::vector<int32_t> out(size_t(tokens), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    int32_t s = 0;
    const int8_t* qt = q + t * cols;
    for (int64_t i = 0; i < cols; ++i) s += qt[i];
    out[size_t(t)] = s;
  }
  return out;
}

}  // namespace

void ternary_gemm(const TernaryMatrixView& w, const int8_t* q, const float* x_scale,
                  int64_t tokens, float* y) {
  if (w.rows < 0 || w.cols < 0 || tokens < 0) throw Error("ternary_gemm: negative shape");
  if (w.cols % QK != 0)
    throw Error("ternary_gemm: weight row length " + std::to_string(w.cols) +
                " is not a multiple of the 256-weight block");
  if (w.cols > kMaxCols)
    throw Error("ternary_gemm: row length " + std::to_string(w.cols) + " exceeds " +
                std::to_string(kMaxCols));
  if (w.tile_rows != 1 && w.tile_rows != TK2_TILE_ROWS)
    throw Error("ternary_gemm: tile_rows " + std::to_string(w.tile_rows) + " is neither 1 nor " +
                std::to_string(TK2_TILE_ROWS));
  if (w.rows == 0 || tokens == 0) return;
  if (!y || (w.cols > 0 && (!w.data || !q || !x_scale))) throw Error("ternary_gemm: null buffer");
  if (w.cols == 0) {
    std::fill(y, y + tokens * w.rows, 0.0f);
    return;
  }

  const std::vector<int32_t> qsum = token_sums(q, tokens, w.cols);

  GemmArgs a{w.data, w.rows, tk2_row_bytes(w.cols), w.tile_rows, w.cols, q,
             w.cols, qsum.data(), x_scale, w.scale, y, w.rows};
  const GemmKernel kernel = gemm_kernel(active_isa());

  // Split into (row chunk, token chunk) tasks: row chunks of >= 16 rows (a multiple of
  // the kernels' 4- and 8-row groups and of TK2 tiles), about 4 tasks per thread for
  // balance; token chunks of 64 keep a chunk's activations in L2 while its weight rows
  // stream.
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


#if defined(NANOCHAT_HAVE_X86_KERNELS) || defined(NANOCHAT_HAVE_ARM_KERNELS)
#define NANOCHAT_HAVE_PANEL_KERNELS 1
namespace {

using PanelKernel = void (*)(const PanelArgs& a, int64_t p0, int64_t p1, int64_t t0, int64_t t1);

// The panel kernel for the active ISA (nullptr: the TK2 route), and its name: vpdpbusd on
// AVX-512 VNNI and AVX-VNNI, vpmaddubsw on AVX2 and AVX-512 without VNNI, SDOT on
// neon_dotprod, vmlal_s8 on neon (the TK2 route would pack every weight and then reduce each
// dot horizontally).
PanelKernel panel_kernel(const char** name = nullptr) {
  const Isa isa = active_isa();
  const char* n = isa_name(isa);
  PanelKernel k = nullptr;
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  if (isa == Isa::neon_dotprod) k = gemm_panels_neon_dotprod;
  if (isa == Isa::neon) k = gemm_panels_neon;
#endif
#ifdef NANOCHAT_HAVE_X86_KERNELS
  if (isa >= Isa::avx512vnni) {
    k = gemm_panels_avx512vnni;
  } else if (isa == Isa::avx_vnni) {
    k = gemm_panels_avxvnni;
  } else if (isa >= Isa::avx2) {
    n = "avx2";
    k = gemm_panels_avx2;
  }
#endif
  if (name) *name = n;
  return k;
}

void gemm_codes_panels(PanelKernel kernel, const int8_t* codes, int64_t rows, int64_t cols,
                       float scale, const int8_t* q, const float* x_scale, int64_t tokens,
                       float* y) {
  const char* what = "ternary_gemm_codes";
  // Panels (see PanelArgs), in a per-thread buffer: reused call after call, so the
  // pages are not faulted in again each step.
  const int64_t npanels = (rows + 15) / 16, panel = 16 * cols;
  thread_local std::vector<uint8_t> buf;
  buf.assign(size_t(npanels * panel), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* c = codes + r * cols;
    uint8_t* o = buf.data() + (r / 16) * panel + (r % 16) * 4;
    for (int64_t k = 0; k < cols; ++k) {
      if (c[k] < -1 || c[k] > 1)
        throw Error(std::string(what) + ": code " + std::to_string(int(c[k])) + " at row " +
                    std::to_string(r) + ", column " + std::to_string(k) +
                    " is not ternary (-1, 0, +1)");
      o[(k / 4) * 64 + k % 4] = uint8_t(c[k] + 1);
    }
  }
  const std::vector<int32_t> qsum = token_sums(q, tokens, cols);
  const PanelArgs a{buf.data(), rows, cols, q, qsum.data(), x_scale, scale, y};

  // Tasks: (pair-of-panels chunk, 64-token chunk), about 4 per thread.
  const int64_t threads = num_threads();
  if (threads == 1 || rows * cols * tokens < (int64_t(1) << 18)) {
    kernel(a, 0, npanels, 0, tokens);
    return;
  }
  const int64_t tchunk = 64, ntc = (tokens + tchunk - 1) / tchunk;
  const int64_t want_pc = std::max<int64_t>(1, (4 * threads + ntc - 1) / ntc);
  int64_t pchunk = (npanels + want_pc - 1) / want_pc;
  pchunk = (pchunk + 1) / 2 * 2;
  const int64_t npc = (npanels + pchunk - 1) / pchunk;
  parallel_for(npc * ntc, [&](int64_t i) {
    const int64_t pc = i % npc, tc = i / npc;
    const int64_t p0 = pc * pchunk, t0 = tc * tchunk;
    kernel(a, p0, std::min(npanels, p0 + pchunk), t0, std::min(tokens, t0 + tchunk));
  });
}

}  // namespace
#endif

const char* ternary_gemm_codes_path() {
  const char* name = isa_name(active_isa());  // the TK2 route runs ternary_gemm's kernel
#ifdef NANOCHAT_HAVE_PANEL_KERNELS
  panel_kernel(&name);
#endif
  return name;
}

void ternary_gemm_codes(const int8_t* codes, int64_t rows, int64_t cols, float scale,
                        const int8_t* q, const float* x_scale, int64_t tokens, float* y) {
  const char* what = "ternary_gemm_codes";
  if (rows < 0 || cols < 0 || tokens < 0) throw Error(std::string(what) + ": negative shape");
  if (cols % 4 != 0)
    throw Error(std::string(what) + ": row length " + std::to_string(cols) +
                " is not a multiple of 4");
  if (cols > kMaxCols)
    throw Error(std::string(what) + ": row length " + std::to_string(cols) + " exceeds " +
                std::to_string(kMaxCols));
  if (rows == 0 || tokens == 0) return;
  if (!y || (cols > 0 && (!codes || !q || !x_scale)))
    throw Error(std::string(what) + ": null buffer");
  if (cols == 0) {
    std::fill(y, y + tokens * rows, 0.0f);
    return;
  }
#ifdef NANOCHAT_HAVE_PANEL_KERNELS
  if (const PanelKernel k = panel_kernel()) {
    gemm_codes_panels(k, codes, rows, cols, scale, q, x_scale, tokens, y);
    return;
  }
#endif
  if (cols % QK != 0)
    throw Error(std::string(what) + ": row length " + std::to_string(cols) +
                " must be a multiple of 256 on the scalar path (no panel kernel)");
  std::vector<uint8_t> tk(size_t(rows * tk2_row_bytes(cols)));
  tk2_pack(codes, rows, cols, tk.data());  // validates the codes
  ternary_gemm(TernaryMatrixView{tk.data(), rows, cols, scale}, q, x_scale, tokens, y);
}

}  // namespace nanochat
