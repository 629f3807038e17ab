/* nanochat C API: the C++ engine (nanochat.hpp) behind opaque handles, for FFI.
 *
 *   nc_model* model = NULL;
 *   if (nc_model_load("model.gguf", &model) != NC_OK) { fprintf(stderr, "%s\n", nc_last_error()); }
 *   nc_session* s = NULL;  nc_session_new(model, 0, &s);
 *   nc_sampling sp;  nc_sampling_default(&sp);  sp.max_tokens = 64;
 *   nc_generate(s, "def main(", &sp, on_token, user_data, &stats);
 *   nc_session_free(s);  nc_model_free(model);
 *
 * Every function returns an nc_status. On failure the message (naming the file, key or
 * argument at fault) is available from nc_last_error() on the same thread until the next
 * failing call there. No function throws or aborts on bad input. A model may be shared by
 * sessions on different threads; a session is used by one thread at a time. */
#ifndef NANOCHAT_H
#define NANOCHAT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define NC_API __declspec(dllexport)
#else
#define NC_API __attribute__((visibility("default")))
#endif

typedef enum nc_status {
  NC_OK = 0,
  NC_ERR_INVALID_ARGUMENT = 1, /* a NULL handle, a bad option value, a token out of range */
  NC_ERR_FILE = 2,             /* missing, unreadable, truncated or malformed model file */
  NC_ERR_CONTEXT_FULL = 3,     /* the session's KV cache cannot hold the tokens */
  NC_ERR_BUFFER_TOO_SMALL = 4, /* an output buffer is too small; *n_out says how much is needed */
  NC_ERR_INTERNAL = 5,         /* out of memory or a bug */
  NC_ERR_QUEUE_FULL = 6        /* a scheduler's queue is full: try again later */
} nc_status;

typedef struct nc_model nc_model;
typedef struct nc_session nc_session;

typedef struct nc_model_info {
  int32_t vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_hidden;
  int32_t context_length;
  int32_t bos_id, eos_id, eot_id; /* -1 when absent */
  int32_t add_bos;                /* nonzero: nc_generate starts a fresh prompt with bos_id */
  int64_t n_params;
  int64_t weight_bytes; /* bytes read per decoded token */
  char architecture[32];
  char weight_type[16];
  char embd_type[16];
  /* architecture "nanochat" options (docs/gguf.md); 0 / 0 / 1 for a plain bitnet model */
  int32_t sliding_window;   /* keys a sliding-window layer sees */
  int32_t n_sliding_layers; /* layers with sliding-window attention */
  int32_t n_experts;        /* routed experts of a MoE FFN */
  int32_t n_experts_used;   /* experts per token (top-k) */
  int32_t hc_streams;       /* mHC residual streams */
} nc_model_info;

typedef struct nc_sampling {
  float temperature; /* <= 0: greedy */
  int32_t top_k;     /* 0: off */
  float top_p;       /* 1: off */
  float repetition_penalty;
  int32_t repetition_window;
  uint64_t seed;
  int32_t max_tokens;
  const int32_t* stop_tokens; /* may be NULL */
  size_t n_stop_tokens;
  const char* const* stop_strings; /* NUL-terminated UTF-8; may be NULL */
  size_t n_stop_strings;
  int32_t stop_at_eos; /* nonzero: eos/eot end generation */
} nc_sampling;

typedef struct nc_generate_stats {
  int32_t prompt_tokens;
  int32_t generated_tokens;
  int32_t decode_steps;
  double prefill_seconds;
  double decode_seconds;
  char stop_reason[16]; /* "max_tokens", "stop_token", "stop_string", "callback", "context_full" */
} nc_generate_stats;

/* Called per generated token with its UTF-8 piece (not NUL-terminated). Return nonzero
 * to stop generation. Text held back when generation ends (a possible stop-string start,
 * an unfinished character) comes in one last call with token -1. */
typedef int (*nc_token_callback)(int32_t token, const char* piece, size_t len, void* user_data);

