// The engine's internals behind nanochat.hpp: the loaded model (Model::Impl, model.cpp),
// a session's KV cache and scratch (SessionState), and the forward pass (forward.cpp).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/large_buffer.h"
#include "dense/dense.h"
#include "engine/tokenizer.h"
#include "gguf/gguf.h"
#include "nanochat/nanochat.hpp"

namespace nanochat {

enum class Activation { silu, relu2 };

// One ternary matrix as TK2 tiles (ternary.h; rows = out_features, cols = in_features),
// inside Model::Impl::ternary; every block's scale is `scale`.
struct TernaryWeight {
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  float scale = 0.0f;
};

// Sinkhorn iterations an mHC model may ask for (each token runs them in every sub-layer).
constexpr int64_t kMaxSinkhornIterations = 1000;

// Every pointer below points into memory the model owns (Model::Impl): nothing points into
// the GGUF file, whose mapping is closed when load_model returns.
struct LayerWeights {
  const float* attn_norm = nullptr;  // d_model
  const float* attn_sub_norm = nullptr;
  const float* ffn_norm = nullptr;
  const float* ffn_sub_norm = nullptr;  // ffn_hidden
  TernaryWeight q, k, v, o, gate, up, down;
  bool sliding = false;  // sliding-window attention (Model::Impl::window keys), else full
  // Mixture of experts in place of gate/up/ffn_sub_norm/down (nanochat/model/moe.py).
  bool moe = false;
  const float* router = nullptr;        // ffn_gate_inp: n_experts x d_model, f32
  const float* expert_bias = nullptr;   // exp_probs_b: n_experts, selection only
  const float* exp_sub_norm = nullptr;  // n_experts x expert_hidden
  std::vector<TernaryWeight> exp_gate, exp_up, exp_down;  // per expert, own scale
  bool shared = false;                  // the always-on shared expert below
  const float* sh_sub_norm = nullptr;   // expert_hidden
  TernaryWeight sh_gate, sh_up, sh_down;
  // mHC coefficients of the attention [0] and FFN [1] sub-layers (nanochat/model/mhc.py).
  struct Hc {
    const float* pre = nullptr;    // n static logits of H_pre
    const float* post = nullptr;   // n, of H_post
    const float* res = nullptr;    // n*n (sinkhorn) or n! (lite) logits of H_res
    const float* fn = nullptr;     // dynamic: (2n + n_res) x (n*d_model) projection phi
    const float* alpha = nullptr;  // dynamic: gates of pre, post, res
  } hc[2];
};

struct Model::Impl {
  ModelInfo info;
  Activation activation = Activation::silu;
  std::unique_ptr<BpeTokenizer> tokenizer;
  // Every ternary matrix as TK2 tiles, 64-byte aligned, in the order a decode step reads them
  // (layer by layer: q, k, v, o, gate, up, down), so one token streams one buffer.
  LargeBuffer ternary;
  std::vector<LayerWeights> layers;
  const float* output_norm = nullptr;
  // Every F32 tensor the forward pass reads (norms, router and bias, mHC coefficients),
  // copied out of the file at load; norms read between two matrices are copied again
  // behind the first (see `ternary`).
  std::vector<std::vector<float>> f32_tensors;
  // token_embd: the embedding and the tied LM head, copied into 2 MiB pages (F32/F16)
  // or repacked to Q8R (Q8_0): the head streams it once per decoded token.
  DenseMatrix embd;
  LargeBuffer embd_data;
  LargeBuffer embd_scales;
  std::vector<float> inv_freq;  // head_dim/2 RoPE frequencies theta^(-2i/head_dim)
  int32_t window = 0;           // keys a sliding layer's query sees (0: no sliding layer)
  int32_t n_experts = 0, n_experts_used = 0, expert_hidden = 0;  // 0: no MoE layer
  bool expert_weights_norm = false;  // top-k gates divided by their sum
  // mHC: n residual streams (0: the plain residual), H_res by Sinkhorn or "lite".
  int32_t hc_n = 0, hc_iters = 0, hc_n_res = 0;
  bool hc_dynamic = false, hc_lite = false;
  std::vector<int32_t> hc_perms;  // lite: n! permutations x n, lexicographic (identity first)
};

// Loads and validates `path` (model.cpp). Errors name the file and the key/tensor.
std::unique_ptr<Model::Impl> load_model(const std::string& path);

// Tokens a forward pass runs per batch (prefill GEMMs are this wide at most).
constexpr int64_t kMaxBatch = 128;

// Seconds forward() has spent in each part, summed over every call (generate() reports the
// decode steps' share: GenerateResult::decode_*_seconds).
struct PartTimes {
  double ternary = 0.0, head = 0.0, attention = 0.0;
};

// One sequence's KV cache. A Session holds one (SessionState); a Scheduler one per
// sequence, sized to the sequence's prompt + max_tokens.
struct KvCache {
  // fault_in: touch every page now (a session's first token would otherwise zero the
  // whole cache inside the first eval's timing); a scheduler's sequences skip it, since
  // admission runs between other sequences' decode steps.
  KvCache(const Model::Impl& m, int32_t n_ctx, bool fault_in = true);
  // Bytes a cache of n_ctx positions over `m` allocates.
  static int64_t bytes(const Model::Impl& m, int32_t n_ctx);
  const Model::Impl& m;
  int32_t n_ctx;
  int32_t n_cached = 0;  // positions in the KV cache
  // f32, per layer: K [kv_head][slot][head_dim], then V the same. A full layer
  // has n_ctx slots (slot = position); a sliding layer a ring of min(n_ctx, window +
  // kMaxBatch) slots (slot = position mod slots): a batch writes its keys before it
  // attends, so the ring must hold the window - 1 keys behind the batch's first query
  // plus the batch; one more slot lets truncate rewind kMaxBatch tokens (the kept last
  // token is run again, reading the window - 1 keys before it).
  LargeBuffer kv;
  std::vector<int64_t> slots;      // per layer
  std::vector<size_t> layer_off;   // per layer: first float of its K
  int32_t ring_lo = 0;  // lowest position every ring still holds (valid: ring_lo..n_cached)
  float* k_cache(int64_t layer, int64_t kv_head);
  float* v_cache(int64_t layer, int64_t kv_head);
  // Throws unless a forward pass may start at position `pos` (the sliding layers' rings
  // still hold the window before it); truncate(n) reruns position n - 1.
  void check_start(int32_t pos, const char* what) const;
};

// Every scratch buffer a forward pass of up to kMaxBatch rows needs, sized once.
struct ForwardScratch {
  explicit ForwardScratch(const Model::Impl& m);
  PartTimes times;
  std::vector<float> x;         // residual stream, B x d
  std::vector<float> xn;        // normed input of a matmul, B x max(d, ffn)
  std::vector<float> qkv;       // B x (d + 2 * kv_dim)
  std::vector<float> att;       // attention output, B x d
  std::vector<float> gu;        // gate | up, B x 2 * ffn
  std::vector<float> h;         // act(gate) * up, B x ffn
  std::vector<float> proj;      // attn_output / ffn_down output, B x d
  std::vector<float> rope;      // cos | sin per token, B x head_dim
  std::vector<int8_t> q8;       // quantized activations, B x max(d, ffn)
  std::vector<float> q8_scale;  // B
  std::vector<int32_t> q8_sum;  // B
  DenseActBuffer head_act;
  // MoE (sized only when the model has experts): the FFN input's int8 rows kept while
  // experts overwrite q8, router scores, each token's picks, tokens grouped by expert.
  std::vector<int8_t> moe_q8;         // B x d
  std::vector<float> moe_q8_scale;    // B
  std::vector<int32_t> moe_q8_sum;    // B
  std::vector<float> moe_scores;      // B x n_experts
  std::vector<int32_t> moe_pick;      // B x k: expert
  std::vector<float> moe_gate;        // B x k: gate weight
  std::vector<int32_t> moe_count;     // n_experts + 1: start of each expert's rows
  std::vector<int32_t> moe_rows;      // B x k: pick index (token * k + slot), by expert
  std::vector<float> moe_y;           // B x d: the FFN output
  // mHC (sized only with streams): the n residual streams, per-token coefficients.
  std::vector<float> streams;         // B x n x d
  std::vector<float> hc_pre, hc_post; // B x n
  std::vector<float> hc_res;          // B x n x n
  std::vector<float> hc_tmp;          // max(n x d, 2n + n_res): one token's scratch
};

// A session's KV cache and its scratch.
struct SessionState : KvCache, ForwardScratch {
  SessionState(const Model::Impl& m, int32_t n_ctx) : KvCache(m, n_ctx), ForwardScratch(m) {}
};

// The text side of generate(): appends each token's bytes and says what may be streamed.
// Held back: an unfinished UTF-8 sequence at the end, and a suffix that could still grow
// into a stop string. A completed stop string cuts the text where it starts.
class TextStream {
 public:
  explicit TextStream(std::vector<std::string> stops);  // throws on an empty stop string
  // Appends bytes; returns the piece that may be emitted now (all of the rest when a stop
  // string completed: then stopped() is true and text() ends before the stop string).
  std::string push(const std::string& bytes);
  bool stopped() const { return stopped_; }
  std::string flush();  // everything still held back (generation is over)
  const std::string& text() const { return text_; }

