// GGUF v3 reader: mmaps the file read-only and bounds-checks everything before use.
// No count read from the file is trusted for an allocation until it is shown to fit
// in the bytes that remain.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "gguf/gguf.h"

namespace nanochat {
namespace gguf {

StringList::StringList(const std::vector<std::string>& v) {
  size_t bytes = 0;
  for (const std::string& x : v) bytes += x.size();
  reserve(v.size(), bytes);
  for (const std::string& x : v) push_back(x);
}

std::vector<std::string> StringList::to_vector() const {
  std::vector<std::string> v;
  v.reserve(size());
  for (size_t i = 0; i < size(); ++i) v.emplace_back((*this)[i]);
  return v;
}

namespace {

// Heap bytes a std::string holds beyond its own object (libstdc++ keeps up to 15 inline).
uint64_t heap_of(const std::string& s) { return s.capacity() > 15 ? s.capacity() + 1 : 0; }

// Reads the file front to back. Where it is (the key or tensor, the array indices) is kept
// as plain fields and turned into text only when an error is thrown, so parsing costs the
// same per element however long the key: building "key[i]" per element was quadratic.
struct Cursor {
  Cursor(const std::string& f, const uint8_t* b, uint64_t n, const ReadLimits& l)
      : file(f), base(b), size(n), lim(l) {}
  const std::string& file;
  const uint8_t* base;
  uint64_t size;
  const ReadLimits& lim;
  uint64_t pos = 0;
  // Location for messages: "metadata #3", "metadata 'key'[2][0]", "tensor 'name'".
  const char* section = "header";
  uint64_t item = 0;
  const std::string* name = nullptr;
  std::vector<uint64_t> index;  // array indices, outermost first

