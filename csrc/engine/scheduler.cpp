// nanochat.hpp's Scheduler: continuous batching over one model.
//
// A sequence is waiting (no KV cache yet), then active: prefilling while its KV cache holds
// fewer than its prompt's tokens, then decoding (the cache holds every token but the last
// sampled one, which the next step runs). A step runs, in one forward pass, the pending
// token of every decoding sequence and then prompt chunks of prefilling ones in admission
// order, up to prefill_chunk prompt tokens and kMaxBatch rows in all.
//
// Locking: `mu` guards the queues, every sequence's published output and the stats. A step
// plans under it, runs the forward pass and sampling without it (the planned sequences are
// marked in_step: cancel() then only flags them, and the step retires them when it
// publishes), and publishes under it again. `step_mu` keeps step() to one thread.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "common/threadpool.h"
#include "engine/model.h"
#include "engine/sampler.h"

namespace nanochat {

namespace {

struct Seq {
  Seq(const SamplerConfig& sc, std::vector<std::string> stops)
      : sampler(sc), text(std::move(stops)) {}
  int64_t id = 0;
  std::vector<int32_t> history;  // prompt, then the sampled tokens
  int32_t prompt_len = 0;
  int32_t max_tokens = 0;
  int32_t capacity = 0;  // KV positions: min(n_ctx, prompt + max_tokens)
  int64_t kv_bytes = 0;
  std::vector<int32_t> stop;
  Sampler sampler;
  TextStream text;
  std::unique_ptr<KvCache> kv;  // while active
  int32_t generated = 0;
  bool in_step = false;
  bool cancelled = false;  // asked while in_step: the step retires it
  bool done = false;
  bool has_news = false;
  SequenceOutput out;  // published, not yet polled
  // Written by the step thread alone while in_step, published under the lock.
  int32_t step_token = -1;
  std::string step_piece, step_reason, step_error;
};

std::string mib(int64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", double(bytes) / (1 << 20));
  return b;
}

}  // namespace

struct Scheduler::Impl {
  Impl(std::shared_ptr<const Model> mdl, const SchedulerOptions& o, int32_t ctx, int64_t budget)
      : model(std::move(mdl)), opts(o), n_ctx(ctx), kv_budget(budget), scratch(model->impl()) {
    logits.resize(size_t(opts.max_batch) * size_t(model->info().vocab_size));
    stats.kv_budget_bytes = kv_budget;
  }

  std::shared_ptr<const Model> model;
  SchedulerOptions opts;
  int32_t n_ctx;
  int64_t kv_budget;
  ForwardScratch scratch;
  std::vector<float> logits;  // max_batch x vocab

  mutable std::mutex mu;
  std::condition_variable cv;
  bool woken = false;
  std::mutex step_mu;
  int64_t next_id = 1;
  std::map<int64_t, std::unique_ptr<Seq>> seqs;  // unfinished, or finished and not polled
  std::deque<Seq*> waiting;
  std::vector<Seq*> active;  // admission order
  std::vector<Seq*> news;    // output to poll
  SchedulerStats stats;

  // ---- under mu ----
  void mark_news(Seq* q) {
    if (!q->has_news) news.push_back(q);
    q->has_news = true;
  }

  bool fits(const Seq* q) const {
    return int32_t(active.size()) < opts.max_batch && stats.kv_used_bytes + q->kv_bytes <= kv_budget;
  }

  // Gives q its KV cache; false (q finished with an error) when memory runs out.
  bool admit(Seq* q) {
    try {
      q->kv = std::make_unique<KvCache>(model->impl(), q->capacity, false);
    } catch (const std::bad_alloc&) {
      finish(q, "error", "out of memory allocating a KV cache of " + mib(q->kv_bytes));
      return false;
    }
    stats.kv_used_bytes += q->kv_bytes;
    active.push_back(q);
    return true;
  }

  void admit_waiting() {
    while (!waiting.empty() && fits(waiting.front())) {
      Seq* q = waiting.front();
      waiting.pop_front();
      admit(q);
    }
  }

