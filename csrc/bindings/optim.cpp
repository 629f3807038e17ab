// nanochat._C 8-bit optimizer state: blockwise quantize/dequantize and the fused AdamW,
// Lion and Muon-momentum steps of csrc/optim/blockwise8.h, on CPU buffers or (with a CUDA
// build) CUDA buffers plus a stream handle. Every tensor is passed flattened (1-d); the
// Python side (nanochat/optim/state8bit.py) allocates and checks first, this checks again.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/buffer.h"
#include "optim/blockwise8.h"
#ifdef NANOCHAT_HAVE_CUDA
#include "cuda/optim8bit_cuda.h"
#endif

namespace py = pybind11;
using namespace nanochat;
using namespace nanochat::bindings;

namespace {

Map8 map_from_name(const std::string& s) {
  if (s == "linear") return Map8::linear;
  if (s == "minifloat") return Map8::minifloat;
  throw Error("map: expected 'linear' or 'minifloat', got '" + s + "'");
}

bool on_cuda(const Buffer& b) { return b.device.rfind("cuda", 0) == 0; }

// Typed address of a flat buffer of n elements on the expected device.
template <typename T>
T* flat(const Buffer& b, const char* name, const char* dtype, int64_t n, bool cuda) {
  T* p = get<T>(b, name, dtype, 1, cuda);
  expect_shape(b, name, {n});
  return p;
}

void no_cuda(bool cuda, const char* what) {
#ifndef NANOCHAT_HAVE_CUDA
  if (cuda) throw Error(std::string(what) + ": CUDA buffers, but nanochat._C was built without CUDA");
#else
  (void)cuda;
  (void)what;
#endif
}

void quantize(const Buffer& x, const Buffer& codes, const Buffer& absmax, int64_t block,
              const std::string& map_name, uintptr_t stream) {
  const Map8 map = map_from_name(map_name);
  const bool cuda = on_cuda(x);
  no_cuda(cuda, "optim8_quantize");
  const int64_t n = x.numel(), nb = optim8_num_blocks(n, block);
  const float* xp = flat<float>(x, "x", "float32", n, cuda);
  void* cp = map == Map8::linear ? static_cast<void*>(flat<int8_t>(codes, "codes", "int8", n, cuda))
                                 : static_cast<void*>(flat<uint8_t>(codes, "codes", "uint8", n, cuda));
  float* ap = flat<float>(absmax, "absmax", "float32", nb, cuda);
  py::gil_scoped_release nogil;
#ifdef NANOCHAT_HAVE_CUDA
  if (cuda) return cuda_quantize_blockwise(xp, n, block, map, cp, ap, stream);
#endif
  (void)stream;
  quantize_blockwise(xp, n, block, map, cp, ap);
}

void dequantize(const Buffer& codes, const Buffer& absmax, const Buffer& x, int64_t block,
                const std::string& map_name, uintptr_t stream) {
  const Map8 map = map_from_name(map_name);
  const bool cuda = on_cuda(x);
  no_cuda(cuda, "optim8_dequantize");
  const int64_t n = x.numel(), nb = optim8_num_blocks(n, block);
  float* xp = flat<float>(x, "x", "float32", n, cuda);
  const void* cp = map == Map8::linear
                       ? static_cast<const void*>(flat<int8_t>(codes, "codes", "int8", n, cuda))
                       : static_cast<const void*>(flat<uint8_t>(codes, "codes", "uint8", n, cuda));
  const float* ap = flat<float>(absmax, "absmax", "float32", nb, cuda);
  py::gil_scoped_release nogil;
#ifdef NANOCHAT_HAVE_CUDA
  if (cuda) return cuda_dequantize_blockwise(cp, ap, n, block, map, xp, stream);
#endif
  (void)stream;
  dequantize_blockwise(cp, ap, n, block, map, xp);
}

void adamw8(const Buffer& p, const Buffer& g, const Buffer& m, const Buffer& m_absmax,
            const Buffer& v, const Buffer& v_absmax, int64_t block, float lr, float beta1,
            float beta2, float eps, float weight_decay, float bc1, float bc2, uintptr_t stream) {
  const bool cuda = on_cuda(p);
  no_cuda(cuda, "adamw8_step");
  const int64_t n = p.numel(), nb = optim8_num_blocks(n, block);
  AdamW8Args a{flat<float>(p, "param", "float32", n, cuda),
               flat<float>(g, "grad", "float32", n, cuda),
               flat<int8_t>(m, "exp_avg", "int8", n, cuda),
               flat<float>(m_absmax, "exp_avg_absmax", "float32", nb, cuda),
               flat<uint8_t>(v, "exp_avg_sq", "uint8", n, cuda),
               flat<float>(v_absmax, "exp_avg_sq_absmax", "float32", nb, cuda),
               n, block, lr, beta1, beta2, eps, weight_decay, bc1, bc2};
  py::gil_scoped_release nogil;
#ifdef NANOCHAT_HAVE_CUDA
  if (cuda) return cuda_adamw8_step(a, stream);
#endif
  (void)stream;
  adamw8_step(a);
}

void lion8(const Buffer& p, const Buffer& g, const Buffer& m, const Buffer& m_absmax,
           int64_t block, float lr, float beta1, float beta2, float weight_decay,
           uintptr_t stream) {
  const bool cuda = on_cuda(p);
  no_cuda(cuda, "lion8_step");
  const int64_t n = p.numel(), nb = optim8_num_blocks(n, block);
  Lion8Args a{flat<float>(p, "param", "float32", n, cuda),
              flat<float>(g, "grad", "float32", n, cuda),
              flat<int8_t>(m, "exp_avg", "int8", n, cuda),
              flat<float>(m_absmax, "exp_avg_absmax", "float32", nb, cuda),
              n, block, lr, beta1, beta2, weight_decay};
  py::gil_scoped_release nogil;
#ifdef NANOCHAT_HAVE_CUDA
  if (cuda) return cuda_lion8_step(a, stream);
#endif
  (void)stream;
  lion8_step(a);
}

void momentum8(const Buffer& g, const Buffer& m, const Buffer& m_absmax, const Buffer& u,
               int64_t block, float beta, bool nesterov, uintptr_t stream) {
  const bool cuda = on_cuda(g);
  no_cuda(cuda, "momentum8_step");
  const int64_t n = g.numel(), nb = optim8_num_blocks(n, block);
  Momentum8Args a{flat<float>(g, "grad", "float32", n, cuda),
                  flat<int8_t>(m, "momentum", "int8", n, cuda),
                  flat<float>(m_absmax, "momentum_absmax", "float32", nb, cuda),
                  flat<float>(u, "update", "float32", n, cuda),
                  n, block, beta, nesterov};
  py::gil_scoped_release nogil;
#ifdef NANOCHAT_HAVE_CUDA
  if (cuda) return cuda_momentum8_step(a, stream);
#endif
  (void)stream;
  momentum8_step(a);
}

}  // namespace