  std::string where() const {
    std::string s = section;
    if (name)
      s += " '" + *name + "'";
    else if (std::strcmp(section, "header") != 0)
      s += " #" + std::to_string(item);
    for (uint64_t i : index) s += "[" + std::to_string(i) + "]";
    return s;
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(file + ": " + where() + ": " + what + " (at byte " + std::to_string(pos) +
                ", file size " + std::to_string(size) + ")");
  }
  uint64_t remaining() const { return size - pos; }
  void need(uint64_t n, const char* what) const {
    if (n > remaining())
      fail(std::string("truncated: ") + what + " needs " + std::to_string(n) + " bytes");
  }
  template <typename T>
  T pod(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  // A length-prefixed string's bytes (a view into the mapping), at most `max` long.
  std::string_view str(const char* what, uint64_t max) {
    const uint64_t n = pod<uint64_t>(what);
    if (n > remaining())
      fail(std::string(what) + " length " + std::to_string(n) + " extends past end of file");
    if (n > max)
      fail(std::string(what) + " length " + std::to_string(n) + " exceeds the limit of " +
           std::to_string(max) + " bytes");
    std::string_view s(reinterpret_cast<const char*>(base + pos), static_cast<size_t>(n));
    pos += n;
    return s;
  }
  // Minimum bytes one value of type t takes on disk.
  static uint64_t min_size(ValueType t) {
    if (t == ValueType::STRING) return 8;
    if (t == ValueType::ARRAY) return 12;
    return value_type_size(t);
  }
  ValueType value_type(const char* what) {
    const uint32_t t = pod<uint32_t>(what);
    if (!value_type_known(t)) fail("unknown value type " + std::to_string(t));
    return static_cast<ValueType>(t);
  }
  // Fills v (a Value stored where it will stay) with a value of type t; the caller has
  // counted sizeof(Value), this adds the heap bytes it allocates.
  void value(Value& v, ValueType t, int depth, uint64_t& memory) {
    v.type = t;
    if (t == ValueType::STRING) {
      v.str = std::string(str("string", lim.max_string_bytes));
      memory += heap_of(v.str);
      return;
    }
    if (t != ValueType::ARRAY) {
      const size_t n = value_type_size(t);
      need(n, value_type_name(t));
      std::memcpy(&v.bits, base + pos, n);
      pos += n;
      if (t == ValueType::BOOL && v.bits > 1)
        fail("bool value " + std::to_string(v.bits) + " is not 0 or 1");
      return;
    }
    if (depth >= MAX_ARRAY_DEPTH) fail("arrays nested deeper than " +
                                       std::to_string(MAX_ARRAY_DEPTH));
    v.elem_type = value_type("array element type");
    v.count = pod<uint64_t>("array length");
    const uint64_t each = min_size(v.elem_type);
    if (v.count > remaining() / each)
      fail("array of " + std::to_string(v.count) + " " + value_type_name(v.elem_type) +
           " elements cannot fit in the remaining " + std::to_string(remaining()) + " bytes");
    if (v.count > lim.max_array_elements)
      fail("array of " + std::to_string(v.count) + " elements exceeds the limit of " +
           std::to_string(lim.max_array_elements));
    const size_t count = static_cast<size_t>(v.count);
    if (v.elem_type == ValueType::STRING) {
      // First pass: the strings' total length, so the list is allocated once.
      uint64_t bytes = 0, p = pos;
      for (size_t i = 0; i < count; ++i) {
        uint64_t n;
        if (size - p < 8) break;  // the second pass reports it, with the index
        std::memcpy(&n, base + p, 8);
        if (n > size - p - 8) break;
        bytes += n;
        p += 8 + n;
      }
      v.strings.reserve(count, static_cast<size_t>(bytes));
      index.push_back(0);
      for (size_t i = 0; i < count; ++i) {
        index.back() = i;
        v.strings.push_back(str("string", lim.max_string_bytes));
      }
      index.pop_back();
      memory += v.strings.heap_bytes();
    } else if (v.elem_type == ValueType::ARRAY) {
      memory += v.count * sizeof(Value);
      check_memory(memory);
      v.items.resize(count);
      index.push_back(0);
      for (size_t i = 0; i < count; ++i) {
        index.back() = i;
        // A nested array is (elem type, count, elems), with no type tag of its own.
        value(v.items[i], ValueType::ARRAY, depth + 1, memory);
        check_memory(memory);
      }
      index.pop_back();
    } else {
      const uint64_t n = v.count * each;
      if (v.elem_type == ValueType::BOOL)
        for (uint64_t i = 0; i < n; ++i)
          if (base[pos + i] > 1) {
            pos += i;
            index.push_back(i);
            fail("bool value is not 0 or 1");
          }
      v.raw.assign(base + pos, base + pos + n);
      pos += n;
      memory += n;
    }
  }
  // Parsed metadata may take 2x the bytes read so far (from the first key on) plus a slack.
  uint64_t kv_start = 0;
  void check_memory(uint64_t memory) const {
    const uint64_t allowed = 2 * (pos - kv_start) + METADATA_MEMORY_SLACK;
    if (memory > allowed)
      fail("parsed metadata would take " + std::to_string(memory) + " bytes of memory, more " +
           "than the allowed " + std::to_string(allowed) + " (2x its " +
           std::to_string(pos - kv_start) + " bytes in the file + " +
           std::to_string(METADATA_MEMORY_SLACK) + ")");
  }
};

}  // namespace

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path, const ReadLimits& limits) {
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
  f->parse(limits);  // on throw, ~GgufFile unmaps
  return f;
}

GgufFile::~GgufFile() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), static_cast<size_t>(size_));
}

