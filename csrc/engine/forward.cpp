// The forward pass: python/nanochat/model/gpt.py's graph on the C++ kernels.
//
//   x = token_embd[tok]
//   per layer:  a = rmsnorm(x) -> int8 (once) -> q, k, v (one pool dispatch) -> NEOX RoPE
//               -> causal GQA attention over the f32 KV cache (1/sqrt(hd))
//               x += attn_output(int8(rmsnorm(a, attn_sub_norm)))
//               f = int8(rmsnorm(x)) -> gate, up (one dispatch) -> act(gate) * up
//               x += ffn_down(int8(rmsnorm(., ffn_sub_norm)))
//   logits = token_embd . rmsnorm(x, output_norm)      (tied head, dense kernels)
//
// A batch of up to kMaxBatch tokens runs each matrix as one GEMM (prefill); one token
// is the decode GEMV. Nothing here allocates: ForwardScratch holds every buffer.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "common/threadpool.h"
#include "engine/model.h"
#include "norm/rmsnorm.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"

namespace nanochat {

int64_t KvCache::bytes(const Model::Impl& m, int32_t n_ctx) {
  const int64_t kv_dim = int64_t(m.info.n_kv_heads) * m.info.head_dim;
  int64_t total = 0;
  for (const LayerWeights& L : m.layers) {
    const int64_t slots =
        L.sliding ? std::min<int64_t>(n_ctx, int64_t(m.window) + kMaxBatch) : int64_t(n_ctx);
    total += 2 * slots * kv_dim * int64_t(sizeof(float));
  }
  return total;
}

KvCache::KvCache(const Model::Impl& model, int32_t ctx, bool fault_in) : m(model), n_ctx(ctx) {
  const ModelInfo& I = m.info;
  const int64_t kv_dim = int64_t(I.n_kv_heads) * I.head_dim;
  slots.resize(size_t(I.n_layers));
  layer_off.resize(size_t(I.n_layers));
  size_t total = 0;
  for (int64_t l = 0; l < I.n_layers; ++l) {
    const bool ring = m.layers[size_t(l)].sliding;
    slots[size_t(l)] = ring ? std::min<int64_t>(n_ctx, int64_t(m.window) + kMaxBatch) : n_ctx;
    layer_off[size_t(l)] = total;
    total += size_t(2 * slots[size_t(l)] * kv_dim);
  }
  kv = LargeBuffer(total * sizeof(float));
  if (fault_in) std::memset(kv.data(), 0, kv.size());
}

ForwardScratch::ForwardScratch(const Model::Impl& m) {
  const ModelInfo& I = m.info;
  const int64_t d = I.d_model, hd = I.head_dim, ffn = I.ffn_hidden;
  const int64_t kv_dim = int64_t(I.n_kv_heads) * hd;
  const int64_t hidden = std::max<int64_t>(ffn, m.expert_hidden), wide = std::max(d, hidden);
  const size_t B = size_t(kMaxBatch);
  x.resize(B * size_t(d));
  xn.resize(B * size_t(wide));
  qkv.resize(B * size_t(d + 2 * kv_dim));
  att.resize(B * size_t(d));
  gu.resize(B * size_t(2 * hidden));
  h.resize(B * size_t(hidden));
  proj.resize(B * size_t(d));
  rope.resize(B * size_t(hd));
  q8.resize(B * size_t(wide));
  q8_scale.resize(B);
  q8_sum.resize(B);
  head_act.reserve(kMaxBatch, d);
  if (m.hc_n) {
    const size_t n = size_t(m.hc_n);
    streams.resize(B * n * size_t(d));
    hc_pre.resize(B * n);
    hc_post.resize(B * n);
    hc_res.resize(B * n * n);
    hc_tmp.resize(n * size_t(d) + 2 * n + size_t(m.hc_n_res));
  }
  if (m.n_experts) {
    const size_t E = size_t(m.n_experts), k = size_t(m.n_experts_used);
    moe_q8.resize(B * size_t(d));
    moe_q8_scale.resize(B);
    moe_q8_sum.resize(B);
    moe_scores.resize(B * E);
    moe_pick.resize(B * k);
    moe_gate.resize(B * k);
    moe_count.resize(E + 1);
    moe_rows.resize(B * k);
    moe_y.resize(B * size_t(d));
  }
}

float* KvCache::k_cache(int64_t layer, int64_t kv_head) {
  return reinterpret_cast<float*>(kv.data()) + layer_off[size_t(layer)] +
         kv_head * slots[size_t(layer)] * m.info.head_dim;
}

float* KvCache::v_cache(int64_t layer, int64_t kv_head) {
  return k_cache(layer, kv_head) +
         int64_t(m.info.n_kv_heads) * slots[size_t(layer)] * m.info.head_dim;
}

void KvCache::check_start(int32_t pos, const char* what) const {
  if (m.window == 0) return;
  const int32_t need = std::max(0, pos - m.window + 1);  // first key position pos reads
  if (need < pos && need < ring_lo)
    throw Error(std::string(what) + ": the sliding-window layers' KV rings no longer hold " +
                "positions " + std::to_string(need) + ".." + std::to_string(ring_lo - 1) +
                " (they keep the last window + " + std::to_string(kMaxBatch) +
                " positions, so at most " + std::to_string(kMaxBatch) +
                " tokens can be rewound); reset the session and evaluate again");
}

namespace {

// Work (multiply-adds) below which a step runs on the calling thread: a pool dispatch
// costs a few microseconds.
constexpr int64_t kParallelWork = int64_t(1) << 17;

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, as torch's F.rms_norm (norm/rmsnorm.h's
// row kernel of the active ISA).
void rmsnorm(const float* x, const float* w, int64_t tokens, int64_t n, float eps, float* out) {
  // The weights come from DRAM once per token (the weight stream evicted them): start
  // every line's miss now, so they arrive while the sum of squares runs.
#if defined(__GNUC__)
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(w + i, 0, 2);
#endif
  for (int64_t t = 0; t < tokens; ++t) rms_norm_row(x + t * n, w, n, eps, out + t * n);
}

// Adds the seconds from construction to destruction to one of ForwardScratch::times: two
// clock reads per matrix product or attention call (~100 per small_560m decode step).
class PartTimer {
 public:
  explicit PartTimer(double& acc) : acc_(acc), t0_(std::chrono::steady_clock::now()) {}
  ~PartTimer() {
    acc_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }
  PartTimer(const PartTimer&) = delete;
  PartTimer& operator=(const PartTimer&) = delete;

