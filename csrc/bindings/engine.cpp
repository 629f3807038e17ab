// nanochat._C engine bindings: EngineModel (load, info, tokenizer), EngineSession
// (eval, eval_all, generate) and EngineScheduler (continuous batching) over the C++ API
// in nanochat.hpp. python/nanochat/infer/engine.py and infer/server.py
// wraps these. The GIL is released while the engine computes; a generate callback takes
// it back for each token.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "nanochat/nanochat.hpp"

namespace py = pybind11;
using namespace nanochat;

namespace {

struct PyModel {
  std::shared_ptr<const Model> model;
};

struct PySession {
  std::shared_ptr<const Model> model;
  std::unique_ptr<Session> session;
};

struct PyScheduler {
  std::unique_ptr<Scheduler> scheduler;
};

py::dict info_dict(const ModelInfo& i) {
  py::dict d;
  d["path"] = i.path;
  d["architecture"] = i.architecture;
  d["name"] = i.name;
  d["vocab_size"] = i.vocab_size;
  d["d_model"] = i.d_model;
  d["n_layers"] = i.n_layers;
  d["n_heads"] = i.n_heads;
  d["n_kv_heads"] = i.n_kv_heads;
  d["head_dim"] = i.head_dim;
  d["ffn_hidden"] = i.ffn_hidden;
  d["context_length"] = i.context_length;
  d["rope_theta"] = i.rope_theta;
  d["norm_eps"] = i.norm_eps;
  d["activation"] = i.activation;
  d["weight_type"] = i.weight_type;
  d["embd_type"] = i.embd_type;
  d["n_params"] = i.n_params;
  d["weight_bytes"] = i.weight_bytes;
  d["ternary_bytes"] = i.ternary_bytes;
  d["head_bytes"] = i.head_bytes;
  d["bos_id"] = i.bos_id;
  d["eos_id"] = i.eos_id;
  d["eot_id"] = i.eot_id;
  d["add_bos"] = i.add_bos;
  d["sliding_window"] = i.sliding_window;
  d["n_sliding_layers"] = i.n_sliding_layers;
  d["n_experts"] = i.n_experts;
  d["n_experts_used"] = i.n_experts_used;
  d["hc_streams"] = i.hc_streams;
  return d;
}

py::array_t<float> to_array(const float* p, std::vector<py::ssize_t> shape) {
  py::array_t<float> a(shape);
  std::memcpy(a.mutable_data(), p, size_t(a.size()) * sizeof(float));
  return a;
}

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<PyModel>(m, "EngineModel", "A GGUF model loaded by the C++ engine (read-only).")
      .def(py::init([](const std::string& path, int n_threads) {
             LoadOptions o;
             o.n_threads = n_threads;
             py::gil_scoped_release nogil;
             return PyModel{Model::load(path, o)};
           }),
           py::arg("path"), py::arg("n_threads") = 0)
      .def_property_readonly("info", [](const PyModel& s) { return info_dict(s.model->info()); })
      .def(
          "tokenize",
          [](const PyModel& s, const std::string& text, bool parse_special) {
            py::gil_scoped_release nogil;
            return s.model->tokenize(text, parse_special);
          },
          py::arg("text"), py::arg("parse_special") = false)
      .def(
          "detokenize",
          [](const PyModel& s, const std::vector<int32_t>& ids) {
            return py::bytes(s.model->detokenize(ids));
          },
          py::arg("ids"), "Raw bytes of the tokens (may end inside a UTF-8 character).")
      .def(
          "token_text",
          [](const PyModel& s, int32_t id) { return py::bytes(s.model->token_text(id)); },
          py::arg("id"))
      .def(
          "token_id", [](const PyModel& s, const std::string& t) { return s.model->token_id(t); },
          py::arg("token"));

