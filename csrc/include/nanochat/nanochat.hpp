// nanochat C++ embedding API: load a ternary (BitNet b1.58) GGUF model and generate text.
//
//   auto model = nanochat::Model::load("model.gguf");      // immutable, share across threads
//   nanochat::Session chat(model);                          // one KV cache per conversation
//   nanochat::SamplingParams sp;  sp.temperature = 0.7f;  sp.max_tokens = 64;
//   auto r = chat.generate(model->tokenize("def main("), sp,
//                          [](int32_t, const std::string& piece) { std::cout << piece; return true; });
//
// A Model is read-only after load(): any number of Sessions on any threads may use it at
// once. A Session is not thread-safe; use one per conversation (or per thread). Every
// error (bad file, bad argument, full context) throws nanochat::Error with a message that
// names the file, key or argument at fault. The C API (nanochat.h) wraps this one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "nanochat/error.hpp"

namespace nanochat {

struct ModelInfo {
  std::string path;
  std::string architecture;  // "bitnet" (llama.cpp-compatible) or "nanochat"
  std::string name;          // general.name
  int32_t vocab_size = 0;
  int32_t d_model = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t ffn_hidden = 0;
  int32_t context_length = 0;  // the longest context a Session may hold
  float rope_theta = 0.0f;
  float norm_eps = 0.0f;
  std::string activation;   // "silu" or "relu2"
  std::string weight_type;  // ggml type of the ternary matrices on disk: "TQ2_0" / "TQ1_0"
  std::string embd_type;    // ggml type of token_embd: "F16", "Q8_0", "F32"
  int64_t n_params = 0;     // every weight in the file
  int64_t weight_bytes = 0; // bytes the engine reads per decoded token (matrices + head)
  int64_t ternary_bytes = 0; // ... of them in ternary matrices (a MoE token's top-k experts)
  int64_t head_bytes = 0;    // ... in the LM head (the tied token_embd)
  int32_t bos_id = -1;
  int32_t eos_id = -1;      // ends a document; also a stop token by default
  int32_t eot_id = -1;      // ends an assistant turn (chat); -1 when the model has none
  bool add_bos = false;     // tokenizer.ggml.add_bos_token: a fresh prompt starts with bos_id
  int32_t sliding_window = 0;    // keys a sliding-window layer sees (0: all layers full)
  int32_t n_sliding_layers = 0;  // layers with sliding-window attention
  int32_t n_experts = 0;         // routed experts of a MoE FFN (0: dense)
  int32_t n_experts_used = 0;    // experts per token (top-k)
  int32_t hc_streams = 1;        // mHC residual streams (1: the plain residual)
};

struct LoadOptions {
  // Threads this model's sessions compute on, at most 1024 (kMaxThreads); 0: the
  // library-wide setting (set_num_threads, NANOCHAT_NUM_THREADS, cores).
  int32_t n_threads = 0;
};

struct SamplingParams {
  float temperature = 0.8f;         // <= 0: greedy (argmax)
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float repetition_penalty = 1.0f;  // 1: off; > 1 penalizes recent tokens (CTRL-style)
  int32_t repetition_window = 64;   // how many recent tokens the penalty looks at
  uint64_t seed = 0;                // same seed, same prompt, same params -> same tokens
  int32_t max_tokens = 128;         // generated tokens at most
  std::vector<int32_t> stop_tokens; // generation ends when one is sampled (not emitted)
  std::vector<std::string> stop_strings;  // ... or when the text ends with one (trimmed)
  bool stop_at_eos = true;          // eos_id (and eot_id) are stop tokens
};

// Called for every generated token with its text piece (UTF-8 bytes; a multi-byte
// character split across tokens arrives when it is complete; text that may begin a stop
// string waits until it cannot). Return false to stop. If text is still held back when
// generation ends, one last call passes token -1 with it (the pieces add up to .text).
using TokenCallback = std::function<bool(int32_t token, const std::string& piece)>;

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids (stop tokens excluded)
  std::string text;             // their text (a matched stop string trimmed off)
  std::string stop_reason;      // "max_tokens", "stop_token", "stop_string", "callback", "context_full"
  int32_t prompt_tokens = 0;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;  // time for all decode steps (sampling included)
  int32_t decode_steps = 0;     // forward passes after the prefill
  // Where decode_seconds went, by the engine's own clocks: the ternary matrix products,
  // the LM head and attention over the KV cache. The rest is norms, RoPE, activation
  // quantization, residual adds and sampling.
  double decode_ternary_seconds = 0.0;
  double decode_head_seconds = 0.0;
  double decode_attention_seconds = 0.0;
};

