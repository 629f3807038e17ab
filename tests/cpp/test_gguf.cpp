// GGUF v3 writer/reader: round trips, every malformed case throws nanochat::Error,
// and random byte flips never crash (run under ASan + UBSan by .ci/run); Q8_0, the
// token embedding's block type, against ggml's reference bytes.
#include <gtest/gtest.h>

#include <unistd.h>

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "dense/dense.h"
#include "gguf/gguf.h"

using namespace nanochat;
using namespace nanochat::gguf;

namespace {

std::string temp_path(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/nanochat_test_" + name + "_" +
         std::to_string(::getpid()) + ".gguf";
}

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

void write_all(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name) : path(temp_path(name)) {}
  ~TempFile() { std::remove(path.c_str()); }
};

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

// A small valid file: a few KVs and two tensors.
std::vector<uint8_t> small_file(const std::string& path) {
  GgufWriter w;
  w.add_kv("general.architecture", Value::string("bitnet"));
  w.add_kv("n", Value::u32(7));
  w.add_kv("toks", Value::string_array({"a", "bc"}));
  w.add_kv("ids", Value::int_array(ValueType::I32, {1, -2}));
  const auto a = pattern(8, 1), b = pattern(66, 2);
  w.add_tensor("a", GgmlType::F32, {2}, a.data(), a.size());
  w.add_tensor("b", GgmlType::TQ2_0, {256}, b.data(), b.size());
  w.write(path);
  return read_all(path);
}

template <typename F>
void expect_error_containing(F fn, const std::string& needle) {
  try {
    fn();
    FAIL() << "expected nanochat::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Little-endian byte helpers to build malformed files by hand.
struct Bytes {
  std::vector<uint8_t> b;
  template <typename T>
  Bytes& pod(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof v);
    return *this;
  }
  Bytes& str(const std::string& s) {
    pod<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& pad(size_t align) {
    while (b.size() % align) b.push_back(0);
    return *this;
  }
  Bytes& zeros(size_t n) {
    b.insert(b.end(), n, 0);
    return *this;
  }
};

Bytes header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
  Bytes h;
  h.pod<uint32_t>(MAGIC).pod<uint32_t>(version).pod<uint64_t>(n_tensors).pod<uint64_t>(n_kv);
  return h;
}

// One tensor info + its data section.
Bytes one_tensor(uint32_t n_dims, std::vector<uint64_t> dims, uint32_t type, uint64_t offset,
                 size_t data_bytes) {
  Bytes f = header(1, 0);
  f.str("t").pod<uint32_t>(n_dims);
  for (uint64_t d : dims) f.pod<uint64_t>(d);
  f.pod<uint32_t>(type).pod<uint64_t>(offset).pad(32).zeros(data_bytes);
  return f;
}

}  // namespace

TEST(GgufTraits, BlockSizes) {
  EXPECT_EQ(type_traits(35).type_size, 66);
  EXPECT_EQ(tensor_nbytes(35, {512, 3}), 2 * 66 * 3);
  EXPECT_EQ(tensor_nbytes(36, {256, 3}), 256 * 3 / 4 + 32);  // I2_S: codes, then its tail
  EXPECT_THROW(tensor_nbytes(36, {64}), Error);
  EXPECT_EQ(tensor_nbytes(8, {64}), 68);
  EXPECT_EQ(tensor_nbytes(1, {3, 5}), 30);
  EXPECT_THROW(tensor_nbytes(35, {100}), Error);
  EXPECT_THROW(tensor_nbytes(99, {1}), Error);
  EXPECT_THROW(tensor_nbytes(0, {1 << 30, 1 << 30, 1 << 30, 1 << 30}), Error);  // overflow
}