void GgufFile::parse(const ReadLimits& limits) {
  Cursor c{path_, base_, size_, limits};
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
  if (n_kv > limits.max_kv_count)
    c.fail("metadata count " + std::to_string(n_kv) + " exceeds the limit of " +
           std::to_string(limits.max_kv_count));
  if (n_tensors > limits.max_tensor_count)
    c.fail("tensor count " + std::to_string(n_tensors) + " exceeds the limit of " +
           std::to_string(limits.max_tensor_count));

  // Memory: each KV's pair in kvs_ and its node in kv_index_ (a red-black node of ~32
  // bytes plus the key and the index), each key twice, and what its value allocates.
  constexpr uint64_t kv_fixed =
      sizeof(std::pair<std::string, Value>) + 32 + sizeof(std::pair<const std::string, size_t>);
  uint64_t memory = 0;
  c.kv_start = c.pos;
  c.section = "metadata";
  // Reserve no more than the memory budget could ever hold: a small file may claim many.
  kvs_.reserve(static_cast<size_t>(
      std::min<uint64_t>(n_kv, (2 * c.remaining() + METADATA_MEMORY_SLACK) / kv_fixed)));
  for (uint64_t i = 0; i < n_kv; ++i) {
    c.item = i;
    c.name = nullptr;
    std::string key(c.str("key", MAX_KEY_BYTES));
    c.name = &key;
    memory += kv_fixed + 2 * heap_of(key);
    c.check_memory(memory);
    const ValueType t = c.value_type("value type");
    Value v;
    c.value(v, t, 0, memory);
    c.check_memory(memory);
    if (kv_index_.count(key)) c.fail("duplicate metadata key '" + key + "'");
    kv_index_[key] = kvs_.size();
    c.name = nullptr;
    kvs_.emplace_back(std::move(key), std::move(v));
  }
  metadata_bytes_ = c.pos - c.kv_start;
  metadata_memory_ = memory;

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

  c.section = "tensor";
  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    c.item = i;
    c.name = nullptr;
    TensorInfo t;
    t.name = std::string(c.str("name", MAX_KEY_BYTES));
    c.name = &t.name;
    const uint32_t n_dims = c.pod<uint32_t>("n_dims");
    if (n_dims < 1 || n_dims > static_cast<uint32_t>(MAX_DIMS))
      c.fail("n_dims " + std::to_string(n_dims) + " (expected 1.." + std::to_string(MAX_DIMS) +
             ")");
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t v = c.pod<uint64_t>("dims");
      if (v > static_cast<uint64_t>(INT64_MAX))
        c.fail("dimension " + std::to_string(v) + " is too large");
      t.dims.push_back(static_cast<int64_t>(v));
    }
    t.type = c.pod<uint32_t>("type");
    if (!find_traits(t.type)) c.fail("unknown ggml tensor type " + std::to_string(t.type));
    t.offset = c.pod<uint64_t>("offset");
    try {
      t.nbytes = tensor_nbytes(t.type, t.dims);
    } catch (const Error& e) {
      c.fail(e.what());
    }
    if (t.offset % alignment_ != 0)
      c.fail("data offset " + std::to_string(t.offset) + " is not a multiple of " +
             "the alignment " + std::to_string(alignment_));
    if (tensor_index_.count(t.name)) c.fail("duplicate tensor name '" + t.name + "'");
    c.name = nullptr;
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
  // Two tensors sharing bytes would let one write (or one corrupt block) alter both; no
  // writer produces them. Sorted by offset, each must end before the next one starts.
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const TensorInfo& t : tensors_)
    if (t.nbytes > 0) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& a = *by_offset[i - 1];
    const TensorInfo& b = *by_offset[i];
    if (a.offset + uint64_t(a.nbytes) > b.offset)
      throw Error(path_ + ": tensor '" + b.name + "' data at offset " + std::to_string(b.offset) +
                  " overlaps tensor '" + a.name + "' [" + std::to_string(a.offset) + ", " +
                  std::to_string(a.offset + uint64_t(a.nbytes)) + ")");
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
std::vector<std::string> GgufFile::get_string_array(const std::string& k) const {
  const Value& v = get(k);
  if (v.type != ValueType::ARRAY || v.elem_type != ValueType::STRING)
    throw Error(path_ + ": metadata '" + k + "': expected array[string], got " + v.type_name());
  return v.strings.to_vector();
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