class Model {
 public:
  // Maps the GGUF file, validates every key, shape, type and offset, and prepares the
  // kernel layouts. Throws nanochat::Error naming the file and what is wrong.
  static std::shared_ptr<const Model> load(const std::string& path, const LoadOptions& opts = {});
  ~Model();

  const ModelInfo& info() const;
  // Byte-level BPE from the file's tokenizer.ggml.* metadata. parse_special: text such as
  // "<|user_start|>" becomes that special token; otherwise it is plain bytes.
  std::vector<int32_t> tokenize(const std::string& text, bool parse_special = false) const;
  std::string detokenize(const std::vector<int32_t>& tokens) const;
  std::string token_text(int32_t id) const;  // raw bytes of one token ("" for specials)
  int32_t token_id(const std::string& token) const;  // id of a vocabulary entry, or -1
  int32_t n_threads() const;  // LoadOptions.n_threads (0: the library-wide count)

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int32_t n_threads_ = 0;
};

// A session's context when the caller does not name one: the model's context_length, but
// at most this (a file may claim 2^24 tokens; its KV cache would take tens of GB).
constexpr int32_t kDefaultMaxContext = 4096;
// The largest KV cache a session allocates unless the caller allows more.
constexpr int64_t kDefaultMaxKvBytes = int64_t(4) << 30;

class Session {
 public:
  // n_ctx: tokens this session's KV cache holds, up to the model's context_length; 0 means
  // min(context_length, kDefaultMaxContext). max_kv_bytes: the largest KV cache it may
  // allocate (0: kDefaultMaxKvBytes); a larger need throws an Error naming the file, the
  // bytes needed and the bytes allowed.
  explicit Session(std::shared_ptr<const Model> model, int32_t n_ctx = 0,
                   int64_t max_kv_bytes = 0);
  // Bytes of the KV cache a session of n_ctx tokens over `model` allocates.
  static int64_t kv_cache_bytes(const Model& model, int32_t n_ctx);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  Session(Session&&) noexcept;
  Session& operator=(Session&&) noexcept;

  const Model& model() const;
  int32_t n_ctx() const;
  int32_t n_past() const;  // tokens in the conversation (the cache holds them; the last
                           // one generate() sampled is run when the conversation goes on)
  void reset();            // forget the conversation
  // Drop cached tokens from position n on (n <= n_past): lets a caller rewind.
  void truncate(int32_t n);

  // Runs the tokens at positions n_past .. n_past+n-1 (prefill in batches) and returns
  // the logits (vocab_size floats) of the last one. Throws when the context would overflow.
  const std::vector<float>& eval(const std::vector<int32_t>& tokens);
  // As eval, but returns logits for every token (n * vocab_size, row-major). For tests
  // and scoring; slower, since it runs the head on every position.
  std::vector<float> eval_all(const std::vector<int32_t>& tokens);

  // Feeds `prompt` (may be empty to continue from the cache) and samples up to
  // params.max_tokens tokens, streaming each through `on_token` (may be empty).
  GenerateResult generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                          const TokenCallback& on_token = nullptr);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// ---- continuous batching ----------------------------------------------------------------
//
//   nanochat::Scheduler sched(model, opts);
//   int64_t id = sched.submit(prompt_tokens, params);     // any thread
//   while (sched.step()) for (auto& out : sched.poll()) ...  // one thread runs step()
//
// A Scheduler serves many sequences over one model: each step() is ONE forward pass over
// the pending token of every decoding sequence plus up to prefill_chunk prompt tokens of
// sequences still prefilling, so the weights are read once for the whole batch. Each
// sequence has its own KV cache (sized to its prompt + max_tokens, within n_ctx), position,
// sampler (SamplingParams: seed, temperature, ..., stop tokens and strings, max_tokens).
// Greedy sequences get exactly the tokens Session::generate gives them alone.