TEST(Gguf, RoundTripEveryKvTypeAndTensorType) {
  TempFile tf("roundtrip");
  GgufWriter w;
  w.add_kv("u8", Value::u8(200));
  w.add_kv("i8", Value::i8(-100));
  w.add_kv("u16", Value::u16(60000));
  w.add_kv("i16", Value::i16(-30000));
  w.add_kv("u32", Value::u32(4000000000u));
  w.add_kv("i32", Value::i32(-2000000000));
  w.add_kv("f32", Value::f32(1.5f));
  w.add_kv("bool", Value::boolean(true));
  w.add_kv("string", Value::string("h\xC3\xA9llo"));
  w.add_kv("u64", Value::u64(18000000000000000000ull));
  w.add_kv("i64", Value::i64(-9000000000000000000ll));
  w.add_kv("f64", Value::f64(-2.25e300));
  w.add_kv("arr_str", Value::string_array({"", "x", "yz"}));
  w.add_kv("arr_i16", Value::int_array(ValueType::I16, {-1, 2, 32767}));
  w.add_kv("arr_f32", Value::float_array(ValueType::F32, {0.5, -1.0}));
  w.add_kv("arr_bool", Value::int_array(ValueType::BOOL, {1, 0}));
  w.add_kv("arr_empty", Value::int_array(ValueType::U8, {}));
  Value nested;
  nested.type = ValueType::ARRAY;
  nested.elem_type = ValueType::ARRAY;
  nested.count = 2;
  nested.items = {Value::int_array(ValueType::U8, {1, 2}), Value::string_array({"q"})};
  w.add_kv("nested", nested);
  w.set_alignment(64);

  const auto f32 = pattern(4 * 6, 1), f16 = pattern(2 * 3, 2), q8 = pattern(34 * 2, 3),
             tq1 = pattern(54 * 2, 4), tq2 = pattern(66 * 4, 5);
  w.add_tensor("f32", GgmlType::F32, {3, 2}, f32.data(), f32.size());
  w.add_tensor("f16", GgmlType::F16, {3}, f16.data(), f16.size());
  w.add_tensor_ref("q8", GgmlType::Q8_0, {64}, q8.data(), q8.size());
  w.add_tensor("tq1", GgmlType::TQ1_0, {256, 1, 2}, tq1.data(), tq1.size());
  w.add_tensor("tq2", GgmlType::TQ2_0, {512, 2, 1, 1}, tq2.data(), tq2.size());
  w.write(tf.path);

  auto f = GgufFile::open(tf.path);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->get_u64("u8"), 200u);
  EXPECT_EQ(f->get_i64("i8"), -100);
  EXPECT_EQ(f->get_u32("u16"), 60000u);
  EXPECT_EQ(f->get_i64("i16"), -30000);
  EXPECT_EQ(f->get_u32("u32"), 4000000000u);
  EXPECT_EQ(f->get_i64("i32"), -2000000000);
  EXPECT_EQ(f->get_f32("f32"), 1.5f);
  EXPECT_TRUE(f->get_bool("bool"));
  EXPECT_EQ(f->get_string("string"), "h\xC3\xA9llo");
  EXPECT_EQ(f->get_u64("u64"), 18000000000000000000ull);
  EXPECT_THROW(f->get_i64("u64"), Error);
  EXPECT_EQ(f->get_i64("i64"), -9000000000000000000ll);
  EXPECT_EQ(f->get_f64("f64"), -2.25e300);
  EXPECT_EQ(f->get_string_array("arr_str"), (std::vector<std::string>{"", "x", "yz"}));
  EXPECT_EQ(f->get_int_array("arr_i16"), (std::vector<int64_t>{-1, 2, 32767}));
  EXPECT_EQ(f->get_float_array("arr_f32"), (std::vector<double>{0.5, -1.0}));
  EXPECT_EQ(f->get_int_array("arr_bool"), (std::vector<int64_t>{1, 0}));
  EXPECT_TRUE(f->get_int_array("arr_empty").empty());
  const Value& n = f->get("nested");
  ASSERT_EQ(n.items.size(), 2u);
  EXPECT_EQ(n.items[0].as_int_array(), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(n.items[1].as_string_array(), (std::vector<std::string>{"q"}));
  EXPECT_EQ(f->get("arr_str").type_name(), "array[string]");
  EXPECT_EQ(f->kvs().front().first, "u8");  // file order kept

  // typed getters throw on missing keys and wrong types, naming file and key
  expect_error_containing([&] { f->get_u32("nope"); }, "'nope' not found");
  expect_error_containing([&] { f->get_string("u32"); }, "metadata 'u32'");
  expect_error_containing([&] { f->get_u32("i8"); }, "negative");
  expect_error_containing([&] { f->get_bool("u8"); }, tf.path);

  ASSERT_EQ(f->tensors().size(), 5u);
  struct Want {
    const char* name;
    uint32_t type;
    std::vector<int64_t> dims;
    const std::vector<uint8_t>* bytes;
  } want[] = {{"f32", 0, {3, 2}, &f32},           {"f16", 1, {3}, &f16},
              {"q8", 8, {64}, &q8},               {"tq1", 34, {256, 1, 2}, &tq1},
              {"tq2", 35, {512, 2, 1, 1}, &tq2}};
  for (size_t i = 0; i < 5; ++i) {
    const TensorInfo& t = f->tensors()[i];
    EXPECT_EQ(t.name, want[i].name);
    EXPECT_EQ(t.type, want[i].type);
    EXPECT_EQ(t.dims, want[i].dims);
    EXPECT_EQ(t.offset % 64, 0u);
    EXPECT_EQ((f->data_offset() + t.offset) % 64, 0u);
    ASSERT_EQ(static_cast<size_t>(t.nbytes), want[i].bytes->size());
    EXPECT_EQ(0, std::memcmp(t.data, want[i].bytes->data(), want[i].bytes->size()));
  }
  EXPECT_EQ(&f->tensor("tq2"), &f->tensors()[4]);
  EXPECT_EQ(f->find_tensor("missing"), nullptr);
  EXPECT_THROW(f->tensor("missing"), Error);
}