  py::class_<PySession>(m, "EngineSession", "One conversation's KV cache over an EngineModel.")
      .def(py::init([](const PyModel& model, int32_t n_ctx, int64_t max_kv_bytes) {
             return PySession{model.model,
                              std::make_unique<Session>(model.model, n_ctx, max_kv_bytes)};
           }),
           py::arg("model"), py::arg("n_ctx") = 0, py::arg("max_kv_bytes") = 0)
      .def_property_readonly("n_past", [](const PySession& s) { return s.session->n_past(); })
      .def_property_readonly("n_ctx", [](const PySession& s) { return s.session->n_ctx(); })
      .def("reset", [](PySession& s) { s.session->reset(); })
      .def(
          "truncate", [](PySession& s, int32_t n) { s.session->truncate(n); }, py::arg("n"))
      .def(
          "eval",
          [](PySession& s, const std::vector<int32_t>& ids) {
            const float* p;
            {
              py::gil_scoped_release nogil;
              p = s.session->eval(ids).data();
            }
            return to_array(p, {py::ssize_t(s.model->info().vocab_size)});
          },
          py::arg("ids"), "Logits (vocab,) float32 of the last token.")
      .def(
          "eval_all",
          [](PySession& s, const std::vector<int32_t>& ids) {
            std::vector<float> out;
            {
              py::gil_scoped_release nogil;
              out = s.session->eval_all(ids);
            }
            return to_array(out.data(),
                            {py::ssize_t(ids.size()), py::ssize_t(s.model->info().vocab_size)});
          },
          py::arg("ids"), "Logits (n, vocab) float32 of every token.")
      .def(
          "generate",
          [](PySession& s, const std::vector<int32_t>& prompt, float temperature, int32_t top_k,
             float top_p, float repetition_penalty, int32_t repetition_window, uint64_t seed,
             int32_t max_tokens, const std::vector<int32_t>& stop_tokens, const py::list& stop,
             bool stop_at_eos, py::object callback) {
            SamplingParams sp;
            sp.temperature = temperature;
            sp.top_k = top_k;
            sp.top_p = top_p;
            sp.repetition_penalty = repetition_penalty;
            sp.repetition_window = repetition_window;
            sp.seed = seed;
            sp.max_tokens = max_tokens;
            sp.stop_tokens = stop_tokens;
            for (const py::handle& h : stop)
              sp.stop_strings.push_back(h.cast<std::string>());  // str (UTF-8) or bytes
            sp.stop_at_eos = stop_at_eos;
            // A Python exception in the callback stops generation and is re-raised here.
            std::exception_ptr error;
            TokenCallback cb;
            if (!callback.is_none())
              cb = [&](int32_t tok, const std::string& piece) {
                py::gil_scoped_acquire gil;
                try {
                  py::object r = callback(tok, py::bytes(piece));
                  return r.is_none() || r.cast<bool>();
                } catch (...) {
                  error = std::current_exception();
                  return false;
                }
              };
            GenerateResult r;
            {
              py::gil_scoped_release nogil;
              r = s.session->generate(prompt, sp, cb);
            }
            if (error) std::rethrow_exception(error);
            py::dict d;
            d["tokens"] = r.tokens;
            d["text"] = py::bytes(r.text);
            d["stop_reason"] = r.stop_reason;
            d["prompt_tokens"] = r.prompt_tokens;
            d["prefill_seconds"] = r.prefill_seconds;
            d["decode_seconds"] = r.decode_seconds;
            d["decode_steps"] = r.decode_steps;
            d["decode_ternary_seconds"] = r.decode_ternary_seconds;
            d["decode_head_seconds"] = r.decode_head_seconds;
            d["decode_attention_seconds"] = r.decode_attention_seconds;
            return d;
          },
          py::arg("prompt"), py::arg("temperature") = 0.8f, py::arg("top_k") = 0,
          py::arg("top_p") = 1.0f, py::arg("repetition_penalty") = 1.0f,
          py::arg("repetition_window") = 64, py::arg("seed") = 0, py::arg("max_tokens") = 128,
          py::arg("stop_tokens") = std::vector<int32_t>(), py::arg("stop") = py::list(),
          py::arg("stop_at_eos") = true, py::arg("callback") = py::none(),
          "Feeds `prompt` (ids) and samples; callback(token, piece: bytes) -> False stops. "
          "Returns a dict (tokens, text: bytes, stop_reason, prompt_tokens, prefill_seconds, "
          "decode_seconds, decode_steps, decode_{ternary,head,attention}_seconds).");

  // Subclasses of CoreError (ValueError), registered after it so they are tried first.
  py::register_exception<ContextFullError>(m, "ContextFullError", m.attr("CoreError"));
  py::register_exception<QueueFullError>(m, "QueueFullError", m.attr("CoreError"));

