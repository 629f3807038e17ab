// The raw-buffer descriptor every binding takes (address, shape, strides in elements,
// dtype, device), and the checks that turn a bad one into nanochat::Error before any
// kernel touches it. Shared by the binding files (one per bound concept).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "nanochat/error.hpp"

namespace nanochat::bindings {

struct Buffer {
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  std::string dtype;             // "float32", "bfloat16", "int8", "uint8", "int32", "int64"
  std::string device;            // "cpu" or "cuda:N"

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + (s.size() == 1 ? ",)" : ")");
}

// Validates a buffer and returns its typed address.
template <typename T>
T* get(const Buffer& b, const char* name, const char* dtype, size_t ndim, bool cuda = false) {
  if (b.dtype != dtype)
    throw Error(std::string(name) + ": expected dtype " + dtype + ", got " + b.dtype);
  if (b.shape.size() != ndim || b.strides.size() != ndim)
    throw Error(std::string(name) + ": expected " + std::to_string(ndim) + "-d, got shape " +
                shape_str(b.shape));
  const bool on_cuda = b.device.rfind("cuda", 0) == 0;
  if (on_cuda != cuda)
    throw Error(std::string(name) + ": expected a " + (cuda ? "CUDA" : "CPU") +
                " buffer, got device " + b.device);
  for (int64_t s : b.shape)
    if (s < 0) throw Error(std::string(name) + ": negative dimension");
  const bool empty = b.numel() == 0;  // strides of empty arrays are arbitrary
  int64_t expect = 1;
  for (size_t i = ndim; i-- > 0;) {
    if (!empty && b.shape[i] > 1 && b.strides[i] != expect)
      throw Error(std::string(name) + ": must be contiguous (row-major), got strides " +
                  shape_str(b.strides) + " for shape " + shape_str(b.shape));
    expect *= b.shape[i];
  }
  if (b.numel() > 0 && b.ptr == 0) throw Error(std::string(name) + ": null address");
  if (b.ptr % alignof(T) != 0) throw Error(std::string(name) + ": misaligned address");
  return reinterpret_cast<T*>(b.ptr);
}

inline void expect_shape(const Buffer& b, const char* name, std::vector<int64_t> want) {
  if (b.shape != want)
    throw Error(std::string(name) + ": expected shape " + shape_str(want) + ", got " +
                shape_str(b.shape));
}

// An optional 1-d int64 list of row indices (Collider's kept rows): its address and count,
// or nullptr and 0 when absent.
inline std::pair<const int64_t*, int64_t> optional_rows(const std::optional<Buffer>& b,
                                                        const char* name) {
  if (!b) return {nullptr, 0};
  return {get<int64_t>(*b, name, "int64", 1), b->shape[0]};
}

}  // namespace nanochat::bindings