 private:
  double& acc_;
  std::chrono::steady_clock::time_point t0_;
};

struct Ctx {
  ForwardScratch& s;
  const Model::Impl& m;
  const ModelInfo& info;
  const DenseKernels& dk;
  GemmKernel kernel;
  int64_t threads;
  const BatchSegment* segs;  // the batch's rows by sequence, in row order
  int64_t n_segs;
};

// Per-token int8 quantization of xn (tokens x k) into s.q8 with its sums (the kernels'
// +1 code offset correction), shared by every matrix that reads this input.
void quantize(Ctx& c, int64_t tokens, int64_t k) {
  ForwardScratch& s = c.s;
  c.dk.quantize(s.xn.data(), tokens, k, s.q8.data(), s.q8_scale.data(), s.q8_sum.data());
}

struct MatOut {
  const TernaryWeight* w;
  float* y;  // row t of the output at y + t * ldy
};

// y = W . q for up to 3 matrices that read the same quantized input, in one pool
// dispatch: tasks are (matrix, 16-row-multiple chunk, 64-token chunk) tiles.
template <size_t N>
void matmul(Ctx& c, const MatOut (&outs)[N], int64_t tokens, int64_t ldy) {
  ForwardScratch& s = c.s;
  PartTimer timer(s.times.ternary);
  GemmArgs args[N];
  int64_t rows = 0;
  for (size_t i = 0; i < N; ++i) {
    const TernaryWeight& w = *outs[i].w;
    args[i] = GemmArgs{w.data, w.rows, tk2_row_bytes(w.cols), TK2_TILE_ROWS, w.cols,
                       s.q8.data(), w.cols, s.q8_sum.data(), s.q8_scale.data(), w.scale,
                       outs[i].y, ldy};
    rows += w.rows;
  }
  const int64_t cols = outs[0].w->cols;
  if (c.threads == 1 || rows * cols * tokens < kParallelWork) {
    for (size_t i = 0; i < N; ++i) c.kernel(args[i], 0, args[i].rows, 0, tokens);
    return;
  }
  const int64_t tchunk = 64, ntc = (tokens + tchunk - 1) / tchunk;
  // About 4 tasks per thread in all, row chunks a multiple of the 4-row tiles (16).
  const int64_t want = std::max<int64_t>(1, (4 * c.threads + ntc - 1) / ntc);
  int64_t rchunk = (rows + want - 1) / want;
  rchunk = std::max<int64_t>(16, (rchunk + 15) / 16 * 16);
  int64_t first[N + 1];  // task index where matrix i's row chunks start
  first[0] = 0;
  for (size_t i = 0; i < N; ++i) first[i + 1] = first[i] + (args[i].rows + rchunk - 1) / rchunk;
  const int64_t nrc = first[N];
  auto body = [&](int64_t task) {
    const int64_t rc = task % nrc, tc = task / nrc;
    size_t i = 0;
    while (rc >= first[i + 1]) ++i;
    const int64_t r0 = (rc - first[i]) * rchunk, t0 = tc * tchunk;
    c.kernel(args[i], r0, std::min(args[i].rows, r0 + rchunk), t0, std::min(tokens, t0 + tchunk));
  };
  parallel_for(nrc * ntc, std::ref(body));  // std::ref: no std::function allocation
}

// NEOX RoPE in place on n_heads heads of one token: pairs (x[i], x[i + hd/2]).
void rope(float* x, int64_t n_heads, int64_t hd, const float* cs) {
  const int64_t half = hd / 2;
  const float* cos = cs;
  const float* sin = cs + half;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = a * sin[i] + b * cos[i];
    }
  }
}

