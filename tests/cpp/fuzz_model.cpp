// Mutation fuzzing of the model loader: writes small valid seed models (tokenizer
// included) — a dense bitnet one and two nanochat ones that between them exercise MoE
// experts, mHC residual streams, sliding-window attention and MTP heads — then loads
// thousands of mutants — byte flips, "interesting" integers over header and metadata
// fields, truncations, splices — through the C++ API and the C API. Each must load (then
// tokenize and run a few tokens) or fail with nanochat::Error / an NC_ERR_* status;
// anything else (a crash, an ASan/UBSan report, another exception type) fails the run.
// .ci/run runs it in the sanitizer build via ctest.
//
//   nanochat_fuzz [--iterations N] [--seed S] [--keep DIR]
//   nanochat_fuzz --write-seeds DIR   (the seeds only: tests/fuzz/corpus/model_load)
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "dense/dense.h"
#include "gguf/gguf.h"
#include "nanochat/nanochat.h"
#include "nanochat/nanochat.hpp"
#include "ternary/ternary.h"

using namespace nanochat;
using namespace nanochat::gguf;

namespace {

// What a seed model holds. The defaults are a 1-layer dense bitnet model (d 256, 2 heads
// of 128, 1 kv head, ffn 256); the nanochat options (docs/gguf.md) are off unless set.
struct Spec {
  std::string name;
  std::string arch = "bitnet";
  int64_t layers = 1, context = 64;
  GgmlType ternary = GgmlType::TQ2_0, embd = GgmlType::F16;
  std::string activation = "silu";                     // nanochat.ffn_activation
  int64_t experts = 0, used = 0, shared = 0, dense = 0;  // MoE: E, top-k, shexp, leading dense
  int64_t streams = 0;                                 // mHC residual streams (0: none)
  bool hc_lite = false, hc_dynamic = false;
  int64_t window = 0;            // sliding window (0: no keys)
  std::vector<int64_t> sliding;  // its per-layer pattern
  int64_t mtp = 0;               // nextn heads after the trunk
  // How each model runs: prompt tokens and session context (capped by context_length).
  int64_t prompt = 8, n_ctx = 16;
};

// The three seeds. The two nanochat ones exercise every option, each in the variant the
// other lacks, so mutants reach both sides of each branch in the loader and forward pass.
std::vector<Spec> seed_specs() {
  Spec dense;
  dense.name = "bitnet";
  Spec a;
  a.name = "nanochat-a";
  a.arch = "nanochat";
  a.layers = 2;
  a.context = 160;
  a.activation = "relu2";
  a.experts = 4, a.used = 2, a.shared = 1, a.dense = 1;  // block 0 dense, block 1 MoE
  a.streams = 2, a.hc_dynamic = true;                     // sinkhorn, input-dependent
  a.window = 2, a.sliding = {1, 0};
  a.mtp = 1;
  // 140 prompt tokens wrap the sliding layer's ring of window + 128 = 130 slots.
  a.prompt = 140, a.n_ctx = 160;
  Spec b;
  b.name = "nanochat-b";
  b.arch = "nanochat";
  b.ternary = GgmlType::TQ1_0, b.embd = GgmlType::Q8_0;
  b.experts = 2, b.used = 1;        // every block MoE, no shared expert
  b.streams = 3, b.hc_lite = true;  // static, 3! permutation weights
  b.window = 8, b.sliding = {0};    // keys present, nothing slides
  return {dense, a, b};
}

// A byte-level tokenizer: the 5 specials, the 256 byte symbols, two merges, and reserved
// tokens up to a multiple of 32. Returns the vocabulary size.
int64_t add_tokenizer(GgufWriter& w) {
  std::vector<std::string> tokens = {"<|bos|>", "<|user_start|>", "<|user_end|>",
                                     "<|assistant_start|>", "<|assistant_end|>"};
  // GPT-2's byte -> printable code point map, as UTF-8.
  auto utf8 = [](uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
      s += char(cp);
    } else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    return s;
  };
  std::vector<uint32_t> bs, cs;
  for (uint32_t b = 0; b < 256; ++b)
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) {
      bs.push_back(b);
      cs.push_back(b);
    }
  uint32_t n = 0;
  for (uint32_t b = 0; b < 256; ++b)
    if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
      bs.push_back(b);
      cs.push_back(256 + n++);
    }
  std::vector<std::string> byte_tok(256);
  for (size_t i = 0; i < bs.size(); ++i) byte_tok[bs[i]] = utf8(cs[i]);
  for (int b = 0; b < 256; ++b) tokens.push_back(byte_tok[b]);
  const std::string sp = byte_tok[' '];
  tokens.push_back(sp + "t");
  tokens.push_back("he");
  const std::vector<std::string> merges = {sp + " t", "h e"};
  const int64_t vocab = int64_t(tokens.size()) + (32 - int64_t(tokens.size()) % 32) % 32;
  while (int64_t(tokens.size()) < vocab) tokens.push_back("<|reserved_" + std::to_string(tokens.size()) + "|>");
  std::vector<int64_t> types(tokens.size(), 1);
  for (size_t i = 0; i < tokens.size(); ++i)
    if (i < 5 || tokens[i].rfind("<|reserved_", 0) == 0) types[i] = 3;
  w.add_kv("tokenizer.ggml.model", Value::string("gpt2"));
  w.add_kv("tokenizer.ggml.pre", Value::string("gpt-2"));
  w.add_kv("tokenizer.ggml.tokens", Value::string_array(tokens));
  w.add_kv("tokenizer.ggml.token_type", Value::int_array(ValueType::I32, types));
  w.add_kv("tokenizer.ggml.merges", Value::string_array(merges));
  w.add_kv("tokenizer.ggml.bos_token_id", Value::u32(0));
  w.add_kv("tokenizer.ggml.eos_token_id", Value::u32(0));
  w.add_kv("tokenizer.ggml.eot_token_id", Value::u32(4));
  w.add_kv("tokenizer.ggml.add_bos_token", Value::boolean(true));
  return vocab;
}

