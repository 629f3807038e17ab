// GGUF v3 reader: mmaps the file read-only and bounds-checks everything before use.
// No count read from the file is trusted for an allocation until it is shown to fit
// in the bytes that remain.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "gguf/gguf.h"

namespace nanochat {
namespace gguf {

namespace {

struct Cursor {
  const std::string& file;
  const uint8_t* base;
  uint64_t size;
  uint64_t pos = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(file + ": " + what + " (at byte " + std::to_string(pos) + ", file size " +
                std::to_string(size) + ")");
  }
  uint64_t remaining() const { return size - pos; }
  void need(uint64_t n, const std::string& what) const {
    if (n > remaining()) fail("truncated: " + what + " needs " + std::to_string(n) + " bytes");
  }
  template <typename T>
  T pod(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str(const std::string& what) {
    const uint64_t n = pod<uint64_t>(what + " length");
    if (n > remaining())
      fail(what + " length " + std::to_string(n) + " extends past end of file");
    std::string s(reinterpret_cast<const char*>(base + pos), static_cast<size_t>(n));
    pos += n;
    return s;
  }
  // Minimum bytes one value of type t takes on disk.
  static uint64_t min_size(ValueType t) {
    if (t == ValueType::STRING) return 8;
    if (t == ValueType::ARRAY) return 12;
    return value_type_size(t);
  }
  ValueType value_type(const std::string& what) {
    const uint32_t t = pod<uint32_t>(what + " type");
    if (!value_type_known(t)) fail(what + ": unknown value type " + std::to_string(t));
    return static_cast<ValueType>(t);
  }
  Value value(ValueType t, const std::string& what, int depth) {
    Value v;
    v.type = t;
    if (t == ValueType::STRING) {
      v.str = str(what);
      return v;
    }
    if (t != ValueType::ARRAY) {
      const size_t n = value_type_size(t);
      need(n, what);
      std::memcpy(&v.bits, base + pos, n);
      pos += n;
      if (t == ValueType::BOOL && v.bits > 1)
        fail(what + ": bool value " + std::to_string(v.bits) + " is not 0 or 1");
      return v;
    }
    if (depth >= MAX_ARRAY_DEPTH) fail(what + ": arrays nested deeper than " +
                                       std::to_string(MAX_ARRAY_DEPTH));
    v.elem_type = value_type(what + " array element");
    v.count = pod<uint64_t>(what + " array length");
    const uint64_t each = min_size(v.elem_type);
    if (v.count > remaining() / each)
      fail(what + ": array of " + std::to_string(v.count) + " " + value_type_name(v.elem_type) +
           " elements cannot fit in the remaining " + std::to_string(remaining()) + " bytes");
    if (v.elem_type == ValueType::STRING) {
      v.strings.reserve(static_cast<size_t>(v.count));
      for (uint64_t i = 0; i < v.count; ++i)
        v.strings.push_back(str(what + "[" + std::to_string(i) + "]"));
    } else if (v.elem_type == ValueType::ARRAY) {
      v.items.reserve(static_cast<size_t>(v.count));
      for (uint64_t i = 0; i < v.count; ++i) {
        const std::string w = what + "[" + std::to_string(i) + "]";
        // A nested array is (elem type, count, elems), with no type tag of its own.
        v.items.push_back(value(ValueType::ARRAY, w, depth + 1));
      }
    } else {
      const uint64_t n = v.count * each;
      if (v.elem_type == ValueType::BOOL)
        for (uint64_t i = 0; i < n; ++i)
          if (base[pos + i] > 1) {
            pos += i;
            fail(what + "[" + std::to_string(i) + "]: bool value is not 0 or 1");
          }
      v.raw.assign(base + pos, base + pos + n);
      pos += n;
    }
    return v;
  }
};

}  // namespace

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw Error(path + ": cannot stat: " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
  }
  f->size_ = static_cast<uint64_t>(st.st_size);
  if (f->size_ < 24) {
    ::close(fd);
    throw Error(path + ": too small for a GGUF header (" + std::to_string(f->size_) +
                " bytes, need 24)");
  }
  void* p = ::mmap(nullptr, static_cast<size_t>(f->size_), PROT_READ, MAP_PRIVATE, fd, 0);
  const int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw Error(path + ": mmap failed: " + std::strerror(e));
  f->base_ = static_cast<const uint8_t*>(p);
  f->parse();  // on throw, ~GgufFile unmaps
  return f;
}

GgufFile::~GgufFile() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), static_cast<size_t>(size_));
}