TEST(Gguf, DefaultAlignmentNotWritten) {
  TempFile tf("defalign");
  small_file(tf.path);
  auto f = GgufFile::open(tf.path);
  EXPECT_FALSE(f->has("general.alignment"));
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->data_offset() % 32, 0u);
  EXPECT_EQ(f->tensors()[1].offset, 32u);  // 8 bytes padded to 32
}

TEST(GgufWriter, Validates) {
  GgufWriter w;
  w.add_kv("k", Value::u8(1));
  EXPECT_THROW(w.add_kv("k", Value::u8(2)), Error);
  EXPECT_THROW(w.add_kv("general.alignment", Value::u64(32)), Error);
  EXPECT_THROW(w.set_alignment(12), Error);
  EXPECT_THROW(Value::integer(ValueType::U8, 256), Error);
  EXPECT_THROW(Value::int_array(ValueType::I8, {200}), Error);
  std::vector<uint8_t> d(66);
  w.add_tensor("t", GgmlType::TQ2_0, {256}, d.data(), d.size());
  EXPECT_THROW(w.add_tensor("t", GgmlType::TQ2_0, {256}, d.data(), d.size()), Error);  // dup
  EXPECT_THROW(w.add_tensor("u", GgmlType::TQ2_0, {128}, d.data(), 33), Error);  // row length
  EXPECT_THROW(w.add_tensor("u", GgmlType::TQ2_0, {256}, d.data(), 65), Error);  // byte size
  EXPECT_THROW(w.add_tensor("u", GgmlType::F32, {1, 1, 1, 1, 1}, d.data(), 4), Error);
  EXPECT_THROW(w.add_tensor("u", static_cast<GgmlType>(99), {1}, d.data(), 4), Error);
  // a failed write leaves neither the file nor the temp file behind
  const std::string bad = "/nonexistent_dir_nanochat/x.gguf";
  EXPECT_THROW(w.write(bad), Error);
}

TEST(GgufWriter, AtomicReplace) {
  TempFile tf("atomic");
  small_file(tf.path);
  GgufWriter w;
  w.add_kv("x", Value::u8(1));
  w.write(tf.path);
  auto f = GgufFile::open(tf.path);
  EXPECT_EQ(f->kvs().size(), 1u);
  EXPECT_EQ(f->tensors().size(), 0u);
  std::ifstream tmp(tf.path + ".tmp");
  EXPECT_FALSE(tmp.good());
}

