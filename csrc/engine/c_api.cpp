// nanochat.h: the C API over nanochat.hpp. Every entry point catches everything and maps
// it to an nc_status, keeping the message for nc_last_error() on the calling thread.
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "engine/model.h"
#include "nanochat/nanochat.h"
#include "nanochat/nanochat.hpp"

struct nc_model {
  std::shared_ptr<const nanochat::Model> model;
};

struct nc_session {
  nanochat::Session session;
};

struct nc_scheduler {
  nc_scheduler(std::shared_ptr<const nanochat::Model> m, const nanochat::SchedulerOptions& o)
      : scheduler(std::move(m), o) {}
  nanochat::Scheduler scheduler;
};

namespace {

thread_local std::string t_last_error;

nc_status fail(nc_status st, const std::string& msg) {
  t_last_error = msg;
  return st;
}

// Runs f, mapping exceptions: nanochat::Error -> `error_status` (bad input by default),
// a full context -> NC_ERR_CONTEXT_FULL, out of memory and anything else -> internal.
template <class F>
nc_status guarded(const char* fn, F&& f, nc_status error_status = NC_ERR_INVALID_ARGUMENT) {
  try {
    return f();
  } catch (const nanochat::ContextFullError& e) {
    return fail(NC_ERR_CONTEXT_FULL, std::string(fn) + ": " + e.what());
  } catch (const nanochat::QueueFullError& e) {
    return fail(NC_ERR_QUEUE_FULL, std::string(fn) + ": " + e.what());
  } catch (const nanochat::Error& e) {
    return fail(error_status, std::string(fn) + ": " + e.what());
  } catch (const std::bad_alloc&) {
    return fail(NC_ERR_INTERNAL, std::string(fn) + ": out of memory");
  } catch (const std::exception& e) {
    return fail(NC_ERR_INTERNAL, std::string(fn) + ": internal error: " + e.what());
  } catch (...) {
    return fail(NC_ERR_INTERNAL, std::string(fn) + ": unknown internal error");
  }
}

void copy_str(char* dst, size_t cap, const std::string& s) {
  const size_t n = s.size() < cap - 1 ? s.size() : cap - 1;
  std::memcpy(dst, s.data(), n);
  dst[n] = '\0';
}

// nc_sampling -> SamplingParams (params NULL: the defaults); a NULL list pointer is an error.
nc_status to_params(const char* fn, const nc_sampling* params, nanochat::SamplingParams& sp) {
  if (!params) return NC_OK;
  if ((params->n_stop_tokens > 0 && !params->stop_tokens) ||
      (params->n_stop_strings > 0 && !params->stop_strings))
    return fail(NC_ERR_INVALID_ARGUMENT, std::string(fn) + ": stop list with a NULL pointer");
  sp.temperature = params->temperature;
  sp.top_k = params->top_k;
  sp.top_p = params->top_p;
  sp.repetition_penalty = params->repetition_penalty;
  sp.repetition_window = params->repetition_window;
  sp.seed = params->seed;
  sp.max_tokens = params->max_tokens;
  sp.stop_at_eos = params->stop_at_eos != 0;
  sp.stop_tokens.assign(params->stop_tokens, params->stop_tokens + params->n_stop_tokens);
  for (size_t i = 0; i < params->n_stop_strings; ++i) {
    if (!params->stop_strings[i])
      return fail(NC_ERR_INVALID_ARGUMENT,
                  std::string(fn) + ": stop_strings[" + std::to_string(i) + "] is NULL");
    sp.stop_strings.emplace_back(params->stop_strings[i]);
  }
  return NC_OK;
}

}  // namespace

