// GGUF v3 writer, plus the type tables and Value helpers shared with the reader.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <set>

#include "gguf/gguf.h"

namespace nanochat {
namespace gguf {

// ---- value types ------------------------------------------------------------------
namespace {
const char* const VALUE_TYPE_NAMES[VALUE_TYPE_COUNT] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
const size_t VALUE_TYPE_SIZES[VALUE_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

bool is_int_type(ValueType t) {
  switch (t) {
    case ValueType::U8: case ValueType::I8: case ValueType::U16: case ValueType::I16:
    case ValueType::U32: case ValueType::I32: case ValueType::U64: case ValueType::I64:
      return true;
    default:
      return false;
  }
}

// The scalar bits of integer (or bool) type t as int64; sets *too_big for U64 values
// above INT64_MAX.
int64_t decode_int(ValueType t, uint64_t bits, bool* too_big) {
  *too_big = false;
  switch (t) {
    case ValueType::U8: return static_cast<uint8_t>(bits);
    case ValueType::I8: return static_cast<int8_t>(static_cast<uint8_t>(bits));
    case ValueType::U16: return static_cast<uint16_t>(bits);
    case ValueType::I16: return static_cast<int16_t>(static_cast<uint16_t>(bits));
    case ValueType::U32: return static_cast<uint32_t>(bits);
    case ValueType::I32: return static_cast<int32_t>(static_cast<uint32_t>(bits));
    case ValueType::BOOL: return bits != 0;
    case ValueType::U64:
      if (bits > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) *too_big = true;
      return static_cast<int64_t>(bits);
    case ValueType::I64: return static_cast<int64_t>(bits);
    default: return 0;
  }
}

uint64_t load_bits(const uint8_t* p, size_t n) {
  uint64_t v = 0;
  std::memcpy(&v, p, n);  // little-endian host
  return v;
}

void check_int_range(ValueType t, int64_t v) {
  int64_t lo = 0, hi = 0;
  switch (t) {
    case ValueType::U8: lo = 0; hi = 0xff; break;
    case ValueType::I8: lo = -128; hi = 127; break;
    case ValueType::U16: lo = 0; hi = 0xffff; break;
    case ValueType::I16: lo = -32768; hi = 32767; break;
    case ValueType::U32: lo = 0; hi = 0xffffffffLL; break;
    case ValueType::I32:
      lo = std::numeric_limits<int32_t>::min();
      hi = std::numeric_limits<int32_t>::max();
      break;
    case ValueType::U64: lo = 0; hi = std::numeric_limits<int64_t>::max(); break;
    case ValueType::I64: return;
    case ValueType::BOOL: lo = 0; hi = 1; break;
    default:
      throw Error(std::string("value type ") + value_type_name(t) + " is not an integer type");
  }
  if (v < lo || v > hi)
    throw Error("value " + std::to_string(v) + " does not fit in " + value_type_name(t));
}

uint64_t float_bits(ValueType t, double v) {
  if (t == ValueType::F32) {
    const float f = static_cast<float>(v);
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
  }
  if (t == ValueType::F64) {
    uint64_t b;
    std::memcpy(&b, &v, 8);
    return b;
  }
  throw Error(std::string("value type ") + value_type_name(t) + " is not a float type");
}
}  // namespace

bool value_type_known(uint32_t t) { return t < VALUE_TYPE_COUNT; }

const char* value_type_name(ValueType t) {
  const uint32_t i = static_cast<uint32_t>(t);
  return i < VALUE_TYPE_COUNT ? VALUE_TYPE_NAMES[i] : "unknown";
}

ValueType value_type_from_name(const std::string& name) {
  for (uint32_t i = 0; i < VALUE_TYPE_COUNT; ++i)
    if (name == VALUE_TYPE_NAMES[i]) return static_cast<ValueType>(i);
  throw Error("unknown GGUF value type '" + name + "'");
}

size_t value_type_size(ValueType t) {
  const uint32_t i = static_cast<uint32_t>(t);
  return i < VALUE_TYPE_COUNT ? VALUE_TYPE_SIZES[i] : 0;
}

// ---- Value ---------------------------------------------------------------------------
static Value scalar(ValueType t, uint64_t bits) {
  Value v;
  v.type = t;
  v.bits = bits;
  return v;
}
Value Value::u8(uint8_t x) { return scalar(ValueType::U8, x); }
Value Value::i8(int8_t x) { return scalar(ValueType::I8, static_cast<uint8_t>(x)); }
Value Value::u16(uint16_t x) { return scalar(ValueType::U16, x); }
Value Value::i16(int16_t x) { return scalar(ValueType::I16, static_cast<uint16_t>(x)); }
Value Value::u32(uint32_t x) { return scalar(ValueType::U32, x); }
Value Value::i32(int32_t x) { return scalar(ValueType::I32, static_cast<uint32_t>(x)); }
Value Value::f32(float x) { return scalar(ValueType::F32, float_bits(ValueType::F32, x)); }
Value Value::boolean(bool x) { return scalar(ValueType::BOOL, x ? 1 : 0); }
Value Value::string(std::string x) {
  Value v;
  v.type = ValueType::STRING;
  v.str = std::move(x);
  return v;
}
Value Value::u64(uint64_t x) { return scalar(ValueType::U64, x); }
Value Value::i64(int64_t x) { return scalar(ValueType::I64, static_cast<uint64_t>(x)); }
Value Value::f64(double x) { return scalar(ValueType::F64, float_bits(ValueType::F64, x)); }

Value Value::integer(ValueType t, int64_t x) {
  check_int_range(t, x);
  const size_t n = value_type_size(t);
  uint64_t bits = static_cast<uint64_t>(x);
  if (n < 8) bits &= (uint64_t(1) << (8 * n)) - 1;
  return scalar(t, bits);
}
Value Value::floating(ValueType t, double x) { return scalar(t, float_bits(t, x)); }

Value Value::string_array(std::vector<std::string> v) {
  Value a;
  a.type = ValueType::ARRAY;
  a.elem_type = ValueType::STRING;
  a.count = v.size();
  a.strings = std::move(v);
  return a;
}
Value Value::int_array(ValueType elem, const std::vector<int64_t>& v) {
  if (!is_int_type(elem) && elem != ValueType::BOOL)
    throw Error(std::string("int_array: element type ") + value_type_name(elem) +
                " is not an integer type");
  Value a;
  a.type = ValueType::ARRAY;
  a.elem_type = elem;
  a.count = v.size();
  const size_t n = value_type_size(elem);
  a.raw.resize(v.size() * n);
  for (size_t i = 0; i < v.size(); ++i) {
    check_int_range(elem, v[i]);
    const uint64_t bits = static_cast<uint64_t>(v[i]);
    std::memcpy(a.raw.data() + i * n, &bits, n);
  }
  return a;
}
Value Value::float_array(ValueType elem, const std::vector<double>& v) {
  Value a;
  a.type = ValueType::ARRAY;
  a.elem_type = elem;
  a.count = v.size();
  const size_t n = value_type_size(elem);
  a.raw.resize(v.size() * n);
  for (size_t i = 0; i < v.size(); ++i) {
    const uint64_t bits = float_bits(elem, v[i]);
    std::memcpy(a.raw.data() + i * n, &bits, n);
  }
  return a;
}

static Error wrong_type(const Value& v, const char* want) {
  return Error(std::string("expected ") + want + ", got " + v.type_name());
}

bool Value::is_integer() const { return is_int_type(type); }

int64_t Value::as_i64() const {
  if (!is_int_type(type)) throw wrong_type(*this, "an integer");
  bool big;
  const int64_t v = decode_int(type, bits, &big);
  if (big) throw Error("value " + std::to_string(bits) + " does not fit in i64");
  return v;
}
uint64_t Value::as_u64() const {
  if (!is_int_type(type)) throw wrong_type(*this, "an integer");
  if (type == ValueType::U64) return bits;
  bool big;
  const int64_t v = decode_int(type, bits, &big);
  if (v < 0) throw Error("value " + std::to_string(v) + " is negative");
  return static_cast<uint64_t>(v);
}
uint32_t Value::as_u32() const {
  const uint64_t v = as_u64();
  if (v > 0xffffffffULL) throw Error("value " + std::to_string(v) + " does not fit in u32");
  return static_cast<uint32_t>(v);
}
double Value::as_f64() const {
  if (type == ValueType::F32) {
    float f;
    const uint32_t b = static_cast<uint32_t>(bits);
    std::memcpy(&f, &b, 4);
    return f;
  }
  if (type == ValueType::F64) {
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
  }
  throw wrong_type(*this, "f32 or f64");
}
float Value::as_f32() const { return static_cast<float>(as_f64()); }
bool Value::as_bool() const {
  if (type != ValueType::BOOL) throw wrong_type(*this, "bool");
  return bits != 0;
}
const std::string& Value::as_string() const {
  if (type != ValueType::STRING) throw wrong_type(*this, "string");
  return str;
}
std::vector<std::string> Value::as_string_array() const {
  if (type != ValueType::ARRAY || elem_type != ValueType::STRING)
    throw wrong_type(*this, "array[string]");
  return strings.to_vector();
}
int64_t Value::int_at(uint64_t i) const {
  if (type != ValueType::ARRAY || !(is_int_type(elem_type) || elem_type == ValueType::BOOL))
    throw wrong_type(*this, "an array of integers");
  if (i >= count) throw Error("array index " + std::to_string(i) + " out of range");
  const size_t n = value_type_size(elem_type);
  bool big;
  const int64_t v = decode_int(elem_type, load_bits(raw.data() + i * n, n), &big);
  if (big) throw Error("array element does not fit in i64");
  return v;
}
double Value::float_at(uint64_t i) const {
  if (type != ValueType::ARRAY || (elem_type != ValueType::F32 && elem_type != ValueType::F64))
    throw wrong_type(*this, "an array of f32/f64");
  if (i >= count) throw Error("array index " + std::to_string(i) + " out of range");
  const size_t n = value_type_size(elem_type);
  return scalar(elem_type, load_bits(raw.data() + i * n, n)).as_f64();
}
std::vector<int64_t> Value::as_int_array() const {
  if (type != ValueType::ARRAY || !(is_int_type(elem_type) || elem_type == ValueType::BOOL))
    throw wrong_type(*this, "an array of integers");
  std::vector<int64_t> o;
  o.reserve(count);
  for (uint64_t i = 0; i < count; ++i) o.push_back(int_at(i));
  return o;
}
std::vector<double> Value::as_float_array() const {
  if (type != ValueType::ARRAY || (elem_type != ValueType::F32 && elem_type != ValueType::F64))
    throw wrong_type(*this, "an array of f32/f64");
  std::vector<double> o;
  o.reserve(count);
  for (uint64_t i = 0; i < count; ++i) o.push_back(float_at(i));
  return o;
}

std::string Value::type_name() const {
  if (type != ValueType::ARRAY) return value_type_name(type);
  if (elem_type == ValueType::ARRAY)
    return "array[" + (items.empty() ? std::string("array") : items[0].type_name()) + "]";
  return std::string("array[") + value_type_name(elem_type) + "]";
}

// ---- tensor types ----------------------------------------------------------------------
const TypeTraits& type_traits(uint32_t id) {
  const TypeTraits* t = find_traits(id);
  if (!t) throw Error("unknown ggml tensor type " + std::to_string(id));
  return *t;
}

int64_t tensor_nbytes(uint32_t type, const std::vector<int64_t>& dims) {
  const TypeTraits& t = type_traits(type);
  if (dims.empty() || dims.size() > static_cast<size_t>(MAX_DIMS))
    throw Error("tensor has " + std::to_string(dims.size()) + " dims (expected 1.." +
                std::to_string(MAX_DIMS) + ")");
  for (int64_t d : dims)
    if (d < 0) throw Error("negative tensor dimension " + std::to_string(d));
  if (dims[0] % t.block_size != 0)
    throw Error("row length " + std::to_string(dims[0]) + " is not a multiple of " + t.name +
                "'s block size " + std::to_string(t.block_size));
  int64_t n = dims[0] / t.block_size;
  if (__builtin_mul_overflow(n, t.type_size, &n)) throw Error("tensor size overflows");
  for (size_t i = 1; i < dims.size(); ++i)
    if (__builtin_mul_overflow(n, dims[i], &n)) throw Error("tensor size overflows");
  if (t.type == GgmlType::I2_S && __builtin_add_overflow(n, I2_S_TAIL_BYTES, &n))
    throw Error("tensor size overflows");
  return n;
}

// ---- writer ----------------------------------------------------------------------------
namespace {
constexpr const char* ALIGNMENT_KEY = "general.alignment";

void check_alignment(uint32_t a) {
  if (a == 0 || a % 8 != 0)
    throw Error("general.alignment must be a nonzero multiple of 8, got " + std::to_string(a));
}

struct Out {
  std::FILE* f;
  const std::string& path;
  uint64_t pos = 0;
  void bytes(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f) != n)
      throw Error(path + ": write failed: " + std::strerror(errno));
    pos += n;
  }
  template <typename T>
  void pod(T v) { bytes(&v, sizeof v); }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    bytes(s.data(), s.size());
  }
  void pad(uint64_t align) {
    static const uint8_t zeros[256] = {};
    uint64_t n = (align - pos % align) % align;
    while (n) {
      const size_t k = n < sizeof zeros ? static_cast<size_t>(n) : sizeof zeros;
      bytes(zeros, k);
      n -= k;
    }
  }
  void value(const Value& v) {
    switch (v.type) {
      case ValueType::STRING: str(v.str); return;
      case ValueType::ARRAY:
        pod<uint32_t>(static_cast<uint32_t>(v.elem_type));
        pod<uint64_t>(v.count);
        if (v.elem_type == ValueType::STRING) {
          for (const auto& s : v.strings) str(s);
        } else if (v.elem_type == ValueType::ARRAY) {
          for (const auto& it : v.items) value(it);  // (elem type, count, elems) each
        } else {
          bytes(v.raw.data(), v.raw.size());
        }
        return;
      default: bytes(&v.bits, value_type_size(v.type)); return;
    }
  }
};

void check_value(const Value& v, int depth) {
  if (!value_type_known(static_cast<uint32_t>(v.type)))
    throw Error("unknown value type " + std::to_string(static_cast<uint32_t>(v.type)));
  if (v.type != ValueType::ARRAY) return;
  if (depth >= MAX_ARRAY_DEPTH) throw Error("arrays nested too deep");
  const uint32_t et = static_cast<uint32_t>(v.elem_type);
  if (!value_type_known(et)) throw Error("unknown array element type " + std::to_string(et));
  if (v.elem_type == ValueType::STRING) {
    if (v.strings.size() != v.count) throw Error("array[string] count mismatch");
  } else if (v.elem_type == ValueType::ARRAY) {
    if (v.items.size() != v.count) throw Error("array[array] count mismatch");
    for (const auto& it : v.items) {
      if (it.type != ValueType::ARRAY) throw Error("array[array] element is not an array");
      check_value(it, depth + 1);
    }
  } else if (v.raw.size() != v.count * value_type_size(v.elem_type)) {
    throw Error(std::string("array[") + value_type_name(v.elem_type) + "] holds " +
                std::to_string(v.raw.size()) + " bytes for " + std::to_string(v.count) +
                " elements");
  }
}
}  // namespace

