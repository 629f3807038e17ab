// libFuzzer target gguf_open: GgufFile::open on any bytes, then every typed getter on every
// key and a read of every tensor's first and last byte. It must return a file or throw
// nanochat::Error; a crash, sanitizer report, hang or other exception is a finding.
// Seeds: tests/fuzz/corpus/gguf_open (tests/fuzz/make_corpus.py). Run: tools/fuzz.sh.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "gguf/gguf.h"

using namespace nanochat;
using namespace nanochat::gguf;

namespace {

template <class F>
void quietly(F&& f) {
  try {
    f();
  } catch (const Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<GgufFile> f;
  try {
    f = GgufFile::open(nanochat_fuzz::input_path(data, size));
  } catch (const Error&) {
    return 0;
  }
  volatile uint64_t sink = f->metadata_memory() + f->data_offset();
  for (const auto& kv : f->kvs()) {
    const std::string& key = kv.first;  // (clang 14: lambdas cannot capture a binding)
    const Value& v = kv.second;
    sink = sink + v.type_name().size();
    quietly([&] { sink = sink + uint64_t(f->get_i64(key)); });
    quietly([&] { sink = sink + f->get_u32(key); });
    quietly([&] { sink = sink + (f->get_f64(key) > 0.0); });
    quietly([&] { sink = sink + f->get_bool(key); });
    quietly([&] { sink = sink + f->get_string(key).size(); });
    quietly([&] { sink = sink + f->get_string_array(key).size(); });
    quietly([&] { sink = sink + f->get_int_array(key).size(); });
    quietly([&] { sink = sink + f->get_float_array(key).size(); });
    quietly([&] { sink = sink + uint64_t(v.int_at(v.count ? v.count - 1 : 0)); });
  }
  for (const TensorInfo& t : f->tensors())
    if (t.nbytes > 0) sink = sink + t.data[0] + t.data[t.nbytes - 1];
  (void)sink;
  return 0;
}
