// Model loading: GGUF metadata and tensors (the layout docs/gguf.md describes) ->
// validated hyperparameters, TK2 ternary matrices, the dense embedding / tied head and the
// tokenizer. Every error names the file and the key or tensor at fault.
#include "engine/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "ternary/ternary.h"

namespace nanochat {

namespace {

std::string dims_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

class Loader {
 public:
  explicit Loader(const gguf::GgufFile& f) : f_(f) {}

  [[noreturn]] void fail(const std::string& what) const { throw Error(f_.path() + ": " + what); }

  // An integer hyperparameter in [lo, hi].
  int64_t hparam(const std::string& key, int64_t lo, int64_t hi) const {
    const int64_t v = f_.get_i64(key);
    if (v < lo || v > hi)
      fail("metadata '" + key + "' = " + std::to_string(v) + " is out of range [" +
           std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v;
  }
  int64_t hparam_or(const std::string& key, int64_t def, int64_t lo, int64_t hi) const {
    return f_.has(key) ? hparam(key, lo, hi) : def;
  }
  // A copy of an F32 tensor, kept in `store` (the model's), refused when any value is NaN
  // or infinite: a bad norm or router weight would only show as garbage at generate time.
  // The model keeps no pointer into the file, whose mapping closes after load.
  const float* owned_f32(const gguf::TensorInfo& t, std::vector<std::vector<float>>& store) const {
    const int64_t n = t.nbytes / int64_t(sizeof(float));
    std::vector<float> v(static_cast<size_t>(n));
    std::memcpy(v.data(), t.data, size_t(t.nbytes));
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(v[size_t(i)]))
        fail("tensor '" + t.name + "': value " + std::to_string(i) + " is not finite (" +
             std::to_string(v[size_t(i)]) + ")");
    store.push_back(std::move(v));
    return store.back().data();
  }
  float positive_float(const std::string& key) const {
    const float v = f_.get_f32(key);
    if (!std::isfinite(v) || v <= 0.0f)
      fail("metadata '" + key + "' = " + std::to_string(v) + " must be a finite number > 0");
    return v;
  }

  // A tensor that must exist with these dims (GGUF order) and one of these types.
  const gguf::TensorInfo& tensor(const std::string& name, const std::vector<int64_t>& dims,
                                 std::initializer_list<gguf::GgmlType> types) {
    const gguf::TensorInfo* t = f_.find_tensor(name);
    if (!t) fail("missing tensor '" + name + "'");
    used_.insert(name);
    if (t->dims != dims)
      fail("tensor '" + name + "' has dims " + dims_str(t->dims) + ", expected " + dims_str(dims));
    bool ok = false;
    std::string names;
    for (gguf::GgmlType ty : types) {
      ok = ok || t->type == uint32_t(ty);
      names += std::string(names.empty() ? "" : " or ") + gguf::type_traits(uint32_t(ty)).name;
    }
    if (!ok)
      fail("tensor '" + name + "' has type " + gguf::type_traits(t->type).name + ", expected " +
           names);
    return *t;
  }

  // Every tensor in the file must be one the engine reads: anything else (an untied
  // output.weight, llama.cpp's optional .scale tensors, extensions) would change the
  // model's meaning if silently ignored.
  void check_no_extra_tensors() const {
    for (const gguf::TensorInfo& t : f_.tensors())
      if (!used_.count(t.name))
        fail("unexpected tensor '" + t.name + "' (not part of the " +
             "bitnet graph this engine runs)");
  }