void GgufWriter::add_kv(const std::string& key, Value v) {
  if (key.empty()) throw Error("empty metadata key");
  for (const auto& kv : kvs_)
    if (kv.key == key) throw Error("duplicate metadata key '" + key + "'");
  try {
    check_value(v, 0);
  } catch (const Error& e) {
    throw Error("metadata key '" + key + "': " + e.what());
  }
  if (key == ALIGNMENT_KEY) {
    if (v.type != ValueType::U32)
      throw Error(std::string(ALIGNMENT_KEY) + " must be u32, got " + v.type_name());
    check_alignment(static_cast<uint32_t>(v.bits));
    alignment_ = static_cast<uint32_t>(v.bits);
  }
  kvs_.push_back({key, std::move(v)});
}

void GgufWriter::set_alignment(uint32_t alignment) {
  check_alignment(alignment);
  for (auto& kv : kvs_)
    if (kv.key == ALIGNMENT_KEY) {
      kv.value = Value::u32(alignment);
      alignment_ = alignment;
      return;
    }
  add_kv(ALIGNMENT_KEY, Value::u32(alignment));
}

void GgufWriter::check_tensor(const std::string& name, GgmlType type,
                              const std::vector<int64_t>& dims, size_t nbytes) const {
  if (name.empty()) throw Error("empty tensor name");
  for (const auto& t : tensors_)
    if (t.name == name) throw Error("duplicate tensor name '" + name + "'");
  int64_t need;
  try {
    need = tensor_nbytes(static_cast<uint32_t>(type), dims);
  } catch (const Error& e) {
    throw Error("tensor '" + name + "': " + e.what());
  }
  if (static_cast<uint64_t>(need) != nbytes)
    throw Error("tensor '" + name + "': " + type_traits(static_cast<uint32_t>(type)).name +
                " data needs " + std::to_string(need) + " bytes, got " + std::to_string(nbytes));
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type,
                            const std::vector<int64_t>& dims, const void* data, size_t nbytes) {
  check_tensor(name, type, dims, nbytes);
  if (nbytes && !data) throw Error("tensor '" + name + "': null data");
  auto owned = std::make_shared<std::vector<uint8_t>>(
      static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + nbytes);
  tensors_.push_back({name, type, dims, owned->data(), nbytes, owned});
}