TEST(GgufWriter, NeverFollowsAPlantedTempSymlink) {
  // The old writer opened a fixed `path.tmp` with fopen: a symlink planted there made it
  // overwrite the link's target, and two exports of one path shared that file.
  TempFile tf("planted"), victim("victim");
  write_all(victim.path, {'k', 'e', 'e', 'p'});
  const std::string planted = tf.path + ".tmp";
  ASSERT_EQ(::symlink(victim.path.c_str(), planted.c_str()), 0);
  GgufWriter w;
  w.add_kv("x", Value::u8(1));
  w.write(tf.path);
  EXPECT_EQ(read_all(victim.path), (std::vector<uint8_t>{'k', 'e', 'e', 'p'}));
  EXPECT_EQ(GgufFile::open(tf.path)->kvs().size(), 1u);
  ::unlink(planted.c_str());
}

TEST(GgufReader, EveryTruncationThrows) {
  TempFile tf("trunc");
  const auto full = small_file(tf.path);
  ASSERT_NO_THROW(GgufFile::open(tf.path));
  // The last tensor's data ends before the final padding: lengths from there on are valid.
  size_t min_valid = full.size();
  {
    auto f = GgufFile::open(tf.path);
    const TensorInfo& t = f->tensors().back();
    min_valid = f->data_offset() + t.offset + t.nbytes;
  }
  for (size_t n = 0; n < full.size(); ++n) {
    write_all(tf.path, std::vector<uint8_t>(full.begin(), full.begin() + n));
    if (n < min_valid)
      EXPECT_THROW(GgufFile::open(tf.path), Error) << "truncated to " << n << " bytes";
    else
      EXPECT_NO_THROW(GgufFile::open(tf.path)) << "truncated to " << n << " bytes";
  }
}

TEST(GgufReader, MalformedFilesThrow) {
  TempFile tf("bad");
  auto expect_bad = [&](const Bytes& b, const std::string& needle) {
    write_all(tf.path, b.b);
    expect_error_containing([&] { GgufFile::open(tf.path); }, needle);
    expect_error_containing([&] { GgufFile::open(tf.path); }, tf.path);
  };
  // sanity: the hand-built valid file opens
  write_all(tf.path, one_tensor(1, {4}, 0, 0, 16).b);
  EXPECT_NO_THROW(GgufFile::open(tf.path));

  Bytes magic;
  magic.pod<uint32_t>(0x46554746).pod<uint32_t>(3).pod<uint64_t>(0).pod<uint64_t>(0);
  expect_bad(magic, "not a GGUF file");
  expect_bad(header(0, 0, 2), "unsupported GGUF version 2");
  expect_bad(header(0, 0, 4), "only version 3");
  expect_error_containing([] { GgufFile::open("/nonexistent_nanochat.gguf"); }, "cannot open");

  Bytes huge_str = header(0, 1);
  huge_str.pod<uint64_t>(~uint64_t(0) - 3).zeros(16);
  expect_bad(huge_str, "extends past end of file");
  Bytes huge_val = header(0, 1);
  huge_val.str("k").pod<uint32_t>(8).pod<uint64_t>(uint64_t(1) << 62);
  expect_bad(huge_val, "extends past end of file");
  Bytes huge_arr = header(0, 1);
  huge_arr.str("k").pod<uint32_t>(9).pod<uint32_t>(8).pod<uint64_t>(uint64_t(1) << 60).zeros(64);
  expect_bad(huge_arr, "cannot fit");
  Bytes bad_elem = header(0, 1);
  bad_elem.str("k").pod<uint32_t>(9).pod<uint32_t>(13).pod<uint64_t>(1).zeros(8);
  expect_bad(bad_elem, "unknown value type 13");
  Bytes bad_type = header(0, 1);
  bad_type.str("k").pod<uint32_t>(77).zeros(8);
  expect_bad(bad_type, "unknown value type 77");
  Bytes dup = header(0, 2);
  dup.str("k").pod<uint32_t>(0).pod<uint8_t>(1).str("k").pod<uint32_t>(0).pod<uint8_t>(2);
  expect_bad(dup, "duplicate metadata key 'k'");
  Bytes deep = header(0, 1);
  deep.str("k").pod<uint32_t>(9);
  for (int i = 0; i < 20; ++i) deep.pod<uint32_t>(9).pod<uint64_t>(1);
  deep.zeros(64);
  expect_bad(deep, "nested deeper");
  Bytes bad_align = header(0, 1);
  bad_align.str("general.alignment").pod<uint32_t>(4).pod<uint32_t>(12);
  expect_bad(bad_align, "general.alignment 12");

  expect_bad(header(~uint64_t(0), 0), "tensor count");
  expect_bad(header(0, ~uint64_t(0) / 2), "metadata count");
  expect_bad(one_tensor(5, {1, 1, 1, 1, 1}, 0, 0, 64), "n_dims 5");
  expect_bad(one_tensor(0, {}, 0, 0, 64), "n_dims 0");
  expect_bad(one_tensor(1, {4}, 99, 0, 64), "unknown ggml tensor type 99");
  expect_bad(one_tensor(1, {4}, 0, 8, 64), "not a multiple of the alignment");
  expect_bad(one_tensor(1, {4}, 0, 0, 8), "extends past end of file");
  expect_bad(one_tensor(1, {4}, 0, uint64_t(1) << 63, 16), "extends past end of file");
  expect_bad(one_tensor(1, {100}, 35, 0, 64), "block size");
  expect_bad(one_tensor(2, {uint64_t(1) << 40, uint64_t(1) << 40}, 0, 0, 64), "overflow");
  expect_bad(one_tensor(1, {~uint64_t(0)}, 0, 0, 64), "too large");
}

