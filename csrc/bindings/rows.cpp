// nanochat._C.gather_backward_operands / scatter_scaled_rows: csrc/rows on raw buffers
// (python/nanochat/ops/bitlinear.py wraps them as torch ops in BitLinear's bf16 backward).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/buffer.h"
#include "rows/bf16_rows.h"

namespace py = pybind11;
using nanochat::bindings::Buffer;
using nanochat::bindings::expect_shape;
using nanochat::bindings::get;
using nanochat::bindings::optional_rows;

void bind_rows(py::module_& m) {
  m.def(
      "gather_backward_operands",
      [](const Buffer& gy, const Buffer& q, const Buffer& x_scale,
         const std::optional<Buffer>& rows, const Buffer& g, const Buffer& gs,
         const Buffer& qb) {
        const float* gyp = get<float>(gy, "grad_y", "float32", 2);
        const int64_t total = gy.shape[0], out_cols = gy.shape[1];
        const int8_t* qp = get<int8_t>(q, "q", "int8", 2);
        const int64_t in_cols = q.shape[1];
        expect_shape(q, "q", {total, in_cols});
        const float* sp = get<float>(x_scale, "x_scale", "float32", 1);
        expect_shape(x_scale, "x_scale", {total});
        const auto [rp, n_rows] = optional_rows(rows, "rows");
        const int64_t n = rp ? n_rows : total;
        uint16_t* gp = get<uint16_t>(g, "g", "bfloat16", 2);
        expect_shape(g, "g", {n, out_cols});
        uint16_t* gsp = get<uint16_t>(gs, "gs", "bfloat16", 2);
        expect_shape(gs, "gs", {n, out_cols});
        uint16_t* qbp = get<uint16_t>(qb, "qb", "bfloat16", 2);
        expect_shape(qb, "qb", {n, in_cols});
        py::gil_scoped_release release;
        nanochat::gather_backward_operands(gyp, out_cols, qp, in_cols, sp, total, rp, n, gp, gsp,
                                           qbp);
      },
      py::arg("grad_y"), py::arg("q"), py::arg("x_scale"), py::arg("rows"), py::arg("g"),
      py::arg("gs"), py::arg("qb"),
      "bf16 operands of BitLinear's backward over the listed rows (None: all): g = grad_y, "
      "gs = grad_y * x_scale, qb = q.");
  m.def(
      "scatter_scaled_rows",
      [](const Buffer& src, const std::optional<Buffer>& rows, double scale, const Buffer& dst) {
        const uint16_t* sp = get<uint16_t>(src, "src", "bfloat16", 2);
        float* dp = get<float>(dst, "out", "float32", 2);
        const int64_t total = dst.shape[0], cols = dst.shape[1];
        const auto [rp, n_rows] = optional_rows(rows, "rows");
        const int64_t n = rp ? n_rows : total;
        expect_shape(src, "src", {n, cols});
        py::gil_scoped_release release;
        nanochat::scatter_scaled_rows(sp, cols, rp, n, total, float(scale), dp);
      },
      py::arg("src"), py::arg("rows"), py::arg("scale"), py::arg("out"),
      "out (float32) = src (bf16) * scale on the listed rows (None: all), 0 elsewhere.");
}
