// The inference engine on small random models written with GgufWriter: logits against a
// plain double-precision reference forward written here, batched prefill against token by
// token, ISA and thread independence, TQ1_0 == TQ2_0, generate (sampling, stop tokens and
// strings, UTF-8-safe streaming), every load error naming the file and tensor/key, and
// the C API's statuses and nc_last_error.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/threadpool.h"
#include "dense/dense.h"
#include "engine/model.h"
#include "gguf/gguf.h"
#include "gpt2_bytes.h"
#include "nanochat/nanochat.h"
#include "nanochat/nanochat.hpp"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"
#include "test_util.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;

// Counts heap allocations (any thread) while g_count_allocs is set: a decode step must
// make none. A plain malloc/free wrapper, so every other test runs as before.
using nanochat_test::byte_symbol;

namespace {
std::atomic<bool> g_count_allocs{false};
std::atomic<int64_t> g_allocs{0};
}  // namespace
void* operator new(size_t n) {
  if (g_count_allocs.load(std::memory_order_relaxed)) g_allocs.fetch_add(1);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace {

// ---- a small random model -------------------------------------------------------------

struct Spec {
  std::string arch = "nanochat";
  std::string activation = "silu";
  int64_t d = 256, layers = 2, heads = 4, kv_heads = 2, ffn = 512, ctx = 256;
  int64_t extra_specials = 6;  // <|reserved_N|> fillers after the merges
  float theta = 10000.0f, eps = 1e-5f;
  gguf::GgmlType wtype = gguf::GgmlType::TQ2_0;
  gguf::GgmlType etype = gguf::GgmlType::F16;
  uint32_t seed = 1;
};

struct Mat {
  std::vector<int8_t> codes;  // out x in
  float scale = 0.0f;
  int64_t rows = 0, cols = 0;
};

// What the file means, for the reference forward.
struct Ref {
  Spec spec;
  int64_t vocab = 0;
  std::vector<double> embd;  // vocab x d, the values the file stores
  std::vector<double> output_norm;
  struct Layer {
    std::vector<double> attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm;
    Mat q, k, v, o, gate, up, down;
  };
  std::vector<Layer> layers;
};

struct TensorSpec {
  std::string name;
  gguf::GgmlType type;
  std::vector<int64_t> dims;
  std::vector<uint8_t> bytes;
};

// The file's metadata and tensors, editable before writing (to make broken files).
struct FileSpec {
  std::vector<std::pair<std::string, gguf::Value>> kvs;
  std::vector<TensorSpec> tensors;

  void set(const std::string& key, gguf::Value v) {
    for (auto& kv : kvs)
      if (kv.first == key) {
        kv.second = std::move(v);
        return;
      }
    kvs.emplace_back(key, std::move(v));
  }
  void erase_kv(const std::string& key) {
    kvs.erase(std::remove_if(kvs.begin(), kvs.end(), [&](auto& kv) { return kv.first == key; }),
              kvs.end());
  }
  TensorSpec& tensor(const std::string& name) {
    for (auto& t : tensors)
      if (t.name == name) return t;
    throw std::runtime_error("test: no tensor " + name);
  }
  void erase_tensor(const std::string& name) {
    tensors.erase(
        std::remove_if(tensors.begin(), tensors.end(), [&](auto& t) { return t.name == name; }),
        tensors.end());
  }
  void write(const std::string& path) const {
    gguf::GgufWriter w;
    for (const auto& kv : kvs) w.add_kv(kv.first, kv.second);
    for (const auto& t : tensors)
      w.add_tensor(t.name, t.type, t.dims, t.bytes.data(), t.bytes.size());
    w.write(path);
  }
};

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

std::vector<uint8_t> pack(const Mat& m, gguf::GgmlType type) {
  const bool tq2 = type == gguf::GgmlType::TQ2_0;
  std::vector<uint8_t> b(
      static_cast<size_t>(m.rows * m.cols / QK * (tq2 ? TQ2_0_BLOCK_BYTES : TQ1_0_BLOCK_BYTES)));
  if (tq2)
    tq2_0_pack(m.codes.data(), m.rows, m.cols, m.scale, b.data());
  else
    tq1_0_pack(m.codes.data(), m.rows, m.cols, m.scale, b.data());
  return b;
}

// A random model as (file, reference). Ternary scales are fp16 values (the file stores
// fp16), so the reference and the engine use the same weights exactly.
std::pair<FileSpec, Ref> make_model(const Spec& s) {
  std::mt19937 rng(s.seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  FileSpec f;
  Ref ref;
  ref.spec = s;

  // Vocabulary: <|bos|>, <|assistant_end|>, 256 bytes, merge results, reserved fillers.
  std::vector<std::string> tokens = {"<|bos|>", "<|assistant_end|>"};
  std::vector<int64_t> types = {3, 3};
  for (int b = 0; b < 256; ++b) {
    tokens.push_back(byte_symbol(b));
    types.push_back(1);
  }
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"Ġ", "w"}, {"o", "r"}, {"Ġw", "or"}};
  std::vector<std::string> merge_strs;
  for (const auto& m : merges) {
    tokens.push_back(m.first + m.second);
    types.push_back(1);
    merge_strs.push_back(m.first + " " + m.second);
  }
  for (int64_t i = 0; i < s.extra_specials; ++i) {
    tokens.push_back("<|reserved_" + std::to_string(i) + "|>");
    types.push_back(3);
  }
  const int64_t vocab = int64_t(tokens.size());
  ref.vocab = vocab;

  using gguf::Value;
  const std::string p = s.arch + ".";
  f.set("general.architecture", Value::string(s.arch));
  f.set("general.name", Value::string("test"));
  f.set("general.file_type", Value::u32(s.wtype == gguf::GgmlType::TQ2_0 ? 37 : 36));
  f.set("general.quantization_version", Value::u32(2));
  f.set(p + "vocab_size", Value::u32(uint32_t(vocab)));
  f.set(p + "context_length", Value::u32(uint32_t(s.ctx)));
  f.set(p + "embedding_length", Value::u32(uint32_t(s.d)));
  f.set(p + "block_count", Value::u32(uint32_t(s.layers)));
  f.set(p + "feed_forward_length", Value::u32(uint32_t(s.ffn)));
  f.set(p + "attention.head_count", Value::u32(uint32_t(s.heads)));
  f.set(p + "attention.head_count_kv", Value::u32(uint32_t(s.kv_heads)));
  f.set(p + "rope.dimension_count", Value::u32(uint32_t(s.d / s.heads)));
  f.set(p + "rope.freq_base", Value::f32(s.theta));
  f.set(p + "attention.layer_norm_rms_epsilon", Value::f32(s.eps));
  if (s.arch == "nanochat") f.set("nanochat.ffn_activation", Value::string(s.activation));
  f.set("tokenizer.ggml.model", Value::string("gpt2"));
  f.set("tokenizer.ggml.pre", Value::string("gpt-2"));
  f.set("tokenizer.ggml.tokens", Value::string_array(tokens));
  f.set("tokenizer.ggml.token_type", Value::int_array(gguf::ValueType::I32, types));
  f.set("tokenizer.ggml.merges", Value::string_array(merge_strs));
  f.set("tokenizer.ggml.bos_token_id", Value::u32(0));
  f.set("tokenizer.ggml.eos_token_id", Value::u32(0));
  f.set("tokenizer.ggml.eot_token_id", Value::u32(1));
  f.set("tokenizer.ggml.add_bos_token", Value::boolean(true));
  f.set("tokenizer.ggml.add_eos_token", Value::boolean(false));

  // Embedding (the tied head).
  std::vector<float> e(static_cast<size_t>(vocab * s.d));
  for (auto& v : e) v = 0.1f * uni(rng);  // logits O(1): sampling is not one-hot
  ref.embd.resize(e.size());
  TensorSpec te{"token_embd.weight", s.etype, {s.d, vocab}, {}};
  if (s.etype == gguf::GgmlType::F32) {
    te.bytes = f32_bytes(e);
    for (size_t i = 0; i < e.size(); ++i) ref.embd[i] = e[i];
  } else if (s.etype == gguf::GgmlType::F16) {
    te.bytes.resize(e.size() * 2);
    for (size_t i = 0; i < e.size(); ++i) {
      const uint16_t h = fp32_to_fp16(e[i]);
      std::memcpy(te.bytes.data() + 2 * i, &h, 2);
      ref.embd[i] = fp16_to_fp32(h);
    }
  } else {
    te.bytes.resize(size_t(vocab * s.d / 32 * 34));
    q8_0_quantize(e.data(), vocab, s.d, te.bytes.data());
    std::vector<float> back(e.size());
    q8_0_dequantize(te.bytes.data(), vocab, s.d, back.data());
    for (size_t i = 0; i < e.size(); ++i) ref.embd[i] = back[i];
  }
  f.tensors.push_back(te);

  auto norm = [&](int64_t n, std::vector<double>& out) {
    std::vector<float> w(static_cast<size_t>(n));
    for (auto& v : w) v = 1.0f + 0.2f * uni(rng);
    out.assign(w.begin(), w.end());
    return f32_bytes(w);
  };
  f.tensors.push_back(
      {"output_norm.weight", gguf::GgmlType::F32, {s.d}, norm(s.d, ref.output_norm)});
  const int64_t hd = s.d / s.heads, kv = s.kv_heads * hd;
  ref.layers.resize(size_t(s.layers));
  for (int64_t l = 0; l < s.layers; ++l) {
    Ref::Layer& L = ref.layers[size_t(l)];
    const std::string b = "blk." + std::to_string(l) + ".";
    auto mat = [&](const char* name, Mat& m, int64_t in, int64_t out) {
      m.rows = out;
      m.cols = in;
      m.codes = nanochat_test::random_codes(rng, in * out);
      // ~1/sqrt(in) keeps activations O(1); fp16-exact like a file's d.
      m.scale =
          fp16_to_fp32(fp32_to_fp16((0.8f + 0.4f * std::fabs(uni(rng))) / std::sqrt(float(in))));
      f.tensors.push_back({b + name, s.wtype, {in, out}, pack(m, s.wtype)});
    };
    f.tensors.push_back(
        {b + "attn_norm.weight", gguf::GgmlType::F32, {s.d}, norm(s.d, L.attn_norm)});
    mat("attn_q.weight", L.q, s.d, s.d);
    mat("attn_k.weight", L.k, s.d, kv);
    mat("attn_v.weight", L.v, s.d, kv);
    f.tensors.push_back(
        {b + "attn_sub_norm.weight", gguf::GgmlType::F32, {s.d}, norm(s.d, L.attn_sub_norm)});
    mat("attn_output.weight", L.o, s.d, s.d);
    f.tensors.push_back({b + "ffn_norm.weight", gguf::GgmlType::F32, {s.d}, norm(s.d, L.ffn_norm)});
    mat("ffn_gate.weight", L.gate, s.d, s.ffn);
    mat("ffn_up.weight", L.up, s.d, s.ffn);
    f.tensors.push_back(
        {b + "ffn_sub_norm.weight", gguf::GgmlType::F32, {s.ffn}, norm(s.ffn, L.ffn_sub_norm)});
    mat("ffn_down.weight", L.down, s.ffn, s.d);
  }
  return {f, ref};
}

// ---- the reference forward (double precision, whole sequence, no cache) ----------------

using Rows = std::vector<std::vector<double>>;

std::vector<double> rmsnorm(const std::vector<double>& x, const std::vector<double>& w,
                            double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  std::vector<double> o(x.size());
  for (size_t i = 0; i < x.size(); ++i) o[i] = x[i] * r * w[i];
  return o;
}

// BitLinear: per-token absmax int8 activations, ternary codes, one scale each.
std::vector<double> bitlinear(const Mat& m, const std::vector<double>& x) {
  double amax = 0;
  for (double v : x) amax = std::max(amax, std::fabs(v));
  const double s = 127.0 / std::max(amax, 1e-5);
  std::vector<double> q(x.size());
  for (size_t i = 0; i < x.size(); ++i) q[i] = std::clamp(std::nearbyint(x[i] * s), -128.0, 127.0);
  std::vector<double> y(static_cast<size_t>(m.rows));
  for (int64_t r = 0; r < m.rows; ++r) {
    double acc = 0;
    for (int64_t k = 0; k < m.cols; ++k) acc += m.codes[size_t(r * m.cols + k)] * q[size_t(k)];
    y[size_t(r)] = acc * m.scale / s;
  }
  return y;
}

// Logits for every position of `tokens`.
Rows reference_logits(const Ref& ref, const std::vector<int32_t>& tokens) {
  const Spec& s = ref.spec;
  const int64_t d = s.d, hd = d / s.heads, T = int64_t(tokens.size()), group = s.heads / s.kv_heads;
  Rows x(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t)
    x[size_t(t)].assign(ref.embd.begin() + tokens[size_t(t)] * d,
                        ref.embd.begin() + (tokens[size_t(t)] + 1) * d);
  auto rope = [&](std::vector<double>& v, int64_t nh, int64_t pos) {
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t i = 0; i < hd / 2; ++i) {
        const double a = double(pos) * std::pow(double(s.theta), -2.0 * double(i) / double(hd));
        double& x1 = v[size_t(h * hd + i)];
        double& x2 = v[size_t(h * hd + i + hd / 2)];
        const double n1 = x1 * std::cos(a) - x2 * std::sin(a),
                     n2 = x1 * std::sin(a) + x2 * std::cos(a);
        x1 = n1;
        x2 = n2;
      }
  };
  for (const Ref::Layer& L : ref.layers) {
    Rows q(static_cast<size_t>(T)), k(static_cast<size_t>(T)), v(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      const auto a = rmsnorm(x[size_t(t)], L.attn_norm, s.eps);
      q[size_t(t)] = bitlinear(L.q, a);
      k[size_t(t)] = bitlinear(L.k, a);
      v[size_t(t)] = bitlinear(L.v, a);
      rope(q[size_t(t)], s.heads, t);
      rope(k[size_t(t)], s.kv_heads, t);
    }
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> att(size_t(d), 0.0);
      for (int64_t h = 0; h < s.heads; ++h) {
        const int64_t g = h / group;
        std::vector<double> sc(static_cast<size_t>(t + 1));
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t i = 0; i < hd; ++i)
            dot += q[size_t(t)][size_t(h * hd + i)] * k[size_t(j)][size_t(g * hd + i)];
          sc[size_t(j)] = dot / std::sqrt(double(hd));
          mx = std::max(mx, sc[size_t(j)]);
        }
        double sum = 0;
        for (auto& e : sc) sum += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t i = 0; i < hd; ++i)
            att[size_t(h * hd + i)] += sc[size_t(j)] / sum * v[size_t(j)][size_t(g * hd + i)];
      }
      const auto o = bitlinear(L.o, rmsnorm(att, L.attn_sub_norm, s.eps));
      for (int64_t i = 0; i < d; ++i) x[size_t(t)][size_t(i)] += o[size_t(i)];
      const auto f = rmsnorm(x[size_t(t)], L.ffn_norm, s.eps);
      const auto g = bitlinear(L.gate, f), u = bitlinear(L.up, f);
      std::vector<double> hmid(static_cast<size_t>(s.ffn));
      for (int64_t i = 0; i < s.ffn; ++i) {
        const double gi = g[size_t(i)];
        const double act =
            s.activation == "silu" ? gi / (1.0 + std::exp(-gi)) : std::pow(std::max(gi, 0.0), 2);
        hmid[size_t(i)] = act * u[size_t(i)];
      }
      const auto dn = bitlinear(L.down, rmsnorm(hmid, L.ffn_sub_norm, s.eps));
      for (int64_t i = 0; i < d; ++i) x[size_t(t)][size_t(i)] += dn[size_t(i)];
    }
  }
  Rows logits(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    auto hn = rmsnorm(x[size_t(t)], ref.output_norm, s.eps);
    if (s.etype == gguf::GgmlType::Q8_0)  // the engine's head input: q8 blocks of 32
      for (int64_t b = 0; b < d / 32; ++b) {
        double amax = 0;
        for (int64_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(hn[size_t(b * 32 + i)]));
        const double dd = amax / 127;
        for (int64_t i = 0; i < 32; ++i)
          hn[size_t(b * 32 + i)] = dd > 0 ? std::round(hn[size_t(b * 32 + i)] / dd) * dd : 0.0;
      }
    logits[size_t(t)].resize(size_t(ref.vocab));
    for (int64_t r = 0; r < ref.vocab; ++r) {
      double acc = 0;
      for (int64_t i = 0; i < d; ++i) acc += ref.embd[size_t(r * d + i)] * hn[size_t(i)];
      logits[size_t(t)][size_t(r)] = acc;
    }
  }
  return logits;
}

