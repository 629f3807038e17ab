// nanochat._C.rms_norm_forward / rms_norm_backward: csrc/norm on raw buffers
// (python/nanochat/ops/rmsnorm.py wraps them as the nanochat::rms_norm torch op).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/buffer.h"
#include "nanochat/error.hpp"
#include "norm/rmsnorm.h"

namespace py = pybind11;
using nanochat::Error;
using nanochat::bindings::Buffer;
using nanochat::bindings::expect_shape;
using nanochat::bindings::get;
using nanochat::bindings::optional_rows;

void bind_norm(py::module_& m) {
  m.def(
      "rms_norm_forward",
      [](const Buffer& x, const Buffer& w, double eps, const Buffer& y, const Buffer& rstd) {
        const float* xp = get<float>(x, "x", "float32", 2);
        const int64_t rows = x.shape[0], dim = x.shape[1];
        const float* wp = get<float>(w, "weight", "float32", 1);
        expect_shape(w, "weight", {dim});
        float* yp = get<float>(y, "y", "float32", 2);
        expect_shape(y, "y", x.shape);
        float* rp = get<float>(rstd, "rstd", "float32", 1);
        expect_shape(rstd, "rstd", {rows});
        if (!(eps >= 0)) throw Error("rms_norm: eps must be >= 0, got " + std::to_string(eps));
        py::gil_scoped_release release;
        nanochat::rms_norm_forward(xp, wp, rows, dim, float(eps), yp, rp);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("y"), py::arg("rstd"),
      "y, rstd (per row) of RMSNorm over x (rows x dim), weight (dim).");
  m.def(
      "rms_norm_backward",
      [](const Buffer& gy, const Buffer& x, const Buffer& w, const Buffer& rstd,
         const std::optional<Buffer>& keep, const Buffer& gx, const Buffer& gw) {
        const float* xp = get<float>(x, "x", "float32", 2);
        const int64_t rows = x.shape[0], dim = x.shape[1];
        const float* gyp = get<float>(gy, "grad_y", "float32", 2);
        expect_shape(gy, "grad_y", x.shape);
        const float* wp = get<float>(w, "weight", "float32", 1);
        expect_shape(w, "weight", {dim});
        const float* rp = get<float>(rstd, "rstd", "float32", 1);
        expect_shape(rstd, "rstd", {rows});
        float* gxp = get<float>(gx, "grad_x", "float32", 2);
        expect_shape(gx, "grad_x", x.shape);
        float* gwp = get<float>(gw, "grad_weight", "float32", 1);
        expect_shape(gw, "grad_weight", {dim});
        const auto [kp, n_keep] = optional_rows(keep, "keep");
        py::gil_scoped_release release;
        nanochat::rms_norm_backward(gyp, xp, wp, rp, rows, dim, kp, n_keep, gxp, gwp);
      },
      py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("keep"),
      py::arg("grad_x"), py::arg("grad_weight"),
      "grad_x, grad_weight of RMSNorm; keep: sorted row indices (int64) or None (all rows).");
}
