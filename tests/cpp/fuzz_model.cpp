// Mutation fuzzing of the model loader: writes a small valid bitnet GGUF (tokenizer
// included), then loads thousands of mutants — byte flips, "interesting" integers over
// header and metadata fields, truncations, splices — through the C++ API and the C API.
// Each must load (then tokenize and run a few tokens) or fail with nanochat::Error /
// an NC_ERR_* status; anything else (a crash, an ASan/UBSan report, another exception
// type) fails the run. .ci/run runs it in the sanitizer build via ctest.
//
//   nanochat_fuzz [--iterations N] [--seed S] [--keep DIR]
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

#include "gguf/gguf.h"
#include "nanochat/nanochat.h"
#include "nanochat/nanochat.hpp"
#include "ternary/ternary.h"

using namespace nanochat;
using namespace nanochat::gguf;

namespace {

// A 1-layer bitnet model (d 256, 2 heads of 128, 1 kv head, ffn 256) and a byte-level
// tokenizer: the 5 specials, the 256 byte symbols, and two merges.
std::vector<uint8_t> seed_model(const std::string& path, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t d = 256, ffn = 256, hd = 128, nh = 2, nkv = 1;
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

  GgufWriter w;
  w.add_kv("general.architecture", Value::string("bitnet"));
  w.add_kv("general.name", Value::string("fuzz"));
  w.add_kv("bitnet.vocab_size", Value::u32(uint32_t(vocab)));
  w.add_kv("bitnet.context_length", Value::u32(64));
  w.add_kv("bitnet.embedding_length", Value::u32(uint32_t(d)));
  w.add_kv("bitnet.block_count", Value::u32(1));
  w.add_kv("bitnet.feed_forward_length", Value::u32(uint32_t(ffn)));
  w.add_kv("bitnet.attention.head_count", Value::u32(uint32_t(nh)));
  w.add_kv("bitnet.attention.head_count_kv", Value::u32(uint32_t(nkv)));
  w.add_kv("bitnet.rope.dimension_count", Value::u32(uint32_t(hd)));
  w.add_kv("bitnet.rope.freq_base", Value::f32(10000.0f));
  w.add_kv("bitnet.attention.layer_norm_rms_epsilon", Value::f32(1e-5f));
  w.add_kv("tokenizer.ggml.model", Value::string("gpt2"));
  w.add_kv("tokenizer.ggml.pre", Value::string("gpt-2"));
  w.add_kv("tokenizer.ggml.tokens", Value::string_array(tokens));
  w.add_kv("tokenizer.ggml.token_type", Value::int_array(ValueType::I32, types));
  w.add_kv("tokenizer.ggml.merges", Value::string_array(merges));
  w.add_kv("tokenizer.ggml.bos_token_id", Value::u32(0));
  w.add_kv("tokenizer.ggml.eos_token_id", Value::u32(0));
  w.add_kv("tokenizer.ggml.eot_token_id", Value::u32(4));
  w.add_kv("tokenizer.ggml.add_bos_token", Value::boolean(true));

  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> embd(size_t(vocab * d));
  for (auto& v : embd) v = nd(rng);
  std::vector<uint16_t> embd16(embd.size());
  for (size_t i = 0; i < embd.size(); ++i) embd16[i] = fp32_to_fp16(embd[i]);
  w.add_tensor("token_embd.weight", GgmlType::F16, {d, vocab}, embd16.data(), embd16.size() * 2);
  std::vector<float> ones(size_t(std::max(d, ffn)), 1.0f);
  w.add_tensor("output_norm.weight", GgmlType::F32, {d}, ones.data(), size_t(d) * 4);

  auto ternary = [&](const std::string& name, int64_t rows, int64_t cols) {
    std::uniform_int_distribution<int> u(-1, 1);
    std::vector<int8_t> codes(size_t(rows * cols));
    for (auto& c : codes) c = int8_t(u(rng));
    std::vector<uint8_t> packed(size_t(rows * cols / QK * TQ2_0_BLOCK_BYTES));
    tq2_0_pack(codes.data(), rows, cols, 0.03f, packed.data());
    w.add_tensor(name, GgmlType::TQ2_0, {cols, rows}, packed.data(), packed.size());
  };
  const std::string p = "blk.0.";
  w.add_tensor(p + "attn_norm.weight", GgmlType::F32, {d}, ones.data(), size_t(d) * 4);
  ternary(p + "attn_q.weight", nh * hd, d);
  ternary(p + "attn_k.weight", nkv * hd, d);
  ternary(p + "attn_v.weight", nkv * hd, d);
  w.add_tensor(p + "attn_sub_norm.weight", GgmlType::F32, {d}, ones.data(), size_t(d) * 4);
  ternary(p + "attn_output.weight", d, nh * hd);
  w.add_tensor(p + "ffn_norm.weight", GgmlType::F32, {d}, ones.data(), size_t(d) * 4);
  ternary(p + "ffn_gate.weight", ffn, d);
  ternary(p + "ffn_up.weight", ffn, d);
  w.add_tensor(p + "ffn_sub_norm.weight", GgmlType::F32, {ffn}, ones.data(), size_t(ffn) * 4);
  ternary(p + "ffn_down.weight", d, ffn);
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

// Loads a mutant through the C++ API; on success exercises it a little.
bool try_cpp(const std::string& path) {
  try {
    auto model = Model::load(path);
    const ModelInfo& info = model->info();
    auto ids = model->tokenize("the cat<|bos|> \xF0\x9F\x98\x80 \xff", true);
    (void)model->detokenize(ids);
    std::vector<int32_t> prompt;
    for (int32_t t : ids)
      if (t >= 0 && t < info.vocab_size && prompt.size() < 8) prompt.push_back(t);
    if (prompt.empty()) prompt.push_back(0);
    Session s(model, 16);
    SamplingParams sp;
    sp.max_tokens = 3;
    sp.seed = 1;
    (void)s.generate(prompt, sp);
    return true;
  } catch (const Error&) {
    return false;  // a clear error is the expected outcome for most mutants
  }
}

bool try_c(const std::string& path) {
  nc_model* m = nullptr;
  if (nc_model_load(path.c_str(), &m) != NC_OK) {
    if (!nc_last_error() || !*nc_last_error()) {
      std::fprintf(stderr, "nc_model_load failed without a message for %s\n", path.c_str());
      std::abort();
    }
    return false;
  }
  nc_session* s = nullptr;
  if (nc_session_new(m, 16, &s) == NC_OK) {
    nc_sampling sp;
    nc_sampling_default(&sp);
    sp.max_tokens = 2;
    nc_generate(s, "he", &sp, nullptr, nullptr, nullptr);
    nc_session_free(s);
  }
  nc_model_free(m);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  long iterations = 3000;
  uint64_t seed = 1;
  std::string keep;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iterations" && i + 1 < argc) iterations = std::atol(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--keep" && i + 1 < argc) keep = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--iterations N] [--seed S] [--keep DIR]\n", argv[0]);
      return 2;
    }
  }
  const char* tmp = std::getenv("TMPDIR");
  const std::string dir = tmp && *tmp ? tmp : "/tmp";
  const std::string base = dir + "/nanochat_fuzz_" + std::to_string(::getpid());
  const std::string seed_path = base + "_seed.gguf", path = base + "_mutant.gguf";

  const std::vector<uint8_t> good = seed_model(seed_path, uint32_t(seed));
  if (!try_cpp(seed_path) || !try_c(seed_path)) {
    std::fprintf(stderr, "the unmutated seed model does not load\n");
    return 1;
  }
  size_t meta_end = good.size();
  {
    auto f = GgufFile::open(seed_path);
    meta_end = size_t(f->data_offset());
  }
  std::remove(seed_path.c_str());

  std::mt19937_64 rng(seed);
  long loaded = 0;
  for (long it = 0; it < iterations; ++it) {
    const std::vector<uint8_t> b = mutate(good, meta_end, rng);
    write_file(path, b);
    if (!keep.empty()) write_file(keep + "/mutant_" + std::to_string(it) + ".gguf", b);
    const bool ok = (it % 2 == 0) ? try_cpp(path) : try_c(path);
    loaded += ok;
  }
  std::remove(path.c_str());
  std::printf("fuzz: %ld mutants, %ld loaded and ran, %ld rejected with an error, no crash\n",
              iterations, loaded, iterations - loaded);
  return 0;
}