std::string temp_path(const std::string& tag) {
  static std::atomic<int> n{0};
  return ::testing::TempDir() + "nanochat_engine_" + std::to_string(::getpid()) + "_" + tag + "_" +
         std::to_string(n++) + ".gguf";
}

// Writes a model and removes the file when the test ends.
struct TempModel {
  std::string path;
  explicit TempModel(const FileSpec& f, const std::string& tag = "m") : path(temp_path(tag)) {
    f.write(path);
  }
  ~TempModel() { std::remove(path.c_str()); }
};

std::vector<int32_t> random_tokens(uint32_t seed, int64_t n, int64_t vocab) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> u(2, int32_t(vocab - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& v : t) v = u(rng);
  return t;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}

// Max |a - b| over a vocab row, relative to the row's largest logit.
double rel_diff(const float* a, const std::vector<double>& b) {
  double m = 0, scale = 1e-9;
  for (size_t i = 0; i < b.size(); ++i) {
    m = std::max(m, std::fabs(double(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return m / scale;
}

std::string load_error(const std::string& path) {
  try {
    Model::load(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::string error_of(const FileSpec& f) {
  TempModel m(f, "bad");
  const std::string e = load_error(m.path);
  EXPECT_NE(e.find(m.path), std::string::npos) << "the error does not name the file: " << e;
  return e;
}

}  // namespace

// ---- numerics -------------------------------------------------------------------------

// Logits equal the double reference (up to int8 rounding flips that float-vs-double
// intermediate values cause now and then), for every variant the loader accepts, on the
// best ISA and on the scalar kernels.
TEST(Engine, MatchesReference) {
  GlobalStateGuard guard;
  std::vector<Spec> specs(5);
  specs[1].activation = "relu2";
  specs[1].etype = gguf::GgmlType::Q8_0;
  specs[1].wtype = gguf::GgmlType::TQ1_0;
  specs[2].arch = "bitnet";
  specs[2].etype = gguf::GgmlType::F32;
  specs[2].kv_heads = 4;  // plain multi-head attention
  specs[3].heads = 8;     // head_dim 32, 4 query heads per kv head
  specs[3].kv_heads = 2;
  specs[3].d = 256;
  specs[3].ffn = 768;
  specs[3].layers = 1;
  specs[4].heads = 2;  // head_dim 128
  specs[4].kv_heads = 1;
  specs[4].d = 256;
  specs[4].seed = 9;
  // Agreement is ~1e-7 of the largest logit. Now and then a float difference moves a
  // value across an int8 rounding boundary; a flipped code shifts the logits by up to
  // ~1% (here: scalar spec 0 from position 8 on, through the KV cache). So: every
  // position within 2e-2, and 90% of them within 1e-5.
  int checked = 0, tight = 0;
  for (size_t si = 0; si < specs.size(); ++si) {
    const Spec& spec = specs[si];
    auto [file, ref] = make_model(spec);
    TempModel tm(file);
    auto model = Model::load(tm.path);
    const auto tokens = random_tokens(uint32_t(si + 3), 19, ref.vocab);
    const Rows want = reference_logits(ref, tokens);
    for (Isa isa : {best_isa(), Isa::scalar}) {
      set_isa(isa);
      Session s(model);
      const std::vector<float> all = s.eval_all(tokens);
      for (size_t t = 0; t < tokens.size(); ++t) {
        const double e = rel_diff(all.data() + t * size_t(ref.vocab), want[t]);
        EXPECT_LT(e, 2e-2) << "spec " << si << " isa " << isa_name(isa) << " position " << t;
        ++checked;
        tight += e < 1e-5;
      }
      s.reset();
      const std::vector<float>& last = s.eval(tokens);
      EXPECT_LT(rel_diff(last.data(), want.back()), 2e-2) << "spec " << si;
    }
    reset_isa();
  }
  EXPECT_GE(tight, checked * 9 / 10) << tight << " of " << checked << " positions within 1e-5";
}

// Prefill in batches (more than kMaxBatch tokens, in uneven pieces) equals token by token,
// and eval_all's rows equal eval's logits; 1 and 2 threads agree.
TEST(Engine, BatchedPrefillEqualsTokenByToken) {
  GlobalStateGuard guard;
  Spec spec;
  spec.etype = gguf::GgmlType::Q8_0;
  auto [file, ref] = make_model(spec);
  TempModel tm(file);
  auto model = Model::load(tm.path);
  const int64_t n = kMaxBatch + 22;
  const auto tokens = random_tokens(7, n, ref.vocab);
  const size_t V = size_t(ref.vocab);
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    Session one(model);
    std::vector<float> by_token(size_t(n) * V);
    for (int64_t t = 0; t < n; ++t) {
      const auto& l = one.eval({tokens[size_t(t)]});
      std::copy(l.begin(), l.end(), by_token.begin() + t * int64_t(V));
    }
    Session batched(model);
    const std::vector<float> all = batched.eval_all(tokens);
    ASSERT_EQ(all.size(), by_token.size());
    const double scale = max_abs(all);
    for (size_t i = 0; i < all.size(); ++i)
      ASSERT_NEAR(all[i], by_token[i], 1e-5 * scale) << "threads " << threads << " index " << i;
    Session pieces(model);
    pieces.eval(std::vector<int32_t>(tokens.begin(), tokens.begin() + 100));
    const auto& last = pieces.eval(std::vector<int32_t>(tokens.begin() + 100, tokens.end()));
    for (size_t i = 0; i < V; ++i) ASSERT_NEAR(last[i], all[(size_t(n) - 1) * V + i], 1e-5 * scale);
    EXPECT_EQ(pieces.n_past(), n);
  }
}

// Decode steps (and a prefill batch) allocate nothing: every buffer lives in the Session.
TEST(Engine, EvalDoesNotAllocate) {
  GlobalStateGuard guard;
  Spec spec;
  spec.etype = gguf::GgmlType::Q8_0;
  auto [file, ref] = make_model(spec);
  TempModel tm(file);
  auto model = Model::load(tm.path);
  const auto prompt = random_tokens(4, 40, ref.vocab);
  const std::vector<int32_t> one = {7};
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    Session s(model);
    s.eval(prompt);
    s.eval(one);  // warm: the pool's threads exist
    g_allocs = 0;
    g_count_allocs = true;
    for (int i = 0; i < 8; ++i) s.eval(one);
    s.eval(prompt);
    g_count_allocs = false;
    EXPECT_EQ(g_allocs.load(), 0) << threads << " threads";
  }
}

// One Model, sessions on several threads at once (the pool serves one, the others run
// inline): every thread gets the logits a lone session gets.
TEST(Engine, SessionsOnThreadsShareAModel) {
  GlobalStateGuard guard;
  set_num_threads(2);
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<float>> want;
  for (uint32_t i = 0; i < 4; ++i) {
    prompts.push_back(random_tokens(20 + i, 30, ref.vocab));
    Session s(model);
    want.push_back(s.eval_all(prompts.back()));
  }
  std::vector<std::vector<float>> got(4);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      Session s(model);
      for (int rep = 0; rep < 3; ++rep) {
        s.reset();
        got[i] = s.eval_all(prompts[i]);
      }
    });
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(got[i], want[i]) << i;
}

// 8 threads x 100 generates on one shared model (sessions made and dropped, the kernels'
// pools shared): every result equals a lone session's. .ci/run runs this under TSan.
TEST(Engine, EightThreadsHundredGeneratesShareAModel) {
  GlobalStateGuard guard;
  set_num_threads(2);
  Spec spec;
  spec.layers = 1;
  spec.ffn = 256;
  spec.ctx = 64;
  auto [file, ref] = make_model(spec);
  TempModel tm(file);
  auto model = Model::load(tm.path);
  SamplingParams sp;
  sp.max_tokens = 4;
  sp.stop_at_eos = false;
  constexpr int kThreads = 8, kReps = 100;
  std::vector<std::vector<int32_t>> want(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    sp.seed = uint64_t(i);
    want[size_t(i)] = Session(model).generate(model->tokenize("hello world"), sp).tokens;
  }
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      SamplingParams p = sp;
      p.seed = uint64_t(i);
      Session kept(model);  // one session reused, one fresh per call
      for (int rep = 0; rep < kReps; ++rep) {
        kept.reset();
        const auto a = kept.generate(model->tokenize("hello world"), p).tokens;
        const auto b = Session(model).generate(model->tokenize("hello world"), p).tokens;
        if (a != want[size_t(i)] || b != want[size_t(i)] ||
            model->detokenize(a) != model->detokenize(want[size_t(i)]))
          mismatches.fetch_add(1);
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// LoadOptions.n_threads applies to that model's sessions, not to the library-wide count
// (Model::load used to replace the one pool every other model ran on).
TEST(Engine, LoadThreadsDoNotChangeOtherModels) {
  GlobalStateGuard guard;
  set_num_threads(2);
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  LoadOptions o;
  o.n_threads = 3;
  auto own = Model::load(tm.path, o);
  EXPECT_EQ(own->n_threads(), 3);
  EXPECT_EQ(num_threads(), 2);
  auto shared = Model::load(tm.path);
  EXPECT_EQ(shared->n_threads(), 0);
  const auto toks = random_tokens(5, 20, ref.vocab);
  Session a(own), b(shared);
  EXPECT_EQ(a.eval(toks), b.eval(toks));  // thread count never changes results
  EXPECT_EQ(num_threads(), 2);
  o.n_threads = kMaxThreads + 1;
  EXPECT_THROW(Model::load(tm.path, o), Error);
}

// A TQ1_0 file holds the same codes as the TQ2_0 one: identical logits.
TEST(Engine, Tq1EqualsTq2) {
  Spec a;
  Spec b = a;
  b.wtype = gguf::GgmlType::TQ1_0;
  auto fa = make_model(a).first;
  auto fb = make_model(b).first;
  TempModel ta(fa), tb(fb);
  auto ma = Model::load(ta.path), mb = Model::load(tb.path);
  EXPECT_EQ(ma->info().weight_type, "TQ2_0");
  EXPECT_EQ(mb->info().weight_type, "TQ1_0");
  const auto tokens = random_tokens(5, 12, ma->info().vocab_size);
  Session sa(ma), sb(mb);
  EXPECT_EQ(sa.eval_all(tokens), sb.eval_all(tokens));
}

TEST(Engine, Info) {
  Spec spec;
  spec.etype = gguf::GgmlType::Q8_0;
  auto [file, ref] = make_model(spec);
  TempModel tm(file);
  auto model = Model::load(tm.path);
  const ModelInfo& i = model->info();
  EXPECT_EQ(i.path, tm.path);
  EXPECT_EQ(i.architecture, "nanochat");
  EXPECT_EQ(i.name, "test");
  EXPECT_EQ(i.vocab_size, ref.vocab);
  EXPECT_EQ(i.d_model, 256);
  EXPECT_EQ(i.n_layers, 2);
  EXPECT_EQ(i.n_heads, 4);
  EXPECT_EQ(i.n_kv_heads, 2);
  EXPECT_EQ(i.head_dim, 64);
  EXPECT_EQ(i.ffn_hidden, 512);
  EXPECT_EQ(i.context_length, 256);
  EXPECT_EQ(i.activation, "silu");
  EXPECT_EQ(i.embd_type, "Q8_0");
  EXPECT_EQ(i.bos_id, 0);
  EXPECT_EQ(i.eos_id, 0);
  EXPECT_EQ(i.eot_id, 1);
  EXPECT_TRUE(i.add_bos);
  EXPECT_FLOAT_EQ(i.rope_theta, 10000.0f);
  EXPECT_FLOAT_EQ(i.norm_eps, 1e-5f);
  const int64_t ternary = 2 * (256 * 256 * 2 + 256 * 128 * 2 + 256 * 512 * 3);
  const int64_t norms = 256 + 2 * (3 * 256 + 512);
  EXPECT_EQ(i.n_params, ternary + norms + ref.vocab * 256);
  EXPECT_EQ(i.weight_bytes, ternary / 4 + ref.vocab * 256 / 32 * 34 + 4 * norms);
  // Tokenizer round trip through the model.
  const auto ids = model->tokenize("hello world");
  EXPECT_EQ(model->detokenize(ids), "hello world");
  EXPECT_EQ(model->tokenize("<|bos|>hi", true).front(), 0);
  EXPECT_EQ(model->token_text(0), "");
  EXPECT_EQ(model->token_id("he"), model->tokenize("he").front());
  EXPECT_THROW(model->token_text(int32_t(ref.vocab)), Error);
}

// ---- sessions and generation ------------------------------------------------------------

TEST(Engine, SessionStateAndErrors) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  EXPECT_THROW(Session(model, -1), Error);
  EXPECT_THROW(Session(model, 257), Error);  // > context_length
  Session s(model, 8);
  EXPECT_EQ(s.n_ctx(), 8);
  EXPECT_THROW(s.eval({}), Error);
  EXPECT_THROW(s.eval({int32_t(ref.vocab)}), Error);
  EXPECT_THROW(s.eval({-1}), Error);
  EXPECT_THROW(s.eval_all({3, int32_t(ref.vocab)}), Error);
  EXPECT_EQ(s.n_past(), 0);  // a failed call changes nothing
  const auto tokens = random_tokens(3, 8, ref.vocab);
  const std::vector<float> first = s.eval(tokens);
  EXPECT_EQ(s.n_past(), 8);
  EXPECT_THROW(s.eval({5}), ContextFullError);
  EXPECT_THROW(s.eval({5}), Error);  // a ContextFullError is an Error
  EXPECT_EQ(s.n_past(), 8);
  // Rewind and replay: the same logits.
  EXPECT_THROW(s.truncate(9), Error);
  EXPECT_THROW(s.truncate(-1), Error);
  s.truncate(5);
  EXPECT_EQ(s.n_past(), 5);
  EXPECT_EQ(s.eval(std::vector<int32_t>(tokens.begin() + 5, tokens.end())), first);
  s.reset();
  EXPECT_EQ(s.n_past(), 0);
  EXPECT_EQ(s.eval(tokens), first);
  // generate from a full context stops at once; from a nearly full one at n_ctx.
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.stop_at_eos = false;
  GenerateResult r = s.generate({}, sp);
  EXPECT_EQ(r.stop_reason, "context_full");
  EXPECT_TRUE(r.tokens.empty());
  s.truncate(5);
  r = s.generate({}, sp);  // the logits of position 4 are recomputed
  EXPECT_EQ(r.stop_reason, "context_full");
  EXPECT_EQ(r.tokens.size(), 3u);
  EXPECT_EQ(s.n_past(), 8);
  EXPECT_THROW(s.generate(tokens, sp), ContextFullError);
  Session empty(model);
  EXPECT_THROW(empty.generate({}, sp), Error);
  sp.max_tokens = -1;
  EXPECT_THROW(empty.generate({3}, sp), Error);
  sp.max_tokens = 4;
  sp.stop_strings = {""};
  EXPECT_THROW(empty.generate({3}, sp), Error);
  sp.stop_strings = {};
  sp.stop_tokens = {int32_t(ref.vocab)};
  EXPECT_THROW(empty.generate({3}, sp), Error);
  sp.stop_tokens = {};
  sp.top_p = 2.0f;  // the sampler's own check
  EXPECT_THROW(empty.generate({3}, sp), Error);
  EXPECT_EQ(empty.n_past(), 0);
}

// Greedy generation is the argmax chain of eval's logits; pieces add up to the text;
// decode steps are one per token after the first.
TEST(Engine, GreedyGenerateFollowsEval) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  const auto prompt = random_tokens(11, 6, ref.vocab);
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.max_tokens = 12;
  sp.stop_at_eos = false;
  Session s(model);
  std::string streamed;
  std::vector<int32_t> seen;
  const GenerateResult r = s.generate(prompt, sp, [&](int32_t t, const std::string& piece) {
    if (t >= 0) seen.push_back(t);
    streamed += piece;
    return true;
  });
  EXPECT_EQ(r.stop_reason, "max_tokens");
  EXPECT_EQ(r.tokens.size(), 12u);
  EXPECT_EQ(r.prompt_tokens, 6);
  EXPECT_EQ(r.decode_steps, 11);
  EXPECT_EQ(seen, r.tokens);
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(r.text, model->detokenize(r.tokens));
  EXPECT_GT(r.prefill_seconds, 0.0);
  EXPECT_EQ(s.n_past(), 18);
  Session manual(model);
  std::vector<float> l = manual.eval(prompt);
  for (int32_t want : r.tokens) {
    const int32_t arg = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
    ASSERT_EQ(arg, want);
    l = manual.eval({arg});
  }
  // Continuing from the cache (the last token is still pending) matches too.
  sp.max_tokens = 3;
  const GenerateResult more = s.generate({}, sp);
  for (int32_t want : more.tokens) {
    const int32_t arg = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
    ASSERT_EQ(arg, want);
    l = manual.eval({arg});
  }
  // max_tokens 0: no tokens, prompt still fed.
  Session z(model);
  sp.max_tokens = 0;
  EXPECT_TRUE(z.generate(prompt, sp).tokens.empty());
  EXPECT_EQ(z.n_past(), 6);
}

TEST(Engine, SeededSamplingAndStops) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  const auto prompt = random_tokens(12, 5, ref.vocab);
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.max_tokens = 24;
  sp.stop_at_eos = false;
  sp.seed = 42;
  Session s(model);
  const GenerateResult a = s.generate(prompt, sp);
  s.reset();
  const GenerateResult b = s.generate(prompt, sp);
  EXPECT_EQ(a.tokens, b.tokens);
  s.reset();
  sp.seed = 43;
  const GenerateResult c = s.generate(prompt, sp);
  EXPECT_NE(a.tokens, c.tokens);
  sp.seed = 42;

  // A stop token ends generation and is not part of the output.
  sp.stop_tokens = {a.tokens[5]};
  s.reset();
  const GenerateResult st = s.generate(prompt, sp);
  const size_t first =
      size_t(std::find(a.tokens.begin(), a.tokens.end(), a.tokens[5]) - a.tokens.begin());
  EXPECT_EQ(st.stop_reason, "stop_token");
  EXPECT_EQ(st.tokens, std::vector<int32_t>(a.tokens.begin(), a.tokens.begin() + long(first)));

  // A stop string cuts the text where it starts; the stream adds up to the cut text.
  sp.stop_tokens = {};
  const std::string text = a.text;
  ASSERT_GE(text.size(), 8u);
  const std::string stop = text.substr(4, 3);
  s.reset();
  std::string streamed;
  sp.stop_strings = {"\x01\x02 never", stop};
  const GenerateResult ss = s.generate(prompt, sp, [&](int32_t, const std::string& p) {
    streamed += p;
    return true;
  });
  EXPECT_EQ(ss.stop_reason, "stop_string");
  EXPECT_EQ(ss.text, text.substr(0, text.find(stop)));
  EXPECT_EQ(streamed, ss.text);

  // The callback stops it.
  s.reset();
  sp.stop_strings = {};
  int calls = 0;
  const GenerateResult cb =
      s.generate(prompt, sp, [&](int32_t, const std::string&) { return ++calls < 3; });
  EXPECT_EQ(cb.stop_reason, "callback");
  EXPECT_EQ(cb.tokens.size(), 3u);
}

// eos and eot are stop tokens when stop_at_eos: a file whose eos is a token greedy
// decoding produces stops there.
TEST(Engine, StopAtEos) {
  auto [file, ref] = make_model(Spec{});
  const auto prompt = random_tokens(13, 5, ref.vocab);
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.max_tokens = 10;
  sp.stop_at_eos = false;
  std::vector<int32_t> greedy;
  {
    TempModel tm(file);
    Session s(Model::load(tm.path));
    greedy = s.generate(prompt, sp).tokens;
  }
  ASSERT_EQ(greedy.size(), 10u);
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"}) {
    FileSpec f = file;
    f.set(key, gguf::Value::u32(uint32_t(greedy[4])));
    TempModel tm(f);
    auto model = Model::load(tm.path);
    Session s(model);
    sp.stop_at_eos = true;
    const GenerateResult r = s.generate(prompt, sp);
    const auto first = std::find(greedy.begin(), greedy.end(), greedy[4]);
    EXPECT_EQ(r.stop_reason, "stop_token") << key;
    EXPECT_EQ(r.tokens, std::vector<int32_t>(greedy.begin(), first)) << key;
    s.reset();
    sp.stop_at_eos = false;
    EXPECT_EQ(s.generate(prompt, sp).tokens, greedy) << key;
  }
}