  // Ends q: frees its KV cache at once and publishes its last output.
  void finish(Seq* q, const std::string& reason, const std::string& error = std::string()) {
    if (q->kv) {
      q->kv.reset();
      stats.kv_used_bytes -= q->kv_bytes;
      active.erase(std::find(active.begin(), active.end(), q));
    }
    q->done = true;
    q->out.finished = true;
    q->out.finish_reason = reason;
    q->out.error = error;
    q->out.generated_tokens = q->generated;
    mark_news(q);
  }

  void update_counts() {
    stats.active = int32_t(active.size());
    stats.waiting = int32_t(waiting.size());
  }
};

Scheduler::Scheduler(std::shared_ptr<const Model> model, const SchedulerOptions& opts) {
  if (!model) throw Error("Scheduler: model is null");
  const int32_t max = model->info().context_length;
  if (opts.n_ctx < 0 || opts.n_ctx > max)
    throw Error("Scheduler: n_ctx " + std::to_string(opts.n_ctx) + " is outside [0, " +
                std::to_string(max) + "] (the model's context_length; 0: min(" +
                std::to_string(max) + ", " + std::to_string(kDefaultMaxContext) + "))");
  if (opts.kv_budget_bytes < 0)
    throw Error("Scheduler: kv_budget_bytes must be >= 0 (0: " + mib(kDefaultMaxKvBytes) +
                "), got " + std::to_string(opts.kv_budget_bytes));
  if (opts.max_batch < 1 || opts.max_batch > kMaxBatch)
    throw Error("Scheduler: max_batch must be in [1, " + std::to_string(kMaxBatch) + "], got " +
                std::to_string(opts.max_batch));
  if (opts.prefill_chunk < 1 || opts.prefill_chunk > kMaxBatch)
    throw Error("Scheduler: prefill_chunk must be in [1, " + std::to_string(kMaxBatch) +
                "], got " + std::to_string(opts.prefill_chunk));
  if (opts.max_queue < 0)
    throw Error("Scheduler: max_queue must be >= 0, got " + std::to_string(opts.max_queue));
  const int32_t ctx = opts.n_ctx ? opts.n_ctx : std::min(max, kDefaultMaxContext);
  const int64_t budget = opts.kv_budget_bytes ? opts.kv_budget_bytes : kDefaultMaxKvBytes;
  impl_ = std::make_unique<Impl>(std::move(model), opts, ctx, budget);
}

Scheduler::~Scheduler() = default;

const SchedulerOptions& Scheduler::options() const { return impl_->opts; }

int64_t Scheduler::submit(const std::vector<int32_t>& prompt, const SamplingParams& params) {
  Impl& s = *impl_;
  const ModelInfo& info = s.model->info();
  const int32_t vocab = info.vocab_size;
  if (prompt.empty()) throw Error("submit: the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= vocab)
      throw Error("submit: prompt token " + std::to_string(prompt[i]) + " at index " +
                  std::to_string(i) + " is out of range [0, " + std::to_string(vocab) + ")");
  if (params.max_tokens < 1)
    throw Error("submit: max_tokens must be >= 1, got " + std::to_string(params.max_tokens));
  for (size_t i = 0; i < params.stop_tokens.size(); ++i)
    if (params.stop_tokens[i] < 0 || params.stop_tokens[i] >= vocab)
      throw Error("submit: stop_tokens[" + std::to_string(i) + "] = " +
                  std::to_string(params.stop_tokens[i]) + " is out of range");
  if (int64_t(prompt.size()) >= s.n_ctx)
    throw ContextFullError("submit: a prompt of " + std::to_string(prompt.size()) +
                           " tokens leaves no room to generate in the context of " +
                           std::to_string(s.n_ctx) + " tokens");
  SamplerConfig sc;
  sc.temperature = params.temperature;
  sc.top_k = params.top_k;
  sc.top_p = params.top_p;
  sc.repetition_penalty = params.repetition_penalty;
  sc.repetition_window = params.repetition_window;
  sc.seed = params.seed;
  auto q = std::make_unique<Seq>(sc, params.stop_strings);  // validates both
  q->history = prompt;
  q->history.reserve(prompt.size() + size_t(std::min(params.max_tokens, s.n_ctx)));
  q->prompt_len = int32_t(prompt.size());
  q->max_tokens = params.max_tokens;
  q->capacity = int32_t(std::min<int64_t>(s.n_ctx, int64_t(prompt.size()) + params.max_tokens));
  q->kv_bytes = KvCache::bytes(s.model->impl(), q->capacity);
  if (q->kv_bytes > s.kv_budget)
    throw ContextFullError("submit: " + std::to_string(q->capacity) +
                           " tokens (prompt + max_tokens) need a KV cache of " +
                           mib(q->kv_bytes) + ", more than the scheduler's whole budget of " +
                           mib(s.kv_budget) + "; ask for fewer tokens");
  q->stop = params.stop_tokens;
  if (params.stop_at_eos) {
    if (info.eos_id >= 0) q->stop.push_back(info.eos_id);
    if (info.eot_id >= 0) q->stop.push_back(info.eot_id);
  }
  q->out.prompt_tokens = q->prompt_len;

  std::lock_guard<std::mutex> lock(s.mu);
  const bool now = s.waiting.empty() && s.fits(q.get());
  if (!now && int32_t(s.waiting.size()) >= s.opts.max_queue)
    throw QueueFullError("submit: " + std::to_string(s.waiting.size()) +
                         " sequences already wait (max_queue); try again later");
  q->id = s.next_id++;
  Seq* p = q.get();
  p->out.id = p->id;
  s.seqs.emplace(p->id, std::move(q));
  if (now) {
    s.admit(p);
  } else {
    s.waiting.push_back(p);
  }
  s.update_counts();
  s.woken = true;
  s.cv.notify_all();
  return p->id;
}

bool Scheduler::cancel(int64_t id) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.seqs.find(id);
  if (it == s.seqs.end() || it->second->done || it->second->cancelled) return false;
  Seq* q = it->second.get();
  if (q->in_step) {
    q->cancelled = true;
    return true;
  }
  auto w = std::find(s.waiting.begin(), s.waiting.end(), q);
  if (w != s.waiting.end()) s.waiting.erase(w);
  s.finish(q, "cancelled");
  s.admit_waiting();  // its room may let others in
  s.update_counts();
  return true;
}

bool Scheduler::step() {
  using clock = std::chrono::steady_clock;
  Impl& s = *impl_;
  std::lock_guard<std::mutex> step_lock(s.step_mu);
  const auto t0 = clock::now();
  const int32_t vocab = s.model->info().vocab_size;
  int32_t tokens[kMaxBatch];
  BatchSegment segs[kMaxBatch];
  int64_t logit_rows[kMaxBatch];
  Seq* seg_seq[kMaxBatch];
  Seq* logit_seq[kMaxBatch];
  int64_t n = 0, n_segs = 0, n_logits = 0, prefill = 0;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.admit_waiting();
    s.update_counts();
    // Decoding sequences first (one row each), then prompt chunks.
    for (Seq* q : s.active) {
      if (q->kv->n_cached < q->prompt_len) continue;
      tokens[n] = q->history.back();
      segs[n_segs] = BatchSegment{q->kv.get(), n, 1};
      seg_seq[n_segs++] = q;
      logit_rows[n_logits] = n;
      logit_seq[n_logits++] = q;
      ++n;
    }
    int64_t budget = std::min<int64_t>(s.opts.prefill_chunk, kMaxBatch - n);
    for (Seq* q : s.active) {
      const int64_t left = q->prompt_len - q->kv->n_cached;
      if (left <= 0 || budget == 0) continue;
      const int64_t take = std::min(left, budget);
      std::copy(q->history.begin() + q->kv->n_cached,
                q->history.begin() + q->kv->n_cached + take, tokens + n);
      segs[n_segs] = BatchSegment{q->kv.get(), n, take};
      seg_seq[n_segs++] = q;
      n += take;
      budget -= take;
      prefill += take;
      if (take == left) {  // the prompt's last token: sample the first one from it
        logit_rows[n_logits] = n - 1;
        logit_seq[n_logits++] = q;
      }
    }
    if (n == 0) return false;
    for (int64_t i = 0; i < n_segs; ++i) seg_seq[i]->in_step = true;
  }

