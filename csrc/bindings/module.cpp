// nanochat._C: pybind11 bindings over the core. Takes raw buffers only (address,
// shape, strides in elements, dtype, device); no torch headers. The Python layer
// (nanochat/ops/ternary.py) builds Buffers from torch tensors or numpy arrays and
// allocates outputs; these functions check everything again and throw
// nanochat::Error (ValueError in Python) instead of touching bad memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "act/swiglu.h"
#include "attn/attention.h"
#include "bindings/buffer.h"
#include "common/cpu.h"
#include "common/large_buffer.h"
#include "common/membw.h"
#include "common/threadpool.h"
#include "dense/dense.h"
#include "gguf/gguf.h"
#include "loss/fused_loss.h"
#include "norm/rmsnorm.h"
#include "optim/blockwise8.h"
#include "rows/bf16_rows.h"
#include "ternary/dispatch.h"
#include "ternary/ternary.h"
#ifdef NANOCHAT_HAVE_CUDA
#include "cuda/ternary_cuda.h"
#endif

namespace py = pybind11;
using namespace nanochat;
using namespace nanochat::bindings;

namespace {

int64_t blocks_per_row(int64_t cols, const char* what) {
  if (cols % QK != 0)
    throw Error(std::string(what) + ": row length " + std::to_string(cols) +
                " is not a multiple of the 256-weight block");
  return cols / QK;
}

// codes (rows, cols) int8 + packed (rows, cols/256*block_bytes) uint8
std::pair<int8_t*, uint8_t*> codes_and_packed(const Buffer& codes, const Buffer& packed,
                                              int64_t block_bytes, const char* what) {
  int8_t* c = get<int8_t>(codes, "codes", "int8", 2);
  uint8_t* p = get<uint8_t>(packed, "packed", "uint8", 2);
  const int64_t rows = codes.shape[0], cols = codes.shape[1];
  expect_shape(packed, "packed", {rows, blocks_per_row(cols, what) * block_bytes});
  return {c, p};
}

float* optional_scales(const py::object& o, int64_t rows, int64_t cols) {
  if (o.is_none()) return nullptr;
  const Buffer& b = o.cast<const Buffer&>();
  float* s = get<float>(b, "block_scales", "float32", 2);
  expect_shape(b, "block_scales", {rows, cols / QK});
  return s;
}

py::dict info() {
  py::dict d;
  d["version"] = NANOCHAT_VERSION;
  const CpuFeatures& f = cpu_features();
  py::dict feats;
  feats["avx2"] = f.avx2;
  feats["avx_vnni"] = f.avx_vnni;
  feats["avx512"] = f.avx512bw;
  feats["avx512_vnni"] = f.avx512vnni;
  feats["avx512_bf16"] = f.avx512bf16;
  feats["amx_bf16"] = f.amx_bf16;
  feats["neon"] = f.neon;
  feats["dotprod"] = f.dotprod;
  feats["i8mm"] = f.i8mm;
#ifdef NANOCHAT_HAVE_X86_KERNELS
  feats["x86_kernels_compiled"] = true;
#else
  feats["x86_kernels_compiled"] = false;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
  feats["arm_kernels_compiled"] = true;
#else
  feats["arm_kernels_compiled"] = false;
#endif
  d["features"] = feats;
  py::dict cuda;
#ifdef NANOCHAT_HAVE_CUDA
  cuda["compiled"] = true;
  cuda["devices"] = cuda_device_count();
#else
  cuda["compiled"] = false;
  cuda["devices"] = 0;
#endif
  d["cuda"] = cuda;
  d["threads"] = num_threads();
  std::vector<std::string> isas;
  for (Isa i : supported_isas()) isas.emplace_back(isa_name(i));
  d["isas"] = isas;
  d["isa"] = isa_name(active_isa());
  // The kernel path each op family runs on the active ISA (each module's own choice).
  py::dict ops;
  ops["ternary_gemm"] = isa_name(active_isa());
  ops["ternary_gemm_codes"] = ternary_gemm_codes_path();  // training's BitLinear
  ops["quantize"] = quantize_activations_path();
  ops["dense"] = dense_kernels().name;  // the engine's head, embedding and decode attention
  ops["rmsnorm"] = rmsnorm_path();
  ops["swiglu"] = swiglu_path();
  ops["attention"] = attention_path();  // training's attention op
  ops["bf16_rows"] = bf16_rows_path();
  ops["fused_loss"] = fused_loss_path();
  ops["optim8"] = optim8_kernels().name;  // the 8-bit optimizer update
  d["ops"] = ops;
  return d;
}

void gemm_checked(const Buffer& w, int64_t rows, int64_t cols, float scale, const Buffer& q,
                  const Buffer& x_scale, const Buffer& y, TernaryMatrixView* view,
                  const int8_t** qp, const float** sp, float** yp, int64_t* tokens,
                  bool cuda = false, int64_t tile_rows = 1, int64_t copies = 1) {
  const uint8_t* wp = get<uint8_t>(w, "weights", "uint8", 2, cuda);
  if (tile_rows != 1 && tile_rows != TK2_TILE_ROWS)
    throw Error("tile_rows must be 1 (TK2) or " + std::to_string(TK2_TILE_ROWS) + " (TK2 tiles)");
  if (copies < 1) throw Error("copies must be >= 1");
  // TK2 tiles: whole tiles, as tk2_tile writes them; `copies` matrices one after another
  const int64_t stored = (rows + tile_rows - 1) / tile_rows * tile_rows;
  expect_shape(w, "weights", {copies * stored, tk2_row_bytes(cols)});
  *qp = get<int8_t>(q, "q", "int8", 2, cuda);
  *tokens = q.shape[0];
  expect_shape(q, "q", {*tokens, cols});
  *sp = get<float>(x_scale, "x_scale", "float32", 1, cuda);
  expect_shape(x_scale, "x_scale", {*tokens});
  *yp = get<float>(y, "y", "float32", 2, cuda);
  expect_shape(y, "y", {*tokens, rows});
  *view = TernaryMatrixView{wp, rows, cols, scale, tile_rows};
}


// ---- GGUF ------------------------------------------------------------------------
// Python values <-> gguf::Value. KV type names: "u8", ..., "f64", "bool", "string",
// "array[<elem>]" with a scalar or string element type.
gguf::Value gguf_scalar(gguf::ValueType t, py::handle h, const std::string& what) {
  using gguf::ValueType;
  if (t == ValueType::STRING) {
    if (!py::isinstance<py::str>(h)) throw Error(what + ": expected str");
    return gguf::Value::string(h.cast<std::string>());
  }
  if (t == ValueType::F32 || t == ValueType::F64) {
    if (!py::isinstance<py::float_>(h) && !py::isinstance<py::int_>(h))
      throw Error(what + ": expected a float");
    return gguf::Value::floating(t, h.cast<double>());
  }
  if (t == ValueType::BOOL) {
    if (!py::isinstance<py::bool_>(h)) throw Error(what + ": expected a bool");
    return gguf::Value::boolean(h.cast<bool>());
  }
  if (t == ValueType::ARRAY) throw Error(what + ": nested arrays are not supported here");
  if (!py::isinstance<py::int_>(h) || py::isinstance<py::bool_>(h))
    throw Error(what + ": expected an int");
  if (t == ValueType::U64) {
    const unsigned long long v = PyLong_AsUnsignedLongLong(h.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      throw Error(what + ": value does not fit in u64");
    }
    return gguf::Value::u64(v);
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    throw Error(what + ": value does not fit in " + gguf::value_type_name(t));
  }
  try {
    return gguf::Value::integer(t, v);
  } catch (const Error& e) {
    throw Error(what + ": " + e.what());
  }
}

gguf::Value gguf_value(const std::string& type_name, py::handle h, const std::string& what) {
  using gguf::ValueType;
  const std::string pre = "array[";
  if (type_name.rfind(pre, 0) != 0 || type_name.back() != ']')
    return gguf_scalar(gguf::value_type_from_name(type_name), h, what);
  const ValueType et =
      gguf::value_type_from_name(type_name.substr(pre.size(), type_name.size() - pre.size() - 1));
  if (et == ValueType::ARRAY) throw Error(what + ": nested arrays are not supported here");
  if (py::isinstance<py::str>(h) || !py::isinstance<py::sequence>(h))
    throw Error(what + ": expected a list for " + type_name);
  const py::sequence seq = h.cast<py::sequence>();
  gguf::Value a;
  a.type = ValueType::ARRAY;
  a.elem_type = et;
  a.count = seq.size();
  const size_t n = gguf::value_type_size(et);
  for (size_t i = 0; i < seq.size(); ++i) {
    gguf::Value e = gguf_scalar(et, seq[i], what + "[" + std::to_string(i) + "]");
    if (et == ValueType::STRING) {
      a.strings.push_back(std::move(e.str));
    } else {
      const auto* b = reinterpret_cast<const uint8_t*>(&e.bits);
      a.raw.insert(a.raw.end(), b, b + n);
    }
  }
  return a;
}

py::str utf8(const std::string& s) {  // never throws on bad UTF-8 in a file
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

py::object gguf_to_py(const gguf::Value& v) {
  using gguf::ValueType;
  switch (v.type) {
    case ValueType::STRING: return utf8(v.str);
    case ValueType::BOOL: return py::bool_(v.as_bool());
    case ValueType::F32: case ValueType::F64: return py::float_(v.as_f64());
    case ValueType::U64: return py::int_(v.bits);
    case ValueType::ARRAY: {
      py::list l;
      if (v.elem_type == ValueType::STRING) {
        for (const auto& s : v.strings) l.append(utf8(s));
      } else if (v.elem_type == ValueType::ARRAY) {
        for (const auto& it : v.items) l.append(gguf_to_py(it));
      } else {
        const size_t n = gguf::value_type_size(v.elem_type);
        for (uint64_t i = 0; i < v.count; ++i) {
          gguf::Value e;
          e.type = v.elem_type;
          std::memcpy(&e.bits, v.raw.data() + i * n, n);
          l.append(gguf_to_py(e));
        }
      }
      return std::move(l);
    }
    default: return py::int_(v.as_i64());
  }
}

void gguf_write(const std::string& path, const py::list& kvs, const py::list& tensors) {
  gguf::GgufWriter w;
  try {
    for (size_t i = 0; i < kvs.size(); ++i) {
      const py::tuple kv = kvs[i].cast<py::tuple>();
      if (kv.size() != 3) throw Error("kvs[" + std::to_string(i) + "]: expected (key, type, value)");
      const std::string key = kv[0].cast<std::string>();
      const std::string type = kv[1].cast<std::string>();
      w.add_kv(key, gguf_value(type, kv[2], "metadata '" + key + "'"));
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      const py::tuple t = tensors[i].cast<py::tuple>();
      if (t.size() != 4)
        throw Error("tensors[" + std::to_string(i) + "]: expected (name, type, dims, Buffer)");
      const std::string name = t[0].cast<std::string>();
      const uint32_t type = t[1].cast<uint32_t>();
      const std::vector<int64_t> dims = t[2].cast<std::vector<int64_t>>();
      const Buffer& b = t[3].cast<const Buffer&>();
      const std::string what = "tensor '" + name + "' data";
      const uint8_t* p = get<uint8_t>(b, what.c_str(), "uint8", b.shape.size());
      gguf::type_traits(type);  // unknown ids throw here
      w.add_tensor_ref(name, static_cast<gguf::GgmlType>(type), dims, p,
                       static_cast<size_t>(b.numel()));
    }
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  py::gil_scoped_release nogil;
  w.write(path);
}

}  // namespace

// Defined in engine.cpp and tokenizer.cpp (one file per bound concept).
void bind_engine(py::module_& m);
void bind_tokenizer(py::module_& m);
void bind_loss(py::module_& m);  // loss.cpp
void bind_attention(py::module_& m);  // attention.cpp
void bind_norm(py::module_& m);  // norm.cpp
void bind_rows(py::module_& m);  // rows.cpp
void bind_swiglu(py::module_& m);  // swiglu.cpp
void bind_optim(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "nanochat C++ core: ternary formats and W1.58A8 kernels";
  py::register_exception<Error>(m, "CoreError", PyExc_ValueError);

  py::class_<Buffer>(m, "Buffer")
      .def(py::init<uintptr_t, std::vector<int64_t>, std::vector<int64_t>, std::string,
                    std::string>(),
           py::arg("ptr"), py::arg("shape"), py::arg("strides"), py::arg("dtype"),
           py::arg("device") = "cpu")
      .def_readonly("ptr", &Buffer::ptr)
      .def_readonly("shape", &Buffer::shape)
      .def_readonly("dtype", &Buffer::dtype)
      .def_readonly("device", &Buffer::device);

  m.def("info", &info, "Version, CPU features, CUDA, threads and kernel dispatch.");
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Kernel thread count; n <= 0 restores the default (NANOCHAT_NUM_THREADS or all cores).");
  m.def("supported_isas", [] {
    std::vector<std::string> o;
    for (Isa i : supported_isas()) o.emplace_back(isa_name(i));
    return o;
  });
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_isa", [](const std::string& n) { set_isa(isa_from_name(n)); }, py::arg("name"));
  m.def("reset_isa", &reset_isa);

  m.def(
      "absmean_quantize",
      [](const Buffer& w, const Buffer& codes) {
        const float* wp = get<float>(w, "w", "float32", 2);
        int8_t* cp = get<int8_t>(codes, "codes", "int8", 2);
        expect_shape(codes, "codes", w.shape);
        return absmean_quantize(wp, w.numel(), cp);
      },
      py::arg("w"), py::arg("codes"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "tq2_0_pack",
      [](const Buffer& codes, float scale, const Buffer& out) {
        auto [c, p] = codes_and_packed(codes, out, TQ2_0_BLOCK_BYTES, "tq2_0_pack");
        tq2_0_pack(c, codes.shape[0], codes.shape[1], scale, p);
      },
      py::arg("codes"), py::arg("scale"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "tq2_0_unpack",
      [](const Buffer& in, const Buffer& codes, py::object block_scales) {
        auto [c, p] = codes_and_packed(codes, in, TQ2_0_BLOCK_BYTES, "tq2_0_unpack");
        float* s = optional_scales(block_scales, codes.shape[0], codes.shape[1]);
        py::gil_scoped_release nogil;
        tq2_0_unpack(p, codes.shape[0], codes.shape[1], c, s);
      },
      py::arg("packed"), py::arg("codes"), py::arg("block_scales") = py::none());
  m.def(
      "tq1_0_pack",
      [](const Buffer& codes, float scale, const Buffer& out) {
        auto [c, p] = codes_and_packed(codes, out, TQ1_0_BLOCK_BYTES, "tq1_0_pack");
        tq1_0_pack(c, codes.shape[0], codes.shape[1], scale, p);
      },
      py::arg("codes"), py::arg("scale"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "tq1_0_unpack",
      [](const Buffer& in, const Buffer& codes, py::object block_scales) {
        auto [c, p] = codes_and_packed(codes, in, TQ1_0_BLOCK_BYTES, "tq1_0_unpack");
        float* s = optional_scales(block_scales, codes.shape[0], codes.shape[1]);
        py::gil_scoped_release nogil;
        tq1_0_unpack(p, codes.shape[0], codes.shape[1], c, s);
      },
      py::arg("packed"), py::arg("codes"), py::arg("block_scales") = py::none());

  // Q8_0 (the token embedding's optional type): x (rows, cols) float32 <-> (rows,
  // cols/32*34) uint8, ggml's reference quantizer, byte-equal to gguf.quants.
  m.def(
      "q8_0_quantize",
      [](const Buffer& x, const Buffer& out) {
        const float* xp = get<float>(x, "x", "float32", 2);
        uint8_t* op = get<uint8_t>(out, "out", "uint8", 2);
        const int64_t rows = x.shape[0], cols = x.shape[1];
        if (cols % QK8_0 != 0)
          throw Error("q8_0_quantize: row length " + std::to_string(cols) +
                      " is not a multiple of the 32-weight Q8_0 block");
        expect_shape(out, "out", {rows, cols / QK8_0 * Q8_0_BLOCK_BYTES});
        q8_0_quantize(xp, rows, cols, op);
      },
      py::arg("x"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "q8_0_dequantize",
      [](const Buffer& in, const Buffer& x) {
        const uint8_t* ip = get<uint8_t>(in, "packed", "uint8", 2);
        float* xp = get<float>(x, "x", "float32", 2);
        const int64_t rows = x.shape[0], cols = x.shape[1];
        if (cols % QK8_0 != 0)
          throw Error("q8_0_dequantize: row length " + std::to_string(cols) +
                      " is not a multiple of the 32-weight Q8_0 block");
        expect_shape(in, "packed", {rows, cols / QK8_0 * Q8_0_BLOCK_BYTES});
        q8_0_dequantize(ip, rows, cols, xp);
      },
      py::arg("packed"), py::arg("x"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "tk2_pack",
      [](const Buffer& codes, const Buffer& out) {
        auto [c, p] = codes_and_packed(codes, out, TK2_BLOCK_BYTES, "tk2_pack");
        tk2_pack(c, codes.shape[0], codes.shape[1], p);
      },
      py::arg("codes"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "tk2_unpack",
      [](const Buffer& in, const Buffer& codes) {
        auto [c, p] = codes_and_packed(codes, in, TK2_BLOCK_BYTES, "tk2_unpack");
        tk2_unpack(p, codes.shape[0], codes.shape[1], c);
      },
      py::arg("packed"), py::arg("codes"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "tk2_tile",
      [](const Buffer& tk, int64_t cols, const Buffer& out) {
        const uint8_t* t = get<uint8_t>(tk, "tk2", "uint8", 2);
        uint8_t* o = get<uint8_t>(out, "out", "uint8", 2);
        const int64_t rows = tk.shape[0];
        expect_shape(tk, "tk2", {rows, tk2_row_bytes(cols)});
        const int64_t tiled_rows = (rows + TK2_TILE_ROWS - 1) / TK2_TILE_ROWS * TK2_TILE_ROWS;
        expect_shape(out, "out", {tiled_rows, tk2_row_bytes(cols)});
        tk2_tile(t, rows, cols, o);
      },
      py::arg("tk2"), py::arg("cols"), py::arg("out"), py::call_guard<py::gil_scoped_release>(),
      "Row-major TK2 (rows x cols/4) -> TK2 tiles (rows rounded up to 8, x cols/4).");
  m.def(
      "tq2_0_to_tk2",
      [](const Buffer& tq, int64_t cols, const Buffer& out) {
        const uint8_t* t = get<uint8_t>(tq, "tq2_0", "uint8", 2);
        uint8_t* o = get<uint8_t>(out, "out", "uint8", 2);
        const int64_t rows = tq.shape[0];
        expect_shape(tq, "tq2_0", {rows, blocks_per_row(cols, "tq2_0_to_tk2") * TQ2_0_BLOCK_BYTES});
        expect_shape(out, "out", {rows, tk2_row_bytes(cols)});
        return tq2_0_to_tk2(t, rows, cols, o);
      },
      py::arg("tq2_0"), py::arg("cols"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "tk2_to_tq2_0",
      [](const Buffer& tk, int64_t cols, float scale, const Buffer& out) {
        const uint8_t* t = get<uint8_t>(tk, "tk2", "uint8", 2);
        uint8_t* o = get<uint8_t>(out, "out", "uint8", 2);
        const int64_t rows = tk.shape[0];
        expect_shape(tk, "tk2", {rows, tk2_row_bytes(cols)});
        expect_shape(out, "out", {rows, blocks_per_row(cols, "tk2_to_tq2_0") * TQ2_0_BLOCK_BYTES});
        tk2_to_tq2_0(t, rows, cols, scale, o);
      },
      py::arg("tk2"), py::arg("cols"), py::arg("scale"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "quantize_activations",
      [](const Buffer& x, const Buffer& q, const Buffer& scale) {
        const float* xp = get<float>(x, "x", "float32", 2);
        int8_t* qp = get<int8_t>(q, "q", "int8", 2);
        float* sp = get<float>(scale, "x_scale", "float32", 1);
        expect_shape(q, "q", x.shape);
        expect_shape(scale, "x_scale", {x.shape[0]});
        quantize_activations(xp, x.shape[0], x.shape[1], qp, sp);
      },
      py::arg("x"), py::arg("q"), py::arg("x_scale"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_activations",
      [](const Buffer& q, const Buffer& scale, const Buffer& x) {
        const int8_t* qp = get<int8_t>(q, "q", "int8", 2);
        const float* sp = get<float>(scale, "x_scale", "float32", 1);
        float* xp = get<float>(x, "x", "float32", 2);
        expect_shape(x, "x", q.shape);
        expect_shape(scale, "x_scale", {q.shape[0]});
        dequantize_activations(qp, sp, q.shape[0], q.shape[1], xp);
      },
      py::arg("q"), py::arg("x_scale"), py::arg("x"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "ternary_gemm",
      [](const Buffer& w, int64_t rows, int64_t cols, float scale, const Buffer& q,
         const Buffer& x_scale, const Buffer& y, int64_t tile_rows) {
        TernaryMatrixView v;
        const int8_t* qp;
        const float* sp;
        float* yp;
        int64_t tokens;
        gemm_checked(w, rows, cols, scale, q, x_scale, y, &v, &qp, &sp, &yp, &tokens, false,
                     tile_rows);
        ternary_gemm(v, qp, sp, tokens, yp);
      },
      py::arg("weights"), py::arg("rows"), py::arg("cols"), py::arg("scale"), py::arg("q"),
      py::arg("x_scale"), py::arg("y"), py::arg("tile_rows") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "y = scale * x_scale * (codes @ q^T)^T over TK2 weights (tile_rows 8: TK2 tiles) on the "
      "active ISA.");

  m.def(
      "ternary_gemm_codes",
      [](const Buffer& codes, float scale, const Buffer& q, const Buffer& x_scale,
         const Buffer& y) {
        const int8_t* cp = get<int8_t>(codes, "codes", "int8", 2);
        const int64_t rows = codes.shape[0], cols = codes.shape[1];
        const int8_t* qp = get<int8_t>(q, "q", "int8", 2);
        const int64_t tokens = q.shape[0];
        expect_shape(q, "q", {tokens, cols});
        const float* sp = get<float>(x_scale, "x_scale", "float32", 1);
        expect_shape(x_scale, "x_scale", {tokens});
        float* yp = get<float>(y, "y", "float32", 2);
        expect_shape(y, "y", {tokens, rows});
        ternary_gemm_codes(cp, rows, cols, scale, qp, sp, tokens, yp);
      },
      py::arg("codes"), py::arg("scale"), py::arg("q"), py::arg("x_scale"), py::arg("y"),
      py::call_guard<py::gil_scoped_release>(),
      "ternary_gemm's y from int8 codes (rows, cols) instead of TK2 bytes (training).");

  m.def(
      "time_ternary_gemm",
      [](const Buffer& w, int64_t rows, int64_t cols, float scale, const Buffer& q,
         const Buffer& x_scale, const Buffer& y, int iters, int64_t tile_rows, int64_t copies) {
        TernaryMatrixView v;
        const int8_t* qp;
        const float* sp;
        float* yp;
        int64_t tokens;
        gemm_checked(w, rows, cols, scale, q, x_scale, y, &v, &qp, &sp, &yp, &tokens, false,
                     tile_rows, copies);
        const int64_t matrix_bytes = w.shape[0] / copies * w.shape[1];
        const uint8_t* first = v.data;
        std::vector<double> secs;
        for (int i = 0; i < iters; ++i) {
          v.data = first + (i % copies) * matrix_bytes;
          const auto t0 = std::chrono::steady_clock::now();
          ternary_gemm(v, qp, sp, tokens, yp);
          secs.push_back(
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        return secs;
      },
      py::arg("weights"), py::arg("rows"), py::arg("cols"), py::arg("scale"), py::arg("q"),
      py::arg("x_scale"), py::arg("y"), py::arg("iters"), py::arg("tile_rows") = 1,
      py::arg("copies") = 1, py::call_guard<py::gil_scoped_release>(),
      "Runs ternary_gemm `iters` times back to back; returns each call's seconds. With "
      "copies > 1, `weights` holds that many matrices one after another and call i reads "
      "copy i % copies (copies larger than the caches: the weights come from DRAM, as in "
      "decode).");

  m.def("measure_read_bandwidth", &measure_read_bandwidth, py::arg("bytes"), py::arg("threads"),
        py::arg("reps") = 5, py::call_guard<py::gil_scoped_release>(),
        "Best memory read rate in GB/s over `reps` passes of a `bytes` buffer.");
  m.def(
      "large_buffer",
      [](int64_t nbytes) {
        if (nbytes < 0) throw Error("large_buffer: negative size " + std::to_string(nbytes));
        auto* buf = new LargeBuffer(size_t(nbytes));
        py::capsule owner(buf, [](void* p) { delete static_cast<LargeBuffer*>(p); });
        return py::array(py::dtype::of<uint8_t>(), {py::ssize_t(nbytes)}, {py::ssize_t(1)},
                         buf->data(), owner);
      },
      py::arg("nbytes"),
      "An uninitialized uint8 array in the engine's weight memory (2 MiB pages from 2 MiB "
      "up): benchmarks put DRAM-sized weights there so they read as the engine reads.");


  // ---- GGUF v3 files ----
  m.def("gguf_write", &gguf_write, py::arg("path"), py::arg("kvs"), py::arg("tensors"),
        "Writes a GGUF v3 file atomically. kvs: [(key, type, value)] with type 'u8'..'f64', "
        "'bool', 'string' or 'array[<elem>]'; tensors: [(name, ggml_type_id, dims in GGUF "
        "order (fastest first), Buffer of uint8 bytes)].");
  py::class_<gguf::GgufFile, std::unique_ptr<gguf::GgufFile>>(m, "GgufFile")
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release nogil;
             return gguf::GgufFile::open(path);
           }),
           py::arg("path"), "Maps and validates a GGUF v3 file (read-only).")
      .def_property_readonly("path", &gguf::GgufFile::path)
      .def_property_readonly("version", &gguf::GgufFile::version)
      .def_property_readonly("alignment", &gguf::GgufFile::alignment)
      .def_property_readonly("data_offset", &gguf::GgufFile::data_offset)
      .def_property_readonly("file_size", &gguf::GgufFile::file_size)
      .def("kv", [](const gguf::GgufFile& f) {
        py::dict d;
        for (const auto& kv : f.kvs()) d[utf8(kv.first)] = gguf_to_py(kv.second);
        return d;
      }, "Metadata as {key: python value} in file order.")
      .def("kv_types", [](const gguf::GgufFile& f) {
        py::dict d;
        for (const auto& kv : f.kvs()) d[utf8(kv.first)] = kv.second.type_name();
        return d;
      }, "Metadata value types as {key: 'u32' | 'string' | 'array[string]' | ...}.")
      .def("tensors", [](const gguf::GgufFile& f) {
        py::list l;
        for (const auto& t : f.tensors()) {
          py::dict d;
          d["name"] = utf8(t.name);
          d["type"] = t.type;
          d["type_name"] = gguf::type_traits(t.type).name;
          d["dims"] = t.dims;
          d["offset"] = t.offset;
          d["nbytes"] = t.nbytes;
          l.append(d);
        }
        return l;
      }, "Tensor infos: dicts of name, type (ggml id), type_name, dims (GGUF order), offset, nbytes.")
      .def("tensor_data", [](py::object self, const std::string& name) {
        const gguf::TensorInfo& t = self.cast<const gguf::GgufFile&>().tensor(name);
        py::array a(py::dtype::of<uint8_t>(), {static_cast<py::ssize_t>(t.nbytes)}, {1},
                    const_cast<uint8_t*>(t.data), self);
        a.attr("setflags")(py::arg("write") = false);
        return a;
      }, py::arg("name"),
      "Read-only zero-copy uint8 array over the tensor's bytes; keeps the file mapped.");

#ifdef NANOCHAT_HAVE_CUDA
  m.def("cuda_device_count", &cuda_device_count);
  m.def(
      "cuda_ternary_gemm",
      [](const Buffer& w, int64_t rows, int64_t cols, float scale, const Buffer& q,
         const Buffer& x_scale, const Buffer& y, uintptr_t stream) {
        TernaryMatrixView v;
        const int8_t* qp;
        const float* sp;
        float* yp;
        int64_t tokens;
        gemm_checked(w, rows, cols, scale, q, x_scale, y, &v, &qp, &sp, &yp, &tokens, true);
        cuda_ternary_gemm(v.data, rows, cols, scale, qp, sp, tokens, yp, stream);
      },
      py::arg("weights"), py::arg("rows"), py::arg("cols"), py::arg("scale"), py::arg("q"),
      py::arg("x_scale"), py::arg("y"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
#else
  m.def("cuda_device_count", [] { return 0; });
#endif

  bind_engine(m);
  bind_tokenizer(m);
  bind_loss(m);
  bind_attention(m);
  bind_norm(m);
  bind_rows(m);
  bind_swiglu(m);
  bind_optim(m);
}
