// GGUF v3 files: a writer (exporter) and a bounds-checked mmap reader (inference
// engine). Plain C++17, little-endian hosts only (as ggml). Spec: ggml docs/gguf.md;
// summary in ../shared/reference/formats.md.
//
// Conventions:
//   - Tensor dims are in GGUF order: fastest-varying first, so a row-major array of
//     shape (rows, cols) has dims {cols, rows}. dims[0] must be a multiple of the
//     type's block size.
//   - Every tensor's data offset (relative to the data section) is a multiple of
//     general.alignment (default 32), and so is the start of the data section.
//   - Every error is a nanochat::Error naming the file and what/where is wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ternary/ternary.h"  // nanochat::Error

namespace nanochat {
namespace gguf {

constexpr uint32_t MAGIC = 0x46554747;  // "GGUF" little-endian
constexpr uint32_t VERSION = 3;
constexpr uint32_t DEFAULT_ALIGNMENT = 32;
constexpr int MAX_DIMS = 4;
constexpr int MAX_ARRAY_DEPTH = 8;  // nested arrays deeper than this are rejected
// Reader limits (a file past one is refused with an error naming it). llama.cpp's gguf.cpp
// caps a string at 1 GiB and an array at 2^30 elements; keys and counts are capped lower
// here, far above any real model's (tens of keys, hundreds of tensors, keys under 100 bytes).
constexpr uint64_t MAX_KEY_BYTES = 65536;
constexpr uint64_t MAX_STRING_BYTES = uint64_t(1) << 30;
constexpr uint64_t MAX_ARRAY_ELEMENTS = uint64_t(1) << 30;
constexpr uint64_t MAX_KV_COUNT = 65536;
constexpr uint64_t MAX_TENSOR_COUNT = 65536;
// Parsed metadata may hold at most 2x its bytes in the file plus this much in memory
// (GgufFile::metadata_memory): a few hundred keys' fixed overhead.
constexpr uint64_t METADATA_MEMORY_SLACK = 64 * 1024;

// ---- metadata value types ------------------------------------------------------
enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};
constexpr uint32_t VALUE_TYPE_COUNT = 13;
bool value_type_known(uint32_t t);
const char* value_type_name(ValueType t);  // "u8", ..., "string", "array"
ValueType value_type_from_name(const std::string& name);  // throws Error on unknown
// Bytes of one scalar of type t on disk; 0 for STRING and ARRAY.
size_t value_type_size(ValueType t);

// An array of strings stored back to back (one buffer plus an end offset per string), so
// it takes no more memory than the file's bytes (an 8-byte length and the text each);
// a std::vector<std::string> takes 32 bytes even for an empty string. Iterating yields
// std::string copies.
class StringList {
 public:
  StringList() = default;
  StringList(const std::vector<std::string>& v);  // NOLINT: implicit, as the vector it replaces
  void reserve(size_t n, size_t bytes) {
    ends_.reserve(n);
    data_.reserve(bytes);
  }
  void push_back(std::string_view s) {
    data_.append(s.data(), s.size());
    ends_.push_back(data_.size());
  }
  size_t size() const { return ends_.size(); }
  bool empty() const { return ends_.empty(); }
  std::string_view operator[](size_t i) const {
    const size_t b = i ? size_t(ends_[i - 1]) : 0;
    return std::string_view(data_).substr(b, size_t(ends_[i]) - b);
  }
  std::vector<std::string> to_vector() const;
  size_t heap_bytes() const { return data_.capacity() + ends_.capacity() * sizeof(uint64_t); }
  bool operator==(const StringList& o) const { return data_ == o.data_ && ends_ == o.ends_; }

  class iterator {
   public:
    iterator(const StringList* l, size_t i) : l_(l), i_(i) {}
    std::string operator*() const { return std::string((*l_)[i_]); }
    iterator& operator++() {
      ++i_;
      return *this;
    }
    bool operator!=(const iterator& o) const { return i_ != o.i_; }

   private:
    const StringList* l_;
    size_t i_;
  };
  iterator begin() const { return iterator(this, 0); }
  iterator end() const { return iterator(this, size()); }

 private:
  std::string data_;
  std::vector<uint64_t> ends_;
};

// One metadata value. Scalars keep their raw little-endian bits in `bits`; arrays of
// scalars keep their packed elements in `raw`, arrays of strings in `strings`, and
// arrays of arrays in `items`.
struct Value {
  ValueType type = ValueType::U8;
  uint64_t bits = 0;
  std::string str;
  ValueType elem_type = ValueType::U8;  // ARRAY only
  uint64_t count = 0;                   // ARRAY only: number of elements
  std::vector<uint8_t> raw;             // ARRAY of scalars
  StringList strings;                   // ARRAY of STRING
  std::vector<Value> items;             // ARRAY of ARRAY