// Causal GQA attention of the batch's queries over their sequences' caches (each
// segment's rows at positions kv->n_cached ..), with an online softmax over key blocks
// (no score buffer beyond one block on the stack). A task is one KV head and a chunk of
// one segment's queries: the query heads that share the KV head (up to kHeadChunk at a
// time) read each key and value row once, which in decode is one pass over the layer's
// cache from DRAM instead of one per query head from L2.
void attention(Ctx& c, int64_t layer) {
  ForwardScratch& s = c.s;
  PartTimer timer(s.times.attention);
  const ModelInfo& I = c.info;
  const int64_t H = I.n_heads, hd = I.head_dim, d = I.d_model, KV = I.n_kv_heads;
  const int64_t group = H / KV;
  const int64_t window = c.m.layers[size_t(layer)].sliding ? c.m.window : 0;
  const int64_t ldq = d + 2 * KV * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  constexpr int64_t kKeyBlock = 256;
  constexpr int64_t kQueryChunk = 16;
  constexpr int64_t kHeadChunk = 8;
  // first[i]: the task where segment i's query chunks start (at most kMaxBatch segments).
  int64_t first[kMaxBatch + 1];
  first[0] = 0;
  int64_t work = 0;
  for (int64_t i = 0; i < c.n_segs; ++i) {
    const BatchSegment& g = c.segs[i];
    first[i + 1] = first[i] + (g.rows + kQueryChunk - 1) / kQueryChunk;
    const int64_t keys = g.kv->n_cached + g.rows;
    work += H * g.rows * (window ? std::min(window, keys) : keys) * hd;
  }
  const DenseKernels& dk = c.dk;
  auto body = [&](int64_t task) {
    const int64_t kvh = task % KV, chunk = task / KV;
    int64_t seg = 0;
    while (chunk >= first[seg + 1]) ++seg;
    const BatchSegment& g = c.segs[seg];
    const int64_t qc = chunk - first[seg], pos0 = g.kv->n_cached - g.row0;
    const float* K = g.kv->k_cache(layer, kvh);
    const float* V = g.kv->v_cache(layer, kvh);
    const int64_t S = g.kv->slots[size_t(layer)];
    float sc[kHeadChunk * kKeyBlock];  // head h's scores at sc + h * nb
    float mx[kHeadChunk], sum[kHeadChunk];
    const int64_t t_end = g.row0 + std::min(g.rows, (qc + 1) * kQueryChunk);
    for (int64_t t = g.row0 + qc * kQueryChunk; t < t_end; ++t) {
      for (int64_t h0 = kvh * group; h0 < (kvh + 1) * group; h0 += kHeadChunk) {
        const int64_t nq = std::min(kHeadChunk, (kvh + 1) * group - h0);
        const float* q = s.qkv.data() + t * ldq + h0 * hd;  // nq heads, hd apart
        float* out = s.att.data() + t * d + h0 * hd;
        std::fill(out, out + nq * hd, 0.0f);
        std::fill(mx, mx + nq, -std::numeric_limits<float>::infinity());
        std::fill(sum, sum + nq, 0.0f);
        // Key positions lo .. p; position j sits in slot j mod S (S > p for a full layer),
        // so a block stops at the ring's end too.
        const int64_t p = pos0 + t, lo = window ? std::max<int64_t>(0, p - window + 1) : 0;
        for (int64_t j = lo; j <= p;) {
          const int64_t j0 = j % S;
          const int64_t nb = std::min({kKeyBlock, p + 1 - j, S - j0});
          j += nb;
          dk.scores(q, nq, K + j0 * hd, hd, nb, hd, scale, sc);
          for (int64_t h = 0; h < nq; ++h) {
            float* sh = sc + h * nb;
            float bm = sh[0];
            for (int64_t i = 1; i < nb; ++i) bm = std::max(bm, sh[i]);
            if (bm > mx[h]) {
              if (sum[h] > 0.0f) {  // rescale what earlier blocks accumulated to the new max
                const float f = std::exp(mx[h] - bm);
                sum[h] *= f;
                for (int64_t i = 0; i < hd; ++i) out[h * hd + i] *= f;
              }
              mx[h] = bm;
            }
            sum[h] += dk.exp_sum(sh, nb, mx[h]);
          }
          dk.accumulate(sc, nq, V + j0 * hd, hd, nb, hd, out);
        }
        for (int64_t h = 0; h < nq; ++h) {
          const float inv = 1.0f / sum[h];
          for (int64_t i = 0; i < hd; ++i) out[h * hd + i] *= inv;
        }
      }
    }
  };
  const int64_t ntasks = KV * first[c.n_segs];
  if (c.threads == 1 || work < kParallelWork) {
    for (int64_t i = 0; i < ntasks; ++i) body(i);
  } else {
    parallel_for(ntasks, std::ref(body));
  }
}