NC_API const char* nc_version(void);
NC_API const char* nc_last_error(void);
/* 0: all cores. Above 1024 threads, or when the threads cannot be started, the count
 * stays as it was and nc_last_error() says why; nc_num_threads() tells the count. */
NC_API void nc_set_num_threads(int32_t n);
NC_API int32_t nc_num_threads(void);

NC_API nc_status nc_model_load(const char* path, nc_model** out);
NC_API void nc_model_free(nc_model* model); /* NULL is a no-op */
NC_API nc_status nc_model_get_info(const nc_model* model, nc_model_info* out);

/* Tokens of `text` (len bytes) into out[0..cap); *n_out = the count (also when it does not
 * fit, with NC_ERR_BUFFER_TOO_SMALL). parse_special: "<|...|>" strings become specials. */
NC_API nc_status nc_tokenize(const nc_model* model, const char* text, size_t len,
                             int parse_special, int32_t* out, size_t cap, size_t* n_out);
/* Text of the tokens into out (NUL-terminated, cap bytes); *n_out = its length. */
NC_API nc_status nc_detokenize(const nc_model* model, const int32_t* tokens, size_t n,
                               char* out, size_t cap, size_t* n_out);

/* n_ctx: tokens the session's KV cache holds, up to the model's context_length; 0: the
 * model's context_length but at most 4096. The KV cache may take up to 4 GiB; a context
 * needing more fails with NC_ERR_INVALID_ARGUMENT and a message naming the file, the bytes
 * needed and allowed. */
NC_API nc_status nc_session_new(const nc_model* model, int32_t n_ctx, nc_session** out);
/* As nc_session_new, with the largest KV cache (bytes) the session may allocate;
 * max_kv_bytes 0: the default 4 GiB. A new function, so nc_session_new and every struct keep
 * their ABI. */
NC_API nc_status nc_session_new_limited(const nc_model* model, int32_t n_ctx,
                                        int64_t max_kv_bytes, nc_session** out);
NC_API void nc_session_free(nc_session* session); /* NULL is a no-op */
NC_API nc_status nc_session_reset(nc_session* session);
NC_API int32_t nc_session_n_past(const nc_session* session);
/* Feeds tokens; when logits is not NULL, copies the last token's vocab_size logits. */
NC_API nc_status nc_session_eval(nc_session* session, const int32_t* tokens, size_t n,
                                 float* logits);

NC_API void nc_sampling_default(nc_sampling* out);
/* Tokenizes `prompt` (parse_special on, so chat markers work), feeds it and generates.
 * callback and stats may be NULL. Same as nc_generate_ex(..., strlen(prompt),
 * NC_GENERATE_PARSE_SPECIAL, ...). */
NC_API nc_status nc_generate(nc_session* session, const char* prompt, const nc_sampling* params,
                             nc_token_callback callback, void* user_data,
                             nc_generate_stats* stats);

/* nc_generate_ex flags. Without NC_GENERATE_PARSE_SPECIAL the prompt is plain text: a
 * user typing "<|im_end|>" gets those characters, not the control token. */
#define NC_GENERATE_PARSE_SPECIAL 1u
/* As nc_generate for `len` bytes of prompt (may hold NULs; NULL when len is 0) and the
 * flags above (other bits: NC_ERR_INVALID_ARGUMENT). */
NC_API nc_status nc_generate_ex(nc_session* session, const char* prompt, size_t len,
                                uint32_t flags, const nc_sampling* params,
                                nc_token_callback callback, void* user_data,
                                nc_generate_stats* stats);

/* ---- continuous batching (nanochat.hpp's Scheduler) ------------------------------------
 *
 *   nc_scheduler* sch = NULL;  nc_scheduler_options o;  nc_scheduler_options_default(&o);
 *   nc_scheduler_new(model, &o, &sch);
 *   nc_scheduler_submit(sch, tokens, n, &sp, &id);     (any thread)
 *   int ran = 1;  while (ran) { nc_scheduler_step(sch, &ran); nc_scheduler_poll(sch, cb, ud); }
 *
 * Each step runs one forward pass over every active sequence (one decode token each, plus
 * a chunk of prompt tokens of sequences still prefilling). Each sequence has its own KV
 * cache (prompt + max_tokens positions) and sampling parameters; greedy sequences get the
 * tokens nc_generate gives them alone. submit, cancel, poll and stats may be called from
 * any thread while one thread steps. */
