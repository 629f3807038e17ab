// nanochat._C.swiglu_forward / swiglu_backward: csrc/act on raw buffers
// (python/nanochat/ops/swiglu.py wraps them as the nanochat::swiglu torch op).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "act/swiglu.h"
#include "bindings/buffer.h"

namespace py = pybind11;
using nanochat::bindings::Buffer;
using nanochat::bindings::expect_shape;
using nanochat::bindings::get;
using nanochat::bindings::optional_rows;

void bind_swiglu(py::module_& m) {
  m.def(
      "swiglu_forward",
      [](const Buffer& g, const Buffer& u, const Buffer& h) {
        const float* gp = get<float>(g, "gate", "float32", 2);
        const float* up = get<float>(u, "up", "float32", 2);
        expect_shape(u, "up", g.shape);
        float* hp = get<float>(h, "out", "float32", 2);
        expect_shape(h, "out", g.shape);
        py::gil_scoped_release release;
        nanochat::swiglu_forward(gp, up, g.shape[0], g.shape[1], hp);
      },
      py::arg("gate"), py::arg("up"), py::arg("out"), "out = silu(gate) * up (rows x dim).");
  m.def(
      "swiglu_backward",
      [](const Buffer& gh, const Buffer& g, const Buffer& u, const std::optional<Buffer>& keep,
         const Buffer& gg, const Buffer& gu) {
        const float* gp = get<float>(g, "gate", "float32", 2);
        const float* up = get<float>(u, "up", "float32", 2);
        expect_shape(u, "up", g.shape);
        const float* ghp = get<float>(gh, "grad_out", "float32", 2);
        expect_shape(gh, "grad_out", g.shape);
        float* ggp = get<float>(gg, "grad_gate", "float32", 2);
        expect_shape(gg, "grad_gate", g.shape);
        float* gup = get<float>(gu, "grad_up", "float32", 2);
        expect_shape(gu, "grad_up", g.shape);
        const auto [kp, n_keep] = optional_rows(keep, "keep");
        py::gil_scoped_release release;
        nanochat::swiglu_backward(ghp, gp, up, g.shape[0], g.shape[1], kp, n_keep, ggp, gup);
      },
      py::arg("grad_out"), py::arg("gate"), py::arg("up"), py::arg("keep"),
      py::arg("grad_gate"), py::arg("grad_up"),
      "grad_gate, grad_up of silu(gate) * up; keep: sorted row indices (int64) or None.");
}