void bind_optim(py::module_& m) {
  m.def("optim8_kernel", [] { return std::string(optim8_kernels().name); },
        "The 8-bit optimizer kernel set the active ISA maps to ('scalar' or 'avx512').");
  m.def("optim8_num_blocks", &optim8_num_blocks, py::arg("n"), py::arg("block"),
        "ceil(n / block) after checking block (a positive multiple of 64, at most 2^20).");
  m.def("optim8_quantize", &quantize, py::arg("x"), py::arg("codes"), py::arg("absmax"),
        py::arg("block"), py::arg("map"), py::arg("stream") = 0,
        "Blockwise 8-bit codes (int8 'linear' / uint8 'minifloat') and per-block absmax of x.");
  m.def("optim8_dequantize", &dequantize, py::arg("codes"), py::arg("absmax"), py::arg("x"),
        py::arg("block"), py::arg("map"), py::arg("stream") = 0);
  m.def("adamw8_step", &adamw8, py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_absmax"), py::arg("exp_avg_sq"), py::arg("exp_avg_sq_absmax"),
        py::arg("block"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("bias_correction1"), py::arg("bias_correction2"),
        py::arg("stream") = 0, "Fused dequantize -> AdamW -> requantize, in place.");
  m.def("lion8_step", &lion8, py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_absmax"), py::arg("block"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("weight_decay"), py::arg("stream") = 0,
        "Fused dequantize -> Lion -> requantize, in place.");
  m.def("momentum8_step", &momentum8, py::arg("grad"), py::arg("momentum"),
        py::arg("momentum_absmax"), py::arg("update"), py::arg("block"), py::arg("beta"),
        py::arg("nesterov"), py::arg("stream") = 0,
        "Fused dequantize -> momentum (Muon) -> requantize; the (Nesterov) update goes to `update`.");
}