  py::class_<PyScheduler>(m, "EngineScheduler",
                          "Continuous batching over an EngineModel (nanochat.hpp Scheduler): "
                          "submit/cancel/poll from any thread, step() on one.")
      .def(py::init([](const PyModel& model, int32_t n_ctx, int64_t kv_budget_bytes,
                       int32_t max_batch, int32_t prefill_chunk, int32_t max_queue) {
             SchedulerOptions o;
             o.n_ctx = n_ctx;
             o.kv_budget_bytes = kv_budget_bytes;
             o.max_batch = max_batch;
             o.prefill_chunk = prefill_chunk;
             o.max_queue = max_queue;
             return PyScheduler{std::make_unique<Scheduler>(model.model, o)};
           }),
           py::arg("model"), py::arg("n_ctx") = 0, py::arg("kv_budget_bytes") = 0,
           py::arg("max_batch") = 16, py::arg("prefill_chunk") = 64, py::arg("max_queue") = 64)
      .def(
          "submit",
          [](PyScheduler& s, const std::vector<int32_t>& prompt, float temperature, int32_t top_k,
             float top_p, float repetition_penalty, int32_t repetition_window, uint64_t seed,
             int32_t max_tokens, const std::vector<int32_t>& stop_tokens, const py::list& stop,
             bool stop_at_eos) {
            SamplingParams sp;
            sp.temperature = temperature;
            sp.top_k = top_k;
            sp.top_p = top_p;
            sp.repetition_penalty = repetition_penalty;
            sp.repetition_window = repetition_window;
            sp.seed = seed;
            sp.max_tokens = max_tokens;
            sp.stop_tokens = stop_tokens;
            for (const py::handle& h : stop) sp.stop_strings.push_back(h.cast<std::string>());
            sp.stop_at_eos = stop_at_eos;
            py::gil_scoped_release nogil;
            return s.scheduler->submit(prompt, sp);
          },
          py::arg("prompt"), py::arg("temperature") = 0.8f, py::arg("top_k") = 0,
          py::arg("top_p") = 1.0f, py::arg("repetition_penalty") = 1.0f,
          py::arg("repetition_window") = 64, py::arg("seed") = 0, py::arg("max_tokens") = 128,
          py::arg("stop_tokens") = std::vector<int32_t>(), py::arg("stop") = py::list(),
          py::arg("stop_at_eos") = true,
          "Queues a sequence; returns its id. ContextFullError: it can never fit; "
          "QueueFullError: max_queue sequences wait already.")
      .def(
          "cancel",
          [](PyScheduler& s, int64_t id) {
            py::gil_scoped_release nogil;
            return s.scheduler->cancel(id);
          },
          py::arg("id"))
      .def("step",
           [](PyScheduler& s) {
             py::gil_scoped_release nogil;
             return s.scheduler->step();
           })
      .def(
          "wait",
          [](PyScheduler& s, int32_t timeout_ms) {
            py::gil_scoped_release nogil;
            return s.scheduler->wait(timeout_ms);
          },
          py::arg("timeout_ms"))
      .def("notify",
           [](PyScheduler& s) {
             py::gil_scoped_release nogil;
             s.scheduler->notify();
           })
      .def(
          "poll",
          [](PyScheduler& s) {
            std::vector<SequenceOutput> outs;
            {
              py::gil_scoped_release nogil;
              outs = s.scheduler->poll();
            }
            py::list r;
            for (const SequenceOutput& o : outs) {
              py::dict d;
              d["id"] = o.id;
              d["tokens"] = o.tokens;
              d["text"] = py::bytes(o.text);
              d["finished"] = o.finished;
              d["finish_reason"] = o.finish_reason;
              d["error"] = o.error;
              d["prompt_tokens"] = o.prompt_tokens;
              d["generated_tokens"] = o.generated_tokens;
              r.append(d);
            }
            return r;
          },
          "News since the last poll: dicts (id, tokens, text: bytes, finished, finish_reason, "
          "error, prompt_tokens, generated_tokens).")
      .def_property_readonly("stats", [](const PyScheduler& s) {
        const SchedulerStats st = s.scheduler->stats();
        py::dict d;
        d["active"] = st.active;
        d["waiting"] = st.waiting;
        d["kv_used_bytes"] = st.kv_used_bytes;
        d["kv_budget_bytes"] = st.kv_budget_bytes;
        d["steps"] = st.steps;
        d["prefill_tokens"] = st.prefill_tokens;
        d["decode_tokens"] = st.decode_tokens;
        d["last_rows"] = st.last_rows;
        d["last_sequences"] = st.last_sequences;
        d["last_step_seconds"] = st.last_step_seconds;
        d["step_seconds"] = st.step_seconds;
        d["ternary_seconds"] = st.ternary_seconds;
        d["attention_seconds"] = st.attention_seconds;
        d["head_seconds"] = st.head_seconds;
        d["sample_seconds"] = st.sample_seconds;
        return d;
      });
}
