// libFuzzer target: the C API's generation parameters (nanochat.h) on a tiny model.
//
// The fuzz bytes fill an nc_sampling (temperature, top_k, top_p, repetition penalty and
// window, seed, max_tokens, stop tokens and strings, stop_at_eos), the session's n_ctx,
// nc_generate_ex's flags and the prompt, all raw (NaN, negative, huge). Every call must
// return one of the documented statuses, with a message when it is not NC_OK, and never
// NC_ERR_INTERNAL (a bug), crash, hang or leak. The model (1 layer, d 256, vocab of the 256
// bytes plus 2 control tokens, context 48) is written once to a temporary file at start.
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "../cpp/gpt2_bytes.h"
#include "nanochat/nanochat.h"
#include "ternary/ternary.h"

using nanochat_test::byte_symbol;

namespace {

nc_model* make_model() {
  using namespace nanochat;
  using gguf::Value;
  constexpr int64_t d = 256, ffn = 256, heads = 2, kv_heads = 1, ctx = 48;
  std::vector<std::string> tokens = {"<|bos|>", "<|assistant_end|>"};
  std::vector<int64_t> types = {3, 3};
  for (int b = 0; b < 256; ++b) {
    tokens.push_back(byte_symbol(b));
    types.push_back(1);
  }
  tokens.push_back("he");
  types.push_back(1);
  const int64_t vocab = int64_t(tokens.size());
  gguf::GgufWriter w;
  w.add_kv("general.architecture", Value::string("nanochat"));
  w.add_kv("general.name", Value::string("fuzz"));
  w.add_kv("general.file_type", Value::u32(37));
  w.add_kv("general.quantization_version", Value::u32(2));
  w.add_kv("nanochat.vocab_size", Value::u32(uint32_t(vocab)));
  w.add_kv("nanochat.context_length", Value::u32(ctx));
  w.add_kv("nanochat.embedding_length", Value::u32(d));
  w.add_kv("nanochat.block_count", Value::u32(1));
  w.add_kv("nanochat.feed_forward_length", Value::u32(ffn));
  w.add_kv("nanochat.attention.head_count", Value::u32(heads));
  w.add_kv("nanochat.attention.head_count_kv", Value::u32(kv_heads));
  w.add_kv("nanochat.rope.dimension_count", Value::u32(d / heads));
  w.add_kv("nanochat.rope.freq_base", Value::f32(10000.0f));
  w.add_kv("nanochat.attention.layer_norm_rms_epsilon", Value::f32(1e-5f));
  w.add_kv("nanochat.ffn_activation", Value::string("silu"));
  w.add_kv("tokenizer.ggml.model", Value::string("gpt2"));
  w.add_kv("tokenizer.ggml.pre", Value::string("gpt-2"));
  w.add_kv("tokenizer.ggml.tokens", Value::string_array(tokens));
  w.add_kv("tokenizer.ggml.token_type", Value::int_array(gguf::ValueType::I32, types));
  w.add_kv("tokenizer.ggml.merges", Value::string_array({"h e"}));
  w.add_kv("tokenizer.ggml.bos_token_id", Value::u32(0));
  w.add_kv("tokenizer.ggml.eos_token_id", Value::u32(0));
  w.add_kv("tokenizer.ggml.eot_token_id", Value::u32(1));
  w.add_kv("tokenizer.ggml.add_bos_token", Value::boolean(true));

  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<std::vector<uint8_t>> keep;  // the writer may hold pointers until write()
  auto add = [&](const std::string& name, gguf::GgmlType type, std::vector<int64_t> dims,
                 std::vector<uint8_t> bytes) {
    keep.push_back(std::move(bytes));
    w.add_tensor(name, type, dims, keep.back().data(), keep.back().size());
  };
  auto f32 = [&](int64_t n, float base, float spread) {
    std::vector<uint8_t> b(size_t(n) * 4);
    for (int64_t i = 0; i < n; ++i) {
      const float v = base + spread * uni(rng);
      std::memcpy(b.data() + 4 * i, &v, 4);
    }
    return b;
  };
  auto ternary = [&](int64_t in, int64_t out) {
    std::vector<int8_t> codes(size_t(in * out));
    for (auto& c : codes) c = int8_t(int(rng() % 3) - 1);
    std::vector<uint8_t> b(size_t(in * out / QK * TQ2_0_BLOCK_BYTES));
    tq2_0_pack(codes.data(), out, in, 1.0f / 16.0f, b.data());
    return b;
  };
  std::vector<uint8_t> embd(size_t(vocab * d) * 2);
  for (int64_t i = 0; i < vocab * d; ++i) {
    const uint16_t h = fp32_to_fp16(0.1f * uni(rng));
    std::memcpy(embd.data() + 2 * i, &h, 2);
  }
  add("token_embd.weight", gguf::GgmlType::F16, {d, vocab}, std::move(embd));
  add("output_norm.weight", gguf::GgmlType::F32, {d}, f32(d, 1.0f, 0.2f));
  const int64_t kv = kv_heads * (d / heads);
  add("blk.0.attn_norm.weight", gguf::GgmlType::F32, {d}, f32(d, 1.0f, 0.2f));
  add("blk.0.attn_q.weight", gguf::GgmlType::TQ2_0, {d, d}, ternary(d, d));
  add("blk.0.attn_k.weight", gguf::GgmlType::TQ2_0, {d, kv}, ternary(d, kv));
  add("blk.0.attn_v.weight", gguf::GgmlType::TQ2_0, {d, kv}, ternary(d, kv));
  add("blk.0.attn_sub_norm.weight", gguf::GgmlType::F32, {d}, f32(d, 1.0f, 0.2f));
  add("blk.0.attn_output.weight", gguf::GgmlType::TQ2_0, {d, d}, ternary(d, d));
  add("blk.0.ffn_norm.weight", gguf::GgmlType::F32, {d}, f32(d, 1.0f, 0.2f));
  add("blk.0.ffn_gate.weight", gguf::GgmlType::TQ2_0, {d, ffn}, ternary(d, ffn));
  add("blk.0.ffn_up.weight", gguf::GgmlType::TQ2_0, {d, ffn}, ternary(d, ffn));
  add("blk.0.ffn_sub_norm.weight", gguf::GgmlType::F32, {ffn}, f32(ffn, 1.0f, 0.2f));
  add("blk.0.ffn_down.weight", gguf::GgmlType::TQ2_0, {ffn, d}, ternary(ffn, d));

  const char* dir = std::getenv("TMPDIR");
  const std::string path = std::string(dir && *dir ? dir : "/tmp") + "/nanochat_fuzz_sampling_" +
                           std::to_string(::getpid()) + ".gguf";
  w.write(path);
  nc_model* m = nullptr;
  const nc_status st = nc_model_load(path.c_str(), &m);
  std::remove(path.c_str());  // the model keeps what it needs
  if (st != NC_OK) {
    std::fprintf(stderr, "fuzz_sampling: the model does not load: %s\n", nc_last_error());
    std::abort();
  }
  return m;
}

// Reads fixed-size fields off the front of the input, zeros when it runs out.
struct Reader {
  const uint8_t* p;
  size_t n;
  template <class T>
  T take() {
    T v{};
    const size_t k = n < sizeof(T) ? n : sizeof(T);
    std::memcpy(&v, p, k);
    p += k;
    n -= k;
    return v;
  }
  std::string bytes(size_t max) {
    const size_t k = n < max ? n : max;
    std::string s(reinterpret_cast<const char*>(p), k);
    p += k;
    n -= k;
    return s;
  }
};

int on_token(int32_t, const char*, size_t, void* ud) {
  int* budget = static_cast<int*>(ud);
  return --*budget < 0;  // some inputs stop generation from the callback
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  nc_set_num_threads(1);  // one thread: deterministic, and the fuzzer's own CPU
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static nc_model* model = make_model();
  Reader r{data, size};
  nc_sampling sp;
  nc_sampling_default(&sp);
  const uint8_t mask = r.take<uint8_t>();  // which fields the input overrides
  if (mask & 1) sp.temperature = r.take<float>();
  if (mask & 2) sp.top_k = r.take<int32_t>();
  if (mask & 4) sp.top_p = r.take<float>();
  if (mask & 8) sp.repetition_penalty = r.take<float>();
  if (mask & 16) sp.repetition_window = r.take<int32_t>();
  if (mask & 32) sp.seed = r.take<uint64_t>();
  const int32_t max_tokens = r.take<int32_t>();
  sp.max_tokens = max_tokens > 12 ? max_tokens % 13 : max_tokens;  // bounded work per input
  sp.stop_at_eos = r.take<uint8_t>() & 1;
  int32_t stop_tokens[4];
  sp.n_stop_tokens = r.take<uint8_t>() % 5;
  for (size_t i = 0; i < sp.n_stop_tokens; ++i) stop_tokens[i] = r.take<int32_t>();
  sp.stop_tokens = sp.n_stop_tokens ? stop_tokens : nullptr;
  std::string stops[2];
  const char* stop_ptrs[2];
  sp.n_stop_strings = r.take<uint8_t>() % 3;
  for (size_t i = 0; i < sp.n_stop_strings; ++i) {
    stops[i] = r.bytes(r.take<uint8_t>() % 8);
    stop_ptrs[i] = stops[i].c_str();
  }
  sp.stop_strings = sp.n_stop_strings ? stop_ptrs : nullptr;
  const int32_t n_ctx = r.take<int32_t>();
  const uint32_t flags = r.take<uint32_t>();
  int budget = r.take<uint8_t>() % 16;
  const std::string prompt = r.bytes(64);

  nc_session* s = nullptr;
  nc_status st = nc_session_new(model, n_ctx, &s);
  if (st != NC_OK) {
    if (st != NC_ERR_INVALID_ARGUMENT || s != nullptr || !*nc_last_error()) std::abort();
    st = nc_session_new(model, 0, &s);
    if (st != NC_OK) std::abort();
  }
  for (int turn = 0; turn < 2; ++turn) {
    nc_generate_stats stats;
    st = nc_generate_ex(s, prompt.data(), prompt.size(), flags, &sp, on_token, &budget, &stats);
    if (st == NC_OK) {
      if (stats.generated_tokens < 0 || stats.generated_tokens > (sp.max_tokens > 0 ? sp.max_tokens : 0))
        std::abort();
      if (nc_session_n_past(s) < 0) std::abort();
    } else if (st == NC_ERR_INTERNAL || !*nc_last_error()) {
      std::fprintf(stderr, "fuzz_sampling: status %d: %s\n", int(st), nc_last_error());
      std::abort();
    }
  }
  nc_session_free(s);
  return 0;
}