// UTF-8 holding back and stop strings, piece by piece.
TEST(Engine, TextStream) {
  TextStream u({});
  EXPECT_EQ(u.push("a\xC3"), "a");  // é = C3 A9 split across tokens
  EXPECT_EQ(u.push("\xA9"), "\xC3\xA9");
  EXPECT_EQ(u.push("\xF0\x9F"), "");  // a 4-byte emoji in three pieces
  EXPECT_EQ(u.push("\x98"), "");
  EXPECT_EQ(u.push("\x80!"), "\xF0\x9F\x98\x80!");
  EXPECT_EQ(u.push("\x80"), "\x80");  // a stray continuation byte cannot complete: out
  EXPECT_EQ(u.push("\xE2\x82"), "");
  EXPECT_EQ(u.flush(), "\xE2\x82");  // the end: flushed as is
  EXPECT_EQ(u.text(), "a\xC3\xA9\xF0\x9F\x98\x80!\x80\xE2\x82");

  TextStream s({"STOP", "xy"});
  EXPECT_EQ(s.push("hello S"), "hello ");  // "S" may start "STOP"
  EXPECT_EQ(s.push("T"), "");
  EXPECT_EQ(s.push("AR"), "STAR");  // it did not
  EXPECT_EQ(s.push("x"), "");
  EXPECT_EQ(s.push("ST"), "x");  // "x" is no longer a prefix of "xy"; "ST" is of "STOP"
  EXPECT_FALSE(s.stopped());
  EXPECT_EQ(s.push("OP and more"), "");  // completed: cut before it
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(s.text(), "hello STARx");
  EXPECT_EQ(s.push("later"), "");
  EXPECT_EQ(s.flush(), "");

  TextStream w({"ab"});
  EXPECT_EQ(w.push("zzab"), "zz");  // a stop inside one token
  EXPECT_TRUE(w.stopped());
  EXPECT_THROW(TextStream({"ok", ""}), Error);
  TextStream h({"end"});
  EXPECT_EQ(h.push("the en"), "the ");
  EXPECT_EQ(h.flush(), "en");  // generation ended (max_tokens): the held text goes out
}

