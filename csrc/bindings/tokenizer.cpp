// nanochat._C.BpeTokenizer and nanochat._C.Sampler: the engine's C++ tokenizer and
// sampler, for tests against HF tokenizers and for Python callers of the engine.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "gguf/gguf.h"
#include "nanochat/error.hpp"

namespace py = pybind11;
using nanochat::BpeTokenizer;
using nanochat::Error;
using nanochat::Sampler;
using nanochat::SamplerConfig;

namespace {

// UTF-8 of a str; a lone surrogate raises UnicodeEncodeError (as HF tokenizers does).
std::string utf8_of(const py::str& s) {
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(s.ptr(), &n);
  if (p == nullptr) throw py::error_already_set();
  return std::string(p, static_cast<size_t>(n));
}

std::vector<int32_t> encode_gil_free(const BpeTokenizer& t, const std::string& text,
                                     bool parse_special) {
  py::gil_scoped_release release;
  return t.encode(text, parse_special);
}

}  // namespace

void bind_tokenizer(py::module_& m) {
  py::class_<BpeTokenizer>(m, "BpeTokenizer",
                           "Byte-level BPE (GPT-2 pre-tokenizer), equal to nanochat.tokenizer "
                           "(HF tokenizers) token for token.")
      .def(py::init<std::vector<std::string>, std::vector<int32_t>,
                    const std::vector<std::string>&>(),
           py::arg("tokens"), py::arg("token_types"), py::arg("merges"),
           "tokens in byte-level form (Tokenizer.tokens()), ggml token types (1 normal, "
           "3 control, 4 user-defined; [] = all normal), merges 'left right' by rank.")
      .def_static(
          "from_gguf",
          [](const std::string& path) {
            auto f = nanochat::gguf::GgufFile::open(path);
            return BpeTokenizer::from_gguf(*f);
          },
          py::arg("path"), "From a GGUF file's tokenizer.ggml.* metadata.")
      .def(
          "encode",
          [](const BpeTokenizer& t, const py::str& text, bool parse_special) {
            return encode_gil_free(t, utf8_of(text), parse_special);
          },
          py::arg("text"), py::arg("parse_special") = false,
          "Token ids of text; parse_special: control/user-defined token strings become "
          "their ids, else they are plain text.")
      .def(
          "encode_bytes",
          [](const BpeTokenizer& t, const py::bytes& b, bool parse_special) {
            return encode_gil_free(t, std::string(b), parse_special);
          },
          py::arg("data"), py::arg("parse_special") = false,
          "encode for raw bytes; an invalid UTF-8 byte is one punctuation-like character.")
      .def(
          "decode",
          [](const BpeTokenizer& t, const std::vector<int32_t>& ids) {
            return py::bytes(t.decode(ids));
          },
          py::arg("ids"), "Bytes of the ids (control tokens give b'').")
      .def("token_bytes",
           [](const BpeTokenizer& t, int32_t id) { return py::bytes(t.token_bytes(id)); },
           py::arg("id"))
      .def("token_type", &BpeTokenizer::token_type, py::arg("id"))
      .def("is_special", &BpeTokenizer::is_special, py::arg("id"))
      .def("find", &BpeTokenizer::find, py::arg("token"),
           "Id of a vocabulary entry in byte-level form, or -1.")
      .def_property_readonly("vocab_size", &BpeTokenizer::vocab_size)
      .def_static(
          "pre_tokenize",
          [](const py::bytes& b) {
            const std::string s(b);
            py::list out;
            for (const auto& r : BpeTokenizer::pre_tokenize(s))
              out.append(py::bytes(s.data() + r.first, r.second - r.first));
            return out;
          },
          py::arg("data"), "The GPT-2 regex pieces of the UTF-8 bytes, as bytes.");

  py::class_<Sampler>(m, "Sampler",
                      "Repetition penalty, temperature (<= 0: greedy), top-k, top-p, seeded "
                      "draw: the engine's sampler.")
      .def(py::init([](float temperature, int32_t top_k, float top_p, float repetition_penalty,
                       int32_t repetition_window, uint64_t seed) {
             SamplerConfig c;
             c.temperature = temperature;
             c.top_k = top_k;
             c.top_p = top_p;
             c.repetition_penalty = repetition_penalty;
             c.repetition_window = repetition_window;
             c.seed = seed;
             return Sampler(c);
           }),
           py::arg("temperature") = 0.8f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
           py::arg("repetition_penalty") = 1.0f, py::arg("repetition_window") = 64,
           py::arg("seed") = 0)
      .def(
          "sample",
          [](Sampler& s, const py::array& logits, const std::vector<int32_t>& history) {
            if (!logits.dtype().is(py::dtype::of<float>()))
              throw Error("logits: expected a float32 array, got dtype " +
                          std::string(py::str(logits.dtype())));
            if (logits.ndim() != 1)
              throw Error("logits: expected a 1-d array, got " + std::to_string(logits.ndim()) +
                          "-d");
            const py::ssize_t n = logits.shape(0);
            if (n <= 0 || n > INT32_MAX)
              throw Error("logits: length " + std::to_string(n) + " not in [1, 2^31)");
            // A copy (the sampler writes the penalty into it); strides may be anything.
            std::vector<float> x(static_cast<size_t>(n));
            const py::ssize_t stride = logits.strides(0);
            const char* base = static_cast<const char*>(logits.data());
            for (py::ssize_t i = 0; i < n; ++i)
              std::memcpy(&x[static_cast<size_t>(i)], base + i * stride, sizeof(float));
            py::gil_scoped_release release;
            return s.sample(x.data(), static_cast<int32_t>(n), history);
          },
          py::arg("logits"), py::arg("history") = std::vector<int32_t>{},
          "Next token id from float32 logits (not modified) and the tokens so far.");
}