void GgufWriter::add_tensor_ref(const std::string& name, GgmlType type,
                                const std::vector<int64_t>& dims, const void* data,
                                size_t nbytes) {
  check_tensor(name, type, dims, nbytes);
  if (nbytes && !data) throw Error("tensor '" + name + "': null data");
  tensors_.push_back({name, type, dims, static_cast<const uint8_t*>(data), nbytes, nullptr});
}

namespace {

// A temp file beside `path` with a unique random name, created exclusively and never
// through a symlink (O_EXCL | O_NOFOLLOW): a planted `<path>.tmp` or a second export writing
// the same path at the same time cannot make us write into someone else's file.
std::FILE* create_temp(const std::string& path, std::string* tmp) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  std::random_device rd;
  for (int attempt = 0; attempt < 100; ++attempt) {
    char suffix[24];
    std::snprintf(suffix, sizeof suffix, ".%08x%08x.tmp", rd(), rd());
    *tmp = dir + "." + base + suffix;
    const int fd = ::open(tmp->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                          0666);
    if (fd < 0) {
      if (errno == EEXIST) continue;
      throw Error(path + ": cannot create a temporary file " + *tmp + ": " +
                  std::strerror(errno));
    }
    std::FILE* f = ::fdopen(fd, "wb");
    if (!f) {
      const int e = errno;
      ::close(fd);
      ::unlink(tmp->c_str());
      throw Error(*tmp + ": fdopen failed: " + std::strerror(e));
    }
    return f;
  }
  throw Error(path + ": no free temporary name in its directory");
}