// ---- load errors -------------------------------------------------------------------------

TEST(EngineLoad, ErrorsNameFileAndWhat) {
  const Spec spec;
  const FileSpec good = make_model(spec).first;
  auto contains = [](const std::string& e, const std::string& what) {
    return e.find(what) != std::string::npos;
  };
  {
    TempModel ok(good);
    EXPECT_NO_THROW(Model::load(ok.path));
  }
  EXPECT_TRUE(contains(load_error("/nonexistent/x.gguf"), "/nonexistent/x.gguf"));

  FileSpec f = good;
  f.erase_tensor("blk.1.ffn_up.weight");
  EXPECT_TRUE(contains(error_of(f), "missing tensor 'blk.1.ffn_up.weight'"));

  f = good;
  f.tensor("blk.0.attn_k.weight").dims = {256, 256};
  f.tensor("blk.0.attn_k.weight").bytes.resize(256 * 256 / 256 * 66);
  EXPECT_TRUE(
      contains(error_of(f), "'blk.0.attn_k.weight' has dims [256, 256], expected [256, 128]"));

  f = good;  // a norm stored as F16
  {
    TensorSpec& t = f.tensor("blk.0.ffn_norm.weight");
    t.type = gguf::GgmlType::F16;
    t.bytes.resize(512);
  }
  EXPECT_TRUE(contains(error_of(f), "'blk.0.ffn_norm.weight' has type F16, expected F32"));

  f = good;  // a ternary matrix stored as F32
  {
    TensorSpec& t = f.tensor("blk.1.attn_q.weight");
    t.type = gguf::GgmlType::F32;
    t.bytes.assign(256 * 256 * 4, 0);
  }
  EXPECT_TRUE(contains(error_of(f), "'blk.1.attn_q.weight' has type F32, expected TQ2_0 or TQ1_0"));

  f = good;  // one block with a different fp16 d: not a per-tensor-scale export
  {
    TensorSpec& t = f.tensor("blk.0.ffn_gate.weight");
    t.bytes[66 * 3 + 64] ^= 0x01;
  }
  EXPECT_TRUE(contains(error_of(f), "'blk.0.ffn_gate.weight': block 3 has scale"));

  f = good;  // TQ2_0 code 3 (the 2-bit value no weight has)
  f.tensor("blk.1.ffn_down.weight").bytes[66 * 2 + 5] = 0xFF;
  EXPECT_TRUE(contains(error_of(f), "'blk.1.ffn_down.weight'"));
  EXPECT_TRUE(contains(error_of(f), "corrupt"));

  {  // a TQ1_0 byte the packer never writes (1: no base-3 value maps to it)
    Spec s1 = spec;
    s1.wtype = gguf::GgmlType::TQ1_0;
    FileSpec g = make_model(s1).first;
    g.tensor("blk.0.attn_v.weight").bytes[54 * 7 + 3] = 1;
    const std::string e = error_of(g);
    EXPECT_TRUE(contains(e, "'blk.0.attn_v.weight': TQ1_0 block 7")) << e;
    // Mixed ternary types in one file.
    FileSpec mixed = good;
    mixed.tensor("blk.1.ffn_up.weight") = make_model(s1).first.tensor("blk.1.ffn_up.weight");
    EXPECT_TRUE(contains(error_of(mixed), "'blk.1.ffn_up.weight' is TQ1_0 but earlier"));
  }

  f = good;  // an untied head is not what this engine runs
  f.tensors.push_back(
      TensorSpec{"output.weight", gguf::GgmlType::F32, {256, 4}, std::vector<uint8_t>(4096)});
  EXPECT_TRUE(contains(error_of(f), "unexpected tensor 'output.weight'"));

  f = good;
  f.set("nanochat.attention.head_count_kv", gguf::Value::u32(3));
  EXPECT_TRUE(contains(error_of(f), "not a multiple of attention.head_count_kv (3)"));
  f = good;
  f.set("nanochat.attention.head_count", gguf::Value::u32(3));
  f.set("nanochat.attention.head_count_kv", gguf::Value::u32(1));
  EXPECT_TRUE(contains(error_of(f), "(3) x head dim (64) != embedding_length (256)"));
  f = good;
  f.set("nanochat.rope.dimension_count", gguf::Value::u32(32));
  EXPECT_TRUE(contains(error_of(f), "rope.dimension_count"));
  f = good;
  f.set("nanochat.vocab_size", gguf::Value::u32(999));
  EXPECT_TRUE(contains(error_of(f), "'nanochat.vocab_size' (999) != the tokenizer's"));
  f = good;
  f.set("nanochat.context_length", gguf::Value::u32(0));
  EXPECT_TRUE(contains(error_of(f), "'nanochat.context_length' = 0 is out of range"));
  f = good;
  f.set("nanochat.attention.layer_norm_rms_epsilon", gguf::Value::f32(-1.0f));
  EXPECT_TRUE(contains(error_of(f), "layer_norm_rms_epsilon"));
  f = good;
  f.erase_kv("nanochat.block_count");
  EXPECT_TRUE(contains(error_of(f), "nanochat.block_count"));
  f = good;
  f.set("nanochat.ffn_activation", gguf::Value::string("gelu"));
  EXPECT_TRUE(contains(error_of(f), "'nanochat.ffn_activation' = 'gelu'"));
  f = good;
  f.set("general.architecture", gguf::Value::string("llama"));
  EXPECT_TRUE(contains(error_of(f), "'llama' is not supported"));
  f = good;
  f.set("tokenizer.ggml.eot_token_id", gguf::Value::u32(100000));
  EXPECT_TRUE(contains(error_of(f), "tokenizer.ggml.eot_token_id"));
  f = good;  // the tokenizer has one token fewer than token_embd has rows
  {
    for (auto& kv : f.kvs)
      if (kv.first == "tokenizer.ggml.tokens") {
        auto v = kv.second.as_string_array();
        v.pop_back();
        kv.second = gguf::Value::string_array(v);
      } else if (kv.first == "tokenizer.ggml.token_type") {
        auto v = kv.second.as_int_array();
        v.pop_back();
        kv.second = gguf::Value::int_array(gguf::ValueType::I32, v);
      }
    f.erase_kv("nanochat.vocab_size");
  }
  EXPECT_TRUE(contains(error_of(f), "'token_embd.weight' has dims"));

  // d_model not a multiple of 256 (checked before any tensor).
  f = good;
  f.set("nanochat.embedding_length", gguf::Value::u32(384));
  f.set("nanochat.attention.head_count", gguf::Value::u32(6));
  EXPECT_TRUE(contains(error_of(f), "multiples of 256"));
  f = good;
  f.set("nanochat.feed_forward_length", gguf::Value::u32(500));
  EXPECT_TRUE(contains(error_of(f), "multiples of 256"));
}