// down(int8(rmsnorm(act(gate . q) * (up . q), sub_norm))) for the T rows already quantized
// in s.q8 (width d), into s.proj (T x d). Clobbers s.q8 with the hidden rows.
void ffn_block(Ctx& c, const TernaryWeight& gate, const TernaryWeight& up,
               const float* sub_norm, const TernaryWeight& down, int64_t T, int64_t ffn) {
  ForwardScratch& s = c.s;
  const int64_t d = c.info.d_model;
  const MatOut gu[2] = {{&gate, s.gu.data()}, {&up, s.gu.data() + ffn}};
  matmul(c, gu, T, 2 * ffn);
  for (int64_t t = 0; t < T; ++t) {
    const float* g = s.gu.data() + t * 2 * ffn;
    const float* u = g + ffn;
    float* out = s.h.data() + t * ffn;
    if (c.m.activation == Activation::silu) {
      c.dk.silu_mul(g, u, ffn, out);
    } else {
      for (int64_t i = 0; i < ffn; ++i) {
        const float r = g[i] > 0.0f ? g[i] : 0.0f;
        out[i] = (r * r) * u[i];
      }
    }
  }
  rmsnorm(s.h.data(), sub_norm, T, ffn, c.info.norm_eps, s.xn.data());
  quantize(c, T, ffn);
  const MatOut dn[1] = {{&down, s.proj.data()}};
  matmul(c, dn, T, d);
}