void GgufFile::parse() {
  Cursor c{path_, base_, size_};
  const uint32_t magic = c.pod<uint32_t>("magic");
  if (magic != MAGIC) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", magic);
    throw Error(path_ + ": not a GGUF file (magic " + hex + ", expected 0x46554747 \"GGUF\")");
  }
  version_ = c.pod<uint32_t>("version");
  if (version_ != VERSION)
    throw Error(path_ + ": unsupported GGUF version " + std::to_string(version_) +
                " (only version 3 is supported)");
  const uint64_t n_tensors = c.pod<uint64_t>("tensor count");
  const uint64_t n_kv = c.pod<uint64_t>("metadata count");
  // A KV takes >= 8 (key length) + 4 (type) + 1 bytes; a tensor info >= 8 + 4 + 8 + 4 + 8.
  if (n_kv > c.remaining() / 13)
    c.fail("metadata count " + std::to_string(n_kv) + " cannot fit in the file");
  if (n_tensors > c.remaining() / 32)
    c.fail("tensor count " + std::to_string(n_tensors) + " cannot fit in the file");

  kvs_.reserve(static_cast<size_t>(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string where = "metadata #" + std::to_string(i);
    std::string key = c.str(where + " key");
    const std::string what = "metadata '" + key + "'";
    const ValueType t = c.value_type(what);
    Value v = c.value(t, what, 0);
    if (kv_index_.count(key)) c.fail("duplicate metadata key '" + key + "'");
    kv_index_[key] = kvs_.size();
    kvs_.emplace_back(std::move(key), std::move(v));
  }

  auto it = kv_index_.find("general.alignment");
  if (it != kv_index_.end()) {
    const Value& a = kvs_[it->second].second;
    if (a.type != ValueType::U32)
      throw Error(path_ + ": general.alignment must be u32, got " + a.type_name());
    alignment_ = static_cast<uint32_t>(a.bits);
    if (alignment_ == 0 || alignment_ % 8 != 0)
      throw Error(path_ + ": general.alignment " + std::to_string(alignment_) +
                  " is not a nonzero multiple of 8");
  }

  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = c.str("tensor #" + std::to_string(i) + " name");
    const std::string what = "tensor '" + t.name + "'";
    const uint32_t n_dims = c.pod<uint32_t>(what + " n_dims");
    if (n_dims < 1 || n_dims > static_cast<uint32_t>(MAX_DIMS))
      c.fail(what + ": n_dims " + std::to_string(n_dims) + " (expected 1.." +
             std::to_string(MAX_DIMS) + ")");
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t v = c.pod<uint64_t>(what + " dims");
      if (v > static_cast<uint64_t>(INT64_MAX))
        c.fail(what + ": dimension " + std::to_string(v) + " is too large");
      t.dims.push_back(static_cast<int64_t>(v));
    }
    t.type = c.pod<uint32_t>(what + " type");
    if (!find_traits(t.type)) c.fail(what + ": unknown ggml tensor type " + std::to_string(t.type));
    t.offset = c.pod<uint64_t>(what + " offset");
    try {
      t.nbytes = tensor_nbytes(t.type, t.dims);
    } catch (const Error& e) {
      c.fail(what + ": " + e.what());
    }
    if (t.offset % alignment_ != 0)
      c.fail(what + ": data offset " + std::to_string(t.offset) + " is not a multiple of " +
             "the alignment " + std::to_string(alignment_));
    if (tensor_index_.count(t.name)) c.fail("duplicate tensor name '" + t.name + "'");
    tensor_index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }

  data_start_ = (c.pos + alignment_ - 1) / alignment_ * alignment_;
  for (TensorInfo& t : tensors_) {
    const uint64_t n = static_cast<uint64_t>(t.nbytes);
    uint64_t begin, end;
    if (__builtin_add_overflow(data_start_, t.offset, &begin) ||
        __builtin_add_overflow(begin, n, &end) || end > size_)
      throw Error(path_ + ": tensor '" + t.name + "' data [" + std::to_string(t.offset) + ", " +
                  std::to_string(t.offset) + "+" + std::to_string(n) +
                  ") extends past end of file (data section at " + std::to_string(data_start_) +
                  ", file size " + std::to_string(size_) + ")");
    t.data = base_ + begin;
  }
}

bool GgufFile::has(const std::string& key) const { return kv_index_.count(key) != 0; }

const Value& GgufFile::get(const std::string& key) const {
  auto it = kv_index_.find(key);
  if (it == kv_index_.end()) throw Error(path_ + ": metadata key '" + key + "' not found");
  return kvs_[it->second].second;
}

namespace {
template <typename F>
auto typed(const GgufFile& f, const std::string& key, F fn) -> decltype(fn(f.get(key))) {
  const Value& v = f.get(key);
  try {
    return fn(v);
  } catch (const Error& e) {
    throw Error(f.path() + ": metadata '" + key + "': " + e.what());
  }
}
}  // namespace

int64_t GgufFile::get_i64(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_i64(); });
}
uint64_t GgufFile::get_u64(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_u64(); });
}
uint32_t GgufFile::get_u32(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_u32(); });
}
float GgufFile::get_f32(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_f32(); });
}
double GgufFile::get_f64(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_f64(); });
}
bool GgufFile::get_bool(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_bool(); });
}
const std::string& GgufFile::get_string(const std::string& k) const {
  const Value& v = get(k);
  if (v.type != ValueType::STRING)
    throw Error(path_ + ": metadata '" + k + "': expected string, got " + v.type_name());
  return v.str;
}
const std::vector<std::string>& GgufFile::get_string_array(const std::string& k) const {
  const Value& v = get(k);
  if (v.type != ValueType::ARRAY || v.elem_type != ValueType::STRING)
    throw Error(path_ + ": metadata '" + k + "': expected array[string], got " + v.type_name());
  return v.strings;
}
std::vector<int64_t> GgufFile::get_int_array(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_int_array(); });
}
std::vector<double> GgufFile::get_float_array(const std::string& k) const {
  return typed(*this, k, [](const Value& v) { return v.as_float_array(); });
}

const TensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}
const TensorInfo& GgufFile::tensor(const std::string& name) const {
  const TensorInfo* t = find_tensor(name);
  if (!t) throw Error(path_ + ": tensor '" + name + "' not found");
  return *t;
}

}  // namespace gguf
}  // namespace nanochat