typedef struct nc_scheduler nc_scheduler;

typedef struct nc_scheduler_options {
  int32_t n_ctx;           /* prompt + max_tokens of a sequence at most; 0: min(context_length, 4096) */
  int64_t kv_budget_bytes; /* KV caches of all admitted sequences together; 0: 4 GiB */
  int32_t max_batch;       /* sequences admitted at once, 1..128 */
  int32_t prefill_chunk;   /* prompt tokens per step, 1..128 */
  int32_t max_queue;       /* sequences that may wait for room; more: NC_ERR_QUEUE_FULL */
} nc_scheduler_options;

typedef struct nc_sequence_output {
  int64_t id;
  const int32_t* tokens; /* the tokens new since the last poll */
  size_t n_tokens;
  const char* text;      /* their text (UTF-8, not NUL-terminated), stop strings held back */
  size_t text_len;
  int32_t finished;
  /* when finished: "max_tokens", "stop_token", "stop_string", "context_full", "cancelled", "error" */
  char finish_reason[16];
  const char* error;     /* NUL-terminated; "" unless finish_reason is "error" */
  int32_t prompt_tokens;
  int32_t generated_tokens; /* so far, in all */
} nc_sequence_output;

/* Called by nc_scheduler_poll once per sequence with news; pointers live during the call. */
typedef void (*nc_sequence_callback)(const nc_sequence_output* out, void* user_data);

typedef struct nc_scheduler_stats {
  int32_t active, waiting;
  int64_t kv_used_bytes, kv_budget_bytes;
  int64_t steps, prefill_tokens, decode_tokens;
  int32_t last_rows, last_sequences;
  double last_step_seconds;
} nc_scheduler_stats;

NC_API void nc_scheduler_options_default(nc_scheduler_options* out);
/* opts NULL: the defaults. An option out of range: NC_ERR_INVALID_ARGUMENT naming it. */
NC_API nc_status nc_scheduler_new(const nc_model* model, const nc_scheduler_options* opts,
                                  nc_scheduler** out);
NC_API void nc_scheduler_free(nc_scheduler* scheduler); /* NULL is a no-op; not while stepping */
/* Queues prompt tokens with their own sampling (params NULL: defaults); *id_out > 0.
 * NC_ERR_CONTEXT_FULL: the prompt leaves no room in n_ctx, or prompt + max_tokens need
 * more KV than the whole budget (it could never run). NC_ERR_QUEUE_FULL: max_queue wait. */
NC_API nc_status nc_scheduler_submit(nc_scheduler* scheduler, const int32_t* prompt, size_t n,
                                     const nc_sampling* params, int64_t* id_out);
/* Ends a sequence and frees its KV cache (at once, or when the running step ends).
 * NC_ERR_INVALID_ARGUMENT when the id is unknown or already finished. */
NC_API nc_status nc_scheduler_cancel(nc_scheduler* scheduler, int64_t id);
/* One batched forward pass; *ran = 0 when there was nothing to run (ran may be NULL). */
NC_API nc_status nc_scheduler_step(nc_scheduler* scheduler, int32_t* ran);
/* Blocks until there is work (or timeout_ms); *has_work says which (may be NULL). */
NC_API nc_status nc_scheduler_wait(nc_scheduler* scheduler, int32_t timeout_ms, int32_t* has_work);
NC_API nc_status nc_scheduler_poll(nc_scheduler* scheduler, nc_sequence_callback callback,
                                   void* user_data);
NC_API nc_status nc_scheduler_get_stats(const nc_scheduler* scheduler, nc_scheduler_stats* out);

#ifdef __cplusplus
}
#endif

#endif /* NANOCHAT_H */