// A truncated file (every tensor byte counts) fails with the file's name, never crashes.
// Sliding-window attention (docs/gguf.md): a window covering the context computes what
// full attention does; a small one keeps a ring that wraps (ctx 256 > window 4 + 128), and
// token-by-token decode equals batched prefill across the wrap; truncate within the ring
// works and past it is refused.
TEST(Engine, SlidingWindowRing) {
  GlobalStateGuard guard;
  set_num_threads(1);
  auto [file, ref] = make_model(Spec{});
  const auto tokens = random_tokens(11, 200, ref.vocab);
  TempModel full_tm(file);
  const std::vector<float> full = Session(Model::load(full_tm.path)).eval_all(tokens);
  const double scale = max_abs(full);
  FileSpec wide = file;
  wide.set("nanochat.attention.sliding_window", gguf::Value::u32(256));
  wide.set("nanochat.attention.sliding_window_pattern",
           gguf::Value::int_array(gguf::ValueType::BOOL, {1, 0}));
  TempModel wide_tm(wide);
  const std::vector<float> w = Session(Model::load(wide_tm.path)).eval_all(tokens);
  for (size_t i = 0; i < w.size(); ++i) ASSERT_NEAR(w[i], full[i], 1e-6 * scale) << i;

  FileSpec small = wide;
  small.set("nanochat.attention.sliding_window", gguf::Value::u32(4));
  TempModel small_tm(small);
  auto model = Model::load(small_tm.path);
  EXPECT_EQ(model->info().sliding_window, 4);
  EXPECT_EQ(model->info().n_sliding_layers, 1);
  Session batched(model);
  const std::vector<float> all = batched.eval_all(tokens);
  const size_t V = size_t(ref.vocab);
  double diff = 0.0;  // the window changes the model
  for (size_t i = 0; i < all.size(); ++i) diff = std::max(diff, double(std::fabs(all[i] - full[i])));
  EXPECT_GT(diff, 1e-3 * scale);
  Session one(model);
  for (size_t t = 0; t < tokens.size(); ++t) {
    const auto& l = one.eval({tokens[t]});
    for (size_t i = 0; i < V; ++i) ASSERT_NEAR(l[i], all[t * V + i], 1e-5 * scale) << t;
  }
  one.truncate(200 - int32_t(kMaxBatch));
  const auto& again = one.eval({tokens[200 - kMaxBatch]});
  for (size_t i = 0; i < V; ++i)
    ASSERT_NEAR(again[i], all[(200 - kMaxBatch) * V + i], 1e-5 * scale);
  Session deep(model);
  deep.eval_all(tokens);
  try {
    deep.truncate(10);
    FAIL() << "truncate past the ring must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sliding-window layers' KV rings"), std::string::npos);
  }
  EXPECT_EQ(deep.n_past(), 200);
}

TEST(EngineLoad, OptionKeysAreValidated) {
  const FileSpec good = make_model(Spec{}).first;
  auto has = [](const std::string& e, const std::string& what) {
    return e.find(what) != std::string::npos;
  };
  using gguf::Value;
  FileSpec f = good;
  f.set("nanochat.attention.sliding_window", Value::u32(8));
  EXPECT_TRUE(has(error_of(f), "must come together"));
  f.set("nanochat.attention.sliding_window_pattern",
        Value::int_array(gguf::ValueType::BOOL, {1, 0, 1}));
  EXPECT_TRUE(has(error_of(f), "has 3 entries, expected block_count = 2"));
  f.set("nanochat.attention.sliding_window_pattern",
        Value::int_array(gguf::ValueType::U8, {1, 0}));
  EXPECT_TRUE(has(error_of(f), "expected array[bool]"));

  f = good;
  f.set("nanochat.something_new", Value::u32(1));
  EXPECT_TRUE(has(error_of(f), "unknown metadata key 'nanochat.something_new'"));

  f = good;  // MoE keys without their tensors
  f.set("nanochat.expert_count", Value::u32(4));
  f.set("nanochat.expert_used_count", Value::u32(2));
  f.set("nanochat.expert_feed_forward_length", Value::u32(256));
  f.set("nanochat.expert_shared_count", Value::u32(0));
  f.set("nanochat.expert_gating_func", Value::string("sigmoid"));
  f.set("nanochat.expert_weights_norm", Value::boolean(true));
  f.set("nanochat.leading_dense_block_count", Value::u32(0));
  EXPECT_TRUE(has(error_of(f), "missing tensor 'blk.0.ffn_gate_inp.weight'"));
  f.set("nanochat.leading_dense_block_count", Value::u32(2));  // every block dense: loads
  {
    TempModel ok(f);
    EXPECT_EQ(Model::load(ok.path)->info().n_experts, 4);
  }
  f.set("nanochat.expert_used_count", Value::u32(5));
  EXPECT_TRUE(has(error_of(f), "'nanochat.expert_used_count' = 5 is out of range [1, 4]"));
  f = good;
  f.set("nanochat.expert_used_count", Value::u32(2));
  EXPECT_TRUE(has(error_of(f), "without 'nanochat.expert_count'"));

  f = good;  // mHC keys without their tensors
  f.set("nanochat.hc.stream_count", Value::u32(2));
  f.set("nanochat.hc.sinkhorn_iterations", Value::u32(20));
  f.set("nanochat.hc.dynamic", Value::boolean(false));
  f.set("nanochat.hc.res_type", Value::string("sinkhorn"));
  EXPECT_TRUE(has(error_of(f), "missing tensor 'blk.0.hc_attn_pre.weight'"));
  f.set("nanochat.hc.res_type", Value::string("exact"));
  EXPECT_TRUE(has(error_of(f), "'nanochat.hc.res_type' = 'exact'"));
  f.erase_kv("nanochat.hc.stream_count");
  EXPECT_TRUE(has(error_of(f), "without 'nanochat.hc.stream_count'"));
}

TEST(EngineLoad, TruncatedFile) {
  TempModel tm(make_model(Spec{}).first);
  std::ifstream in(tm.path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (size_t keep : {size_t(0), size_t(10), bytes.size() / 2, bytes.size() - 1}) {
    const std::string p = temp_path("trunc");
    std::ofstream(p, std::ios::binary).write(bytes.data(), std::streamsize(keep));
    const std::string e = load_error(p);
    EXPECT_NE(e.find(p), std::string::npos) << e;
    std::remove(p.c_str());
  }
}

// A file may claim a context of 2^24 tokens: a session gets min(context_length, 4096) unless
// the caller names one, and a context whose KV cache passes the limit is refused with an
// error naming the file, the bytes needed and allowed (before: 2^24 threw std::bad_alloc
// out of the session, 2^20 allocated and zeroed the whole cache).
TEST(EngineLoad, ContextAndKvCacheAreCapped) {
  FileSpec f = make_model(Spec{}).first;
  for (uint32_t claimed : {uint32_t(1) << 20, uint32_t(1) << 24}) {
    f.set("nanochat.context_length", gguf::Value::u32(claimed));
    TempModel tm(f);
    auto model = Model::load(tm.path);
    EXPECT_EQ(model->info().context_length, int32_t(claimed));
    Session s(model);
    EXPECT_EQ(s.n_ctx(), kDefaultMaxContext);
    EXPECT_EQ(s.eval({2, 3, 4}).size(), size_t(model->info().vocab_size));
    // 2 layers x (K, V) x 2 kv heads x 64 dims x 4 bytes per token
    const int64_t per_token = 2 * 2 * 2 * 64 * 4;
    EXPECT_EQ(Session::kv_cache_bytes(*model, 1), per_token);
    const int64_t limit = int64_t(64) << 20;
    Session big(model, 8192, limit);  // explicit, larger than the default, within the limit
    EXPECT_EQ(big.n_ctx(), 8192);
    for (int64_t cap : {limit, int64_t(0)}) {  // 0: the default 4 GiB
      if (cap == 0 && claimed < (uint32_t(1) << 24)) continue;  // 2^20 x 2 KiB fits 4 GiB
      try {
        Session over(model, int32_t(claimed), cap);
        ADD_FAILURE() << "no error for a context of " << claimed;
      } catch (const Error& e) {
        const std::string m = e.what();
        const int64_t allowed = cap ? cap : kDefaultMaxKvBytes;
        EXPECT_NE(m.find(tm.path), std::string::npos) << m;
        EXPECT_NE(m.find(std::to_string(claimed) + " tokens"), std::string::npos) << m;
        EXPECT_NE(m.find(std::to_string(per_token * claimed) + " bytes"), std::string::npos) << m;
        EXPECT_NE(m.find("allowed " + std::to_string(allowed)), std::string::npos) << m;
      }
    }
    EXPECT_THROW(Session(model, 16, -1), Error);
    // The C API: the default session is capped; the limited one refuses cleanly.
    nc_model* cm = nullptr;
    ASSERT_EQ(nc_model_load(tm.path.c_str(), &cm), NC_OK);
    nc_session* cs = nullptr;
    ASSERT_EQ(nc_session_new(cm, 0, &cs), NC_OK);
    nc_session_free(cs);
    cs = nullptr;
    EXPECT_EQ(nc_session_new_limited(cm, int32_t(claimed), limit, &cs), NC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(cs, nullptr);
    EXPECT_NE(std::string(nc_last_error()).find(tm.path), std::string::npos) << nc_last_error();
    ASSERT_EQ(nc_session_new_limited(cm, 8192, limit, &cs), NC_OK);
    EXPECT_EQ(nc_session_n_past(cs), 0);
    nc_session_free(cs);
    nc_model_free(cm);
  }
}

// NaN or inf in a norm, the embedding or any other float tensor is refused at load, naming
// the tensor (before: the model loaded and produced NaN logits at the first generate).
TEST(EngineLoad, NonFiniteWeightsAreRefused) {
  const FileSpec good = make_model(Spec{}).first;
  auto has = [](const std::string& e, const std::string& what) {
    return e.find(what) != std::string::npos;
  };
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(),
                       std::numeric_limits<float>::infinity()};
  for (const char* name : {"blk.0.attn_norm.weight", "blk.1.ffn_sub_norm.weight",
                           "output_norm.weight", "blk.1.attn_sub_norm.weight"})
    for (float x : bad) {
      FileSpec f = good;
      std::memcpy(f.tensor(name).bytes.data() + 4 * 5, &x, 4);
      const std::string e = error_of(f);
      EXPECT_TRUE(has(e, std::string("tensor '") + name + "': value 5 is not finite")) << e;
    }
  for (uint16_t h : {uint16_t(0x7e00), uint16_t(0xfc00)}) {  // f16 NaN, -inf
    FileSpec f = good;
    std::memcpy(f.tensor("token_embd.weight").bytes.data() + 2 * 300, &h, 2);
    const std::string e = error_of(f);
    EXPECT_TRUE(has(e, "tensor 'token_embd.weight': value 300 (token 1) is not finite")) << e;
  }
}

TEST(EngineLoad, SinkhornIterationsAreCapped) {
  FileSpec f = make_model(Spec{}).first;
  f.set("nanochat.hc.stream_count", gguf::Value::u32(2));
  f.set("nanochat.hc.dynamic", gguf::Value::boolean(false));
  f.set("nanochat.hc.res_type", gguf::Value::string("sinkhorn"));
  f.set("nanochat.hc.sinkhorn_iterations", gguf::Value::u32(100000));
  const std::string e = error_of(f);
  EXPECT_NE(e.find("'nanochat.hc.sinkhorn_iterations' = 100000 is out of range [0, 1000]"),
            std::string::npos) << e;
}

// After load the model reads nothing from the file: truncating it (which makes any access
// to the old mapping SIGBUS) leaves generation working. In a child process (death test).
TEST(EngineLoad, ModelOwnsItsWeights) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto run = [&] {
    auto model = Model::load(tm.path);
    const std::vector<float> before = Session(model).eval({2, 3, 4, 5});
    if (::truncate(tm.path.c_str(), 0) != 0) std::exit(3);
    Session s(model);
    if (s.eval({2, 3, 4, 5}) != before) std::exit(4);
    SamplingParams p;
    p.max_tokens = 8;
    p.temperature = 0.0f;
    s.generate({6, 7}, p);
    std::exit(0);
  };
  EXPECT_EXIT(run(), ::testing::ExitedWithCode(0), "");
}