extern "C" {

const char* nc_version(void) {
  static const std::string v = nanochat::version();
  return v.c_str();
}

const char* nc_last_error(void) { return t_last_error.c_str(); }

void nc_set_num_threads(int32_t n) {
  try {
    nanochat::set_num_threads(n < 0 ? 0 : n);
  } catch (const std::exception& e) {
    t_last_error = std::string("nc_set_num_threads: ") + e.what();
  } catch (...) {
    t_last_error = "nc_set_num_threads: could not start the thread pool";
  }
}

int32_t nc_num_threads(void) {
  try {
    return nanochat::num_threads();
  } catch (...) {
    return 1;  // the environment could not be read: one thread runs everything inline
  }
}

nc_status nc_model_load(const char* path, nc_model** out) {
  if (!out) return fail(NC_ERR_INVALID_ARGUMENT, "nc_model_load: out is NULL");
  *out = nullptr;
  if (!path) return fail(NC_ERR_INVALID_ARGUMENT, "nc_model_load: path is NULL");
  return guarded(
      "nc_model_load",
      [&] {
        auto m = std::make_unique<nc_model>();
        m->model = nanochat::Model::load(path);
        *out = m.release();
        return NC_OK;
      },
      NC_ERR_FILE);
}

void nc_model_free(nc_model* model) { delete model; }

nc_status nc_model_get_info(const nc_model* model, nc_model_info* out) {
  if (!model || !out) return fail(NC_ERR_INVALID_ARGUMENT, "nc_model_get_info: NULL argument");
  const nanochat::ModelInfo& i = model->model->info();
  nc_model_info r;
  std::memset(&r, 0, sizeof r);
  r.vocab_size = i.vocab_size;
  r.d_model = i.d_model;
  r.n_layers = i.n_layers;
  r.n_heads = i.n_heads;
  r.n_kv_heads = i.n_kv_heads;
  r.head_dim = i.head_dim;
  r.ffn_hidden = i.ffn_hidden;
  r.context_length = i.context_length;
  r.bos_id = i.bos_id;
  r.eos_id = i.eos_id;
  r.eot_id = i.eot_id;
  r.add_bos = i.add_bos ? 1 : 0;
  r.n_params = i.n_params;
  r.weight_bytes = i.weight_bytes;
  copy_str(r.architecture, sizeof r.architecture, i.architecture);
  copy_str(r.weight_type, sizeof r.weight_type, i.weight_type);
  copy_str(r.embd_type, sizeof r.embd_type, i.embd_type);
  r.sliding_window = i.sliding_window;
  r.n_sliding_layers = i.n_sliding_layers;
  r.n_experts = i.n_experts;
  r.n_experts_used = i.n_experts_used;
  r.hc_streams = i.hc_streams;
  *out = r;
  return NC_OK;
}

nc_status nc_tokenize(const nc_model* model, const char* text, size_t len, int parse_special,
                      int32_t* out, size_t cap, size_t* n_out) {
  if (!model || !n_out || (!text && len > 0) || (!out && cap > 0))
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_tokenize: NULL argument");
  return guarded("nc_tokenize", [&] {
    const std::vector<int32_t> ids =
        model->model->tokenize(std::string(text ? text : "", len), parse_special != 0);
    *n_out = ids.size();
    if (ids.size() > cap)
      return fail(NC_ERR_BUFFER_TOO_SMALL, "nc_tokenize: " + std::to_string(ids.size()) +
                                               " tokens do not fit cap = " + std::to_string(cap));
    if (!ids.empty()) std::memcpy(out, ids.data(), ids.size() * sizeof(int32_t));
    return NC_OK;
  });
}

nc_status nc_detokenize(const nc_model* model, const int32_t* tokens, size_t n, char* out,
                        size_t cap, size_t* n_out) {
  if (!model || !n_out || (!tokens && n > 0) || (!out && cap > 0))
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_detokenize: NULL argument");
  return guarded("nc_detokenize", [&] {
    const int32_t vocab = model->model->info().vocab_size;
    for (size_t i = 0; i < n; ++i)
      if (tokens[i] < 0 || tokens[i] >= vocab)
        return fail(NC_ERR_INVALID_ARGUMENT, "nc_detokenize: token " + std::to_string(tokens[i]) +
                                                 " at index " + std::to_string(i) +
                                                 " is out of range");
    const std::string s = model->model->detokenize(std::vector<int32_t>(tokens, tokens + n));
    *n_out = s.size();
    if (s.size() + 1 > cap)
      return fail(NC_ERR_BUFFER_TOO_SMALL,
                  "nc_detokenize: " + std::to_string(s.size() + 1) +
                      " bytes (with the NUL) do not fit cap = " + std::to_string(cap));
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
    return NC_OK;
  });
}

nc_status nc_session_new_limited(const nc_model* model, int32_t n_ctx, int64_t max_kv_bytes,
                                 nc_session** out) {
  if (!out) return fail(NC_ERR_INVALID_ARGUMENT, "nc_session_new: out is NULL");
  *out = nullptr;
  if (!model) return fail(NC_ERR_INVALID_ARGUMENT, "nc_session_new: model is NULL");
  return guarded("nc_session_new", [&] {
    *out = new nc_session{nanochat::Session(model->model, n_ctx, max_kv_bytes)};
    return NC_OK;
  });
}

nc_status nc_session_new(const nc_model* model, int32_t n_ctx, nc_session** out) {
  return nc_session_new_limited(model, n_ctx, 0, out);
}

void nc_session_free(nc_session* session) { delete session; }

nc_status nc_session_reset(nc_session* session) {
  if (!session) return fail(NC_ERR_INVALID_ARGUMENT, "nc_session_reset: session is NULL");
  session->session.reset();
  return NC_OK;
}

int32_t nc_session_n_past(const nc_session* session) {
  if (!session) {
    t_last_error = "nc_session_n_past: session is NULL";
    return -1;
  }
  return session->session.n_past();
}

nc_status nc_session_eval(nc_session* session, const int32_t* tokens, size_t n, float* logits) {
  if (!session || (!tokens && n > 0))
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_session_eval: NULL argument");
  return guarded("nc_session_eval", [&] {
    const std::vector<float>& l = session->session.eval(std::vector<int32_t>(tokens, tokens + n));
    if (logits) std::memcpy(logits, l.data(), l.size() * sizeof(float));
    return NC_OK;
  });
}

void nc_sampling_default(nc_sampling* out) {
  if (!out) return;
  const nanochat::SamplingParams d;
  std::memset(out, 0, sizeof *out);
  out->temperature = d.temperature;
  out->top_k = d.top_k;
  out->top_p = d.top_p;
  out->repetition_penalty = d.repetition_penalty;
  out->repetition_window = d.repetition_window;
  out->seed = d.seed;
  out->max_tokens = d.max_tokens;
  out->stop_tokens = nullptr;
  out->n_stop_tokens = 0;
  out->stop_strings = nullptr;
  out->n_stop_strings = 0;
  out->stop_at_eos = d.stop_at_eos ? 1 : 0;
}

nc_status nc_generate(nc_session* session, const char* prompt, const nc_sampling* params,
                      nc_token_callback callback, void* user_data, nc_generate_stats* stats) {
  if (!session || !prompt) return fail(NC_ERR_INVALID_ARGUMENT, "nc_generate: NULL argument");
  return nc_generate_ex(session, prompt, std::strlen(prompt), NC_GENERATE_PARSE_SPECIAL, params,
                        callback, user_data, stats);
}

nc_status nc_generate_ex(nc_session* session, const char* prompt, size_t len, uint32_t flags,
                         const nc_sampling* params, nc_token_callback callback, void* user_data,
                         nc_generate_stats* stats) {
  if (!session || (!prompt && len > 0))
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_generate: NULL argument");
  if (flags & ~uint32_t(NC_GENERATE_PARSE_SPECIAL))
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_generate_ex: unknown flag bits " +
                                             std::to_string(flags & ~uint32_t(NC_GENERATE_PARSE_SPECIAL)));
  return guarded("nc_generate", [&] {
    nanochat::SamplingParams sp;
    const nc_status st = to_params("nc_generate", params, sp);
    if (st != NC_OK) return st;
    nanochat::Session& s = session->session;
    const nanochat::Model& m = s.model();
    std::vector<int32_t> ids =
        m.tokenize(std::string(prompt ? prompt : "", len), (flags & NC_GENERATE_PARSE_SPECIAL) != 0);
    if (m.info().add_bos && s.n_past() == 0) ids.insert(ids.begin(), m.info().bos_id);
    nanochat::TokenCallback cb;
    if (callback)
      cb = [&](int32_t tok, const std::string& piece) {
        return callback(tok, piece.data(), piece.size(), user_data) == 0;
      };
    const nanochat::GenerateResult r = s.generate(ids, sp, cb);
    if (stats) {
      std::memset(stats, 0, sizeof *stats);
      stats->prompt_tokens = r.prompt_tokens;
      stats->generated_tokens = int32_t(r.tokens.size());
      stats->decode_steps = r.decode_steps;
      stats->prefill_seconds = r.prefill_seconds;
      stats->decode_seconds = r.decode_seconds;
      copy_str(stats->stop_reason, sizeof stats->stop_reason, r.stop_reason);
    }
    return NC_OK;
  });
}

