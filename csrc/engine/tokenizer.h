// Byte-level BPE (GPT-2 style) from a GGUF file's tokenizer.ggml.* metadata, equal token
// for token to the Python tokenizer (HF `tokenizers`, python/nanochat/tokenizer.py) and to
// llama.cpp with tokenizer.ggml.model = "gpt2", tokenizer.ggml.pre = "gpt-2".
//
// Pipeline: (optional) split out special-token strings; GPT-2 regex pre-tokenization
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// over Unicode code points (letter/number/whitespace classes from unicode_data.h);
// each piece's bytes mapped through GPT-2's bytes_to_unicode; BPE merges by rank.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace nanochat {

namespace gguf {
class GgufFile;
}

class BpeTokenizer {
 public:
  // tokens: vocabulary in byte-level form (as HF stores them, e.g. "Ġthe"); token_types:
  // ggml's (1 normal, 3 control, 4 user-defined, ...; empty = all normal); merges:
  // "left right" strings in rank order. Throws nanochat::Error on inconsistent input
  // (a merge whose parts or result are not in the vocabulary, duplicate tokens, a
  // byte with no token).
  BpeTokenizer(std::vector<std::string> tokens, std::vector<int32_t> token_types,
               const std::vector<std::string>& merges);
  // From tokenizer.ggml.{model,pre,tokens,token_type,merges}; model must be "gpt2" and
  // pre one this tokenizer implements ("gpt-2"). Errors name the file and key.
  static BpeTokenizer from_gguf(const gguf::GgufFile& file);

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  // parse_special: control/user-defined token strings in `text` become their ids.
  std::vector<int32_t> encode(const std::string& text, bool parse_special = false) const;
  // Raw bytes (may be invalid UTF-8 for a partial character); specials decode to "".
  std::string decode(const std::vector<int32_t>& ids) const;
  const std::string& token_bytes(int32_t id) const;  // throws on a bad id
  bool is_special(int32_t id) const;
  int32_t find(const std::string& token) const;  // id of a vocabulary entry (byte-level form), or -1

 private:
  // ... (implementation-defined)
  std::vector<std::string> tokens_;
};

}  // namespace nanochat
