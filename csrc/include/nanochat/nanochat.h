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
  NC_ERR_INTERNAL = 5          /* out of memory or a bug */
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

#ifdef __cplusplus
}
#endif

#endif /* NANOCHAT_H */