// ---- the C API -------------------------------------------------------------------------------

namespace {
struct CGen {
  std::string text;
  std::vector<int32_t> tokens;
  int stop_after = -1;
};
int c_callback(int32_t token, const char* piece, size_t len, void* ud) {
  CGen* g = static_cast<CGen*>(ud);
  g->text.append(piece, len);
  if (token >= 0) g->tokens.push_back(token);
  return g->stop_after >= 0 && int(g->tokens.size()) >= g->stop_after;
}
}  // namespace

TEST(EngineCApi, StatusesAndLastError) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  nc_model* m = nullptr;
  EXPECT_EQ(nc_model_load("/nonexistent/model.gguf", &m), NC_ERR_FILE);
  EXPECT_EQ(m, nullptr);
  EXPECT_NE(std::string(nc_last_error()).find("/nonexistent/model.gguf"), std::string::npos);
  EXPECT_EQ(nc_model_load(nullptr, &m), NC_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(nc_model_load(tm.path.c_str(), nullptr), NC_ERR_INVALID_ARGUMENT);
  {  // a corrupt file is a file error
    FileSpec bad = file;
    bad.erase_tensor("output_norm.weight");
    TempModel tb(bad, "cbad");
    EXPECT_EQ(nc_model_load(tb.path.c_str(), &m), NC_ERR_FILE);
    EXPECT_NE(std::string(nc_last_error()).find("output_norm.weight"), std::string::npos);
  }
  ASSERT_EQ(nc_model_load(tm.path.c_str(), &m), NC_OK) << nc_last_error();

  nc_model_info info;
  ASSERT_EQ(nc_model_get_info(m, &info), NC_OK);
  EXPECT_EQ(info.vocab_size, ref.vocab);
  EXPECT_EQ(info.n_kv_heads, 2);
  EXPECT_EQ(info.eot_id, 1);
  EXPECT_EQ(info.add_bos, 1);
  EXPECT_STREQ(info.architecture, "nanochat");
  EXPECT_STREQ(info.weight_type, "TQ2_0");
  EXPECT_STREQ(info.embd_type, "F16");
  EXPECT_EQ(info.sliding_window, 0);  // no options: plain attention, dense FFN, 1 stream
  EXPECT_EQ(info.n_experts, 0);
  EXPECT_EQ(info.hc_streams, 1);
  EXPECT_EQ(nc_model_get_info(nullptr, &info), NC_ERR_INVALID_ARGUMENT);

  // Tokenize / detokenize with buffers too small.
  const char* text = "hello world";
  size_t n = 0;
  int32_t ids[64];
  EXPECT_EQ(nc_tokenize(m, text, strlen(text), 0, ids, 1, &n), NC_ERR_BUFFER_TOO_SMALL);
  const size_t need = n;
  EXPECT_GT(need, 1u);
  ASSERT_EQ(nc_tokenize(m, text, strlen(text), 0, ids, 64, &n), NC_OK);
  EXPECT_EQ(n, need);
  char buf[64];
  EXPECT_EQ(nc_detokenize(m, ids, n, buf, 5, &n), NC_ERR_BUFFER_TOO_SMALL);
  EXPECT_EQ(n, strlen(text));
  ASSERT_EQ(nc_detokenize(m, ids, need, buf, sizeof buf, &n), NC_OK);
  EXPECT_STREQ(buf, text);
  const int32_t bad_id = int32_t(ref.vocab);
  EXPECT_EQ(nc_detokenize(m, &bad_id, 1, buf, sizeof buf, &n), NC_ERR_INVALID_ARGUMENT);

  nc_session* s = nullptr;
  EXPECT_EQ(nc_session_new(m, 100000, &s), NC_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(nc_last_error()).find("n_ctx"), std::string::npos);
  ASSERT_EQ(nc_session_new(m, 16, &s), NC_OK);
  std::vector<float> logits(static_cast<size_t>(ref.vocab));
  EXPECT_EQ(nc_session_eval(s, &bad_id, 1, logits.data()), NC_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(nc_last_error()).find("out of range"), std::string::npos);
  const auto toks = random_tokens(2, 10, ref.vocab);
  ASSERT_EQ(nc_session_eval(s, toks.data(), toks.size(), logits.data()), NC_OK);
  EXPECT_EQ(nc_session_n_past(s), 10);
  {  // the same logits as the C++ API
    Session cs(Model::load(tm.path));
    EXPECT_EQ(cs.eval(toks), logits);
  }
  EXPECT_EQ(nc_session_eval(s, toks.data(), toks.size(), nullptr), NC_ERR_CONTEXT_FULL);
  EXPECT_EQ(nc_session_n_past(s), 10);
  EXPECT_EQ(nc_session_n_past(nullptr), -1);
  ASSERT_EQ(nc_session_reset(s), NC_OK);
  EXPECT_EQ(nc_session_n_past(s), 0);

  // The last error is per thread.
  std::string other = "unset";
  std::thread([&] { other = nc_last_error(); }).join();
  EXPECT_EQ(other, "");

  nc_sampling sp;
  nc_sampling_default(&sp);
  EXPECT_FLOAT_EQ(sp.temperature, 0.8f);
  EXPECT_EQ(sp.max_tokens, 128);
  sp.temperature = 0.0f;
  sp.max_tokens = 5;
  sp.stop_at_eos = 0;
  CGen g;
  nc_generate_stats st;
  ASSERT_EQ(nc_generate(s, "hello", &sp, c_callback, &g, &st), NC_OK) << nc_last_error();
  EXPECT_EQ(st.generated_tokens, 5);
  size_t n_hello = 0;
  ASSERT_EQ(nc_tokenize(m, "hello", 5, 1, ids, 64, &n_hello), NC_OK);
  EXPECT_EQ(st.prompt_tokens, int32_t(n_hello + 1));  // bos + "hello"
  EXPECT_STREQ(st.stop_reason, "max_tokens");
  EXPECT_EQ(g.tokens.size(), 5u);
  EXPECT_EQ(nc_session_n_past(s), st.prompt_tokens + 5);
  // The C++ generate with bos prepended gives the same tokens.
  {
    auto model = Model::load(tm.path);
    Session cs(model);
    std::vector<int32_t> p = model->tokenize("hello", true);
    p.insert(p.begin(), 0);
    SamplingParams cp;
    cp.temperature = 0.0f;
    cp.max_tokens = 5;
    cp.stop_at_eos = false;
    EXPECT_EQ(cs.generate(p, cp).tokens, g.tokens);
  }
  // Stopped by the callback; a context overflow; bad sampling values.
  nc_session_reset(s);
  CGen g2;
  g2.stop_after = 2;
  ASSERT_EQ(nc_generate(s, "hello", &sp, c_callback, &g2, &st), NC_OK);
  EXPECT_STREQ(st.stop_reason, "callback");
  EXPECT_EQ(st.generated_tokens, 2);
  std::string long_prompt(40, 'z');
  nc_session_reset(s);
  EXPECT_EQ(nc_generate(s, long_prompt.c_str(), &sp, nullptr, nullptr, nullptr),
            NC_ERR_CONTEXT_FULL);
  sp.top_p = -1.0f;
  EXPECT_EQ(nc_generate(s, "hi", &sp, nullptr, nullptr, nullptr), NC_ERR_INVALID_ARGUMENT);
  nc_sampling_default(&sp);
  sp.n_stop_strings = 1;  // with a NULL list
  EXPECT_EQ(nc_generate(s, "hi", &sp, nullptr, nullptr, nullptr), NC_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(nc_generate(nullptr, "hi", nullptr, nullptr, nullptr, nullptr),
            NC_ERR_INVALID_ARGUMENT);
  nc_session_free(s);
  nc_session_free(nullptr);
  nc_model_free(m);
  nc_model_free(nullptr);
  EXPECT_STREQ(nc_version(), NANOCHAT_VERSION);
}

// nc_generate_ex without NC_GENERATE_PARSE_SPECIAL: marker text in the prompt is plain
// text; nc_generate (and the flag) turn it into the control token.
TEST(EngineCApi, GenerateParseSpecialFlag) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  nc_model* m = nullptr;
  ASSERT_EQ(nc_model_load(tm.path.c_str(), &m), NC_OK) << nc_last_error();
  nc_session* s = nullptr;
  ASSERT_EQ(nc_session_new(m, 64, &s), NC_OK);
  nc_sampling sp;
  nc_sampling_default(&sp);
  sp.max_tokens = 1;
  sp.stop_at_eos = 0;
  nc_generate_stats st;
  const std::string marker = "<|assistant_end|>";
  ASSERT_EQ(nc_generate(s, marker.c_str(), &sp, nullptr, nullptr, &st), NC_OK);
  EXPECT_EQ(st.prompt_tokens, 2);  // bos + the control token
  nc_session_reset(s);
  ASSERT_EQ(nc_generate_ex(s, marker.data(), marker.size(), NC_GENERATE_PARSE_SPECIAL, &sp,
                           nullptr, nullptr, &st),
            NC_OK);
  EXPECT_EQ(st.prompt_tokens, 2);
  nc_session_reset(s);
  ASSERT_EQ(nc_generate_ex(s, marker.data(), marker.size(), 0, &sp, nullptr, nullptr, &st),
            NC_OK);
  size_t n = 0;
  int32_t ids[64];
  ASSERT_EQ(nc_tokenize(m, marker.data(), marker.size(), 0, ids, 64, &n), NC_OK);
  EXPECT_EQ(st.prompt_tokens, int32_t(n) + 1);
  EXPECT_GT(n, 1u);
  for (size_t i = 0; i < n; ++i) EXPECT_NE(ids[i], 1) << "the control token from plain text";
  // Embedded NULs are prompt bytes; unknown flag bits and NULL prompts are refused.
  nc_session_reset(s);
  const char nul_prompt[] = {'h', '\0', 'i'};
  ASSERT_EQ(nc_generate_ex(s, nul_prompt, 3, 0, &sp, nullptr, nullptr, &st), NC_OK);
  EXPECT_EQ(st.prompt_tokens, 4);
  EXPECT_EQ(nc_generate_ex(s, "x", 1, 2u, &sp, nullptr, nullptr, &st), NC_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(nc_last_error()).find("flag"), std::string::npos);
  EXPECT_EQ(nc_generate_ex(s, nullptr, 3, 0, &sp, nullptr, nullptr, &st), NC_ERR_INVALID_ARGUMENT);
  nc_session_free(s);
  nc_model_free(m);
}

