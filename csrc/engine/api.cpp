// nanochat.hpp: Model (load, tokenizer) and Session (KV cache, eval, generate).
//
// A Session keeps the conversation's tokens (history) and the KV cache of the first
// n_cached of them; tokens past n_cached are "pending" (the last generated token is
// evaluated only when the conversation continues, so a generate() call costs exactly one
// forward pass per token it samples after the first). n_past() counts every token of the
// conversation; all of them fit n_ctx.
#include <algorithm>
#include <cstdio>
#include <new>
#include <chrono>
#include <string>
#include <utility>

#include "common/threadpool.h"
#include "engine/model.h"
#include "engine/sampler.h"

namespace nanochat {

// ---- Model ----------------------------------------------------------------------------

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;

std::shared_ptr<const Model> Model::load(const std::string& path, const LoadOptions& opts) {
  if (opts.n_threads < 0 || opts.n_threads > kMaxThreads)
    throw Error("LoadOptions.n_threads must be in [0, " + std::to_string(kMaxThreads) +
                "], got " + std::to_string(opts.n_threads));
  std::shared_ptr<Model> m(new Model(load_model(path)));
  m->n_threads_ = opts.n_threads;  // this model's sessions only; other models keep theirs
  return m;
}

int32_t Model::n_threads() const { return n_threads_; }

const ModelInfo& Model::info() const { return impl_->info; }

std::vector<int32_t> Model::tokenize(const std::string& text, bool parse_special) const {
  return impl_->tokenizer->encode(text, parse_special);
}

std::string Model::detokenize(const std::vector<int32_t>& tokens) const {
  return impl_->tokenizer->decode(tokens);
}

std::string Model::token_text(int32_t id) const {
  if (id < 0 || id >= impl_->info.vocab_size)
    throw Error("token id " + std::to_string(id) + " is out of range [0, " +
                std::to_string(impl_->info.vocab_size) + ")");
  return impl_->tokenizer->token_bytes(id);  // "" for control tokens, as detokenize
}

int32_t Model::token_id(const std::string& token) const { return impl_->tokenizer->find(token); }

// ---- Session --------------------------------------------------------------------------

struct Session::Impl {
  Impl(std::shared_ptr<const Model> mdl, int32_t n_ctx)
      : model(std::move(mdl)), st(model->impl(), n_ctx) {
    const int64_t vocab = model->info().vocab_size;
    logits.resize(size_t(vocab));
    sample_buf.resize(size_t(vocab));
    history.reserve(size_t(n_ctx));
  }

  std::shared_ptr<const Model> model;
  SessionState st;
  std::vector<int32_t> history;
  std::vector<float> logits;  // for the last history token when logits_valid
  bool logits_valid = false;
  std::vector<float> sample_buf;

  int32_t vocab() const { return model->info().vocab_size; }

  void check_tokens(const std::vector<int32_t>& tokens, const char* what) const {
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || tokens[i] >= vocab())
        throw Error(std::string(what) + ": token " + std::to_string(tokens[i]) + " at index " +
                    std::to_string(i) + " is out of range [0, " + std::to_string(vocab()) + ")");
  }

  void check_fits(size_t n, const char* what) const {
    if (history.size() + n > size_t(st.n_ctx))
      throw ContextFullError(std::string(what) + ": " + std::to_string(n) + " tokens after " +
                             std::to_string(history.size()) + " overflow the context of " +
                             std::to_string(st.n_ctx) + " tokens");
  }

  // Runs the pending tokens; the last one's logits land in `logits` when want_logits.
  // On failure the session is as before the call (the cache past n_cached is unused).
  void run_pending(bool want_logits) {
    const int32_t before = st.n_cached;
    ThreadCountScope threads(model->n_threads());
    try {
      const int64_t n = int64_t(history.size()) - st.n_cached;
      if (n > 0)
        forward(st, history.data() + st.n_cached, n,
                want_logits ? LogitsMode::last : LogitsMode::none, logits.data());
    } catch (...) {
      st.n_cached = before;
      logits_valid = false;
      throw;
    }
    logits_valid = want_logits;
  }

  // Appends tokens and runs everything pending; logits for the last one.
  void feed(const std::vector<int32_t>& tokens) {
    const size_t before = history.size();
    history.insert(history.end(), tokens.begin(), tokens.end());
    try {
      run_pending(true);
    } catch (...) {
      history.resize(before);
      throw;
    }
  }

  // Logits of the last history token, running it again if they were lost (truncate).
  void ensure_logits() {
    if (logits_valid) return;
    if (history.empty()) throw Error("the session is empty: feed a prompt first");
    if (st.n_cached >= int32_t(history.size())) st.n_cached = int32_t(history.size()) - 1;
    run_pending(true);
  }
};

int64_t Session::kv_cache_bytes(const Model& model, int32_t n_ctx) {
  return KvCache::bytes(model.impl(), n_ctx);
}