void nc_scheduler_options_default(nc_scheduler_options* out) {
  if (!out) return;
  const nanochat::SchedulerOptions d;
  std::memset(out, 0, sizeof *out);
  out->n_ctx = d.n_ctx;
  out->kv_budget_bytes = d.kv_budget_bytes;
  out->max_batch = d.max_batch;
  out->prefill_chunk = d.prefill_chunk;
  out->max_queue = d.max_queue;
}

nc_status nc_scheduler_new(const nc_model* model, const nc_scheduler_options* opts,
                           nc_scheduler** out) {
  if (!out) return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_new: out is NULL");
  *out = nullptr;
  if (!model) return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_new: model is NULL");
  return guarded("nc_scheduler_new", [&] {
    nanochat::SchedulerOptions o;
    if (opts) {
      o.n_ctx = opts->n_ctx;
      o.kv_budget_bytes = opts->kv_budget_bytes;
      o.max_batch = opts->max_batch;
      o.prefill_chunk = opts->prefill_chunk;
      o.max_queue = opts->max_queue;
    }
    *out = new nc_scheduler(model->model, o);
    return NC_OK;
  });
}

void nc_scheduler_free(nc_scheduler* scheduler) { delete scheduler; }

nc_status nc_scheduler_submit(nc_scheduler* scheduler, const int32_t* prompt, size_t n,
                              const nc_sampling* params, int64_t* id_out) {
  if (!scheduler || !id_out || (!prompt && n > 0))
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_submit: NULL argument");
  *id_out = 0;
  return guarded("nc_scheduler_submit", [&] {
    nanochat::SamplingParams sp;
    const nc_status st = to_params("nc_scheduler_submit", params, sp);
    if (st != NC_OK) return st;
    *id_out = scheduler->scheduler.submit(std::vector<int32_t>(prompt, prompt + n), sp);
    return NC_OK;
  });
}