 private:
  size_t safe_end() const;
  std::vector<std::string> stops_;
  std::string text_;
  size_t emitted_ = 0;
  bool stopped_ = false;
};

enum class LogitsMode { none, last, all };
// Runs tokens at positions n_cached .. n_cached+n-1 (ids already checked, and they fit
// n_ctx) and advances n_cached. logits: vocab floats (last) or n x vocab (all).
void forward(SessionState& s, const int32_t* tokens, int64_t n, LogitsMode mode, float* logits);

// Rows [row0, row0 + rows) of a batch continue the sequence whose cache is `kv`, at
// positions kv->n_cached ..
struct BatchSegment {
  KvCache* kv;
  int64_t row0, rows;
};
// One forward pass over rows of several sequences (continuous batching): tokens[0 .. n)
// with n <= kMaxBatch, split into segments that cover the rows in order, each with its
// own cache (ids already checked; each segment fits its cache). Every row runs the same
// arithmetic as in forward() (the matrices are row-wise), so a sequence gets the logits
// it would get alone. Advances every cache's n_cached. logits: n_logits x vocab, the
// rows logit_rows[0 .. n_logits).
void forward_batch(ForwardScratch& s, const Model::Impl& m, const int32_t* tokens, int64_t n,
                   const BatchSegment* segs, int64_t n_segs, const int64_t* logit_rows,
                   int64_t n_logits, float* logits);

}  // namespace nanochat