namespace {
std::string mib(int64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", double(bytes) / (1 << 20));
  return b;
}
}  // namespace

Session::Session(std::shared_ptr<const Model> model, int32_t n_ctx, int64_t max_kv_bytes) {
  if (!model) throw Error("Session: model is null");
  const std::string& path = model->info().path;
  const int32_t max = model->info().context_length;
  if (n_ctx < 0 || n_ctx > max)
    throw Error(path + ": n_ctx " + std::to_string(n_ctx) + " is outside [0, " +
                std::to_string(max) + "] (the model's context_length; 0: min(" +
                std::to_string(max) + ", " + std::to_string(kDefaultMaxContext) + "))");
  if (max_kv_bytes < 0)
    throw Error("Session: max_kv_bytes must be >= 0 (0: the default " +
                mib(kDefaultMaxKvBytes) + "), got " + std::to_string(max_kv_bytes));
  const int64_t allowed = max_kv_bytes ? max_kv_bytes : kDefaultMaxKvBytes;
  const int32_t ctx = n_ctx ? n_ctx : std::min(max, kDefaultMaxContext);
  const int64_t need = kv_cache_bytes(*model, ctx);
  if (need > allowed)
    throw Error(path + ": a context of " + std::to_string(ctx) + " tokens needs a KV cache of " +
                std::to_string(need) + " bytes (" + mib(need) + "), more than the allowed " +
                std::to_string(allowed) + " (" + mib(allowed) +
                "); ask for a smaller n_ctx or raise max_kv_bytes");
  try {
    impl_ = std::make_unique<Impl>(std::move(model), ctx);
  } catch (const std::bad_alloc&) {
    throw Error(path + ": out of memory allocating a session of " + std::to_string(ctx) +
                " tokens (KV cache " + mib(need) + ")");
  }
}

Session::~Session() = default;
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;

const Model& Session::model() const { return *impl_->model; }
int32_t Session::n_ctx() const { return impl_->st.n_ctx; }
int32_t Session::n_past() const { return int32_t(impl_->history.size()); }

void Session::reset() {
  impl_->history.clear();
  impl_->st.n_cached = 0;
  impl_->logits_valid = false;
}

void Session::truncate(int32_t n) {
  Impl& s = *impl_;
  if (n < 0 || size_t(n) > s.history.size())
    throw Error("truncate: n = " + std::to_string(n) +
                " is outside [0, n_past = " + std::to_string(s.history.size()) + "]");
  if (size_t(n) == s.history.size()) return;
  // The kept last token is run again for its logits; sliding-window rings must still
  // hold the window before it (model.h: they allow rewinding kMaxBatch tokens).
  if (n > 0 && n - 1 < s.st.n_cached) s.st.check_start(n - 1, "truncate");
  s.history.resize(size_t(n));
  s.st.n_cached = std::min(s.st.n_cached, n);
  s.logits_valid = false;
}

const std::vector<float>& Session::eval(const std::vector<int32_t>& tokens) {
  Impl& s = *impl_;
  if (tokens.empty()) throw Error("eval: no tokens");
  s.check_tokens(tokens, "eval");
  s.check_fits(tokens.size(), "eval");
  s.feed(tokens);
  return s.logits;
}

std::vector<float> Session::eval_all(const std::vector<int32_t>& tokens) {
  Impl& s = *impl_;
  if (tokens.empty()) throw Error("eval_all: no tokens");
  s.check_tokens(tokens, "eval_all");
  s.check_fits(tokens.size(), "eval_all");
  s.run_pending(false);  // a pending generated token goes first
  std::vector<float> out(tokens.size() * size_t(s.vocab()));
  const size_t before = s.history.size();
  s.history.insert(s.history.end(), tokens.begin(), tokens.end());
  const int32_t cached = s.st.n_cached;
  ThreadCountScope threads(s.model->n_threads());
  try {
    forward(s.st, tokens.data(), int64_t(tokens.size()), LogitsMode::all, out.data());
  } catch (...) {
    s.history.resize(before);
    s.st.n_cached = cached;
    throw;
  }
  std::copy(out.end() - s.vocab(), out.end(), s.logits.begin());
  s.logits_valid = true;
  return out;
}

// ---- TextStream ---------------------------------------------------------------------

TextStream::TextStream(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (size_t i = 0; i < stops_.size(); ++i)
    if (stops_[i].empty()) throw Error("stop_strings[" + std::to_string(i) + "] is empty");
}