  std::string failure;
  const PartTimes before = s.scratch.times;
  try {
    ThreadCountScope threads(s.model->n_threads());
    forward_batch(s.scratch, s.model->impl(), tokens, n, segs, n_segs, logit_rows, n_logits,
                  s.logits.data());
  } catch (const std::bad_alloc&) {
    failure = "out of memory in the forward pass";
  } catch (const std::exception& e) {
    failure = e.what();
  }
  const auto t_sample = clock::now();
  const BpeTokenizer& tok = *s.model->impl().tokenizer;
  for (int64_t i = 0; i < n_logits && failure.empty(); ++i) {
    Seq* q = logit_seq[i];
    const int32_t t = q->sampler.sample(s.logits.data() + i * vocab, vocab, q->history);
    q->step_token = -1;
    q->step_piece.clear();
    if (std::find(q->stop.begin(), q->stop.end(), t) != q->stop.end()) {
      q->step_reason = "stop_token";
    } else {
      q->history.push_back(t);
      ++q->generated;
      q->step_token = t;
      q->step_piece = q->text.push(tok.token_bytes(t));
      if (q->text.stopped())
        q->step_reason = "stop_string";
      else if (q->generated >= q->max_tokens)
        q->step_reason = "max_tokens";
      else if (int32_t(q->history.size()) >= q->capacity)
        q->step_reason = "context_full";
    }
    if (!q->step_reason.empty()) q->step_piece += q->text.flush();
  }
  const double sample_seconds = std::chrono::duration<double>(clock::now() - t_sample).count();