 private:
  const gguf::GgufFile& f_;
  std::set<std::string> used_;
};

// TQ2_0 / TQ1_0 -> TK2 tiles (ternary.h) with one per-tensor scale. Unpacking rejects
// TQ2_0's invalid code 3; TQ1_0 decodes any byte to valid trits, so a byte the packer
// cannot produce (corrupt data) is caught by re-packing each block and comparing.
// `t` may be one expert's slice of a stacked tensor: then its data and name are the slice's.
float load_ternary(const Loader& ld, const gguf::TensorInfo& t, int64_t rows, int64_t cols,
                   uint8_t* out, std::vector<int8_t>& codes, std::vector<float>& scales,
                   std::vector<uint8_t>& tk2) {
  codes.resize(size_t(rows * cols));
  scales.resize(size_t(rows * cols / QK));
  if (t.type == uint32_t(gguf::GgmlType::I2_S)) {  // bitnet.cpp: one scale for the tensor
    float scale = 0.0f;
    try {
      scale = i2_s_unpack(t.data, rows, cols, codes.data());
    } catch (const Error& e) {
      ld.fail("tensor '" + t.name + "': " + e.what());
    }
    tk2.resize(size_t(rows * tk2_row_bytes(cols)));
    tk2_pack(codes.data(), rows, cols, tk2.data());
    tk2_tile(tk2.data(), rows, cols, out);
    return scale;
  }
  const bool tq2 = t.type == uint32_t(gguf::GgmlType::TQ2_0);
  try {
    if (tq2)
      tq2_0_unpack(t.data, rows, cols, codes.data(), scales.data());
    else
      tq1_0_unpack(t.data, rows, cols, codes.data(), scales.data());
  } catch (const Error& e) {
    ld.fail("tensor '" + t.name + "': " + e.what());
  }
  const int64_t nblocks = rows * cols / QK;
  if (!tq2) {
    uint8_t block[TQ1_0_BLOCK_BYTES];
    for (int64_t b = 0; b < nblocks; ++b) {
      tq1_0_pack(codes.data() + b * QK, 1, QK, 1.0f, block);
      if (std::memcmp(block, t.data + b * TQ1_0_BLOCK_BYTES, TQ1_0_BLOCK_BYTES - 2) != 0)
        ld.fail("tensor '" + t.name + "': TQ1_0 block " + std::to_string(b) +
                " holds a byte that is not a valid base-3 code (corrupt data)");
    }
  }
  float common = 0.0f;
  int64_t first = -1;
  for (int64_t b = 0; b < nblocks; ++b) {
    const float d = scales[size_t(b)];
    if (!std::isfinite(d))
      ld.fail("tensor '" + t.name + "': block " + std::to_string(b) + " has a non-finite scale");
    if (d == 0.0f) {  // ggml reads a d = 0 block as zeros, whatever its codes say
      std::fill(codes.begin() + b * QK, codes.begin() + (b + 1) * QK, int8_t(0));
    } else if (first < 0) {
      first = b;
      common = d;
    } else if (d != common) {
      ld.fail("tensor '" + t.name + "': block " + std::to_string(b) + " has scale " +
              std::to_string(d) + " but block " + std::to_string(first) + " has " +
              std::to_string(common) +
              "; the engine needs one scale per tensor (a BitNet absmean export)");
    }
  }
  tk2.resize(size_t(rows * tk2_row_bytes(cols)));
  tk2_pack(codes.data(), rows, cols, tk2.data());
  tk2_tile(tk2.data(), rows, cols, out);
  return common;
}

}  // namespace

std::unique_ptr<Model::Impl> load_model(const std::string& path) {
  auto m = std::make_unique<Model::Impl>();
  // Local: the model copies what it reads, so the mapping closes when loading ends.
  const std::unique_ptr<gguf::GgufFile> file = gguf::GgufFile::open(path);
  const gguf::GgufFile& f = *file;
  Loader ld(f);
  ModelInfo& info = m->info;
  info.path = path;

  // ---- hyperparameters ----
  // bitnet: llama.cpp's graph; bitnet-b1.58: bitnet.cpp's (the same graph with squared-ReLU
  // FFNs and I2_S matrices, BitNet b1.58 2B4T's official files); nanochat: ours.
  const std::string arch = f.get_string("general.architecture");
  if (arch != "bitnet" && arch != "bitnet-b1.58" && arch != "nanochat")
    ld.fail("general.architecture '" + arch +
            "' is not supported (expected bitnet, bitnet-b1.58 or nanochat)");
  info.architecture = arch;
  info.name = f.has("general.name") ? f.get_string("general.name") : "";
  const std::string p = arch + ".";
  info.d_model = int32_t(ld.hparam(p + "embedding_length", 1, 1 << 16));
  info.n_layers = int32_t(ld.hparam(p + "block_count", 1, 4096));
  info.ffn_hidden = int32_t(ld.hparam(p + "feed_forward_length", 1, 1 << 18));
  info.n_heads = int32_t(ld.hparam(p + "attention.head_count", 1, 4096));
  info.n_kv_heads =
      int32_t(ld.hparam_or(p + "attention.head_count_kv", info.n_heads, 1, info.n_heads));
  info.context_length = int32_t(ld.hparam(p + "context_length", 1, 1 << 24));
  info.head_dim =
      int32_t(ld.hparam_or(p + "rope.dimension_count", info.d_model / info.n_heads, 1, 1 << 16));
  info.rope_theta = f.has(p + "rope.freq_base") ? ld.positive_float(p + "rope.freq_base")
                                                : 10000.0f;  // llama.cpp's default
  info.norm_eps = ld.positive_float(p + "attention.layer_norm_rms_epsilon");
  if (arch == "nanochat") {
    info.activation = f.get_string("nanochat.ffn_activation");
    if (info.activation != "silu" && info.activation != "relu2")
      ld.fail("metadata 'nanochat.ffn_activation' = '" + info.activation +
              "' (expected silu or relu2)");
  } else if (arch == "bitnet-b1.58") {
    info.activation = "relu2";  // bitnet.cpp's build_bitnet_158: LLM_FFN_RELU_SQR
  } else {
    // llama.cpp's bitnet graph runs SiLU; newer writers state a squared ReLU in this key.
    info.activation = f.has("bitnet.hidden_activation")
                          ? f.get_string("bitnet.hidden_activation")
                          : std::string("silu");
    if (info.activation != "silu" && info.activation != "relu2")
      ld.fail("metadata 'bitnet.hidden_activation' = '" + info.activation +
              "' (expected silu or relu2)");
  }
  m->activation = info.activation == "silu" ? Activation::silu : Activation::relu2;

  const int64_t d = info.d_model, hd = info.head_dim, ffn = info.ffn_hidden;
  if (info.n_heads % info.n_kv_heads != 0)
    ld.fail("attention.head_count (" + std::to_string(info.n_heads) +
            ") is not a multiple of attention.head_count_kv (" + std::to_string(info.n_kv_heads) +
            ")");
  if (int64_t(info.n_heads) * hd != d)
    ld.fail("attention.head_count (" + std::to_string(info.n_heads) + ") x head dim (" +
            std::to_string(hd) + ") != embedding_length (" + std::to_string(d) +
            "); rope.dimension_count must be the whole head");
  if (hd % 2 != 0) ld.fail("head dim " + std::to_string(hd) + " is odd (RoPE rotates pairs)");
  if (d % QK != 0 || ffn % QK != 0)
    ld.fail("embedding_length (" + std::to_string(d) + ") and feed_forward_length (" +
            std::to_string(ffn) + ") must be multiples of 256 (ternary block rows)");
  const int64_t kv_dim = int64_t(info.n_kv_heads) * hd;  // rows of attn_k/v: any count

  // ---- sliding-window attention (docs/gguf.md) ----
  m->layers.resize(size_t(info.n_layers));
  const std::string swa = "nanochat.attention.sliding_window";
  if (arch == "nanochat" && (f.has(swa) || f.has(swa + "_pattern"))) {
    if (!f.has(swa) || !f.has(swa + "_pattern"))
      ld.fail("metadata '" + swa + "' and '" + swa + "_pattern' must come together");
    if (f.get(swa + "_pattern").type_name() != "array[bool]")
      ld.fail("metadata '" + swa + "_pattern' is " + f.get(swa + "_pattern").type_name() +
              ", expected array[bool]");
    const std::vector<int64_t> pat = f.get_int_array(swa + "_pattern");
    if (int64_t(pat.size()) != info.n_layers)
      ld.fail("metadata '" + swa + "_pattern' has " + std::to_string(pat.size()) +
              " entries, expected block_count = " + std::to_string(info.n_layers));
    m->window = int32_t(ld.hparam(swa, 1, 1 << 30));  // >= context: full in effect
    for (int64_t l = 0; l < info.n_layers; ++l) {
      if (pat[size_t(l)] != 0 && pat[size_t(l)] != 1)
        ld.fail("metadata '" + swa + "_pattern'[" + std::to_string(l) + "] is not a bool");
      m->layers[size_t(l)].sliding = pat[size_t(l)] == 1;
      info.n_sliding_layers += pat[size_t(l)] == 1;
    }
    if (info.n_sliding_layers == 0) m->window = 0;  // nothing slides
    info.sliding_window = m->window;
  }

  // ---- tokenizer and vocabulary ----
  m->tokenizer = std::make_unique<BpeTokenizer>(BpeTokenizer::from_gguf(f));
  const int64_t vocab = m->tokenizer->vocab_size();
  if (vocab < 1) ld.fail("tokenizer.ggml.tokens is empty");
  if (f.has(p + "vocab_size") && ld.hparam(p + "vocab_size", 1, INT32_MAX) != vocab)
    ld.fail("metadata '" + p + "vocab_size' (" + std::to_string(f.get_i64(p + "vocab_size")) +
            ") != the tokenizer's " + std::to_string(vocab) + " tokens");
  info.vocab_size = int32_t(vocab);
  auto special = [&](const std::string& key) -> int32_t {
    if (!f.has(key)) return -1;
    return int32_t(ld.hparam(key, 0, vocab - 1));
  };
  info.bos_id = special("tokenizer.ggml.bos_token_id");
  info.eos_id = special("tokenizer.ggml.eos_token_id");
  info.eot_id = special("tokenizer.ggml.eot_token_id");
  info.add_bos =
      f.has("tokenizer.ggml.add_bos_token") && f.get_bool("tokenizer.ggml.add_bos_token");
  if (info.add_bos && info.bos_id < 0)
    ld.fail("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing");

  // ---- mixture of experts (docs/gguf.md) ----
  int64_t n_dense = info.n_layers;  // leading blocks with the dense FFN
  const int64_t n_exp = arch == "nanochat" ? ld.hparam_or("nanochat.expert_count", 0, 0, 1024) : 0;
  if (arch == "nanochat" && !n_exp) {
    for (const char* k : {"expert_used_count", "expert_feed_forward_length",
                          "expert_shared_count", "expert_gating_func", "expert_weights_norm",
                          "leading_dense_block_count"})
      if (f.has(std::string("nanochat.") + k))
        ld.fail("metadata 'nanochat." + std::string(k) +
                "' without 'nanochat.expert_count' (> 0)");
  }
  if (n_exp) {
    if (n_exp < 1) ld.fail("metadata 'nanochat.expert_count' must be >= 1");
    m->n_experts = int32_t(n_exp);
    m->n_experts_used = int32_t(ld.hparam("nanochat.expert_used_count", 1, n_exp));
    m->expert_hidden = int32_t(ld.hparam("nanochat.expert_feed_forward_length", 1, 1 << 18));
    if (m->expert_hidden % QK != 0)
      ld.fail("metadata 'nanochat.expert_feed_forward_length' (" +
              std::to_string(m->expert_hidden) + ") must be a multiple of 256");
    const int64_t shared = ld.hparam("nanochat.expert_shared_count", 0, 1);
    const std::string gating = f.get_string("nanochat.expert_gating_func");
    if (gating != "sigmoid")
      ld.fail("metadata 'nanochat.expert_gating_func' = '" + gating +
              "' (this engine runs sigmoid gating)");
    m->expert_weights_norm = f.get_bool("nanochat.expert_weights_norm");
    n_dense = ld.hparam("nanochat.leading_dense_block_count", 0, info.n_layers);
    for (int64_t l = n_dense; l < info.n_layers; ++l) {
      m->layers[size_t(l)].moe = true;
      m->layers[size_t(l)].shared = shared == 1;
    }
    info.n_experts = m->n_experts;
    info.n_experts_used = m->n_experts_used;
  }
  const int64_t eh = m->expert_hidden;

  // ---- mHC residual streams (docs/gguf.md) ----
  if (arch == "nanochat" && f.has("nanochat.hc.stream_count")) {
    const int64_t n = ld.hparam("nanochat.hc.stream_count", 1, 8);
    const std::string res = f.get_string("nanochat.hc.res_type");
    if (res != "sinkhorn" && res != "lite")
      ld.fail("metadata 'nanochat.hc.res_type' = '" + res + "' (expected sinkhorn or lite)");
    m->hc_lite = res == "lite";
    if (m->hc_lite && n > 5) ld.fail("metadata 'nanochat.hc.stream_count' > 5 with res lite");
    // Every token runs the iterations in every sub-layer: a large count is a cheap way to
    // make a file slow, and training uses ~20.
    m->hc_iters = int32_t(ld.hparam("nanochat.hc.sinkhorn_iterations", 0, kMaxSinkhornIterations));
    m->hc_dynamic = f.get_bool("nanochat.hc.dynamic");
    if (n > 1) {
      m->hc_n = int32_t(n);
      std::vector<int32_t> perm(static_cast<size_t>(n));
      for (int32_t i = 0; i < n; ++i) perm[size_t(i)] = i;
      do {  // lexicographic from the identity, as itertools.permutations(range(n))
        m->hc_perms.insert(m->hc_perms.end(), perm.begin(), perm.end());
      } while (m->hc_lite && std::next_permutation(perm.begin(), perm.end()));
      m->hc_n_res = m->hc_lite ? int32_t(m->hc_perms.size() / size_t(n)) : int32_t(n * n);
    }
  } else if (arch == "nanochat") {
    for (const char* k : {"sinkhorn_iterations", "dynamic", "res_type"})
      if (f.has(std::string("nanochat.hc.") + k))
        ld.fail("metadata 'nanochat.hc." + std::string(k) + "' without 'nanochat.hc.stream_count'");
  }
  info.hc_streams = m->hc_n ? m->hc_n : 1;

  // ---- tensors ----
  using T = gguf::GgmlType;
  const gguf::TensorInfo& embd =
      ld.tensor("token_embd.weight", {d, vocab}, {T::F16, T::Q8_0, T::F32});
  std::vector<std::vector<float>>& own = m->f32_tensors;
  m->output_norm = ld.owned_f32(ld.tensor("output_norm.weight", {d}, {T::F32}), own);

  struct Mat {
    gguf::TensorInfo t;  // for an expert: its slice (data, nbytes, name)
    TernaryWeight* w;
    // The norm vector a decode step reads next after this matrix (and before the next
    // matrix), copied right behind it (see "Ternary matrices" below); null if none.
    const float** norm_after = nullptr;
    int64_t norm_len = 0;
  };
  std::vector<Mat> mats;
  uint32_t ternary_type = 0;
  for (int64_t l = 0; l < info.n_layers; ++l) {
    LayerWeights& L = m->layers[size_t(l)];
    const std::string b = "blk." + std::to_string(l) + ".";
    auto norm = [&](const char* n, int64_t size) {
      return ld.owned_f32(ld.tensor(b + n, {size}, {T::F32}), own);
    };
    L.attn_norm = norm("attn_norm.weight", d);
    L.attn_sub_norm = norm("attn_sub_norm.weight", d);
    L.ffn_norm = norm("ffn_norm.weight", d);
    auto ternary_tensor = [&](const std::string& n, const std::vector<int64_t>& dims) {
      const gguf::TensorInfo& t = ld.tensor(b + n, dims, {T::TQ2_0, T::TQ1_0, T::I2_S});
      if (ternary_type == 0) ternary_type = t.type;
      if (t.type != ternary_type)
        ld.fail("tensor '" + t.name + "' is " + gguf::type_traits(t.type).name +
                " but earlier ternary tensors are " + gguf::type_traits(ternary_type).name);
      return &t;
    };
    auto mat = [&](const char* n, TernaryWeight& w, int64_t in, int64_t out) {
      w.rows = out;
      w.cols = in;
      mats.push_back({*ternary_tensor(n, {in, out}), &w});
    };
    auto then_norm = [&](const float** norm, int64_t len) {
      mats.back().norm_after = norm;
      mats.back().norm_len = len;
    };
    // after a plain layer's down matrix, decode reads this layer's attn_norm
    if (l > 0 && !m->layers[size_t(l - 1)].moe && !m->hc_n) then_norm(&L.attn_norm, d);
    mat("attn_q.weight", L.q, d, d);
    mat("attn_k.weight", L.k, d, kv_dim);
    mat("attn_v.weight", L.v, d, kv_dim);
    then_norm(&L.attn_sub_norm, d);
    mat("attn_output.weight", L.o, d, d);
    if (!m->hc_n) then_norm(&L.ffn_norm, d);  // mHC reads its coefficients in between
    if (m->hc_n) {
      const int64_t n = m->hc_n, nr = m->hc_n_res;
      auto f32 = [&](const std::string& nm, const std::vector<int64_t>& dims) {
        return ld.owned_f32(ld.tensor(b + nm, dims, {T::F32}), own);
      };
      const char* subs[2] = {"hc_attn_", "hc_ffn_"};
      for (int i = 0; i < 2; ++i) {
        LayerWeights::Hc& H = L.hc[i];
        const std::string sb = subs[i];
        H.pre = f32(sb + "pre.weight", {n});
        H.post = f32(sb + "post.weight", {n});
        H.res = f32(sb + "res.weight", m->hc_lite ? std::vector<int64_t>{nr}
                                                  : std::vector<int64_t>{n, n});
        if (m->hc_dynamic) {
          H.fn = f32(sb + "fn.weight", {n * d, 2 * n + nr});
          H.alpha = f32(sb + "alpha.weight", {3});
        }
      }
    }
    if (!L.moe) {
      L.ffn_sub_norm = norm("ffn_sub_norm.weight", ffn);
      mat("ffn_gate.weight", L.gate, d, ffn);
      mat("ffn_up.weight", L.up, d, ffn);
      then_norm(&L.ffn_sub_norm, ffn);
      mat("ffn_down.weight", L.down, ffn, d);
      if (l + 1 == info.n_layers && !m->hc_n) then_norm(&m->output_norm, d);
      continue;
    }
    // Stacked experts [in, out, E]: expert e is rows e*out .. of the (E*out, in) matrix,
    // whole blocks (in is a multiple of 256), so each loads as its own tensor and scale.
    const int64_t E = n_exp;
    auto f32 = [&](const std::string& n, const std::vector<int64_t>& dims) {
      return ld.owned_f32(ld.tensor(b + n, dims, {T::F32}), own);
    };
    L.router = f32("ffn_gate_inp.weight", {d, E});  // finite: a NaN score breaks the top-k
    L.expert_bias = f32("exp_probs_b.bias", {E});
    L.exp_sub_norm = f32("ffn_sub_norm_exps.weight", {eh, E});
    L.exp_gate.resize(size_t(E));
    L.exp_up.resize(size_t(E));
    L.exp_down.resize(size_t(E));
    auto experts = [&](const char* n, std::vector<TernaryWeight>& ws, int64_t in, int64_t out) {
      const gguf::TensorInfo* t = ternary_tensor(n, {in, out, E});
      const int64_t bytes = t->nbytes / E;  // whole rows of whole blocks per expert
      for (int64_t e = 0; e < E; ++e) {
        gguf::TensorInfo slice = *t;
        slice.name = t->name + "' expert '" + std::to_string(e);
        slice.data = t->data + e * bytes;
        slice.nbytes = bytes;
        slice.dims = {in, out};
        ws[size_t(e)].rows = out;
        ws[size_t(e)].cols = in;
        mats.push_back({slice, &ws[size_t(e)]});
      }
    };
    experts("ffn_gate_exps.weight", L.exp_gate, d, eh);
    experts("ffn_up_exps.weight", L.exp_up, d, eh);
    experts("ffn_down_exps.weight", L.exp_down, eh, d);
    if (L.shared) {
      L.sh_sub_norm = norm("ffn_sub_norm_shexp.weight", eh);
      mat("ffn_gate_shexp.weight", L.sh_gate, d, eh);
      mat("ffn_up_shexp.weight", L.sh_up, d, eh);
      mat("ffn_down_shexp.weight", L.sh_down, eh, d);
    }
  }
  // Multi-token-prediction heads (docs/gguf.md): blocks n_layers.. after the trunk, each
  // a regular block plus its nextn.* join. Plain decoding does not run them (they serve
  // speculative decoding later), so they are checked for name, shape and type, not loaded.
  const int64_t n_mtp =
      arch == "nanochat" ? ld.hparam_or("nanochat.nextn_predict_layers", 0, 0, 64) : 0;
  for (int64_t l = info.n_layers; l < info.n_layers + n_mtp; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    for (const char* n : {"attn_norm.weight", "attn_sub_norm.weight", "ffn_norm.weight",
                          "nextn.enorm.weight", "nextn.hnorm.weight",
                          "nextn.shared_head_norm.weight"})
      ld.tensor(b + n, {d}, {T::F32});
    ld.tensor(b + "ffn_sub_norm.weight", {ffn}, {T::F32});
    const std::pair<const char*, std::vector<int64_t>> mtp_mats[] = {
        {"attn_q.weight", {d, d}},        {"attn_k.weight", {d, kv_dim}},
        {"attn_v.weight", {d, kv_dim}},   {"attn_output.weight", {d, d}},
        {"ffn_gate.weight", {d, ffn}},    {"ffn_up.weight", {d, ffn}},
        {"ffn_down.weight", {ffn, d}},    {"nextn.eh_proj.weight", {2 * d, d}}};
    for (const auto& [n, dims] : mtp_mats) ld.tensor(b + n, dims, {T::TQ2_0, T::TQ1_0});
  }
  ld.check_no_extra_tensors();
  // An option this engine does not know could change the model's meaning: refuse it.
  if (arch == "nanochat") {
    static const std::set<std::string> known = {
        "vocab_size", "context_length", "embedding_length", "block_count",
        "feed_forward_length", "attention.head_count", "attention.head_count_kv",
        "rope.dimension_count", "rope.freq_base", "attention.layer_norm_rms_epsilon",
        "ffn_activation", "nextn_predict_layers", "attention.sliding_window",
        "attention.sliding_window_pattern", "expert_count", "expert_used_count",
        "expert_feed_forward_length", "expert_shared_count", "expert_gating_func",
        "expert_weights_norm", "leading_dense_block_count", "hc.stream_count",
        "hc.sinkhorn_iterations", "hc.dynamic", "hc.res_type"};
    for (const auto& kv : f.kvs())
      if (kv.first.rfind("nanochat.", 0) == 0 && !known.count(kv.first.substr(9)))
        ld.fail("unknown metadata key '" + kv.first + "' (an option this engine does not run)");
  }
  info.weight_type = gguf::type_traits(ternary_type).name;

  // Ternary matrices -> one buffer of TK2 tiles in decode order. Each RMSNorm weight vector
  // that decode reads between two matrices is copied in right behind the first: the
  // hardware prefetcher, streaming that matrix, runs on into it, so the norm finds its
  // weights in cache rather than in DRAM (the weight stream evicts them every token).
  // `total` counts the matrix bytes a token reads (a tile's padding rows are never read).
  auto norm_bytes = [](const Mat& x) { return (x.norm_len * 4 + 63) / 64 * 64; };
  int64_t total = 0, off = 0;
  for (const Mat& x : mats) {
    total += x.w->rows * tk2_row_bytes(x.w->cols);
    off += tk2_tiled_bytes(x.w->rows, x.w->cols) + norm_bytes(x);
  }
  m->ternary = LargeBuffer(size_t(off));
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<uint8_t> tk2;
  off = 0;
  for (const Mat& x : mats) {
    uint8_t* dst = m->ternary.data() + off;
    x.w->scale = load_ternary(ld, x.t, x.w->rows, x.w->cols, dst, codes, scales, tk2);
    x.w->data = dst;
    off += tk2_tiled_bytes(x.w->rows, x.w->cols);
    if (x.norm_after) {
      float* norm = reinterpret_cast<float*>(m->ternary.data() + off);
      std::memcpy(norm, *x.norm_after, size_t(x.norm_len) * sizeof(float));
      *x.norm_after = norm;
      off += norm_bytes(x);
    }
  }

  // Embedding / head.
  DenseMatrix& E = m->embd;
  E.rows = vocab;
  E.cols = d;
  if (embd.type == uint32_t(T::Q8_0)) {
    E.type = DenseType::Q8_0;
    m->embd_data = LargeBuffer(size_t(vocab * d));
    m->embd_scales = LargeBuffer(size_t(vocab * d / QK8_0) * sizeof(uint16_t));
    uint16_t* sc = reinterpret_cast<uint16_t*>(m->embd_scales.data());
    q8_0_repack(embd.data, vocab, d, m->embd_data.data(), d, sc, d / QK8_0);
    for (int64_t i = 0; i < vocab * d / QK8_0; ++i)
      if (!std::isfinite(fp16_to_fp32(sc[i])))
        ld.fail("tensor 'token_embd.weight': Q8_0 block " + std::to_string(i) +
                " has a non-finite scale");
    E.scales = sc;
  } else {
    E.type = embd.type == uint32_t(T::F16) ? DenseType::F16 : DenseType::F32;
    m->embd_data = LargeBuffer(size_t(embd.nbytes));
    std::memcpy(m->embd_data.data(), embd.data, size_t(embd.nbytes));
    const int64_t n = vocab * d;
    if (E.type == DenseType::F16) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(m->embd_data.data());
      for (int64_t i = 0; i < n; ++i)
        if ((h[i] & 0x7c00) == 0x7c00)  // exponent all ones: inf or NaN
          ld.fail("tensor 'token_embd.weight': value " + std::to_string(i) + " (token " +
                  std::to_string(i / d) + ") is not finite");
    } else {
      const float* x = reinterpret_cast<const float*>(m->embd_data.data());
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(x[i]))
          ld.fail("tensor 'token_embd.weight': value " + std::to_string(i) + " (token " +
                  std::to_string(i / d) + ") is not finite");
    }
  }
  E.data = m->embd_data.data();
  info.embd_type = dense_type_name(E.type);

  // Sizes: every weight in the file; bytes one decode step reads (TK2 + head + norms).
  info.n_params = 0;
  for (const gguf::TensorInfo& t : f.tensors()) {
    int64_t n = 1;
    for (int64_t x : t.dims) n *= x;
    info.n_params += n;
  }
  info.ternary_bytes = total;
  for (const LayerWeights& L : m->layers)  // a token reads only its top-k experts
    if (L.moe)
      info.ternary_bytes -= (n_exp - m->n_experts_used) *
                            (2 * eh * tk2_row_bytes(d) + d * tk2_row_bytes(eh));
  info.head_bytes = embd.nbytes;
  info.weight_bytes = info.ternary_bytes + info.head_bytes +
                      int64_t(sizeof(float)) * (d + info.n_layers * (3 * d + ffn));

  m->inv_freq.resize(size_t(hd / 2));
  for (int64_t i = 0; i < hd / 2; ++i) {
    // As torch: the exponent -(2i)/hd in float32, then theta ** exponent.
    const float e = -float(2 * i) / float(hd);
    m->inv_freq[size_t(i)] = float(std::pow(double(info.rope_theta), double(e)));
  }
  return m;
}

}  // namespace nanochat