size_t TextStream::safe_end() const {
  const std::string& t = text_;
  size_t end = t.size();
  for (size_t k = 1; k <= 3 && k <= end - emitted_; ++k) {
    const unsigned char ch = static_cast<unsigned char>(t[end - k]);
    if ((ch & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    const size_t need = ch >= 0xF0 ? 4 : ch >= 0xE0 ? 3 : ch >= 0xC0 ? 2 : 1;
    if (need > k) end -= k;  // its lead byte wants more than has arrived
    break;
  }
  for (const std::string& s : stops_)
    for (size_t k = std::min(s.size() - 1, t.size() - emitted_); k >= 1; --k)
      if (t.compare(t.size() - k, k, s, 0, k) == 0) {
        end = std::min(end, t.size() - k);
        break;
      }
  return std::max(end, emitted_);
}

std::string TextStream::push(const std::string& bytes) {
  if (stopped_) return std::string();
  text_ += bytes;
  // Held-back text never holds the start of a completed stop string before emitted_.
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) cut = std::min(cut, text_.find(s, emitted_));
  if (cut != std::string::npos) {
    text_.resize(cut);
    stopped_ = true;
  }
  const size_t end = stopped_ ? text_.size() : safe_end();
  std::string piece = text_.substr(emitted_, end - emitted_);
  emitted_ = end;
  return piece;
}

std::string TextStream::flush() {
  std::string rest = text_.substr(emitted_);
  emitted_ = text_.size();
  return rest;
}

GenerateResult Session::generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                 const TokenCallback& on_token) {
  using clock = std::chrono::steady_clock;
  Impl& s = *impl_;
  const ModelInfo& info = s.model->info();
  if (params.max_tokens < 0)
    throw Error("generate: max_tokens must be >= 0, got " + std::to_string(params.max_tokens));
  TextStream stream(params.stop_strings);  // validates them
  for (size_t i = 0; i < params.stop_tokens.size(); ++i)
    if (params.stop_tokens[i] < 0 || params.stop_tokens[i] >= s.vocab())
      throw Error("generate: stop_tokens[" + std::to_string(i) +
                  "] = " + std::to_string(params.stop_tokens[i]) + " is out of range");
  SamplerConfig sc;
  sc.temperature = params.temperature;
  sc.top_k = params.top_k;
  sc.top_p = params.top_p;
  sc.repetition_penalty = params.repetition_penalty;
  sc.repetition_window = params.repetition_window;
  sc.seed = params.seed;
  Sampler sampler(sc);  // validates the sampling values
  s.check_tokens(prompt, "generate");
  if (prompt.empty() && s.history.empty())
    throw Error("generate: the prompt is empty and so is the session");
  s.check_fits(prompt.size(), "generate");

  std::vector<int32_t> stop = params.stop_tokens;
  if (params.stop_at_eos) {
    if (info.eos_id >= 0) stop.push_back(info.eos_id);
    if (info.eot_id >= 0) stop.push_back(info.eot_id);
  }

  GenerateResult r;
  r.prompt_tokens = int32_t(prompt.size());
  const auto t0 = clock::now();
  if (prompt.empty())
    s.ensure_logits();
  else
    s.feed(prompt);
  const auto t1 = clock::now();
  r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  const PartTimes before = s.st.times;

  const BpeTokenizer& tok_ = *s.model->impl().tokenizer;
  r.stop_reason = "max_tokens";
  for (;;) {
    if (int32_t(r.tokens.size()) >= params.max_tokens) break;
    if (s.history.size() >= size_t(s.st.n_ctx)) {
      r.stop_reason = "context_full";
      break;
    }
    if (!r.tokens.empty()) {
      s.run_pending(true);  // the token sampled last step
      ++r.decode_steps;
    }
    std::copy(s.logits.begin(), s.logits.end(), s.sample_buf.begin());
    const int32_t tok = sampler.sample(s.sample_buf.data(), s.vocab(), s.history);
    if (std::find(stop.begin(), stop.end(), tok) != stop.end()) {
      r.stop_reason = "stop_token";
      break;
    }
    s.history.push_back(tok);
    s.logits_valid = false;
    r.tokens.push_back(tok);
    const std::string piece = stream.push(tok_.token_bytes(tok));
    const bool go_on = !on_token || on_token(tok, piece);
    if (stream.stopped()) {
      r.stop_reason = "stop_string";
      break;
    }
    if (!go_on) {
      r.stop_reason = "callback";
      break;
    }
  }
  // Text held back for a stop string that never completed (or an unfinished character
  // at the very end) is flushed in one last call with token -1.
  const std::string rest = stream.flush();
  if (on_token && !rest.empty() && r.stop_reason != "callback") on_token(-1, rest);
  r.text = stream.text();
  r.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  r.decode_ternary_seconds = s.st.times.ternary - before.ternary;
  r.decode_head_seconds = s.st.times.head - before.head;
  r.decode_attention_seconds = s.st.times.attention - before.attention;
  return r;
}

// ---- library-wide ----------------------------------------------------------------------

// set_num_threads / num_threads are common/threadpool.h's (the same signatures).
std::string version() { return NANOCHAT_VERSION; }

}  // namespace nanochat