struct SchedulerOptions {
  int32_t n_ctx = 0;            // a sequence's prompt + max_tokens at most (0: the model's
                                // context_length, at most kDefaultMaxContext)
  int64_t kv_budget_bytes = 0;  // KV caches of all admitted sequences together (0: 4 GiB)
  int32_t max_batch = 16;       // sequences admitted at once, 1 .. 128
  int32_t prefill_chunk = 64;   // prompt tokens per step, 1 .. 128
  int32_t max_queue = 64;       // sequences waiting for room; a submit beyond it throws
                                // QueueFullError (0: none wait)
};

// Tokens do not fit a session's context, or a sequence could never fit a Scheduler (the
// C API maps it to NC_ERR_CONTEXT_FULL); still a nanochat::Error.
struct ContextFullError : Error {
  using Error::Error;
};

// submit() when max_queue sequences already wait: the caller may retry later (HTTP 429).
struct QueueFullError : Error {
  using Error::Error;
};

// A sequence's output since the last poll().
struct SequenceOutput {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // new tokens (stop tokens excluded)
  std::string text;             // their text, held back as TokenCallback's pieces are
  bool finished = false;
  // When finished: "max_tokens", "stop_token", "stop_string", "context_full", "cancelled",
  // or "error" (error: what failed; the sequence's tokens so far stand).
  std::string finish_reason;
  std::string error;
  int32_t prompt_tokens = 0;
  int32_t generated_tokens = 0;  // in all, so far
};

struct SchedulerStats {
  int32_t active = 0;           // admitted sequences (prefilling or decoding)
  int32_t waiting = 0;          // submitted, waiting for KV room or a batch slot
  int64_t kv_used_bytes = 0;    // KV caches of the admitted sequences
  int64_t kv_budget_bytes = 0;
  int64_t steps = 0;            // forward passes run
  int64_t prefill_tokens = 0;   // prompt tokens run, in all
  int64_t decode_tokens = 0;    // tokens sampled, in all
  int32_t last_rows = 0;        // rows of the last step's forward pass
  int32_t last_sequences = 0;   // sequences in it
  double last_step_seconds = 0.0;
  // Where the steps' time went, summed over all steps (seconds): what a server's operator
  // reads to tell a batched step's cost (the GEMMs grow with the rows, attention with the
  // sequences' caches) from the work around it.
  double step_seconds = 0.0;       // whole steps, the parts below included
  double ternary_seconds = 0.0;    // ternary GEMMs over the batch's rows
  double attention_seconds = 0.0;  // attention over each sequence's cache
  double head_seconds = 0.0;       // the LM head over the sampled rows
  double sample_seconds = 0.0;     // sampling and stop checks, per sequence
};

class Scheduler {
 public:
  // Throws Error on an option out of range (naming it). Computes on the model's threads
  // (LoadOptions.n_threads, else the library-wide count).
  Scheduler(std::shared_ptr<const Model> model, const SchedulerOptions& opts = {});
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a sequence and returns its id (> 0). Throws Error on bad arguments (empty
  // prompt, token or stop token out of range, bad sampling values, max_tokens < 1),
  // ContextFullError when its prompt leaves no room in n_ctx or its KV cache alone would
  // exceed kv_budget_bytes (it could never run), QueueFullError when max_queue wait.
  int64_t submit(const std::vector<int32_t>& prompt, const SamplingParams& params);
  // Ends a sequence: its KV cache is freed now, or at the end of the step running it.
  // Its last output says "cancelled". False when the id is unknown or already finished.
  bool cancel(int64_t id);
  // Admits waiting sequences that fit, runs one batched forward pass and samples. Returns
  // false when there was nothing to run. One thread at a time (others wait for it).
  bool step();
  // Blocks until there is work for step() (or timeout_ms passes, or notify()).
  // Returns whether there is work.
  bool wait(int32_t timeout_ms);
  void notify();  // wakes wait()
  // Output of every sequence with news since the last call; a finished sequence's last.
  std::vector<SequenceOutput> poll();
  SchedulerStats stats() const;
  const SchedulerOptions& options() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Library-wide settings (the kernels' thread count and ISA), shared by every Model
// loaded without LoadOptions.n_threads. set_num_threads throws Error above 1024 threads
// or when the threads cannot be started (the previous count stays).
void set_num_threads(int32_t n);  // 0: all cores
int32_t num_threads();
std::string version();

}  // namespace nanochat