// A huge thread count is refused with a message, never an abort or a hang.
TEST(EngineCApi, ThreadCountIsBounded) {
  GlobalStateGuard guard;
  nc_set_num_threads(2);
  EXPECT_EQ(nc_num_threads(), 2);
  nc_set_num_threads(1 << 30);
  EXPECT_EQ(nc_num_threads(), 2);
  EXPECT_NE(std::string(nc_last_error()).find("nc_set_num_threads"), std::string::npos)
      << nc_last_error();
  nc_set_num_threads(INT32_MAX);
  EXPECT_EQ(nc_num_threads(), 2);
  nc_set_num_threads(-5);  // the default
  EXPECT_GE(nc_num_threads(), 1);
}

// ---- continuous batching (Scheduler) ---------------------------------------------------

namespace {

// Adds the scheduler's news to `got` (tokens and text appended, the last state kept).
void collect(Scheduler& sch, std::map<int64_t, SequenceOutput>& got) {
  for (SequenceOutput& o : sch.poll()) {
    SequenceOutput& g = got[o.id];
    g.id = o.id;
    g.tokens.insert(g.tokens.end(), o.tokens.begin(), o.tokens.end());
    g.text += o.text;
    g.prompt_tokens = o.prompt_tokens;
    g.generated_tokens = o.generated_tokens;
    if (o.finished) {
      EXPECT_FALSE(g.finished) << "sequence " << o.id << " finished twice";
      g.finished = true;
      g.finish_reason = o.finish_reason;
      g.error = o.error;
    }
  }
}

// Steps until nothing is left to run.
void drain(Scheduler& sch, std::map<int64_t, SequenceOutput>& got) {
  for (int i = 0; i < 10000 && sch.step(); ++i) collect(sch, got);
  collect(sch, got);
}

}  // namespace

// Sequences of different lengths (one longer than kMaxBatch), submitted at different steps,
// prompts run in chunks beside other sequences' decode rows, greedy and seeded: each gets
// exactly the tokens, text and stop reason Session::generate gives it alone. On F16 and
// Q8_0 heads, 1 and 2 threads, and with a sliding-window ring that wraps.
TEST(Scheduler, BatchEqualsSessionGenerate) {
  GlobalStateGuard guard;
  for (int variant = 0; variant < 3; ++variant) {
    Spec spec;
    if (variant == 1) spec.etype = gguf::GgmlType::Q8_0;
    auto made = make_model(spec);
    FileSpec file = made.first;
    if (variant == 2) {
      file.set("nanochat.attention.sliding_window", gguf::Value::u32(4));
      file.set("nanochat.attention.sliding_window_pattern",
               gguf::Value::int_array(gguf::ValueType::BOOL, {1, 0}));
    }
    TempModel tm(file);
    auto model = Model::load(tm.path);
    set_num_threads(variant == 1 ? 2 : 1);
    struct Req {
      int64_t len;
      int32_t max_tokens;
      float temperature;
      uint64_t seed;
      int submit_at;  // step
    };
    const std::vector<Req> reqs = {{5, 20, 0.0f, 0, 0},  {150, 12, 0.0f, 0, 0},
                                   {1, 25, 0.0f, 0, 2},  {40, 16, 0.9f, 7, 2},
                                   {70, 8, 0.0f, 0, 5},  {9, 30, 1.0f, 3, 9}};
    std::vector<std::vector<int32_t>> prompts;
    std::vector<SamplingParams> params;
    std::vector<GenerateResult> want;
    for (size_t i = 0; i < reqs.size(); ++i) {
      prompts.push_back(random_tokens(uint32_t(100 + i), reqs[i].len, made.second.vocab));
      SamplingParams sp;
      sp.temperature = reqs[i].temperature;
      sp.seed = reqs[i].seed;
      sp.max_tokens = reqs[i].max_tokens;
      sp.stop_at_eos = false;
      params.push_back(sp);
      Session alone(model);
      want.push_back(alone.generate(prompts[i], sp));
    }
    SchedulerOptions o;
    o.max_batch = 4;  // six sequences: two wait for a slot
    o.prefill_chunk = 16;
    Scheduler sch(model, o);
    std::map<int64_t, SequenceOutput> got;
    std::vector<int64_t> ids;
    bool mixed = false;  // a step ran decode rows and prompt chunks together
    int32_t widest = 0;
    size_t next = 0;
    for (int step = 0; step < 2000; ++step) {
      while (next < reqs.size() && reqs[next].submit_at <= step) {
        ids.push_back(sch.submit(prompts[next], params[next]));
        ++next;
      }
      const bool ran = sch.step();
      collect(sch, got);
      const SchedulerStats st = sch.stats();
      mixed = mixed || (st.last_sequences > 1 && st.last_rows > st.last_sequences);
      widest = std::max(widest, st.last_sequences);
      if (!ran && next == reqs.size()) break;
    }
    EXPECT_TRUE(mixed);
    EXPECT_EQ(widest, 4);
    for (size_t i = 0; i < reqs.size(); ++i) {
      const SequenceOutput& g = got[ids[i]];
      EXPECT_TRUE(g.finished) << "variant " << variant << " request " << i;
      EXPECT_EQ(g.tokens, want[i].tokens) << "variant " << variant << " request " << i;
      EXPECT_EQ(g.text, want[i].text) << "variant " << variant << " request " << i;
      EXPECT_EQ(g.finish_reason, want[i].stop_reason) << "variant " << variant << " request " << i;
      EXPECT_EQ(g.prompt_tokens, int32_t(reqs[i].len));
      EXPECT_EQ(g.generated_tokens, int32_t(want[i].tokens.size()));
    }
    const SchedulerStats st = sch.stats();
    EXPECT_EQ(st.active, 0);
    EXPECT_EQ(st.waiting, 0);
    EXPECT_EQ(st.kv_used_bytes, 0);
    // The parts of the step time are clocked within the steps.
    EXPECT_GT(st.ternary_seconds, 0.0);
    EXPECT_GT(st.attention_seconds, 0.0);
    EXPECT_GT(st.head_seconds, 0.0);
    EXPECT_GT(st.sample_seconds, 0.0);
    EXPECT_LE(st.ternary_seconds + st.attention_seconds + st.head_seconds + st.sample_seconds,
              st.step_seconds);
  }
}

// Stop tokens, stop strings (held back and trimmed as in generate), eos and a context
// shorter than prompt + max_tokens end a sequence as Session::generate ends it.
TEST(Scheduler, StopsMatchSessionGenerate) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  const auto prompt = random_tokens(12, 5, ref.vocab);
  SamplingParams base;
  base.temperature = 1.0f;
  base.max_tokens = 24;
  base.stop_at_eos = false;
  base.seed = 42;
  const GenerateResult a = Session(model).generate(prompt, base);
  ASSERT_GE(a.text.size(), 8u);
  std::vector<SamplingParams> cases(4, base);
  cases[0].stop_tokens = {a.tokens[5]};
  cases[1].stop_strings = {"\x01\x02 never", a.text.substr(4, 3)};
  cases[2].stop_strings = {"\x01\x02 never"};  // held back, then flushed at the end
  cases[3].max_tokens = 200;                    // the context (64) ends it first
  SchedulerOptions o;
  o.n_ctx = 64;
  Scheduler sch(model, o);
  std::vector<int64_t> ids;
  for (const SamplingParams& sp : cases) ids.push_back(sch.submit(prompt, sp));
  std::map<int64_t, SequenceOutput> got;
  drain(sch, got);
  for (size_t i = 0; i < cases.size(); ++i) {
    Session alone(model, 64);
    const GenerateResult w = alone.generate(prompt, cases[i]);
    EXPECT_EQ(got[ids[i]].tokens, w.tokens) << i;
    EXPECT_EQ(got[ids[i]].text, w.text) << i;
    EXPECT_EQ(got[ids[i]].finish_reason, w.stop_reason) << i;
  }
  EXPECT_EQ(got[ids[0]].finish_reason, "stop_token");
  EXPECT_EQ(got[ids[1]].finish_reason, "stop_string");
  EXPECT_EQ(got[ids[3]].finish_reason, "context_full");
}

// The KV budget: sequences that fit run, one that fits later waits, one that never fits
// and one beyond max_queue are refused; cancel frees a sequence's KV at once (and lets a
// waiting one in); everything is freed at the end.
TEST(Scheduler, KvBudgetWaitsRefusesAndCancelFrees) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  const auto prompt = random_tokens(5, 10, ref.vocab);
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.max_tokens = 22;
  sp.stop_at_eos = false;
  const int64_t per = KvCache::bytes(model->impl(), 32);  // prompt + max_tokens
  SchedulerOptions o;
  o.kv_budget_bytes = 2 * per;
  o.max_batch = 8;
  o.max_queue = 2;
  Scheduler sch(model, o);
  const int64_t a = sch.submit(prompt, sp), b = sch.submit(prompt, sp);
  EXPECT_EQ(sch.stats().active, 2);
  EXPECT_EQ(sch.stats().kv_used_bytes, 2 * per);
  const int64_t c = sch.submit(prompt, sp), d = sch.submit(prompt, sp);
  EXPECT_EQ(sch.stats().waiting, 2);
  EXPECT_THROW(sch.submit(prompt, sp), QueueFullError);
  SamplingParams big = sp;
  big.max_tokens = 100;
  try {
    sch.submit(prompt, big);
    FAIL() << "a sequence larger than the budget must be refused";
  } catch (const ContextFullError& e) {
    EXPECT_NE(std::string(e.what()).find("budget"), std::string::npos) << e.what();
  }
  ASSERT_TRUE(sch.step());
  EXPECT_TRUE(sch.cancel(a));  // a's cache freed, c admitted in its room
  SchedulerStats st = sch.stats();
  EXPECT_EQ(st.active, 2);
  EXPECT_EQ(st.waiting, 1);
  EXPECT_EQ(st.kv_used_bytes, 2 * per);
  EXPECT_TRUE(sch.cancel(d));  // a waiting one
  EXPECT_EQ(sch.stats().waiting, 0);
  EXPECT_FALSE(sch.cancel(a));
  EXPECT_FALSE(sch.cancel(12345));
  std::map<int64_t, SequenceOutput> got;
  drain(sch, got);
  EXPECT_EQ(got[a].finish_reason, "cancelled");
  EXPECT_EQ(got[d].finish_reason, "cancelled");
  EXPECT_TRUE(got[d].tokens.empty());
  const GenerateResult w = Session(model).generate(prompt, sp);
  for (int64_t id : {b, c}) {
    EXPECT_EQ(got[id].finish_reason, "max_tokens");
    EXPECT_EQ(got[id].tokens, w.tokens);
  }
  st = sch.stats();
  EXPECT_EQ(st.kv_used_bytes, 0);
  EXPECT_EQ(st.active, 0);
  EXPECT_TRUE(sch.poll().empty());
}