// Persist a rename: fsync the directory that holds `path`.
void fsync_parent(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash ? path.substr(0, slash) : "/");
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Error(dir + ": cannot open directory to fsync: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (rc != 0 && e != EINVAL) throw Error(dir + ": fsync failed: " + std::strerror(e));
}

}  // namespace

void GgufWriter::write(const std::string& path) const {
  std::string tmp;
  std::FILE* f = create_temp(path, &tmp);
  try {
    Out o{f, tmp};
    o.pod<uint32_t>(MAGIC);
    o.pod<uint32_t>(VERSION);
    o.pod<uint64_t>(tensors_.size());
    o.pod<uint64_t>(kvs_.size());
    for (const auto& kv : kvs_) {
      o.str(kv.key);
      o.pod<uint32_t>(static_cast<uint32_t>(kv.value.type));
      o.value(kv.value);
    }
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      o.str(t.name);
      o.pod<uint32_t>(static_cast<uint32_t>(t.dims.size()));
      for (int64_t d : t.dims) o.pod<uint64_t>(static_cast<uint64_t>(d));
      o.pod<uint32_t>(static_cast<uint32_t>(t.type));
      o.pod<uint64_t>(offset);
      offsets.push_back(offset);
      offset += (t.nbytes + alignment_ - 1) / alignment_ * alignment_;
    }
    o.pad(alignment_);
    const uint64_t data_start = o.pos;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (o.pos - data_start != offsets[i]) throw Error(tmp + ": internal offset mismatch");
      o.bytes(tensors_[i].data, tensors_[i].nbytes);
      o.pad(alignment_);
    }
    if (std::fflush(f) != 0) throw Error(tmp + ": write failed: " + std::strerror(errno));
    // the data must be on disk before the rename makes it the file at `path`
    if (::fsync(::fileno(f)) != 0) throw Error(tmp + ": fsync failed: " + std::strerror(errno));
  } catch (...) {
    std::fclose(f);
    ::unlink(tmp.c_str());
    throw;
  }
  if (std::fclose(f) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw Error(tmp + ": close failed: " + std::strerror(e));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw Error(path + ": cannot rename " + tmp + ": " + std::strerror(e));
  }
  fsync_parent(path);
}

}  // namespace gguf
}  // namespace nanochat