// The MoE FFN (nanochat/model/moe.py) of T tokens whose normed input is s.xn (f32) and s.q8
// (int8), into s.moe_y (T x d):
//   score = sigmoid(router . xn)        top-k of score + expert_bias (selection only)
//   gate  = score[pick] (/ their sum when expert_weights_norm)
//   y     = sum gate * expert(x) (+ shared expert(x))
// Tokens are grouped by expert and each expert runs once over its rows (one GEMV per
// picked expert in decode, a GEMM per expert in prefill); buffers are ForwardScratch's.
void moe_ffn(Ctx& c, const LayerWeights& L, int64_t T) {
  ForwardScratch& s = c.s;
  const Model::Impl& m = c.m;
  const int64_t d = c.info.d_model, E = m.n_experts, k = m.n_experts_used, H = m.expert_hidden;
  // Keep the input's int8 rows: each expert gathers its tokens' rows into s.q8.
  std::copy(s.q8.begin(), s.q8.begin() + T * d, s.moe_q8.begin());
  std::copy(s.q8_scale.begin(), s.q8_scale.begin() + T, s.moe_q8_scale.begin());
  std::copy(s.q8_sum.begin(), s.q8_sum.begin() + T, s.moe_q8_sum.begin());
  // Router (full precision) and top-k per token.
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = s.xn.data() + t * d;
    float* sc = s.moe_scores.data() + t * E;
    for (int64_t e = 0; e < E; ++e) {
      const float* w = L.router + e * d;
      float acc = 0.0f;
      for (int64_t i = 0; i < d; ++i) acc += xt[i] * w[i];
      sc[e] = 1.0f / (1.0f + std::exp(-acc));
    }
    int32_t* pick = s.moe_pick.data() + t * k;
    float* gate = s.moe_gate.data() + t * k;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {  // k passes: the best not yet picked (torch.topk)
      int32_t best = -1;
      float bv = 0.0f;
      for (int64_t e = 0; e < E; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken = taken || pick[i] == e;
        const float v = sc[e] + L.expert_bias[e];
        if (!taken && (best < 0 || v > bv)) {
          best = int32_t(e);
          bv = v;
        }
      }
      pick[j] = best;
      gate[j] = sc[best];
      sum += sc[best];
    }
    if (m.expert_weights_norm)
      for (int64_t j = 0; j < k; ++j) gate[j] /= sum;
  }
  // Group the (token, slot) picks by expert: counting sort, token order kept.
  std::fill(s.moe_count.begin(), s.moe_count.end(), 0);
  for (int64_t i = 0; i < T * k; ++i) ++s.moe_count[size_t(s.moe_pick[size_t(i)]) + 1];
  for (int64_t e = 0; e < E; ++e) s.moe_count[size_t(e + 1)] += s.moe_count[size_t(e)];
  for (int64_t i = 0; i < T * k; ++i)
    s.moe_rows[size_t(s.moe_count[size_t(s.moe_pick[size_t(i)])]++)] = int32_t(i);
  for (int64_t e = E; e > 0; --e) s.moe_count[size_t(e)] = s.moe_count[size_t(e - 1)];
  s.moe_count[0] = 0;

  std::fill(s.moe_y.begin(), s.moe_y.begin() + T * d, 0.0f);
  for (int64_t e = 0; e < E; ++e) {
    const int32_t r0 = s.moe_count[size_t(e)], n = s.moe_count[size_t(e + 1)] - r0;
    if (n == 0) continue;
    for (int32_t r = 0; r < n; ++r) {  // gather the tokens' int8 rows
      const int64_t tok = s.moe_rows[size_t(r0 + r)] / k;
      std::copy(s.moe_q8.begin() + tok * d, s.moe_q8.begin() + (tok + 1) * d,
                s.q8.begin() + int64_t(r) * d);
      s.q8_scale[size_t(r)] = s.moe_q8_scale[size_t(tok)];
      s.q8_sum[size_t(r)] = s.moe_q8_sum[size_t(tok)];
    }
    ffn_block(c, L.exp_gate[size_t(e)], L.exp_up[size_t(e)], L.exp_sub_norm + e * H,
              L.exp_down[size_t(e)], n, H);
    for (int32_t r = 0; r < n; ++r) {
      const int64_t i = s.moe_rows[size_t(r0 + r)], tok = i / k;
      const float g = s.moe_gate[size_t(i)];
      const float* src = s.proj.data() + int64_t(r) * d;
      float* dst = s.moe_y.data() + tok * d;
      for (int64_t j = 0; j < d; ++j) dst[j] += src[j] * g;
    }
  }
  if (L.shared) {
    std::copy(s.moe_q8.begin(), s.moe_q8.begin() + T * d, s.q8.begin());
    std::copy(s.moe_q8_scale.begin(), s.moe_q8_scale.begin() + T, s.q8_scale.begin());
    std::copy(s.moe_q8_sum.begin(), s.moe_q8_sum.begin() + T, s.q8_sum.begin());
    ffn_block(c, L.sh_gate, L.sh_up, L.sh_sub_norm, L.sh_down, T, H);
    for (int64_t i = 0; i < T * d; ++i) s.moe_y[size_t(i)] += s.proj[size_t(i)];
  }
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// mHC before a sub-layer (nanochat/model/mhc.py): each token's H_pre, H_post, H_res from the
// static logits (plus, dynamic, alpha * (phi . streams) / rms(streams)), H_res made doubly
// stochastic by Sinkhorn (rows then columns, `iters` rounds, from exp of the max-shifted
// logits) or as the softmax-weighted sum of the permutation matrices ("lite"); then the
// sub-layer input s.x = H_pre . streams.
void hc_in(Ctx& c, const LayerWeights::Hc& H, int64_t T) {
  ForwardScratch& s = c.s;
  const Model::Impl& m = c.m;
  const int64_t n = m.hc_n, d = c.info.d_model, nd = n * d, nr = m.hc_n_res;
  float* dyn = s.hc_tmp.data() + nd;  // 2n + n_res logits
  for (int64_t t = 0; t < T; ++t) {
    const float* X = s.streams.data() + t * nd;
    for (int64_t i = 0; i < n; ++i) dyn[i] = H.pre[i];
    for (int64_t i = 0; i < n; ++i) dyn[n + i] = H.post[i];
    for (int64_t i = 0; i < nr; ++i) dyn[2 * n + i] = H.res[i];
    if (m.hc_dynamic) {
      float ss = 0.0f;
      for (int64_t i = 0; i < nd; ++i) ss += X[i] * X[i];
      const float r = 1.0f / std::sqrt(ss / float(nd) + c.info.norm_eps);
      for (int64_t o = 0; o < 2 * n + nr; ++o) {
        const float* w = H.fn + o * nd;
        float acc = 0.0f;
        for (int64_t i = 0; i < nd; ++i) acc += w[i] * X[i];
        const float a = H.alpha[o < n ? 0 : o < 2 * n ? 1 : 2];
        dyn[o] += a * (acc * r);
      }
    }
    float* pre = s.hc_pre.data() + t * n;
    float* post = s.hc_post.data() + t * n;
    float* R = s.hc_res.data() + t * n * n;
    for (int64_t i = 0; i < n; ++i) {
      pre[i] = sigmoid(dyn[i]);
      post[i] = 2.0f * sigmoid(dyn[n + i]);
    }
    const float* lg = dyn + 2 * n;
    float mx = lg[0];
    for (int64_t i = 1; i < nr; ++i) mx = std::max(mx, lg[i]);
    if (!m.hc_lite) {
      for (int64_t i = 0; i < n * n; ++i) R[i] = std::exp(lg[i] - mx);
      for (int32_t it = 0; it < m.hc_iters; ++it) {
        for (int64_t i = 0; i < n; ++i) {
          float sum = 0.0f;
          for (int64_t j = 0; j < n; ++j) sum += R[i * n + j];
          for (int64_t j = 0; j < n; ++j) R[i * n + j] /= sum;
        }
        for (int64_t j = 0; j < n; ++j) {
          float sum = 0.0f;
          for (int64_t i = 0; i < n; ++i) sum += R[i * n + j];
          for (int64_t i = 0; i < n; ++i) R[i * n + j] /= sum;
        }
      }
    } else {
      float* w = s.hc_tmp.data();  // softmax of the n! logits
      float sum = 0.0f;
      for (int64_t p = 0; p < nr; ++p) sum += (w[p] = std::exp(lg[p] - mx));
      std::fill(R, R + n * n, 0.0f);
      for (int64_t p = 0; p < nr; ++p) {
        const int32_t* perm = m.hc_perms.data() + p * n;  // row i of P_p is e_{perm[i]}
        for (int64_t i = 0; i < n; ++i) R[i * n + perm[i]] += w[p] / sum;
      }
    }
    float* x = s.x.data() + t * d;
    std::fill(x, x + d, 0.0f);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) x[j] += pre[i] * X[i * d + j];
  }
}

