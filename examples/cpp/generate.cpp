// Streams a completion from a nanochat GGUF model through the C++ API.
//   generate MODEL.gguf PROMPT [MAX_TOKENS] [TEMPERATURE]
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include <nanochat/nanochat.hpp>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.gguf PROMPT [MAX_TOKENS] [TEMPERATURE]\n", argv[0]);
    return 2;
  }
  try {
    auto model = nanochat::Model::load(argv[1]);
    const nanochat::ModelInfo& info = model->info();
    std::fprintf(stderr, "%s: %s, %d layers, d_model %d, vocab %d, %s weights\n", argv[1],
                 info.architecture.c_str(), info.n_layers, info.d_model, info.vocab_size,
                 info.weight_type.c_str());

    nanochat::SamplingParams sp;
    sp.max_tokens = argc > 3 ? std::atoi(argv[3]) : 64;
    sp.temperature = argc > 4 ? static_cast<float>(std::atof(argv[4])) : 0.0f;  // greedy

    std::vector<int32_t> prompt;
    if (info.add_bos) prompt.push_back(info.bos_id);
    for (int32_t t : model->tokenize(argv[2])) prompt.push_back(t);

    nanochat::Session session(model);
    std::cout << argv[2];
    nanochat::GenerateResult r =
        session.generate(prompt, sp, [](int32_t, const std::string& piece) {
          std::cout << piece << std::flush;
          return true;
        });
    std::cout << "\n";
    std::fprintf(stderr, "%zu tokens (%s), prefill %.1f tok/s, decode %.1f tok/s\n",
                 r.tokens.size(), r.stop_reason.c_str(),
                 r.prefill_seconds > 0 ? r.prompt_tokens / r.prefill_seconds : 0.0,
                 r.decode_seconds > 0 ? r.decode_steps / r.decode_seconds : 0.0);
    return 0;
  } catch (const nanochat::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
