// Token sampling: repetition penalty, temperature, top-k, top-p, seeded RNG. Plain C++17.
// Order: penalty; then argmax when temperature <= 0; else logits / temperature, top-k,
// top-p over the softmax of what is left, and one draw from the renormalized rest.
// Same seed, logits and history -> same token on every platform: the draw is
// mt19937_64 turned into a double by hand (no std:: distributions).
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace nanochat {

struct SamplerConfig {
  float temperature = 0.8f;         // <= 0: greedy (argmax; lowest id wins ties)
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float repetition_penalty = 1.0f;  // CTRL: logit > 0 ? logit / p : logit * p, once per distinct recent token
  int32_t repetition_window = 64;
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& cfg);  // throws nanochat::Error on bad values
  // Picks the next token from `logits` (n_vocab floats; modified in place) given the
  // tokens so far (prompt + generated; only the last repetition_window are used).
  int32_t sample(float* logits, int32_t n_vocab, const std::vector<int32_t>& history);

 private:
  SamplerConfig cfg_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;  // candidates: (logit, id)
  std::vector<double> weights_;                     // exp((logit - max) / temperature)
  std::vector<int32_t> recent_;                     // distinct ids of the penalty window
};

}  // namespace nanochat
