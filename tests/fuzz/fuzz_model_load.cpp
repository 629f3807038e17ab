// libFuzzer target model_load: Model::load on any bytes; a model that loads gets a session
// at the default context (capped: a file claiming 2^24 tokens must not allocate GBs; the
// KV cache is limited to 64 MiB here), tokenizes a prompt and generates two tokens. Every
// failure must be a nanochat::Error. Seeds: tests/fuzz/corpus/model_load, written by
// `nanochat_fuzz --write-seeds DIR` (tests/cpp/fuzz_model.cpp). Run: tools/fuzz.sh.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "nanochat/nanochat.hpp"

using namespace nanochat;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  set_num_threads(1);  // one execution at a time; no pool start-up per input
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::shared_ptr<const Model> model;
  try {
    model = Model::load(nanochat_fuzz::input_path(data, size));
  } catch (const Error&) {
    return 0;
  }
  try {
    Session s(model, 0, int64_t(64) << 20);
    std::vector<int32_t> prompt = model->tokenize("def f(x):\n  return x<|bos|>", true);
    if (prompt.empty()) prompt.push_back(0);
    SamplingParams p;
    p.max_tokens = 2;
    p.temperature = 0.0f;
    s.generate(prompt, p);
    (void)model->detokenize(prompt);
  } catch (const Error&) {
  }
  return 0;
}