// mHC after a sub-layer with output y (T x d): streams = H_res . streams + H_post^T y.
void hc_out(Ctx& c, const float* y, int64_t T) {
  ForwardScratch& s = c.s;
  const int64_t n = c.m.hc_n, d = c.info.d_model, nd = n * d;
  float* tmp = s.hc_tmp.data();
  for (int64_t t = 0; t < T; ++t) {
    float* X = s.streams.data() + t * nd;
    const float* R = s.hc_res.data() + t * n * n;
    const float* post = s.hc_post.data() + t * n;
    const float* yt = y + t * d;
    for (int64_t i = 0; i < n; ++i) {
      float* o = tmp + i * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < d; ++k) o[k] += R[i * n + j] * X[j * d + k];
      for (int64_t k = 0; k < d; ++k) o[k] += post[i] * yt[k];
    }
    std::copy(tmp, tmp + nd, X);
  }
}

// One batch of tokens through every layer; leaves the final hidden states in s.x.
void run_batch(Ctx& c, const int32_t* tokens, int64_t T) {
  ForwardScratch& s = c.s;
  const Model::Impl& m = c.m;
  const ModelInfo& I = c.info;
  const int64_t d = I.d_model, hd = I.head_dim, ffn = I.ffn_hidden;
  const int64_t kv_dim = int64_t(I.n_kv_heads) * hd, ldq = d + 2 * kv_dim;
  const float eps = I.norm_eps;
  // pos[t]: row t's position in its own sequence.
  int32_t pos[kMaxBatch];
  KvCache* cache[kMaxBatch];
  for (int64_t i = 0; i < c.n_segs; ++i)
    for (int64_t r = 0; r < c.segs[i].rows; ++r) {
      pos[c.segs[i].row0 + r] = c.segs[i].kv->n_cached + int32_t(r);
      cache[c.segs[i].row0 + r] = c.segs[i].kv;
    }

  for (int64_t t = 0; t < T; ++t) dense_row(m.embd, tokens[t], s.x.data() + t * d);
  // cos | sin rows for each position: angle = pos * theta^(-2i/hd) in float32, as torch.
  for (int64_t t = 0; t < T; ++t) {
    float* cs = s.rope.data() + t * hd;
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float a = float(pos[t]) * m.inv_freq[size_t(i)];
      cs[i] = float(std::cos(double(a)));
      cs[hd / 2 + i] = float(std::sin(double(a)));
    }
  }

  const int64_t n_hc = m.hc_n;
  for (int64_t t = 0; t < T && n_hc; ++t)  // every stream starts as the embedding
    for (int64_t i = 0; i < n_hc; ++i)
      std::copy(s.x.data() + t * d, s.x.data() + (t + 1) * d,
                s.streams.data() + (t * n_hc + i) * d);
  // The residual update of a sub-layer's output: plain, or mixed into the mHC streams.
  auto residual = [&](const float* y) {
    if (n_hc) {
      hc_out(c, y, T);
    } else {
      for (int64_t i = 0; i < T * d; ++i) s.x[size_t(i)] += y[i];
    }
  };

  for (int64_t l = 0; l < I.n_layers; ++l) {
    const LayerWeights& L = m.layers[size_t(l)];
    // ---- attention ----
    if (n_hc) hc_in(c, L.hc[0], T);
    rmsnorm(s.x.data(), L.attn_norm, T, d, eps, s.xn.data());
    quantize(c, T, d);
    float* q = s.qkv.data();
    const MatOut qkv[3] = {{&L.q, q}, {&L.k, q + d}, {&L.v, q + d + kv_dim}};
    matmul(c, qkv, T, ldq);
    for (int64_t t = 0; t < T; ++t) {
      float* row = q + t * ldq;
      rope(row, I.n_heads, hd, s.rope.data() + t * hd);
      rope(row + d, I.n_kv_heads, hd, s.rope.data() + t * hd);
      KvCache& kv = *cache[t];
      const int64_t slot = pos[t] % kv.slots[size_t(l)];
      for (int64_t h = 0; h < I.n_kv_heads; ++h) {
        std::copy(row + d + h * hd, row + d + (h + 1) * hd, kv.k_cache(l, h) + slot * hd);
        std::copy(row + d + kv_dim + h * hd, row + d + kv_dim + (h + 1) * hd,
                  kv.v_cache(l, h) + slot * hd);
      }
    }
    attention(c, l);
    rmsnorm(s.att.data(), L.attn_sub_norm, T, d, eps, s.xn.data());
    quantize(c, T, d);
    const MatOut o[1] = {{&L.o, s.proj.data()}};
    matmul(c, o, T, d);
    residual(s.proj.data());

    // ---- feed-forward ----
    if (n_hc) hc_in(c, L.hc[1], T);
    rmsnorm(s.x.data(), L.ffn_norm, T, d, eps, s.xn.data());
    quantize(c, T, d);
    if (L.moe) {
      moe_ffn(c, L, T);
      residual(s.moe_y.data());
    } else {
      ffn_block(c, L.gate, L.up, L.ffn_sub_norm, L.down, T, ffn);
      residual(s.proj.data());
    }
  }
  for (int64_t t = 0; t < T && n_hc; ++t) {  // collapse: the streams' mean
    float* x = s.x.data() + t * d;
    std::fill(x, x + d, 0.0f);
    for (int64_t i = 0; i < n_hc; ++i)
      for (int64_t j = 0; j < d; ++j) x[j] += s.streams[size_t((t * n_hc + i) * d + j)];
    for (int64_t j = 0; j < d; ++j) x[j] /= float(n_hc);
  }
  for (int64_t i = 0; i < c.n_segs; ++i) {
    KvCache& kv = *c.segs[i].kv;
    kv.n_cached += int32_t(c.segs[i].rows);
    if (m.window) {  // the rings now hold at most their last `slots` positions
      int64_t ring = kv.n_ctx;
      for (int64_t l = 0; l < I.n_layers; ++l)
        if (m.layers[size_t(l)].sliding) ring = std::min(ring, kv.slots[size_t(l)]);
      kv.ring_lo = std::max<int32_t>(kv.ring_lo, int32_t(kv.n_cached - ring));
    }
  }
}