TEST(Scheduler, BadArgumentsAreErrors) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  auto opts_error = [&](SchedulerOptions o) -> std::string {
    try {
      Scheduler s(model, o);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  SchedulerOptions o;
  o.max_batch = 0;
  EXPECT_NE(opts_error(o).find("max_batch"), std::string::npos);
  o = SchedulerOptions();
  o.max_batch = int32_t(kMaxBatch) + 1;
  EXPECT_NE(opts_error(o).find("max_batch"), std::string::npos);
  o = SchedulerOptions();
  o.prefill_chunk = 0;
  EXPECT_NE(opts_error(o).find("prefill_chunk"), std::string::npos);
  o = SchedulerOptions();
  o.n_ctx = 100000;
  EXPECT_NE(opts_error(o).find("n_ctx"), std::string::npos);
  o = SchedulerOptions();
  o.kv_budget_bytes = -1;
  EXPECT_NE(opts_error(o).find("kv_budget_bytes"), std::string::npos);
  o = SchedulerOptions();
  o.max_queue = -1;
  EXPECT_NE(opts_error(o).find("max_queue"), std::string::npos);
  EXPECT_THROW(Scheduler(nullptr), Error);

  Scheduler sch(model);
  SamplingParams sp;
  auto submit_error = [&](const std::vector<int32_t>& p, const SamplingParams& s) -> std::string {
    try {
      sch.submit(p, s);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_NE(submit_error({}, sp).find("empty"), std::string::npos);
  EXPECT_NE(submit_error({5, int32_t(ref.vocab)}, sp).find("out of range"), std::string::npos);
  EXPECT_NE(submit_error({5, -1}, sp).find("out of range"), std::string::npos);
  SamplingParams bad = sp;
  bad.max_tokens = 0;
  EXPECT_NE(submit_error({5}, bad).find("max_tokens"), std::string::npos);
  bad = sp;
  bad.stop_tokens = {int32_t(ref.vocab)};
  EXPECT_NE(submit_error({5}, bad).find("stop_tokens[0]"), std::string::npos);
  bad = sp;
  bad.stop_strings = {""};
  EXPECT_NE(submit_error({5}, bad).find("stop_strings[0]"), std::string::npos);
  bad = sp;
  bad.top_p = 2.0f;
  EXPECT_NE(submit_error({5}, bad), "(no error)");
  EXPECT_THROW(sch.submit(random_tokens(3, 256, ref.vocab), sp), ContextFullError);
  EXPECT_EQ(sch.stats().active, 0);
  EXPECT_FALSE(sch.step());
}

// A server's shape: one thread waits and steps while others submit, poll and cancel.
// Every sequence not cancelled gets its sequential greedy tokens; cancelled ones end
// "cancelled" with their KV freed.
TEST(Scheduler, SteppingThreadWithConcurrentSubmitAndCancel) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  auto model = Model::load(tm.path);
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.max_tokens = 40;
  sp.stop_at_eos = false;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<GenerateResult> want;
  for (uint32_t i = 0; i < 8; ++i) {
    prompts.push_back(random_tokens(200 + i, 3 + 11 * i, ref.vocab));
    want.push_back(Session(model).generate(prompts.back(), sp));
  }
  SchedulerOptions o;
  o.max_batch = 5;
  o.prefill_chunk = 8;
  Scheduler sch(model, o);
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::map<int64_t, SequenceOutput> got;
  std::thread stepper([&] {
    while (!stop.load()) {
      if (!sch.wait(20)) continue;
      sch.step();
      std::lock_guard<std::mutex> lock(mu);
      collect(sch, got);
    }
  });
  std::vector<int64_t> ids;
  for (const auto& p : prompts) ids.push_back(sch.submit(p, sp));
  EXPECT_TRUE(sch.cancel(ids[1]));
  for (int i = 0; i < 2000; ++i) {  // cancel ids[6] once it has produced something
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!got[ids[6]].tokens.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  sch.cancel(ids[6]);
  for (int i = 0; i < 20000; ++i) {
    {
      std::lock_guard<std::mutex> lock(mu);
      bool all = true;
      for (int64_t id : ids) all = all && got[id].finished;
      if (all) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  stop = true;
  sch.notify();
  stepper.join();
  for (size_t i = 0; i < ids.size(); ++i) {
    const SequenceOutput& g = got[ids[i]];
    ASSERT_TRUE(g.finished) << i;
    if (i == 1) {
      EXPECT_EQ(g.finish_reason, "cancelled");
      EXPECT_TRUE(g.tokens.empty());
    } else if (i == 6) {
      // cancelled mid-way, or finished before the cancel arrived: a prefix either way
      EXPECT_TRUE(g.finish_reason == "cancelled" || g.finish_reason == "max_tokens");
      ASSERT_LE(g.tokens.size(), want[i].tokens.size());
      EXPECT_TRUE(std::equal(g.tokens.begin(), g.tokens.end(), want[i].tokens.begin()));
    } else {
      EXPECT_EQ(g.finish_reason, "max_tokens") << i;
      EXPECT_EQ(g.tokens, want[i].tokens) << i;
    }
  }
  EXPECT_EQ(sch.stats().kv_used_bytes, 0);
}

namespace {
struct CCollected {
  std::map<int64_t, std::vector<int32_t>> tokens;
  std::map<int64_t, std::string> text, reason;
};
void c_collect(const nc_sequence_output* o, void* ud) {
  auto* c = static_cast<CCollected*>(ud);
  c->tokens[o->id].insert(c->tokens[o->id].end(), o->tokens, o->tokens + o->n_tokens);
  c->text[o->id].append(o->text, o->text_len);
  if (o->finished) c->reason[o->id] = o->finish_reason;
}
}  // namespace

TEST(EngineCApi, Scheduler) {
  auto [file, ref] = make_model(Spec{});
  TempModel tm(file);
  nc_model* m = nullptr;
  ASSERT_EQ(nc_model_load(tm.path.c_str(), &m), NC_OK) << nc_last_error();
  nc_scheduler* sch = nullptr;
  nc_scheduler_options o;
  nc_scheduler_options_default(&o);
  EXPECT_EQ(o.max_batch, 16);
  o.max_batch = 0;
  EXPECT_EQ(nc_scheduler_new(m, &o, &sch), NC_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(sch, nullptr);
  EXPECT_NE(std::string(nc_last_error()).find("max_batch"), std::string::npos);
  EXPECT_EQ(nc_scheduler_new(nullptr, nullptr, &sch), NC_ERR_INVALID_ARGUMENT);
  nc_scheduler_options_default(&o);
  o.max_batch = 2;
  o.max_queue = 1;
  ASSERT_EQ(nc_scheduler_new(m, &o, &sch), NC_OK) << nc_last_error();
  const auto prompt = random_tokens(9, 12, ref.vocab);
  nc_sampling sp;
  nc_sampling_default(&sp);
  sp.temperature = 0.0f;
  sp.max_tokens = 10;
  sp.stop_at_eos = 0;
  int64_t id = -1;
  EXPECT_EQ(nc_scheduler_submit(sch, nullptr, 3, &sp, &id), NC_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(nc_scheduler_submit(sch, prompt.data(), 0, &sp, &id), NC_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(nc_last_error()).find("empty"), std::string::npos);
  sp.n_stop_tokens = 1;  // with a NULL list
  EXPECT_EQ(nc_scheduler_submit(sch, prompt.data(), prompt.size(), &sp, &id),
            NC_ERR_INVALID_ARGUMENT);
  sp.n_stop_tokens = 0;
  sp.max_tokens = 1000;  // prompt + max_tokens beyond the context: generation stops there
  std::vector<int32_t> long_prompt = random_tokens(9, 256, ref.vocab);
  EXPECT_EQ(nc_scheduler_submit(sch, long_prompt.data(), long_prompt.size(), &sp, &id),
            NC_ERR_CONTEXT_FULL);
  sp.max_tokens = 10;
  std::vector<int64_t> ids;
  for (int i = 0; i < 3; ++i) {  // two run, one waits
    ASSERT_EQ(nc_scheduler_submit(sch, prompt.data(), prompt.size(), &sp, &id), NC_OK)
        << nc_last_error();
    EXPECT_GT(id, 0);
    ids.push_back(id);
  }
  EXPECT_EQ(nc_scheduler_submit(sch, prompt.data(), prompt.size(), &sp, &id), NC_ERR_QUEUE_FULL);
  nc_scheduler_stats st;
  ASSERT_EQ(nc_scheduler_get_stats(sch, &st), NC_OK);
  EXPECT_EQ(st.active, 2);
  EXPECT_EQ(st.waiting, 1);
  EXPECT_EQ(nc_scheduler_cancel(sch, 999), NC_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(nc_scheduler_poll(sch, nullptr, nullptr), NC_ERR_INVALID_ARGUMENT);
  CCollected got;
  int32_t ran = 1, has_work = 0;
  ASSERT_EQ(nc_scheduler_wait(sch, 0, &has_work), NC_OK);
  EXPECT_EQ(has_work, 1);
  while (ran) {
    ASSERT_EQ(nc_scheduler_step(sch, &ran), NC_OK) << nc_last_error();
    ASSERT_EQ(nc_scheduler_poll(sch, c_collect, &got), NC_OK);
  }
  ASSERT_EQ(nc_scheduler_get_stats(sch, &st), NC_OK);
  EXPECT_EQ(st.kv_used_bytes, 0);
  EXPECT_GT(st.steps, 9);
  auto model = Model::load(tm.path);
  SamplingParams cp;
  cp.temperature = 0.0f;
  cp.max_tokens = 10;
  cp.stop_at_eos = false;
  const GenerateResult w = Session(model).generate(prompt, cp);
  for (int64_t i : ids) {
    EXPECT_EQ(got.tokens[i], w.tokens);
    EXPECT_EQ(got.text[i], w.text);
    EXPECT_EQ(got.reason[i], "max_tokens");
  }
  nc_scheduler_free(sch);
  nc_scheduler_free(nullptr);
  nc_model_free(m);
}
