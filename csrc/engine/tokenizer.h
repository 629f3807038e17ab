// Byte-level BPE (GPT-2 style) from a GGUF file's tokenizer.ggml.* metadata, equal token
// for token to the Python tokenizer (HF `tokenizers`, python/nanochat/data/tokenizer.py) and to
// llama.cpp with tokenizer.ggml.model = "gpt2", tokenizer.ggml.pre = "gpt-2".
//
// Pipeline: (optional) split out special-token strings; GPT-2 regex pre-tokenization
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// over Unicode code points (letter/number/whitespace classes from unicode_data.h);
// each piece's bytes mapped through GPT-2's bytes_to_unicode; BPE merges by rank.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
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
  // pre one this tokenizer implements: "gpt-2", or "llama-bpe" (LLaMA-3's split regex and
  // its ignore_merges: a piece that is a normal token encodes to it). Errors name the file
  // and key.
  static BpeTokenizer from_gguf(const gguf::GgufFile& file);

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  // parse_special: control/user-defined token strings in `text` become their ids.
  std::vector<int32_t> encode(const std::string& text, bool parse_special = false) const;
  // Raw bytes (may be invalid UTF-8 for a partial character); specials decode to "".
  // (Precisely, as llama.cpp: control, unknown and unused tokens decode to "", a
  // user-defined token to its text as stored, the others through bytes_to_unicode.)
  std::string decode(const std::vector<int32_t>& ids) const;
  const std::string& token_bytes(int32_t id) const;  // throws on a bad id
  bool is_special(int32_t id) const;  // control or user-defined (what parse_special finds)
  int32_t find(const std::string& token) const;  // id of a vocabulary entry (byte-level form), or -1

  // ---- extra helpers (not used by the engine) ----
  int32_t token_type(int32_t id) const;  // throws on a bad id
  // GPT-2 pre-tokenization of `text`: the [begin, end) byte ranges of its pieces, in order,
  // covering the text. Invalid UTF-8: each byte that does not start a valid sequence is
  // one "other" character (so it groups with punctuation) and keeps its byte value, so
  // encode/decode stay lossless. (llama.cpp replaces it with U+FFFD: same split, other
  // bytes; HF only ever sees valid text.)
  static std::vector<std::pair<size_t, size_t>> pre_tokenize(const std::string& text);

 private:
  struct PairMap;  // (left id, right id) -> (rank, merged id), open addressing
  struct Scratch;  // per-call buffers and piece cache
  BpeTokenizer(std::vector<std::string> tokens, std::vector<int32_t> token_types,
               const std::vector<std::string>& merges, const std::string& where);
  void encode_plain(const char* text, size_t n, std::vector<int32_t>& out, Scratch& s) const;
  void encode_piece(const uint8_t* p, size_t n, std::vector<int32_t>& out, Scratch& s) const;
  void merge_small(std::vector<int32_t>& ids, Scratch& s) const;
  void merge_large(std::vector<int32_t>& ids, Scratch& s) const;
  void merge_heap(std::vector<int32_t>& ids, Scratch& s) const;
  struct SpecialMatcher;  // Aho-Corasick automaton over the special-token strings

  std::vector<std::string> tokens_;
  std::vector<int32_t> types_;
  std::vector<std::string> bytes_;  // what each id decodes to
  std::unordered_map<std::string, int32_t> ids_;
  int32_t byte_ids_[256];
  std::shared_ptr<const PairMap> merges_;
  // parse_special: control + user-defined token strings (null when there are none).
  std::shared_ptr<const SpecialMatcher> specials_;
  bool llama3_ = false;  // tokenizer.ggml.pre "llama-bpe" (from_gguf), else GPT-2's split
};

}  // namespace nanochat