// Writes the seed `s` to `path` with the keys, tensor names, dims and types the loader
// (csrc/engine/model.cpp) reads, and returns its bytes.
std::vector<uint8_t> seed_model(const std::string& path, const Spec& s, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t d = 256, ffn = 256, hd = 128, nh = 2, nkv = 1, eh = 256;
  const std::string p = s.arch + ".";
  GgufWriter w;
  w.add_kv("general.architecture", Value::string(s.arch));
  w.add_kv("general.name", Value::string("fuzz"));
  w.add_kv(p + "context_length", Value::u32(uint32_t(s.context)));
  w.add_kv(p + "embedding_length", Value::u32(uint32_t(d)));
  w.add_kv(p + "block_count", Value::u32(uint32_t(s.layers)));
  w.add_kv(p + "feed_forward_length", Value::u32(uint32_t(ffn)));
  w.add_kv(p + "attention.head_count", Value::u32(uint32_t(nh)));
  w.add_kv(p + "attention.head_count_kv", Value::u32(uint32_t(nkv)));
  w.add_kv(p + "rope.dimension_count", Value::u32(uint32_t(hd)));
  w.add_kv(p + "rope.freq_base", Value::f32(10000.0f));
  w.add_kv(p + "attention.layer_norm_rms_epsilon", Value::f32(1e-5f));
  if (s.arch == "nanochat") w.add_kv(p + "ffn_activation", Value::string(s.activation));
  if (s.window) {
    w.add_kv(p + "attention.sliding_window", Value::u32(uint32_t(s.window)));
    w.add_kv(p + "attention.sliding_window_pattern", Value::int_array(ValueType::BOOL, s.sliding));
  }
  if (s.experts) {
    w.add_kv(p + "expert_count", Value::u32(uint32_t(s.experts)));
    w.add_kv(p + "expert_used_count", Value::u32(uint32_t(s.used)));
    w.add_kv(p + "expert_feed_forward_length", Value::u32(uint32_t(eh)));
    w.add_kv(p + "expert_shared_count", Value::u32(uint32_t(s.shared)));
    w.add_kv(p + "expert_gating_func", Value::string("sigmoid"));
    w.add_kv(p + "expert_weights_norm", Value::boolean(s.used > 1));
    w.add_kv(p + "leading_dense_block_count", Value::u32(uint32_t(s.dense)));
  }
  if (s.streams) {
    w.add_kv(p + "hc.stream_count", Value::u32(uint32_t(s.streams)));
    w.add_kv(p + "hc.sinkhorn_iterations", Value::u32(20));
    w.add_kv(p + "hc.dynamic", Value::boolean(s.hc_dynamic));
    w.add_kv(p + "hc.res_type", Value::string(s.hc_lite ? "lite" : "sinkhorn"));
  }
  if (s.mtp) w.add_kv(p + "nextn_predict_layers", Value::u32(uint32_t(s.mtp)));
  const int64_t vocab = add_tokenizer(w);
  w.add_kv(p + "vocab_size", Value::u32(uint32_t(vocab)));

  // F32 tensor: every value `mean`, plus N(0, sd) noise when sd > 0.
  auto f32 = [&](const std::string& name, const std::vector<int64_t>& dims, float mean, float sd) {
    int64_t n = 1;
    for (int64_t x : dims) n *= x;
    std::vector<float> v(size_t(n), mean);
    if (sd > 0.0f) {
      std::normal_distribution<float> nd(mean, sd);
      for (auto& x : v) x = nd(rng);
    }
    w.add_tensor(name, GgmlType::F32, dims, v.data(), v.size() * 4);
  };
  auto norm = [&](const std::string& name, int64_t n) { f32(name, {n}, 1.0f, 0.0f); };
  // A ternary (rows x cols) matrix, or `stack` of them as stacked experts [cols, rows, E]:
  // each slice is its own BitLinear, so each gets its own scale.
  auto ternary = [&](const std::string& name, int64_t rows, int64_t cols, int64_t stack = 0) {
    const bool tq2 = s.ternary == GgmlType::TQ2_0;
    const size_t slice = size_t(rows * cols / QK * (tq2 ? TQ2_0_BLOCK_BYTES : TQ1_0_BLOCK_BYTES));
    std::vector<uint8_t> packed(slice * size_t(std::max<int64_t>(stack, 1)));
    std::vector<int8_t> codes(size_t(rows * cols));
    std::uniform_int_distribution<int> u(-1, 1);
    for (int64_t e = 0; e < std::max<int64_t>(stack, 1); ++e) {
      for (auto& c : codes) c = int8_t(u(rng));
      const float scale = 0.03f + 0.01f * float(e);
      if (tq2)
        tq2_0_pack(codes.data(), rows, cols, scale, packed.data() + size_t(e) * slice);
      else
        tq1_0_pack(codes.data(), rows, cols, scale, packed.data() + size_t(e) * slice);
    }
    const std::vector<int64_t> dims =
        stack ? std::vector<int64_t>{cols, rows, stack} : std::vector<int64_t>{cols, rows};
    w.add_tensor(name, s.ternary, dims, packed.data(), packed.size());
  };

  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> embd(size_t(vocab * d));
  for (auto& v : embd) v = nd(rng);
  if (s.embd == GgmlType::Q8_0) {
    std::vector<uint8_t> q(size_t(vocab * d / 32 * 34));
    q8_0_quantize(embd.data(), vocab, d, q.data());
    w.add_tensor("token_embd.weight", GgmlType::Q8_0, {d, vocab}, q.data(), q.size());
  } else {
    std::vector<uint16_t> embd16(embd.size());
    for (size_t i = 0; i < embd.size(); ++i) embd16[i] = fp32_to_fp16(embd[i]);
    w.add_tensor("token_embd.weight", GgmlType::F16, {d, vocab}, embd16.data(), embd16.size() * 2);
  }
  norm("output_norm.weight", d);

  // Trunk blocks, then the MTP heads (dense blocks plus their nextn.* join), in the
  // exporter's order.
  for (int64_t l = 0; l < s.layers + s.mtp; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    const bool head = l >= s.layers, moe = !head && s.experts && l >= s.dense;
    norm(b + "attn_norm.weight", d);
    ternary(b + "attn_q.weight", nh * hd, d);
    ternary(b + "attn_k.weight", nkv * hd, d);
    ternary(b + "attn_v.weight", nkv * hd, d);
    norm(b + "attn_sub_norm.weight", d);
    ternary(b + "attn_output.weight", d, nh * hd);
    norm(b + "ffn_norm.weight", d);
    if (moe) {
      const int64_t E = s.experts;
      f32(b + "ffn_gate_inp.weight", {d, E}, 0.0f, 0.02f);
      f32(b + "exp_probs_b.bias", {E}, 0.0f, 0.01f);
      ternary(b + "ffn_gate_exps.weight", eh, d, E);
      ternary(b + "ffn_up_exps.weight", eh, d, E);
      f32(b + "ffn_sub_norm_exps.weight", {eh, E}, 1.0f, 0.0f);
      ternary(b + "ffn_down_exps.weight", d, eh, E);
      if (s.shared) {
        ternary(b + "ffn_gate_shexp.weight", eh, d);
        ternary(b + "ffn_up_shexp.weight", eh, d);
        norm(b + "ffn_sub_norm_shexp.weight", eh);
        ternary(b + "ffn_down_shexp.weight", d, eh);
      }
    } else {
      ternary(b + "ffn_gate.weight", ffn, d);
      ternary(b + "ffn_up.weight", ffn, d);
      norm(b + "ffn_sub_norm.weight", ffn);
      ternary(b + "ffn_down.weight", d, ffn);
    }
    if (head) {
      norm(b + "nextn.enorm.weight", d);
      norm(b + "nextn.hnorm.weight", d);
      ternary(b + "nextn.eh_proj.weight", d, 2 * d);
      norm(b + "nextn.shared_head_norm.weight", d);
    } else if (s.streams) {
      const int64_t n = s.streams;
      int64_t n_res = n * n;
      if (s.hc_lite) {  // n! permutation weights
        n_res = 1;
        for (int64_t k = 2; k <= n; ++k) n_res *= k;
      }
      for (const char* sub : {"hc_attn_", "hc_ffn_"}) {
        f32(b + sub + "pre.weight", {n}, 0.0f, 0.5f);
        f32(b + sub + "post.weight", {n}, 0.0f, 0.5f);
        const std::vector<int64_t> res_dims =
            s.hc_lite ? std::vector<int64_t>{n_res} : std::vector<int64_t>{n, n};
        f32(b + sub + "res.weight", res_dims, 0.0f, 0.5f);
        if (s.hc_dynamic) {
          f32(b + sub + "fn.weight", {n * d, 2 * n + n_res}, 0.0f, 0.02f);
          f32(b + sub + "alpha.weight", {3}, 0.01f, 0.0f);
        }
      }
    }
  }
  w.write(path);
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

// One mutant: a few edits, biased toward the header and metadata, where a wrong count,
// length, offset or type does the most damage.
std::vector<uint8_t> mutate(const std::vector<uint8_t>& seed, size_t meta_end, std::mt19937_64& rng) {
  std::vector<uint8_t> b = seed;
  auto pick = [&](size_t n) { return n ? size_t(rng() % n) : 0; };
  const int edits = 1 + int(rng() % 4);
  for (int e = 0; e < edits && !b.empty(); ++e) {
    const size_t pos = (rng() % 4 != 0) ? pick(std::min(meta_end, b.size())) : pick(b.size());
    switch (rng() % 6) {
      case 0:  // flip one bit
        b[pos] ^= uint8_t(1u << (rng() % 8));
        break;
      case 1:  // random byte
        b[pos] = uint8_t(rng());
        break;
      case 2: {  // an "interesting" little-endian integer over 1, 2, 4 or 8 bytes
        static const uint64_t vals[] = {0, 1, 2, 3, 31, 32, 33, 255, 256, 0x7F, 0x80, 0xFFFF,
                                        0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF,
                                        0xFFFFFFFFFFFFFFFF, 1ull << 40};
        const uint64_t v = vals[rng() % (sizeof(vals) / sizeof(vals[0]))];
        const size_t width = size_t(1) << (rng() % 4);
        for (size_t k = 0; k < width && pos + k < b.size(); ++k) b[pos + k] = uint8_t(v >> (8 * k));
        break;
      }
      case 3:  // truncate
        b.resize(pick(b.size()));
        break;
      case 4: {  // duplicate a chunk over another place (splice)
        const size_t src = pick(b.size()), len = 1 + pick(64);
        for (size_t k = 0; k < len && src + k < b.size() && pos + k < b.size(); ++k)
          b[pos + k] = b[src + k];
        break;
      }
      default:  // delete a few bytes (shifts everything after)
        b.erase(b.begin() + long(pos), b.begin() + long(std::min(b.size(), pos + 1 + pick(8))));
        break;
    }
  }
  return b;
}

// The seed's session context, capped by the model's: a mutant's context_length may be
// tiny, and one near 2^24 would allocate gigabytes of KV cache.
int32_t session_ctx(const Spec& s, int32_t context_length) {
  return int32_t(std::min<int64_t>(s.n_ctx, context_length));
}

// Loads a mutant through the C++ API; on success exercises it a little. `why` gets the
// error of a rejected one.
bool try_cpp(const std::string& path, const Spec& spec, std::string* why = nullptr) {
  try {
    auto model = Model::load(path);
    const ModelInfo& info = model->info();
    auto ids = model->tokenize("the cat<|bos|> \xF0\x9F\x98\x80 \xff", true);
    (void)model->detokenize(ids);
    const int32_t n_ctx = session_ctx(spec, info.context_length);
    const size_t want = size_t(std::max<int64_t>(1, std::min<int64_t>(spec.prompt, n_ctx - 3)));
    std::vector<int32_t> valid, prompt;
    for (int32_t t : ids)
      if (t >= 0 && t < info.vocab_size) valid.push_back(t);
    if (valid.empty()) valid.push_back(0);
    while (prompt.size() < want) prompt.push_back(valid[prompt.size() % valid.size()]);
    Session s(model, n_ctx);
    SamplingParams sp;
    sp.max_tokens = 3;
    sp.seed = 1;
    (void)s.generate(prompt, sp);
    return true;
  } catch (const Error& e) {
    if (why) *why = e.what();
    return false;  // a clear error is the expected outcome for most mutants
  }
}

// The same through the C API: every failure must come with a message.
bool try_c(const std::string& path, const Spec& spec) {
  auto fail_check = [&](const char* what) {
    if (!nc_last_error() || !*nc_last_error()) {
      std::fprintf(stderr, "%s failed without a message for %s\n", what, path.c_str());
      std::abort();
    }
    return false;
  };
  nc_model* m = nullptr;
  if (nc_model_load(path.c_str(), &m) != NC_OK) return fail_check("nc_model_load");
  nc_model_info info;
  bool ok = nc_model_get_info(m, &info) == NC_OK || fail_check("nc_model_get_info");
  nc_session* s = nullptr;
  ok = ok && (nc_session_new(m, session_ctx(spec, info.context_length), &s) == NC_OK ||
              fail_check("nc_session_new"));
  if (ok) {
    nc_sampling sp;
    nc_sampling_default(&sp);
    sp.max_tokens = 2;
    // "he" then byte tokens, one per 'a': with bos, spec.prompt tokens.
    const int64_t len = std::max<int64_t>(2, std::min<int64_t>(spec.prompt, info.context_length - 4));
    const std::string text = "he" + std::string(size_t(len - 2), 'a');
    ok = nc_generate(s, text.c_str(), &sp, nullptr, nullptr, nullptr) == NC_OK ||
         fail_check("nc_generate");
    nc_session_free(s);
  }
  nc_model_free(m);
  return ok;
}

// A seed that does not load, run, or exercise what it was written for would turn its
// share of the mutants into noise: say why and stop.
bool check_seed(const std::string& path, const Spec& s) {
  std::string why;
  if (!try_cpp(path, s, &why)) {
    std::fprintf(stderr, "seed %s does not load and run: %s\n", s.name.c_str(), why.c_str());
    return false;
  }
  if (!try_c(path, s)) {
    std::fprintf(stderr, "seed %s fails through the C API: %s\n", s.name.c_str(), nc_last_error());
    return false;
  }
  const ModelInfo info = Model::load(path)->info();
  int64_t n_sliding = 0;
  for (int64_t x : s.sliding) n_sliding += x;
  const bool as_written = info.architecture == s.arch && info.n_layers == s.layers &&
                          info.activation == (s.arch == "nanochat" ? s.activation : "silu") &&
                          info.weight_type == type_traits(uint32_t(s.ternary)).name &&
                          info.embd_type == type_traits(uint32_t(s.embd)).name &&
                          info.n_experts == s.experts && info.n_experts_used == s.used &&
                          info.hc_streams == std::max<int64_t>(s.streams, 1) &&
                          info.n_sliding_layers == n_sliding &&
                          info.sliding_window == (n_sliding ? s.window : 0);
  if (!as_written) {
    std::fprintf(stderr, "seed %s loads as something else than it was written\n", s.name.c_str());
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  long iterations = 3000;
  uint64_t seed = 1;
  std::string keep, seeds_dir;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iterations" && i + 1 < argc) iterations = std::atol(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--keep" && i + 1 < argc) keep = argv[++i];
    else if (a == "--write-seeds" && i + 1 < argc) seeds_dir = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--iterations N] [--seed S] [--keep DIR] | "
                   "--write-seeds DIR\n", argv[0]);
      return 2;
    }
  }
  if (!seeds_dir.empty()) {  // the libFuzzer target model_load starts from these
    uint32_t k = 0;
    for (const Spec& spec : seed_specs()) {
      const std::string path = seeds_dir + "/" + spec.name + ".gguf";
      seed_model(path, spec, uint32_t(seed) + k++);
      if (!check_seed(path, spec)) return 1;
    }
    return 0;
  }
  const char* tmp = std::getenv("TMPDIR");
  const std::string dir = tmp && *tmp ? tmp : "/tmp";
  const std::string base = dir + "/nanochat_fuzz_" + std::to_string(::getpid());
  const std::string seed_path = base + "_seed.gguf", path = base + "_mutant.gguf";

  struct Seed {
    Spec spec;
    std::vector<uint8_t> bytes;
    size_t meta_end;
    long mutants = 0, loaded = 0;
  };
  std::vector<Seed> seeds;
  for (const Spec& spec : seed_specs()) {
    Seed s{spec, seed_model(seed_path, spec, uint32_t(seed + seeds.size())), 0};
    if (!check_seed(seed_path, spec)) return 1;
    s.meta_end = size_t(GgufFile::open(seed_path)->data_offset());
    seeds.push_back(std::move(s));
  }
  std::remove(seed_path.c_str());

  // Which seed each mutant comes from is drawn from the same stream: --seed fixes it all.
  std::mt19937_64 rng(seed);
  long loaded = 0;
  for (long it = 0; it < iterations; ++it) {
    Seed& s = seeds[size_t(rng() % seeds.size())];
    const std::vector<uint8_t> b = mutate(s.bytes, s.meta_end, rng);
    write_file(path, b);
    if (!keep.empty())
      write_file(keep + "/mutant_" + std::to_string(it) + "_" + s.spec.name + ".gguf", b);
    const bool ok = (it % 2 == 0) ? try_cpp(path, s.spec) : try_c(path, s.spec);
    s.mutants += 1;
    s.loaded += ok;
    loaded += ok;
  }
  std::remove(path.c_str());
  std::printf("fuzz: %ld mutants, %ld loaded and ran, %ld rejected with an error, no crash\n",
              iterations, loaded, iterations - loaded);
  for (const Seed& s : seeds)
    std::printf("  %-11s %5ld mutants, %4ld loaded and ran\n", s.spec.name.c_str(), s.mutants,
                s.loaded);
  return 0;
}
