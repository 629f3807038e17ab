// Sampler: see sampler.h for the order of the steps. Non-finite logits: NaN counts as
// -inf (never drawn); when the largest logit is +inf the lowest id holding it is taken
// (the limit of the softmax puts all mass there); all -inf/NaN is an error.
#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "nanochat/error.hpp"

namespace nanochat {

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float clean(float x) { return std::isnan(x) ? NEG_INF : x; }

// Higher logit first, lower id on ties: a strict total order, so top-k and top-p cut
// at the same tokens everywhere.
inline bool before(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first != b.first ? a.first > b.first : a.second < b.second;
}

std::string num(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  return buf;
}

}  // namespace

Sampler::Sampler(const SamplerConfig& cfg) : cfg_(cfg), rng_(cfg.seed) {
  if (std::isnan(cfg.temperature) || std::isinf(cfg.temperature))
    throw Error("sampler: temperature must be a finite number, got " + num(cfg.temperature));
  if (cfg.top_k < 0)
    throw Error("sampler: top_k must be >= 0 (0 = off), got " + std::to_string(cfg.top_k));
  if (!(cfg.top_p > 0.0f && cfg.top_p <= 1.0f))
    throw Error("sampler: top_p must be in (0, 1] (1 = off), got " + num(cfg.top_p));
  if (!(cfg.repetition_penalty > 0.0f) || std::isinf(cfg.repetition_penalty))
    throw Error("sampler: repetition_penalty must be > 0 and finite (1 = off), got " +
                num(cfg.repetition_penalty));
  if (cfg.repetition_window < 0)
    throw Error("sampler: repetition_window must be >= 0, got " +
                std::to_string(cfg.repetition_window));
}

int32_t Sampler::sample(float* logits, int32_t n_vocab, const std::vector<int32_t>& history) {
  if (n_vocab <= 0) throw Error("sampler: n_vocab must be > 0, got " + std::to_string(n_vocab));
  if (logits == nullptr) throw Error("sampler: logits is null");

  // CTRL repetition penalty, once per distinct token of the window.
  if (cfg_.repetition_penalty != 1.0f && cfg_.repetition_window > 0 && !history.empty()) {
    const size_t w = std::min(history.size(), static_cast<size_t>(cfg_.repetition_window));
    recent_.assign(history.end() - static_cast<std::ptrdiff_t>(w), history.end());
    std::sort(recent_.begin(), recent_.end());
    recent_.erase(std::unique(recent_.begin(), recent_.end()), recent_.end());
    for (int32_t id : recent_) {
      if (id < 0 || id >= n_vocab)
        throw Error("sampler: history token " + std::to_string(id) + " out of range [0, " +
                    std::to_string(n_vocab) + ")");
      float& x = logits[id];
      x = x > 0.0f ? x / cfg_.repetition_penalty : x * cfg_.repetition_penalty;
    }
  }

  // Greedy, and the max every softmax subtracts.
  int32_t best = -1;
  for (int32_t i = 0; i < n_vocab; ++i) {
    const float x = clean(logits[i]);
    if (best < 0 ? x > NEG_INF : x > logits[best]) best = i;
  }
  if (cfg_.temperature <= 0.0f) {
    if (best < 0) {  // every logit -inf or NaN: the lowest non-NaN id, as argmax would
      for (int32_t i = 0; i < n_vocab; ++i)
        if (!std::isnan(logits[i])) return i;
      throw Error("sampler: every logit is NaN");
    }
    return best;
  }
  if (best < 0) throw Error("sampler: no finite logit (all -inf or NaN)");
  const float mx = logits[best];
  if (std::isinf(mx)) return best;  // +inf: all the probability mass
  const double inv_t = 1.0 / static_cast<double>(cfg_.temperature);
  auto weight = [&](float x) { return std::exp((static_cast<double>(x) - mx) * inv_t); };
  // u in [0, 1) from the top 53 bits: the same double on every platform.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;

  const bool use_k = cfg_.top_k > 0 && cfg_.top_k < n_vocab;
  const bool use_p = cfg_.top_p < 1.0f;
  if (!use_k && !use_p) {  // plain softmax over the whole vocabulary: no sorting
    weights_.resize(static_cast<size_t>(n_vocab));
    double total = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) total += weights_[i] = weight(clean(logits[i]));
    const double target = u * total;
    double acc = 0.0;
    int32_t last = best;
    for (int32_t i = 0; i < n_vocab; ++i) {
      if (weights_[i] <= 0.0) continue;
      acc += weights_[i];
      last = i;
      if (target < acc) return i;
    }
    return last;  // rounding left target >= acc: the last token with mass
  }

  scratch_.resize(static_cast<size_t>(n_vocab));
  for (int32_t i = 0; i < n_vocab; ++i) scratch_[i] = {clean(logits[i]), i};
  size_t n = scratch_.size();
  double total = 0.0;
  weights_.clear();
  if (use_k) {
    n = static_cast<size_t>(cfg_.top_k);
    std::nth_element(scratch_.begin(), scratch_.begin() + (n - 1), scratch_.end(), before);
    scratch_.resize(n);
    // nth_element leaves an order each standard library picks; sums and the draw below
    // must run in one canonical order.
    std::sort(scratch_.begin(), scratch_.end(), before);
    for (size_t i = 0; i < n; ++i) total += weight(scratch_[i].first);
  } else {  // top-p alone: each token's weight once, summed in id order
    weights_.resize(n);
    for (size_t i = 0; i < n; ++i) total += weights_[i] = weight(scratch_[i].first);
  }
  // Weight of the candidate now at position i of scratch_.
  auto weight_at = [&](size_t i) {
    return use_k ? weight(scratch_[i].first) : weights_[static_cast<size_t>(scratch_[i].second)];
  };

  // The nucleus: sort only as far as needed, in growing chunks from the top (select the
  // next chunk with nth_element, sort just that chunk).
  size_t keep = n;
  double kept = total;
  if (use_p) {
    const double need = static_cast<double>(cfg_.top_p) * total;
    size_t sorted = 0, upto = std::min<size_t>(n, 64);
    keep = 0;
    kept = 0.0;
    while (keep == 0) {
      auto first = scratch_.begin() + static_cast<std::ptrdiff_t>(sorted);
      auto stop = scratch_.begin() + static_cast<std::ptrdiff_t>(upto);
      if (upto < scratch_.size()) std::nth_element(first, stop - 1, scratch_.end(), before);
      std::sort(first, stop, before);
      for (size_t i = sorted; i < upto; ++i) {
        kept += weight_at(i);
        if (kept >= need) {
          keep = i + 1;
          break;
        }
      }
      if (keep == 0 && upto == n) keep = n;  // rounding: the whole set
      sorted = upto;
      upto = std::min(n, upto * 4);
    }
  }

  const double target = u * kept;
  double acc = 0.0;
  int32_t last = scratch_[0].second;
  for (size_t i = 0; i < keep; ++i) {
    const double w = weight_at(i);
    if (w <= 0.0) continue;
    acc += w;
    last = scratch_[i].second;
    if (target < acc) return last;
  }
  return last;
}

}  // namespace nanochat