nc_status nc_scheduler_cancel(nc_scheduler* scheduler, int64_t id) {
  if (!scheduler) return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_cancel: scheduler is NULL");
  return guarded("nc_scheduler_cancel", [&] {
    if (!scheduler->scheduler.cancel(id))
      return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_cancel: no unfinished sequence " +
                                               std::to_string(id));
    return NC_OK;
  });
}

nc_status nc_scheduler_step(nc_scheduler* scheduler, int32_t* ran) {
  if (!scheduler) return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_step: scheduler is NULL");
  return guarded("nc_scheduler_step", [&] {
    const bool r = scheduler->scheduler.step();
    if (ran) *ran = r ? 1 : 0;
    return NC_OK;
  });
}

nc_status nc_scheduler_wait(nc_scheduler* scheduler, int32_t timeout_ms, int32_t* has_work) {
  if (!scheduler) return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_wait: scheduler is NULL");
  return guarded("nc_scheduler_wait", [&] {
    const bool w = scheduler->scheduler.wait(timeout_ms);
    if (has_work) *has_work = w ? 1 : 0;
    return NC_OK;
  });
}

nc_status nc_scheduler_poll(nc_scheduler* scheduler, nc_sequence_callback callback,
                            void* user_data) {
  if (!scheduler || !callback)
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_poll: NULL argument");
  return guarded("nc_scheduler_poll", [&] {
    for (const nanochat::SequenceOutput& o : scheduler->scheduler.poll()) {
      nc_sequence_output c;
      std::memset(&c, 0, sizeof c);
      c.id = o.id;
      c.tokens = o.tokens.data();
      c.n_tokens = o.tokens.size();
      c.text = o.text.data();
      c.text_len = o.text.size();
      c.finished = o.finished ? 1 : 0;
      copy_str(c.finish_reason, sizeof c.finish_reason, o.finish_reason);
      c.error = o.error.c_str();
      c.prompt_tokens = o.prompt_tokens;
      c.generated_tokens = o.generated_tokens;
      callback(&c, user_data);
    }
    return NC_OK;
  });
}

nc_status nc_scheduler_get_stats(const nc_scheduler* scheduler, nc_scheduler_stats* out) {
  if (!scheduler || !out)
    return fail(NC_ERR_INVALID_ARGUMENT, "nc_scheduler_get_stats: NULL argument");
  const nanochat::SchedulerStats s = scheduler->scheduler.stats();
  std::memset(out, 0, sizeof *out);
  out->active = s.active;
  out->waiting = s.waiting;
  out->kv_used_bytes = s.kv_used_bytes;
  out->kv_budget_bytes = s.kv_budget_bytes;
  out->steps = s.steps;
  out->prefill_tokens = s.prefill_tokens;
  out->decode_tokens = s.decode_tokens;
  out->last_rows = s.last_rows;
  out->last_sequences = s.last_sequences;
  out->last_step_seconds = s.last_step_seconds;
  return NC_OK;
}

}  // extern "C"