// logits (tokens x vocab) of the normed final hidden states in s.xn: one pass over the
// head for all of them.
void head_normed(Ctx& c, int64_t tokens, float* logits) {
  ForwardScratch& s = c.s;
  const Model::Impl& m = c.m;
  PartTimer timer(s.times.head);
  const DenseActs& a = s.head_act.prepare(m.embd.type, s.xn.data(), tokens, c.info.d_model);
  dense_gemm(m.embd, a, logits, m.embd.rows);
}

// logits (tokens x vocab) of the final hidden states s.x[first .. first + tokens).
void head(Ctx& c, int64_t first, int64_t tokens, float* logits) {
  ForwardScratch& s = c.s;
  const int64_t d = c.info.d_model;
  rmsnorm(s.x.data() + first * d, c.m.output_norm, tokens, d, c.info.norm_eps, s.xn.data());
  head_normed(c, tokens, logits);
}

}  // namespace

void forward(SessionState& s, const int32_t* tokens, int64_t n, LogitsMode mode, float* logits) {
  BatchSegment seg{&s, 0, 0};
  Ctx c{s, s.m, s.m.info, dense_kernels(), gemm_kernel(active_isa()), num_threads(), &seg, 1};
  const int64_t vocab = s.m.info.vocab_size;
  if (s.n_cached == 0) s.ring_lo = 0;  // a fresh start reads no earlier key
  s.check_start(s.n_cached, "forward");
  for (int64_t c0 = 0; c0 < n; c0 += kMaxBatch) {
    const int64_t T = std::min(kMaxBatch, n - c0);
    seg.rows = T;
    run_batch(c, tokens + c0, T);
    if (mode == LogitsMode::all) head(c, 0, T, logits + c0 * vocab);
    if (mode == LogitsMode::last && c0 + T == n) head(c, T - 1, 1, logits);
  }
}

