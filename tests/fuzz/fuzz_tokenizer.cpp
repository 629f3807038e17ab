// libFuzzer target: the engine's BPE tokenizer (csrc/engine/tokenizer.cpp).
//
// Input: up to 4 lines before a "\n\n" become extra special tokens (control or
// user-defined by their first byte), the rest is text. Checks, on a small built-in
// vocabulary (byte symbols, merges that build runs and words, a few chat markers):
//   - encode without specials is lossless (decode gives the text back) and makes no special;
//   - encode with specials equals a brute-force leftmost-longest split around the specials,
//     each part encoded plainly;
//   - decode of arbitrary ids (the text's bytes as int32s) succeeds or throws nanochat::Error.
// A bad special list (duplicate, empty) must be a nanochat::Error from the constructor.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/tokenizer.h"
#include "../cpp/gpt2_bytes.h"
#include "nanochat/error.hpp"

using nanochat_test::byte_symbol;

namespace {

std::string byte_level(const std::string& raw) {
  std::string s;
  for (unsigned char c : raw) s += byte_symbol(c);
  return s;
}

struct Vocab {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges;
  Vocab() {
    for (int b = 0; b < 256; ++b) add(byte_symbol(b), 1);
    for (const char* u : {"a", " ", "7", "<", "\xff"}) {
      std::string run = u;
      for (int k = 0; k < 4; ++k, run += run) merge(run, run);
    }
    merge("h", "e");
    merge("l", "l");
    merge("he", "ll");
    merge(" ", "w");
    merge("o", "r");
    merge(" w", "or");
    merge("\xf0", "\x9f");
    for (const char* sp : {"<|bos|>", "<|user_start|>", "<|user_end|>", "<|im_end|>"}) add(sp, 3);
    add("<|bos|>!", 4);
  }
  void add(const std::string& t, int32_t type) {
    for (const auto& x : tokens)
      if (x == t) return;
    tokens.push_back(t);
    types.push_back(type);
  }
  void merge(const std::string& l, const std::string& r) {
    merges.push_back(byte_level(l) + " " + byte_level(r));
    add(byte_level(l + r), 1);
  }
};

const Vocab& base() {
  static const Vocab v;
  return v;
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_tokenizer: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  Vocab v = base();
  std::vector<std::string> extra;
  std::string text = in;
  const size_t sep = in.find("\n\n");
  if (sep != std::string::npos && sep < 200) {
    text = in.substr(sep + 2);
    size_t b = 0;
    while (b <= sep && extra.size() < 4) {
      size_t e = in.find('\n', b);
      if (e == std::string::npos || e > sep) e = sep;
      extra.push_back(in.substr(b, e - b));
      b = e + 1;
    }
  }
  for (const std::string& sp : extra) {
    v.tokens.push_back(sp);
    v.types.push_back(!sp.empty() && (sp[0] & 1) ? 4 : 3);
  }
  std::unique_ptr<nanochat::BpeTokenizer> tp;
  try {
    tp = std::make_unique<nanochat::BpeTokenizer>(v.tokens, v.types, v.merges);
  } catch (const nanochat::Error&) {
    return 0;  // a duplicate or empty special: refused with a message
  }
  const nanochat::BpeTokenizer& t = *tp;

  const std::vector<int32_t> plain = t.encode(text, false);
  for (int32_t id : plain)
    if (t.is_special(id)) fail("a special token from plain text");
  if (t.decode(plain) != text) fail("encode/decode without specials is not lossless");

  // Brute-force leftmost-longest over the special strings.
  std::vector<std::string> specials;
  for (int32_t id = 0; id < t.vocab_size(); ++id)
    if (t.is_special(id)) specials.push_back(v.tokens[size_t(id)]);
  std::vector<int32_t> want;
  size_t seg = 0;
  for (size_t i = 0; i < text.size();) {
    size_t best = 0;
    for (const std::string& sp : specials)
      if (sp.size() > best && text.compare(i, sp.size(), sp) == 0) best = sp.size();
    if (best == 0) {
      ++i;
      continue;
    }
    for (int32_t id : t.encode(text.substr(seg, i - seg), false)) want.push_back(id);
    want.push_back(t.find(text.substr(i, best)));
    i += best;
    seg = i;
  }
  for (int32_t id : t.encode(text.substr(seg), false)) want.push_back(id);
  if (t.encode(text, true) != want) fail("parse_special differs from leftmost-longest");

  std::vector<int32_t> ids(size / 4);
  if (!ids.empty()) std::memcpy(ids.data(), data, ids.size() * 4);
  try {
    (void)t.decode(ids);
  } catch (const nanochat::Error&) {
  }
  for (int32_t id : ids) {
    try {
      (void)t.token_bytes(id);
    } catch (const nanochat::Error&) {
    }
  }
  return 0;
}