  // constructors
  static Value u8(uint8_t v);
  static Value i8(int8_t v);
  static Value u16(uint16_t v);
  static Value i16(int16_t v);
  static Value u32(uint32_t v);
  static Value i32(int32_t v);
  static Value f32(float v);
  static Value boolean(bool v);
  static Value string(std::string v);
  static Value u64(uint64_t v);
  static Value i64(int64_t v);
  static Value f64(double v);
  // Integer scalar of any integer type from an int64 (range-checked).
  static Value integer(ValueType t, int64_t v);
  static Value floating(ValueType t, double v);  // F32 or F64
  static Value string_array(std::vector<std::string> v);
  // Array of integer/float/bool elements of type `elem` (values range-checked).
  static Value int_array(ValueType elem, const std::vector<int64_t>& v);
  static Value float_array(ValueType elem, const std::vector<double>& v);

  // Typed getters; throw Error on a wrong type (or a value out of range).
  bool is_integer() const;  // U8..I64 scalar
  int64_t as_i64() const;   // any integer type; u64 > INT64_MAX throws
  uint64_t as_u64() const;  // any integer type; negative throws
  uint32_t as_u32() const;  // any integer type in [0, 2^32)
  double as_f64() const;    // F32 or F64
  float as_f32() const;     // F32 or F64
  bool as_bool() const;
  const std::string& as_string() const;
  std::vector<std::string> as_string_array() const;  // a copy
  std::vector<int64_t> as_int_array() const;   // array of any integer type (or bool)
  std::vector<double> as_float_array() const;  // array of F32/F64
  // Element i of a scalar array as an int64/double (i < count).
  int64_t int_at(uint64_t i) const;
  double float_at(uint64_t i) const;

  std::string type_name() const;  // "u32", "string", "array[string]", "array[array[u8]]"
};

// ---- ggml tensor types ----------------------------------------------------------------
// I2_S (36) is bitnet.cpp's type, not ggml's: its blocks are followed by one float32 scale
// per tensor and padding, I2_S_TAIL_BYTES in all (tensor_nbytes adds them).
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, Q8_0 = 8, TQ1_0 = 34, TQ2_0 = 35, I2_S = 36 };
constexpr int64_t I2_S_TAIL_BYTES = 32;

struct TypeTraits {
  GgmlType type;
  const char* name;
  int64_t block_size;  // elements per block
  int64_t type_size;   // bytes per block
};
constexpr TypeTraits TYPE_TRAITS[] = {
    {GgmlType::F32, "F32", 1, 4},
    {GgmlType::F16, "F16", 1, 2},
    {GgmlType::Q8_0, "Q8_0", 32, 34},
    {GgmlType::TQ1_0, "TQ1_0", 256, 54},
    {GgmlType::TQ2_0, "TQ2_0", 256, 66},
    {GgmlType::I2_S, "I2_S", 128, 32},
};
constexpr const TypeTraits* find_traits(uint32_t id) {
  for (const TypeTraits& t : TYPE_TRAITS)
    if (static_cast<uint32_t>(t.type) == id) return &t;
  return nullptr;
}
static_assert(find_traits(0)->block_size == 1 && find_traits(0)->type_size == 4, "F32");
static_assert(find_traits(1)->block_size == 1 && find_traits(1)->type_size == 2, "F16");
static_assert(find_traits(8)->block_size == 32 && find_traits(8)->type_size == 34, "Q8_0");
static_assert(find_traits(34)->block_size == 256 && find_traits(34)->type_size == 54, "TQ1_0");
static_assert(find_traits(35)->block_size == 256 && find_traits(35)->type_size == 66, "TQ2_0");
static_assert(find_traits(35)->type_size == TQ2_0_BLOCK_BYTES, "TQ2_0 matches ternary.h");
static_assert(find_traits(34)->type_size == TQ1_0_BLOCK_BYTES, "TQ1_0 matches ternary.h");
static_assert(find_traits(36)->block_size == I2_S_BLOCK && find_traits(36)->type_size ==
              I2_S_BLOCK / 4, "I2_S matches ternary.h");