TEST(GgufReader, RandomByteFlipsNeverCrash) {
  TempFile src("fuzzsrc"), tf("fuzz");
  const auto full = small_file(src.path);
  std::mt19937 rng(1234);
  int opened = 0, rejected = 0;
  for (int it = 0; it < 3000; ++it) {
    auto b = full;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      const size_t pos = rng() % b.size();
      if (rng() % 2)
        b[pos] ^= static_cast<uint8_t>(1u << (rng() % 8));
      else
        b[pos] = static_cast<uint8_t>(rng());
    }
    write_all(tf.path, b);
    try {
      auto f = GgufFile::open(tf.path);
      // touch everything the reader hands out
      uint64_t sum = 0;
      for (const auto& t : f->tensors())
        for (int64_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
      for (const auto& kv : f->kvs()) sum += kv.first.size() + kv.second.type_name().size();
      (void)sum;
      ++opened;
    } catch (const Error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(opened, 0);
}

// ---- Q8_0 (token embedding): ggml's quantize_row_q8_0_ref, byte for byte ----------
// Expected bytes below come from gguf.quants.quantize(..., Q8_0) (gguf-py 0.19);
// tests/test_export.py compares random tensors with it as well.

namespace {

std::vector<uint8_t> q8(const std::vector<float>& x, int64_t rows) {
  std::vector<uint8_t> out(x.size() / 32 * 34, 0xAB);
  q8_0_quantize(x.data(), rows, static_cast<int64_t>(x.size()) / rows, out.data());
  return out;
}

uint16_t block_d(const std::vector<uint8_t>& b, size_t block) {
  uint16_t d;
  std::memcpy(&d, b.data() + block * 34, 2);
  return d;
}

int8_t block_q(const std::vector<uint8_t>& b, size_t block, size_t j) {
  return static_cast<int8_t>(b[block * 34 + 2 + j]);
}

}  // namespace

TEST(Q8_0, RoundsHalfAwayFromZero) {
  // amax 127 -> d = 1, id = 1: q = roundf(x); nearest-even would give 0, -0, 2, -2, 2.
  std::vector<float> x(32, 0.0f);
  const float v[] = {127.0f, -127.0f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, std::nextafter(2.5f, 0.0f)};
  std::copy(std::begin(v), std::end(v), x.begin());
  const auto b = q8(x, 1);
  EXPECT_EQ(block_d(b, 0), 0x3C00);  // fp16(1.0)
  const int8_t want[] = {127, -127, 1, -1, 2, -2, 3, 2};
  for (size_t j = 0; j < 8; ++j) EXPECT_EQ(block_q(b, 0, j), want[j]) << j;
  for (size_t j = 8; j < 32; ++j) EXPECT_EQ(block_q(b, 0, j), 0) << j;
}

TEST(Q8_0, MultipliesByTheReciprocalAsGgml) {
  // x * (1/d) and x / d land on different sides of .5 for these values (found by search
  // against gguf.quants): 104 vs 103 for x[1].
  std::vector<float> x(32, 0.0f);
  x[0] = 0x1.de7f86p+0f;   // amax
  x[1] = 0x1.85f506p+0f;   // x[1] / d rounds to 103, x[1] * (1/d) to 104
  x[2] = -0x1.85f506p+0f;
  x[3] = 0x1.d6ddb4p-2f;
  const auto b = q8(x, 1);
  EXPECT_EQ(block_d(b, 0), 0x2389);
  EXPECT_EQ(block_q(b, 0, 0), 127);
  EXPECT_EQ(block_q(b, 0, 1), 104);
  EXPECT_EQ(block_q(b, 0, 2), -104);
  EXPECT_EQ(block_q(b, 0, 3), 31);
}

TEST(Q8_0, AllZeroAndTinyBlocks) {
  std::vector<float> x(96, 0.0f);
  x[5] = -0.0f;
  x[32 + 3] = 1e-39f;   // subnormal: 1/d overflows; q = 0 (fp16 d is 0 anyway)
  x[32 + 4] = -1e-39f;
  x[64 + 7] = -2.0f;    // a normal block after them is unaffected
  const auto b = q8(x, 1);
  for (size_t blk = 0; blk < 2; ++blk) {
    EXPECT_EQ(block_d(b, blk), 0) << blk;
    for (size_t j = 0; j < 32; ++j) EXPECT_EQ(block_q(b, blk, j), 0) << blk << " " << j;
  }
  EXPECT_EQ(block_q(b, 2, 7), -127);
  std::vector<float> back(96, 1.0f);
  q8_0_dequantize(b.data(), 1, 96, back.data());
  for (size_t i = 0; i < 96; ++i)
    EXPECT_EQ(back[i], i == 64 + 7 ? fp16_to_fp32(block_d(b, 2)) * -127.0f : 0.0f) << i;
}

TEST(Q8_0, RandomRowsRoundTripWithinHalfAStep) {
  std::mt19937 rng(7);
  const int64_t rows = 5, cols = 96;
  std::vector<float> x(rows * cols);
  std::normal_distribution<float> n(0.0f, 0.05f);
  for (auto& v : x) v = n(rng);
  const auto b = q8(x, rows);
  ASSERT_EQ(b.size(), static_cast<size_t>(rows * cols / 32 * 34));
  std::vector<float> back(x.size());
  q8_0_dequantize(b.data(), rows, cols, back.data());
  for (int64_t blk = 0; blk < rows * cols / 32; ++blk) {
    float amax = 0.0f;
    int qmax = 0;
    for (int64_t j = 0; j < 32; ++j) {
      amax = std::max(amax, std::fabs(x[blk * 32 + j]));
      qmax = std::max(qmax, std::abs(int(block_q(b, blk, j))));
    }
    EXPECT_EQ(block_d(b, blk), fp32_to_fp16(amax / 127.0f));
    EXPECT_EQ(qmax, 127);  // the block's absmax maps to +-127
    const float d = fp16_to_fp32(block_d(b, blk));
    for (int64_t j = 0; j < 32; ++j) {
      const size_t i = static_cast<size_t>(blk * 32 + j);
      EXPECT_EQ(back[i], d * block_q(b, blk, j));
      // half a step of the fp32 d, plus fp16's relative error on d times |q| <= 127
      EXPECT_NEAR(back[i], x[i], 0.5f * amax / 127.0f + 127.0f * d / 1024.0f) << i;
    }
  }
}

TEST(Q8_0, BadInputThrows) {
  std::vector<float> x(64, 1.0f);
  std::vector<uint8_t> out(68);
  expect_error_containing([&] { q8_0_quantize(x.data(), 1, 48, out.data()); },
                          "not a multiple of the 32-weight Q8_0 block");
  expect_error_containing([&] { q8_0_dequantize(out.data(), 2, 33, x.data()); },
                          "q8_0_dequantize: row length 33");
  expect_error_containing([&] { q8_0_quantize(x.data(), -1, 32, out.data()); }, "negative");
  expect_error_containing([&] { q8_0_quantize(nullptr, 1, 32, out.data()); }, "null");
  x[40] = std::numeric_limits<float>::quiet_NaN();
  expect_error_containing([&] { q8_0_quantize(x.data(), 2, 32, out.data()); },
                          "non-finite value at row 1, column 8");
  x[40] = -std::numeric_limits<float>::infinity();
  EXPECT_THROW(q8_0_quantize(x.data(), 1, 64, out.data()), Error);
  q8_0_quantize(x.data(), 0, 64, out.data());  // empty is fine
}

// ---- limits: time linear in the file, memory within 2x its metadata -----------------------

namespace {

// Heap bytes in use (glibc). ASan's allocator reports none, so the measured check is skipped
// there; the reader's own count (metadata_memory) is checked everywhere.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kHeapMeasurable = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kHeapMeasurable = false;
#else
constexpr bool kHeapMeasurable = true;
#endif
#else
constexpr bool kHeapMeasurable = true;
#endif
size_t heap_in_use() {
  const struct mallinfo2 m = ::mallinfo2();
  return m.uordblks + m.hblkhd;
}

// Adversarial metadata of about n bytes, by shape.
Bytes adversarial(const std::string& shape, size_t n) {
  if (shape == "long key, many strings") {  // the quadratic case: key and elements grow
    Bytes f = header(0, 1);
    const size_t key = std::min<size_t>(n / 2, size_t(MAX_KEY_BYTES));
    f.str(std::string(key, 'k')).pod<uint32_t>(9).pod<uint32_t>(8);
    const uint64_t count = (n - key) / 8;
    f.pod<uint64_t>(count);
    for (uint64_t i = 0; i < count; ++i) f.pod<uint64_t>(0);
    return f;
  }
  if (shape == "short strings") {  // a tokenizer's shape: 1..7-byte strings
    Bytes f = header(0, 1);
    f.str("tokenizer.ggml.tokens").pod<uint32_t>(9).pod<uint32_t>(8);
    const uint64_t count = n / 12;
    f.pod<uint64_t>(count);
    for (uint64_t i = 0; i < count; ++i) f.str(std::string(1 + i % 7, char('a' + i % 26)));
    return f;
  }
  if (shape == "nested arrays") {  // empty arrays of u8 inside one array
    Bytes f = header(0, 1);
    f.str("nested").pod<uint32_t>(9).pod<uint32_t>(9);
    const uint64_t count = n / 12;
    f.pod<uint64_t>(count);
    for (uint64_t i = 0; i < count; ++i) f.pod<uint32_t>(0).pod<uint64_t>(0);
    return f;
  }
  // "many keys": u8 values under distinct 8-byte keys
  const uint64_t count = n / 21;
  Bytes f = header(0, count);
  for (uint64_t i = 0; i < count; ++i) {
    char key[9];
    std::snprintf(key, sizeof key, "%08llx", static_cast<unsigned long long>(i));
    f.str(key).pod<uint32_t>(0).pod<uint8_t>(1);
  }
  return f;
}

}  // namespace

// A GGUF of N bytes parses (or is refused) in time linear in N and, parsed, takes at most
// 2N (+ a fixed slack) of memory. The old reader rebuilt "key[i]" for every element: 2 s
// for a 768 KiB file with a 384 KiB key, and held 32+ bytes per 8-byte empty string.
TEST(GgufLimits, LinearTimeAndBoundedMemory) {
  TempFile tf("limits");
  for (const std::string shape :
       {"long key, many strings", "short strings", "nested arrays", "many keys"}) {
    double seconds[2] = {0, 0};
    const size_t sizes[2] = {size_t(256) << 10, size_t(2) << 20};  // N and 8N
    for (int k = 0; k < 2; ++k) {
      const Bytes b = adversarial(shape, sizes[k]);
      write_all(tf.path, b.b);
      double best = 1e9;
      for (int rep = 0; rep < 3; ++rep) {  // best of 3: a shared machine's noise
        const size_t heap0 = heap_in_use();
        const auto t0 = std::chrono::steady_clock::now();
        std::unique_ptr<GgufFile> f;
        std::string error;
        try {
          f = GgufFile::open(tf.path);
        } catch (const Error& e) {
          error = e.what();
        }
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                                  .count());
        const double allowed = 2.0 * double(b.b.size()) + double(METADATA_MEMORY_SLACK);
        if (f) {
          EXPECT_LE(double(f->metadata_memory()), allowed) << shape;
          EXPECT_LE(f->metadata_bytes(), b.b.size());
          if (kHeapMeasurable) {  // what the heap really holds, the index and vectors included
            const double held = double(heap_in_use() - heap0);
            EXPECT_LE(held, allowed) << shape << ": " << held << " bytes for a "
                                     << b.b.size() << "-byte file";
          }
        } else {
          EXPECT_NE(error.find(tf.path), std::string::npos) << error;
          EXPECT_TRUE(error.find("limit") != std::string::npos ||
                      error.find("memory") != std::string::npos)
              << shape << ": " << error;
        }
      }
      seconds[k] = best;
    }
    // 8x the bytes: at most 8x the time, with a factor 3 (and 20 ms) for noise.
    EXPECT_LE(seconds[1], 3.0 * 8.0 * seconds[0] + 0.02)
        << shape << ": " << seconds[0] << " s for N, " << seconds[1] << " s for 8N";
    EXPECT_LT(seconds[1], 2.0) << shape;
  }
}

TEST(GgufLimits, CountsAndLengthsAreCapped) {
  TempFile tf("caps");
  auto expect_bad = [&](const Bytes& b, const std::string& needle, const ReadLimits& lim) {
    write_all(tf.path, b.b);
    expect_error_containing([&] { GgufFile::open(tf.path, lim); }, needle);
    expect_error_containing([&] { GgufFile::open(tf.path, lim); }, tf.path);
  };
  Bytes key = header(0, 1);
  key.str(std::string(MAX_KEY_BYTES + 1, 'k')).pod<uint32_t>(0).pod<uint8_t>(1);
  expect_bad(key, "exceeds the limit of 65536 bytes", {});
  Bytes kvs = header(0, 3);
  for (const char* k : {"a", "b", "c"}) kvs.str(k).pod<uint32_t>(0).pod<uint8_t>(1);
  ReadLimits lim;
  lim.max_kv_count = 2;
  expect_bad(kvs, "metadata count 3 exceeds the limit of 2", lim);
  Bytes arr = header(0, 1);
  arr.str("a").pod<uint32_t>(9).pod<uint32_t>(0).pod<uint64_t>(5).zeros(5);
  lim = {};
  lim.max_array_elements = 4;
  expect_bad(arr, "array of 5 elements exceeds the limit of 4", lim);
  lim = {};
  lim.max_string_bytes = 3;
  Bytes s = header(0, 1);
  s.str("a").pod<uint32_t>(8).str("four");
  expect_bad(s, "metadata 'a': string length 4 exceeds the limit of 3", lim);
  // An error inside an array names the key and the element, built only when thrown.
  Bytes bad_bool = header(0, 1);
  bad_bool.str("flags").pod<uint32_t>(9).pod<uint32_t>(7).pod<uint64_t>(3);
  bad_bool.pod<uint8_t>(1).pod<uint8_t>(0).pod<uint8_t>(2);
  expect_bad(bad_bool, "metadata 'flags'[2]: bool value is not 0 or 1", {});
}

TEST(GgufReader, OverlappingTensorsThrow) {
  TempFile tf("overlap");
  auto two = [](uint64_t off_a, uint64_t off_b) {
    Bytes f = header(2, 0);
    f.str("a").pod<uint32_t>(1).pod<uint64_t>(16).pod<uint32_t>(0).pod<uint64_t>(off_a);
    f.str("b").pod<uint32_t>(1).pod<uint64_t>(16).pod<uint32_t>(0).pod<uint64_t>(off_b);
    f.pad(32).zeros(256);
    return f;
  };
  write_all(tf.path, two(0, 64).b);  // 64 bytes each, back to back: fine
  EXPECT_NO_THROW(GgufFile::open(tf.path));
  write_all(tf.path, two(0, 32).b);  // b starts inside a
  expect_error_containing([&] { GgufFile::open(tf.path); }, "tensor 'b' data at offset 32 overlaps tensor 'a' [0, 64)");
  write_all(tf.path, two(96, 64).b);  // a starts inside b (file order does not matter)
  expect_error_containing([&] { GgufFile::open(tf.path); }, "overlaps tensor 'b'");
  write_all(tf.path, two(0, 0).b);  // the same bytes
  expect_error_containing([&] { GgufFile::open(tf.path); }, "overlaps");
}
