// nanochat._C.attention_forward / attention_backward: csrc/attn on raw buffers
// (python/nanochat/ops/attention.py wraps them as the nanochat::attention torch op).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "attn/attention.h"
#include "bindings/buffer.h"
#include "nanochat/error.hpp"

namespace py = pybind11;
using nanochat::Error;
using nanochat::bindings::Buffer;
using nanochat::bindings::optional_rows;
using nanochat::bindings::shape_str;

namespace {

// A float32 CPU buffer of the given shape with any non-negative strides (torch's attention
// tensors are transposed views): (B, heads, T, D) with a contiguous last dim, or the
// per-row logsumexp (B, heads, T), read one element at a time.
template <typename View>
View strided(const Buffer& b, const char* name, const std::vector<int64_t>& shape) {
  if (b.dtype != "float32")
    throw Error(std::string(name) + ": expected dtype float32, got " + b.dtype);
  if (b.device != "cpu") throw Error(std::string(name) + ": expected a CPU buffer, got " + b.device);
  if (b.shape != shape)
    throw Error(std::string(name) + ": expected shape " + shape_str(shape) + ", got " +
                shape_str(b.shape));
  for (int64_t s : b.strides)
    if (s < 0) throw Error(std::string(name) + ": negative stride");
  if (shape.size() == 4 && shape.back() > 1 && b.strides.back() != 1)
    throw Error(std::string(name) + ": the last dim must be contiguous, strides " +
                shape_str(b.strides));
  if (b.numel() > 0 && b.ptr == 0) throw Error(std::string(name) + ": null address");
  if (b.ptr % alignof(float) != 0) throw Error(std::string(name) + ": misaligned address");
  View v;
  v.p = reinterpret_cast<decltype(v.p)>(b.ptr);
  v.sb = b.strides[0];
  v.sh = b.strides[1];
  v.st = b.strides[2];
  return v;
}

// The shape of an attention call from q (B, H, T, D) and k (B, Hkv, T, D).
nanochat::AttentionShape shape_of(const Buffer& q, const Buffer& k, int64_t window,
                                  double scale) {
  if (q.shape.size() != 4) throw Error("q: expected (B, H, T, D), got " + shape_str(q.shape));
  if (k.shape.size() != 4) throw Error("k: expected (B, Hkv, T, D), got " + shape_str(k.shape));
  nanochat::AttentionShape s;
  s.batch = q.shape[0];
  s.heads = q.shape[1];
  s.seq = q.shape[2];
  s.head_dim = q.shape[3];
  s.kv_heads = k.shape[1];
  s.window = window;
  s.scale = float(scale);
  return s;
}

// The optional (B, T) int64 doc_start of packed sequences (attention.h), or nullptr.
const int64_t* doc_starts(const std::optional<Buffer>& b, const nanochat::AttentionShape& s) {
  if (!b) return nullptr;
  const int64_t* p = nanochat::bindings::get<int64_t>(*b, "doc_start", "int64", 2);
  nanochat::bindings::expect_shape(*b, "doc_start", {s.batch, s.seq});
  return p;
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def(
      "attention_forward",
      [](const Buffer& q, const Buffer& k, const Buffer& v, const Buffer& out, const Buffer& lse,
         int64_t window, double scale, const std::optional<Buffer>& doc_start) {
        using nanochat::HeadsOut;
        using nanochat::HeadsView;
        const nanochat::AttentionShape s = shape_of(q, k, window, scale);
        const int64_t* ds = doc_starts(doc_start, s);
        const std::vector<int64_t> qs = q.shape, ks = {s.batch, s.kv_heads, s.seq, s.head_dim};
        const HeadsView qv = strided<HeadsView>(q, "q", qs), kv = strided<HeadsView>(k, "k", ks),
                        vv = strided<HeadsView>(v, "v", ks);
        const HeadsOut ov = strided<HeadsOut>(out, "out", qs),
                       lv = strided<HeadsOut>(lse, "logsumexp", {s.batch, s.heads, s.seq});
        py::gil_scoped_release release;
        nanochat::attention_forward(s, qv, kv, vv, ov, lv, ds);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("logsumexp"),
      py::arg("window"), py::arg("scale"), py::arg("doc_start") = py::none(),
      "out and logsumexp of causal attention (window 0: full) of q over k, v; doc_start "
      "(B, T) int64: each token's sequence start in a packed row (None: one per row).");
  m.def(
      "attention_backward",
      [](const Buffer& q, const Buffer& k, const Buffer& v, const Buffer& o, const Buffer& go,
         const Buffer& lse, const std::optional<Buffer>& rows, const Buffer& gq,
         const Buffer& gk, const Buffer& gv, int64_t window, double scale,
         const std::optional<Buffer>& doc_start) {
        using nanochat::HeadsOut;
        using nanochat::HeadsView;
        const nanochat::AttentionShape s = shape_of(q, k, window, scale);
        const int64_t* ds = doc_starts(doc_start, s);
        const std::vector<int64_t> qs = q.shape, ks = {s.batch, s.kv_heads, s.seq, s.head_dim};
        const HeadsView qv = strided<HeadsView>(q, "q", qs), kv = strided<HeadsView>(k, "k", ks),
                        vv = strided<HeadsView>(v, "v", ks), ov = strided<HeadsView>(o, "out", qs),
                        gov = strided<HeadsView>(go, "grad_out", qs);
        const HeadsView lv =
            strided<HeadsView>(lse, "logsumexp", {s.batch, s.heads, s.seq});
        const HeadsOut gqv = strided<HeadsOut>(gq, "grad_q", qs),
                       gkv = strided<HeadsOut>(gk, "grad_k", ks),
                       gvv = strided<HeadsOut>(gv, "grad_v", ks);
        const auto [rp, n_rows] = optional_rows(rows, "rows");
        py::gil_scoped_release release;
        nanochat::attention_backward(s, qv, kv, vv, ov, gov, lv, rp, n_rows, gqv, gkv, gvv, ds);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("grad_out"),
      py::arg("logsumexp"), py::arg("rows"), py::arg("grad_q"), py::arg("grad_k"),
      py::arg("grad_v"), py::arg("window"), py::arg("scale"), py::arg("doc_start") = py::none(),
      "grad_q, grad_k, grad_v of causal attention (window 0: full) on the listed rows "
      "(sorted flat b * T + t, int64) or all rows (None); the other rows get zeros. "
      "doc_start: as attention_forward's.");
}
