// nanochat._C.fused_linear_cross_entropy: the fused LM-head + MTP-head loss of
// csrc/loss on raw buffers (python/nanochat/ops/fused_loss.py wraps it as a torch op).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bindings/buffer.h"
#include "loss/fused_loss.h"
#include "nanochat/error.hpp"
#include "ternary/dispatch.h"

namespace py = pybind11;
using nanochat::Error;
using nanochat::bindings::Buffer;
using nanochat::bindings::expect_shape;
using nanochat::bindings::get;

void bind_loss(py::module_& m) {
  m.def(
      "fused_linear_cross_entropy",
      [](const Buffer& hidden, const Buffer& weight, const Buffer& targets,
         const Buffer& head_weights, const Buffer& loss, py::object grad_hidden,
         py::object grad_weight, int64_t chunk, const std::string& precision) {
        using namespace nanochat;
        FusedLossArgs a;
        a.hidden = get<float>(hidden, "hidden", "float32", 3);
        a.weight = get<float>(weight, "weight", "float32", 2);
        a.heads = hidden.shape[0];
        a.tokens = hidden.shape[1];
        a.vocab = weight.shape[0];
        a.dim = weight.shape[1];
        if (hidden.shape[2] != a.dim)
          throw Error("hidden: last dimension " + std::to_string(hidden.shape[2]) +
                      " != weight's " + std::to_string(a.dim));
        a.targets = get<int32_t>(targets, "targets", "int32", 2);
        expect_shape(targets, "targets", {a.heads, a.tokens});
        a.head_weights = get<float>(head_weights, "head_weights", "float32", 1);
        expect_shape(head_weights, "head_weights", {a.heads});
        a.loss = get<float>(loss, "loss", "float32", 1);
        expect_shape(loss, "loss", {a.heads});
        if (grad_hidden.is_none() != grad_weight.is_none())
          throw Error("grad_hidden and grad_weight: give both or neither");
        if (!grad_hidden.is_none()) {
          const Buffer& gh = grad_hidden.cast<const Buffer&>();
          const Buffer& gw = grad_weight.cast<const Buffer&>();
          a.grad_hidden = get<float>(gh, "grad_hidden", "float32", 3);
          expect_shape(gh, "grad_hidden", hidden.shape);
          a.grad_weight = get<float>(gw, "grad_weight", "float32", 2);
          expect_shape(gw, "grad_weight", weight.shape);
        }
        a.chunk = chunk;
        a.precision = loss_precision_from_name(precision.c_str());
        py::gil_scoped_release nogil;
        return fused_linear_cross_entropy(a);
      },
      py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("head_weights"),
      py::arg("loss"), py::arg("grad_hidden") = py::none(), py::arg("grad_weight") = py::none(),
      py::arg("chunk") = 1024, py::arg("precision") = "f32",
      "Weighted sum of per-head mean cross-entropies of hidden (heads, tokens, d) against the\n"
      "tied head weight (vocab, d); targets int32 (heads, tokens), -1 ignored. Writes each\n"
      "head's loss into `loss` and, if given, the gradients; returns the total.");
#ifdef NANOCHAT_HAVE_CUDA
  m.def(
      "fused_linear_cross_entropy_cuda",
      [](const Buffer& hidden, const Buffer& weight, const Buffer& targets,
         const Buffer& head_scales, const Buffer& row_loss, py::object grad_hidden,
         py::object grad_weight, const Buffer& workspace, int64_t chunk, uintptr_t stream) {
        using namespace nanochat;
        CudaFusedLossArgs a;
        a.hidden = get<float>(hidden, "hidden", "float32", 3, true);
        a.weight = get<float>(weight, "weight", "float32", 2, true);
        a.heads = hidden.shape[0];
        a.tokens = hidden.shape[1];
        a.vocab = weight.shape[0];
        a.dim = weight.shape[1];
        if (hidden.shape[2] != a.dim) throw Error("hidden: last dimension != weight's");
        a.targets = get<int32_t>(targets, "targets", "int32", 2, true);
        expect_shape(targets, "targets", {a.heads, a.tokens});
        a.head_scales = get<float>(head_scales, "head_scales", "float32", 1, true);
        expect_shape(head_scales, "head_scales", {a.heads});
        a.row_loss = get<float>(row_loss, "row_loss", "float32", 2, true);
        expect_shape(row_loss, "row_loss", {a.heads, a.tokens});
        if (grad_hidden.is_none() != grad_weight.is_none())
          throw Error("grad_hidden and grad_weight: give both or neither");
        if (!grad_hidden.is_none()) {
          const Buffer& gh = grad_hidden.cast<const Buffer&>();
          const Buffer& gw = grad_weight.cast<const Buffer&>();
          a.grad_hidden = get<float>(gh, "grad_hidden", "float32", 3, true);
          expect_shape(gh, "grad_hidden", hidden.shape);
          a.grad_weight = get<float>(gw, "grad_weight", "float32", 2, true);
          expect_shape(gw, "grad_weight", weight.shape);
        }
        a.workspace = get<float>(workspace, "workspace", "float32", 1, true);
        a.chunk = chunk;
        if (workspace.shape[0] < std::min(chunk, a.tokens) * a.vocab)
          throw Error("workspace: needs chunk x vocab floats");
        py::gil_scoped_release nogil;
        cuda_fused_linear_cross_entropy(a, stream);
      },
      py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("head_scales"),
      py::arg("row_loss"), py::arg("grad_hidden"), py::arg("grad_weight"), py::arg("workspace"),
      py::arg("chunk"), py::arg("stream"),
      "CUDA fused loss: per-token losses into row_loss, gradients of sum_i w_i * loss_i\n"
      "(head_scales = w_i / n_i) into grad_hidden / grad_weight; device buffers.");
#endif
  m.def(
      "fused_loss_bf16_supported",
      [] {
        return nanochat::loss_precision_supported(nanochat::LossPrecision::bf16,
                                                  nanochat::active_isa());
      },
      "Whether precision='bf16' runs on the active ISA (AVX512-BF16, the AVX2 f32 tiles\n"
      "over bf16-rounded operands, or the scalar reference).");
}