  std::lock_guard<std::mutex> lock(s.mu);
  for (int64_t i = 0; i < n_segs; ++i) seg_seq[i]->in_step = false;
  if (failure.empty()) {
    for (int64_t i = 0; i < n_logits; ++i) {
      Seq* q = logit_seq[i];
      if (q->cancelled) continue;
      if (q->step_token >= 0) q->out.tokens.push_back(q->step_token);
      q->out.text += q->step_piece;  // a stop token's step may flush held-back text
      q->out.generated_tokens = q->generated;
      if (q->step_token >= 0 || !q->step_piece.empty()) s.mark_news(q);
      if (!q->step_reason.empty()) s.finish(q, q->step_reason);
    }
  }
  for (int64_t i = 0; i < n_segs; ++i) {
    Seq* q = seg_seq[i];
    if (q->done) continue;
    if (q->cancelled)
      s.finish(q, "cancelled");
    else if (!failure.empty())
      s.finish(q, "error", failure);
  }
  s.admit_waiting();
  s.update_counts();
  ++s.stats.steps;
  s.stats.prefill_tokens += prefill;
  s.stats.decode_tokens += failure.empty() ? n_logits : 0;
  s.stats.last_rows = int32_t(n);
  s.stats.last_sequences = int32_t(n_segs);
  s.stats.last_step_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  s.stats.step_seconds += s.stats.last_step_seconds;
  s.stats.ternary_seconds += s.scratch.times.ternary - before.ternary;
  s.stats.attention_seconds += s.scratch.times.attention - before.attention;
  s.stats.head_seconds += s.scratch.times.head - before.head;
  s.stats.sample_seconds += sample_seconds;
  return true;
}

bool Scheduler::wait(int32_t timeout_ms) {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mu);
  auto work = [&] { return !s.active.empty() || !s.waiting.empty(); };
  s.cv.wait_for(lock, std::chrono::milliseconds(std::max(0, timeout_ms)),
                [&] { return s.woken || work(); });
  s.woken = false;
  return work();
}

void Scheduler::notify() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  s.woken = true;
  s.cv.notify_all();
}

std::vector<SequenceOutput> Scheduler::poll() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  std::vector<SequenceOutput> r;
  r.reserve(s.news.size());
  for (Seq* q : s.news) {
    q->has_news = false;
    r.push_back(std::move(q->out));
    q->out = SequenceOutput();
    q->out.id = q->id;
    q->out.prompt_tokens = q->prompt_len;
    q->out.generated_tokens = q->generated;
    if (q->done) s.seqs.erase(q->id);
  }
  s.news.clear();
  return r;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace nanochat