void forward_batch(ForwardScratch& s, const Model::Impl& m, const int32_t* tokens, int64_t n,
                   const BatchSegment* segs, int64_t n_segs, const int64_t* logit_rows,
                   int64_t n_logits, float* logits) {
  if (n < 1 || n > kMaxBatch || n_segs < 1 || n_logits < 0 || n_logits > n)
    throw Error("forward_batch: " + std::to_string(n) + " rows in " + std::to_string(n_segs) +
                " segments with " + std::to_string(n_logits) + " logit rows (rows must be in [1, " +
                std::to_string(kMaxBatch) + "])");
  int64_t next = 0;
  for (int64_t i = 0; i < n_segs; ++i) {
    const BatchSegment& g = segs[i];
    if (g.row0 != next || g.rows < 1 || g.kv->n_cached + g.rows > g.kv->n_ctx)
      throw Error("forward_batch: segment " + std::to_string(i) +
                  " does not continue the rows in order or overflows its cache");
    next += g.rows;
    if (g.kv->n_cached == 0) g.kv->ring_lo = 0;
    g.kv->check_start(g.kv->n_cached, "forward_batch");
  }
  if (next != n) throw Error("forward_batch: the segments do not cover the rows");
  for (int64_t i = 0; i < n_logits; ++i)
    if (logit_rows[i] < 0 || logit_rows[i] >= n)
      throw Error("forward_batch: logit row " + std::to_string(logit_rows[i]) + " out of range");
  Ctx c{s, m, m.info, dense_kernels(), gemm_kernel(active_isa()), num_threads(), segs, n_segs};
  run_batch(c, tokens, n);
  const int64_t d = m.info.d_model;
  for (int64_t i = 0; i < n_logits; ++i)
    rmsnorm(s.x.data() + logit_rows[i] * d, m.output_norm, 1, d, m.info.norm_eps,
            s.xn.data() + i * d);
  if (n_logits > 0) head_normed(c, n_logits, logits);
}

}  // namespace nanochat