// Traits of a known type id; throws Error ("unknown ggml tensor type N") otherwise.
const TypeTraits& type_traits(uint32_t id);
// Bytes a tensor of this type and dims (GGUF order) needs (I2_S: with its tail). Throws Error when dims[0]
// is not a multiple of the block size, a dim is negative, there are more than
// MAX_DIMS dims, or the size overflows int64.
int64_t tensor_nbytes(uint32_t type, const std::vector<int64_t>& dims);

// ---- writer ---------------------------------------------------------------------------
class GgufWriter {
 public:
  // Key-value pairs are written in insertion order. A "general.alignment" KV (u32,
  // a nonzero multiple of 8) sets the alignment; set_alignment() adds/replaces it.
  void add_kv(const std::string& key, Value v);
  void set_alignment(uint32_t alignment);
  // Tensors, written in insertion order. The first overload copies `data`; the second
  // keeps the pointer, which must stay valid until write() returns.
  void add_tensor(const std::string& name, GgmlType type, const std::vector<int64_t>& dims,
                  const void* data, size_t nbytes);
  void add_tensor_ref(const std::string& name, GgmlType type, const std::vector<int64_t>& dims,
                      const void* data, size_t nbytes);
  // Writes `path` atomically: a uniquely named temp file beside it, created with O_EXCL |
  // O_NOFOLLOW, fsynced, renamed over `path`, then the directory fsynced; the temp file is
  // removed on error.
  void write(const std::string& path) const;

  uint32_t alignment() const { return alignment_; }

 private:
  struct KV {
    std::string key;
    Value value;
  };
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> dims;
    const uint8_t* data;
    size_t nbytes;
    std::shared_ptr<std::vector<uint8_t>> owned;
  };
  void check_tensor(const std::string& name, GgmlType type, const std::vector<int64_t>& dims,
                    size_t nbytes) const;
  std::vector<KV> kvs_;
  std::vector<Tensor> tensors_;
  uint32_t alignment_ = DEFAULT_ALIGNMENT;
};

// ---- reader ---------------------------------------------------------------------------
struct TensorInfo {
  std::string name;
  uint32_t type;              // a known ggml type id
  std::vector<int64_t> dims;  // GGUF order (fastest first)
  uint64_t offset;            // relative to the data section
  int64_t nbytes;
  const uint8_t* data;  // into the mapping; valid while the GgufFile lives
};

// Parsing limits a caller may lower (the fuzzer does, to keep each input cheap).
struct ReadLimits {
  uint64_t max_kv_count = MAX_KV_COUNT;
  uint64_t max_tensor_count = MAX_TENSOR_COUNT;
  uint64_t max_string_bytes = MAX_STRING_BYTES;
  uint64_t max_array_elements = MAX_ARRAY_ELEMENTS;
};

class GgufFile {
 public:
  // Maps `path` read-only and validates the whole header, metadata and tensor table.
  // Parsing takes time linear in the file's size; the parsed metadata at most
  // 2 x metadata_bytes() + METADATA_MEMORY_SLACK bytes of memory (else an Error).
  static std::unique_ptr<GgufFile> open(const std::string& path, const ReadLimits& limits = {});
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_start_; }  // absolute start of the data section
  // Bytes of the key-value section in the file, and the heap bytes its parsed form holds
  // (keys, values and the key index; counted as they are parsed).
  uint64_t metadata_bytes() const { return metadata_bytes_; }
  uint64_t metadata_memory() const { return metadata_memory_; }

  // Metadata in file order.
  const std::vector<std::pair<std::string, Value>>& kvs() const { return kvs_; }
  bool has(const std::string& key) const;
  const Value& get(const std::string& key) const;  // throws Error when missing
  // Typed lookups: throw Error naming the file and key when missing or mistyped.
  int64_t get_i64(const std::string& key) const;
  uint64_t get_u64(const std::string& key) const;
  uint32_t get_u32(const std::string& key) const;
  float get_f32(const std::string& key) const;
  double get_f64(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;
  std::vector<double> get_float_array(const std::string& key) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(const std::string& name) const;  // nullptr when absent
  const TensorInfo& tensor(const std::string& name) const;       // throws when absent

 private:
  GgufFile() = default;
  void parse(const ReadLimits& limits);
  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint32_t alignment_ = DEFAULT_ALIGNMENT;
  uint64_t data_start_ = 0;
  uint64_t metadata_bytes_ = 0;
  uint64_t metadata_memory_ = 0;
  std::vector<std::pair<std::string, Value>> kvs_;
  std::map<std::string, size_t> kv_index_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace gguf
}  // namespace nanochat
