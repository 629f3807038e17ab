// Byte-level BPE: GPT-2 pre-tokenizer over code points, then merges by rank per piece.
// Semantics follow HF tokenizers' BPE model as python/nanochat/data/tokenizer.py configures it
// (no dropout, no unk, no byte_fallback, ignore_merges false: a piece that is itself a
// token is still built by merges) and llama.cpp's "gpt2" vocab.
#include "engine/tokenizer.h"

#include <algorithm>
#include <climits>
#include <functional>
#include <cstdio>
#include <cstring>
#include <string_view>

#include "engine/unicode_data.h"
#include "gguf/gguf.h"
#include "nanochat/error.hpp"

namespace nanochat {

namespace {

using unicode::CharClass;

// llama.cpp's token types (tokenizer.ggml.token_type); 2 unknown and 5 unused, like
// control, decode to "" and are never produced by BPE or parse_special.
constexpr int32_t TYPE_NORMAL = 1, TYPE_CONTROL = 3, TYPE_USER_DEFINED = 4, TYPE_BYTE = 6;

constexpr uint32_t INVALID_CP = 0xFFFFFFFFu;

// Strict UTF-8: the length of the valid sequence at p (n >= 1 bytes left) and its code
// point, or 0 when p[0] does not start one (overlong, surrogate, > U+10FFFF, truncated).
inline size_t utf8_decode(const uint8_t* p, size_t n, uint32_t* cp) {
  const uint32_t b0 = p[0];
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  if (b0 < 0xC2) return 0;  // continuation byte or overlong 2-byte lead
  if (b0 < 0xE0) {
    if (n < 2 || (p[1] & 0xC0) != 0x80) return 0;
    *cp = ((b0 & 0x1F) << 6) | (p[1] & 0x3F);
    return 2;
  }
  if (b0 < 0xF0) {
    if (n < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
    const uint32_t c = ((b0 & 0x0F) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3F);
    if (c < 0x800 || (c >= 0xD800 && c <= 0xDFFF)) return 0;
    *cp = c;
    return 3;
  }
  if (b0 < 0xF5) {
    if (n < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
      return 0;
    const uint32_t c = ((b0 & 0x07) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) |
                       (p[3] & 0x3F);
    if (c < 0x10000 || c > 0x10FFFF) return 0;
    *cp = c;
    return 4;
  }
  return 0;
}

struct Char {
  uint32_t cp;
  uint32_t len;
  CharClass cls;
};

// The character at s[i] (i < n). An invalid byte is one character of class Other.
inline Char char_at(const uint8_t* s, size_t n, size_t i) {
  const uint8_t b = s[i];
  if (b < 0x80) return {b, 1, static_cast<CharClass>(unicode::LATIN1_CLASS[b])};
  uint32_t cp;
  const size_t len = utf8_decode(s + i, n - i, &cp);
  if (len == 0) return {INVALID_CP, 1, CharClass::Other};
  return {cp, static_cast<uint32_t>(len), unicode::char_class(cp)};
}

// The GPT-2 regex  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// as a backtracking engine (Oniguruma) runs it: at each position the first alternative
// that matches wins, each greedy. The alternatives cover every character, so the pieces
// tile the text. emit(begin, end) gets byte offsets.
template <typename F>
void split_gpt2(const uint8_t* s, size_t n, F&& emit) {
  size_t i = 0;
  while (i < n) {
    const Char c = char_at(s, n, i);
    // 's 't 'm 'd 're 've 'll (ASCII bytes only, so byte compares suffice)
    if (c.cp == '\'' && i + 1 < n) {
      const uint8_t a = s[i + 1];
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        const uint8_t b = s[i + 2];
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
          emit(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    // " ?X+" for X = letters, numbers, other: an optional U+0020 then a run of one class.
    Char head = c;
    size_t j = i;
    if (c.cp == ' ' && i + 1 < n) {
      const Char d = char_at(s, n, i + 1);
      if (d.cls != CharClass::Space) {
        head = d;
        j = i + 1;
      }
    }
    if (head.cls != CharClass::Space) {
      size_t k = j + head.len;
      while (k < n) {
        const Char e = char_at(s, n, k);
        if (e.cls != head.cls) break;
        k += e.len;
      }
      emit(i, k);
      i = k;
      continue;
    }
    // Whitespace run. \s+(?!\S): before a non-space the run gives back its last
    // character (which then starts the next piece, e.g. " word"); a run of one before a
    // non-space fails that and \s+ takes it whole. At the end the run is one piece.
    size_t k = i, last = i, count = 0;
    while (k < n) {
      const Char e = char_at(s, n, k);
      if (e.cls != CharClass::Space) break;
      last = k;
      k += e.len;
      ++count;
    }
    if (k < n && count >= 2) k = last;
    emit(i, k);
    i = k;
  }
}

// LLaMA-3's regex (llama.cpp's "llama-bpe" pre-tokenizer), as Oniguruma runs it:
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// The first alternative that matches at a position wins. The case-insensitive contractions
// compare ASCII letters only (as llama.cpp; Unicode folding would also take U+017F for s).
template <typename F>
void split_llama3(const uint8_t* s, size_t n, F&& emit) {
  auto newline = [](uint32_t cp) { return cp == '\r' || cp == '\n'; };
  auto run = [&](size_t k, CharClass cls, size_t max_chars) {  // end of a run of one class
    for (size_t count = 0; k < n && count < max_chars; ++count) {
      const Char e = char_at(s, n, k);
      if (e.cls != cls) break;
      k += e.len;
    }
    return k;
  };
  size_t i = 0;
  while (i < n) {
    const Char c = char_at(s, n, i);
    if (c.cp == '\'' && i + 1 < n) {
      const uint8_t a = s[i + 1] | 0x20;  // ASCII lower case (only letters are compared)
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        const uint8_t b = s[i + 2] | 0x20;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
          emit(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    size_t letters = n;  // where the letter run starts, n: no match
    if (c.cls == CharClass::Letter) {
      letters = i;
    } else if (c.cls != CharClass::Number && !newline(c.cp) && i + c.len < n &&
               char_at(s, n, i + c.len).cls == CharClass::Letter) {
      letters = i + c.len;
    }
    if (letters < n) {
      const size_t k = run(letters, CharClass::Letter, SIZE_MAX);
      emit(i, k);
      i = k;
      continue;
    }
    if (c.cls == CharClass::Number) {  // \p{N}{1,3}
      const size_t k = run(i, CharClass::Number, 3);
      emit(i, k);
      i = k;
      continue;
    }
    // " ?[^\s\p{L}\p{N}]+[\r\n]*"
    size_t other = n;
    if (c.cls == CharClass::Other) {
      other = i;
    } else if (c.cp == ' ' && i + 1 < n && char_at(s, n, i + 1).cls == CharClass::Other) {
      other = i + 1;
    }
    if (other < n) {
      size_t k = run(other, CharClass::Other, SIZE_MAX);
      while (k < n && (s[k] == '\r' || s[k] == '\n')) ++k;
      emit(i, k);
      i = k;
      continue;
    }
    // c is whitespace. \s*[\r\n]+: the run up to and including its last newline.
    size_t k = i, last = i, count = 0, after_newline = 0;
    while (k < n) {
      const Char e = char_at(s, n, k);
      if (e.cls != CharClass::Space) break;
      last = k;
      k += e.len;
      ++count;
      if (newline(e.cp)) after_newline = k;
    }
    if (after_newline) {
      emit(i, after_newline);
      i = after_newline;
      continue;
    }
    // \s+(?!\S) then \s+, as in split_gpt2
    if (k < n && count >= 2) k = last;
    emit(i, k);
    i = k;
  }
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the other 68 to U+0100...
uint32_t byte_to_cp(int b) {
  static const auto table = [] {
    std::vector<uint32_t> t(256, 0);
    std::vector<bool> printable(256, false);
    for (int c = '!'; c <= '~'; ++c) printable[c] = true;
    for (int c = 0xA1; c <= 0xAC; ++c) printable[c] = true;
    for (int c = 0xAE; c <= 0xFF; ++c) printable[c] = true;
    uint32_t next = 256;
    for (int c = 0; c < 256; ++c) t[c] = printable[c] ? static_cast<uint32_t>(c) : next++;
    return t;
  }();
  return table[b];
}

std::string utf8_encode(uint32_t cp) {
  std::string o;
  if (cp < 0x80) {
    o += static_cast<char>(cp);
  } else if (cp < 0x800) {
    o += static_cast<char>(0xC0 | (cp >> 6));
    o += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    o += static_cast<char>(0xE0 | (cp >> 12));
    o += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    o += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    o += static_cast<char>(0xF0 | (cp >> 18));
    o += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    o += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    o += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return o;
}

// Inverse of byte_to_cp over its 256 code points (all < 0x144); -1 elsewhere.
int cp_to_byte(uint32_t cp) {
  static const auto table = [] {
    std::vector<int16_t> t(0x144, -1);
    for (int b = 0; b < 256; ++b) t[byte_to_cp(b)] = static_cast<int16_t>(b);
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}

// A token for an error message: quoted, control bytes escaped, long ones cut.
std::string quote(const std::string& s) {
  std::string o = "\"";
  for (size_t i = 0; i < s.size() && i < 64; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F || c == '"' || c == '\\') {
      static const char* hex = "0123456789abcdef";
      o += "\\x";
      o += hex[c >> 4];
      o += hex[c & 15];
    } else {
      o += static_cast<char>(c);
    }
  }
  if (s.size() > 64) o += "...";
  return o + "\"";
}

constexpr int32_t NO_RANK = INT32_MAX;
constexpr size_t SMALL_PIECE = 64;  // longer pieces merge with a heap (O(n log n))
constexpr size_t CACHE_MAX_PIECE = 48;
constexpr size_t CACHE_MAX_ENTRIES = 1 << 16;

}  // namespace

// (left id, right id) -> (rank, merged id). Open addressing with linear probing; a
// lookup is a multiply and usually one cache line, the hot operation of BPE.
struct BpeTokenizer::PairMap {
  struct Slot {
    uint64_t key;
    int32_t rank;
    int32_t id;
  };
  static constexpr uint64_t EMPTY = ~0ull;
  std::vector<Slot> slots;
  uint64_t mask = 0;

  explicit PairMap(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 16) cap *= 2;
    slots.assign(cap, Slot{EMPTY, 0, 0});
    mask = cap - 1;
  }
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  static uint64_t slot_of(uint64_t k) { return (k * 0x9E3779B97F4A7C15ull) >> 20; }
  // Returns the rank already stored for this pair, or -1 after inserting it.
  int32_t insert(int32_t a, int32_t b, int32_t rank, int32_t id) {
    const uint64_t k = key(a, b);
    for (uint64_t i = slot_of(k) & mask;; i = (i + 1) & mask) {
      if (slots[i].key == k) return slots[i].rank;
      if (slots[i].key == EMPTY) {
        slots[i] = Slot{k, rank, id};
        return -1;
      }
    }
  }
  const Slot* find(int32_t a, int32_t b) const {
    const uint64_t k = key(a, b);
    for (uint64_t i = slot_of(k) & mask;; i = (i + 1) & mask) {
      if (slots[i].key == k) return &slots[i];
      if (slots[i].key == EMPTY) return nullptr;
    }
  }
  int32_t rank(int32_t a, int32_t b) const {
    const Slot* s = find(a, b);
    return s ? s->rank : NO_RANK;
  }
};

// Finds, for every position of a text, the longest special-token string starting there,
// in time linear in the text (plus the automaton's size), however many specials there are
// and however long: Aho-Corasick over the reversed strings, run over the text backwards
// (a match ending at position i of the reversed text is a special starting at i).
struct BpeTokenizer::SpecialMatcher {
  struct Node {
    int32_t fail = 0;
    int32_t depth = 0;
    int32_t id = -1;    // the special whose reversed string ends here
    int32_t best = -1;  // node of the longest special that is a suffix of this one's string
  };
  std::vector<Node> nodes;
  std::unordered_map<uint64_t, int32_t> edges;  // (node << 8 | byte) -> child

  int32_t child(int32_t node, uint8_t b) const {
    auto it = edges.find((static_cast<uint64_t>(node) << 8) | b);
    return it == edges.end() ? -1 : it->second;
  }

  SpecialMatcher(const std::vector<std::string>& tokens, const std::vector<int32_t>& ids) {
    nodes.emplace_back();
    std::vector<std::vector<std::pair<uint8_t, int32_t>>> kids(1);
    for (int32_t id : ids) {
      const std::string& t = tokens[id];
      int32_t v = 0;
      for (size_t k = t.size(); k-- > 0;) {
        const uint8_t b = static_cast<uint8_t>(t[k]);
        int32_t c = child(v, b);
        if (c < 0) {
          c = static_cast<int32_t>(nodes.size());
          nodes.emplace_back();
          nodes.back().depth = nodes[v].depth + 1;
          kids.emplace_back();
          kids[v].emplace_back(b, c);
          edges.emplace((static_cast<uint64_t>(v) << 8) | b, c);
        }
        v = c;
      }
      nodes[v].id = id;  // tokens are distinct, so each string ends at its own node
    }
    // Breadth first, so every failure target is finished before its users.
    std::vector<int32_t> queue{0};
    for (size_t qi = 0; qi < queue.size(); ++qi) {
      const int32_t u = queue[qi];
      Node& nu = nodes[u];
      nu.best = nu.id >= 0 ? u : (u == 0 ? -1 : nodes[nu.fail].best);
      for (const auto& [b, v] : kids[u]) {
        int32_t f = nu.fail;
        int32_t target = -1;
        if (u != 0) {
          for (;;) {
            target = child(f, b);
            if (target >= 0 || f == 0) break;
            f = nodes[f].fail;
          }
        }
        nodes[v].fail = target >= 0 ? target : 0;
        queue.push_back(v);
      }
    }
  }

  // match[i] = the node of the longest special starting at p[i], or -1.
  void scan(const uint8_t* p, size_t n, std::vector<int32_t>& match) const {
    match.resize(n);
    int32_t state = 0;
    for (size_t i = n; i-- > 0;) {
      int32_t next;
      while ((next = child(state, p[i])) < 0 && state != 0) state = nodes[state].fail;
      state = next < 0 ? 0 : next;
      match[i] = nodes[state].best;
    }
  }
};

// Buffers reused across the pieces of one encode call, and a cache of piece -> ids (the
// same words recur: it roughly halves the time on source code). Keys point into the
// caller's text, which outlives the call.
struct BpeTokenizer::Scratch {
  std::vector<int32_t> ids;
  std::vector<int32_t> ranks;
  struct Sym {
    int32_t id, prev, next;
  };
  std::vector<Sym> syms;
  struct Cand {
    int32_t rank, pos;
    bool operator<(const Cand& o) const {  // max-heap on this order: lowest rank, leftmost
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::vector<Cand> heap;
  std::unordered_map<int32_t, std::vector<int32_t>> buckets;
  std::unordered_map<std::string_view, std::pair<uint32_t, uint32_t>> cache;
  std::vector<int32_t> cache_ids;
};

BpeTokenizer::BpeTokenizer(std::vector<std::string> tokens, std::vector<int32_t> token_types,
                           const std::vector<std::string>& merges)
    : BpeTokenizer(std::move(tokens), std::move(token_types), merges, "BpeTokenizer: ") {}

BpeTokenizer::BpeTokenizer(std::vector<std::string> tokens, std::vector<int32_t> token_types,
                           const std::vector<std::string>& merges, const std::string& where)
    : tokens_(std::move(tokens)), types_(std::move(token_types)) {
  const size_t n = tokens_.size();
  if (n == 0) throw Error(where + "tokens: the vocabulary is empty");
  if (n > static_cast<size_t>(INT32_MAX))
    throw Error(where + "tokens: " + std::to_string(n) + " tokens, more than int32 ids hold");
  if (types_.empty()) types_.assign(n, TYPE_NORMAL);
  if (types_.size() != n)
    throw Error(where + "token_type: " + std::to_string(types_.size()) + " entries for " +
                std::to_string(n) + " tokens");

  ids_.reserve(n);
  bytes_.resize(n);
  std::vector<int32_t> special_ids;
  for (size_t i = 0; i < n; ++i) {
    const std::string& t = tokens_[i];
    const std::string at = "tokens[" + std::to_string(i) + "] " + quote(t);
    const int32_t type = types_[i];
    if (type < TYPE_NORMAL || type > TYPE_BYTE)
      throw Error(where + "token_type[" + std::to_string(i) + "] = " + std::to_string(type) +
                  ": not a token type (1 normal .. 6 byte)");
    if (t.empty()) throw Error(where + "tokens[" + std::to_string(i) + "] is empty");
    auto ins = ids_.emplace(t, static_cast<int32_t>(i));
    if (!ins.second)
      throw Error(where + at + " duplicates tokens[" + std::to_string(ins.first->second) + "]");
    if (type == TYPE_NORMAL || type == TYPE_BYTE) {
      // Byte-level form: every character is one of bytes_to_unicode's 256.
      const uint8_t* p = reinterpret_cast<const uint8_t*>(t.data());
      std::string& out = bytes_[i];
      for (size_t k = 0; k < t.size();) {
        uint32_t cp;
        const size_t len = utf8_decode(p + k, t.size() - k, &cp);
        const int b = len ? cp_to_byte(cp) : -1;
        if (b < 0)
          throw Error(where + at + ": not in GPT-2 byte-level form (byte " +
                      std::to_string(k) + " starts no byte symbol)");
        out += static_cast<char>(b);
        k += len;
      }
    } else if (type == TYPE_USER_DEFINED) {
      bytes_[i] = t;
    }
    if (type == TYPE_CONTROL || type == TYPE_USER_DEFINED)
      special_ids.push_back(static_cast<int32_t>(i));
  }
  if (!special_ids.empty()) specials_ = std::make_shared<SpecialMatcher>(tokens_, special_ids);

  for (int b = 0; b < 256; ++b) {
    const std::string sym = utf8_encode(byte_to_cp(b));
    auto it = ids_.find(sym);
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", b);
    if (it == ids_.end())
      throw Error(where + "tokens: no token for byte " + hex + " (" + quote(sym) + ")");
    const int32_t type = types_[it->second];
    if (type != TYPE_NORMAL && type != TYPE_BYTE)
      throw Error(where + "token_type[" + std::to_string(it->second) + "] = " +
                  std::to_string(type) + ": the token of byte " + hex +
                  " must be normal (1) or byte (6)");
    byte_ids_[b] = it->second;
  }

  auto map = std::make_shared<PairMap>(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string& m = merges[r];
    const std::string at = "merges[" + std::to_string(r) + "] " + quote(m);
    const size_t sp = m.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 == m.size() ||
        m.find(' ', sp + 1) != std::string::npos)
      throw Error(where + at + ": not \"left right\" (two tokens, one space)");
    const std::string left = m.substr(0, sp), right = m.substr(sp + 1);
    const int32_t a = find(left), b = find(right), c = find(left + right);
    if (a < 0) throw Error(where + at + ": " + quote(left) + " is not a token");
    if (b < 0) throw Error(where + at + ": " + quote(right) + " is not a token");
    if (c < 0) throw Error(where + at + ": the result " + quote(left + right) + " is not a token");
    if (r >= static_cast<size_t>(INT32_MAX)) throw Error(where + "merges: too many");
    const int32_t prev = map->insert(a, b, static_cast<int32_t>(r), c);
    if (prev >= 0)
      throw Error(where + at + " duplicates merges[" + std::to_string(prev) + "]");
  }
  merges_ = std::move(map);
}

BpeTokenizer BpeTokenizer::from_gguf(const gguf::GgufFile& file) {
  const std::string& path = file.path();
  const std::string& model = file.get_string("tokenizer.ggml.model");
  if (model != "gpt2")
    throw Error(path + ": tokenizer.ggml.model is " + quote(model) +
                ", expected \"gpt2\" (byte-level BPE)");
  const std::string& pre = file.get_string("tokenizer.ggml.pre");
  if (pre != "gpt-2" && pre != "llama-bpe")
    throw Error(path + ": tokenizer.ggml.pre is " + quote(pre) +
                ", expected \"gpt-2\" or \"llama-bpe\" (the pre-tokenizers implemented)");
  std::vector<std::string> tokens = file.get_string_array("tokenizer.ggml.tokens");
  std::vector<int32_t> types;
  if (file.has("tokenizer.ggml.token_type")) {  // optional in llama.cpp: all normal
    const std::vector<int64_t> raw = file.get_int_array("tokenizer.ggml.token_type");
    types.reserve(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] < INT32_MIN || raw[i] > INT32_MAX)
        throw Error(path + ": tokenizer.ggml.token_type[" + std::to_string(i) + "] = " +
                    std::to_string(raw[i]) + " out of range");
      types.push_back(static_cast<int32_t>(raw[i]));
    }
  }
  const std::vector<std::string>& merges = file.get_string_array("tokenizer.ggml.merges");
  BpeTokenizer t(std::move(tokens), std::move(types), merges, path + ": tokenizer.ggml.");
  t.llama3_ = pre == "llama-bpe";
  return t;
}

// ---- encode ---------------------------------------------------------------------------

std::vector<std::pair<size_t, size_t>> BpeTokenizer::pre_tokenize(const std::string& text) {
  std::vector<std::pair<size_t, size_t>> out;
  split_gpt2(reinterpret_cast<const uint8_t*>(text.data()), text.size(),
             [&](size_t b, size_t e) { out.emplace_back(b, e); });
  return out;
}

std::vector<int32_t> BpeTokenizer::encode(const std::string& text, bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 8);
  Scratch s;
  if (!parse_special || !specials_) {
    encode_plain(text.data(), text.size(), out, s);
    return out;
  }
  // Specials first (leftmost, then longest, as HF's added-token matcher); the text
  // between them is pre-tokenized on its own.
  const char* p = text.data();
  const size_t n = text.size();
  std::vector<int32_t> match;
  specials_->scan(reinterpret_cast<const uint8_t*>(p), n, match);
  size_t seg = 0;
  for (size_t i = 0; i < n;) {
    if (match[i] >= 0) {
      const SpecialMatcher::Node& m = specials_->nodes[match[i]];
      encode_plain(p + seg, i - seg, out, s);
      out.push_back(m.id);
      i += static_cast<size_t>(m.depth);
      seg = i;
    } else {
      ++i;
    }
  }
  encode_plain(p + seg, n - seg, out, s);
  return out;
}

void BpeTokenizer::encode_plain(const char* text, size_t n, std::vector<int32_t>& out,
                                Scratch& s) const {
  const uint8_t* t = reinterpret_cast<const uint8_t*>(text);
  auto piece = [&](size_t b, size_t e) { encode_piece(t + b, e - b, out, s); };
  if (llama3_)
    split_llama3(t, n, piece);
  else
    split_gpt2(t, n, piece);
}

void BpeTokenizer::encode_piece(const uint8_t* p, size_t n, std::vector<int32_t>& out,
                                Scratch& s) const {
  if (n == 1) {
    out.push_back(byte_ids_[p[0]]);
    return;
  }
  if (n > static_cast<size_t>(INT32_MAX))  // merge_large indexes symbols with int32
    throw Error("BpeTokenizer: a pre-tokenizer piece of " + std::to_string(n) +
                " bytes (over 2^31) cannot be encoded");
  const bool cacheable = n <= CACHE_MAX_PIECE;
  std::string_view key(reinterpret_cast<const char*>(p), n);
  if (cacheable) {
    auto it = s.cache.find(key);
    if (it != s.cache.end()) {
      out.insert(out.end(), s.cache_ids.begin() + it->second.first,
                 s.cache_ids.begin() + it->second.first + it->second.second);
      return;
    }
  }
  std::vector<int32_t>& ids = s.ids;
  int32_t whole = -1;
  if (llama3_) {  // LLaMA-3 sets ignore_merges: a piece that is a normal token is that token
    std::string form;
    for (size_t i = 0; i < n; ++i) form += utf8_encode(byte_to_cp(p[i]));
    const auto it = ids_.find(form);
    if (it != ids_.end() && !is_special(it->second)) whole = it->second;
  }
  if (whole >= 0) {
    ids.assign(1, whole);
  } else {
    ids.resize(n);
    for (size_t i = 0; i < n; ++i) ids[i] = byte_ids_[p[i]];
    if (n <= SMALL_PIECE)
      merge_small(ids, s);
    else
      merge_large(ids, s);
  }
  if (cacheable && s.cache.size() < CACHE_MAX_ENTRIES) {
    s.cache.emplace(key, std::make_pair(static_cast<uint32_t>(s.cache_ids.size()),
                                        static_cast<uint32_t>(ids.size())));
    s.cache_ids.insert(s.cache_ids.end(), ids.begin(), ids.end());
  }
  out.insert(out.end(), ids.begin(), ids.end());
}

// Short pieces: ranks of adjacent pairs in an array; each step merges the lowest rank,
// leftmost on ties (the same pair twice), i.e. HF's and llama.cpp's order.
void BpeTokenizer::merge_small(std::vector<int32_t>& ids, Scratch& s) const {
  const PairMap& pm = *merges_;
  std::vector<int32_t>& r = s.ranks;
  r.resize(ids.size() - 1);
  for (size_t i = 0; i + 1 < ids.size(); ++i) r[i] = pm.rank(ids[i], ids[i + 1]);
  while (!r.empty()) {
    size_t best = 0;
    for (size_t i = 1; i < r.size(); ++i)
      if (r[i] < r[best]) best = i;
    if (r[best] == NO_RANK) break;
    ids[best] = pm.find(ids[best], ids[best + 1])->id;
    ids.erase(ids.begin() + best + 1);
    r.erase(r.begin() + best);  // r[j] = rank of (ids[j], ids[j + 1]) again, but for:
    if (best < r.size()) r[best] = pm.rank(ids[best], ids[best + 1]);
    if (best > 0) r[best - 1] = pm.rank(ids[best - 1], ids[best]);
  }
}

// Long pieces (whitespace or digit runs, long words): a linked list of symbols, candidate
// pairs in buckets by rank, each bucket swept left to right. A merge of rank r never
// creates a pair of rank r (its result is neither of the pair's parts), and in merge lists
// from BPE training a pair that contains r's result comes later than r; so the sweep
// gives the lowest-rank, leftmost order of merge_small in sequential passes (1 MiB of one
// character: a few times faster than a heap). A merge list that breaks the order (a new
// pair ranked below the current one) is redone with merge_heap.
void BpeTokenizer::merge_large(std::vector<int32_t>& ids, Scratch& s) const {
  const PairMap& pm = *merges_;
  const int32_t n = static_cast<int32_t>(ids.size());
  auto& sym = s.syms;
  sym.resize(n);
  for (int32_t i = 0; i < n; ++i) sym[i] = {ids[i], i - 1, i + 1 < n ? i + 1 : -1};
  auto& buckets = s.buckets;  // rank -> positions of candidate pairs
  buckets.clear();
  std::vector<int32_t> ranks;  // min-heap of ranks whose bucket is non-empty
  auto add = [&](int32_t rank, int32_t pos) {
    std::vector<int32_t>& b = buckets[rank];
    if (b.empty()) {
      ranks.push_back(rank);
      std::push_heap(ranks.begin(), ranks.end(), std::greater<int32_t>());
    }
    b.push_back(pos);
  };
  for (int32_t i = 0; i + 1 < n; ++i) {
    const int32_t rk = pm.rank(ids[i], ids[i + 1]);
    if (rk != NO_RANK) add(rk, i);
  }
  std::vector<int32_t> pending;
  while (!ranks.empty()) {
    std::pop_heap(ranks.begin(), ranks.end(), std::greater<int32_t>());
    const int32_t r = ranks.back();
    ranks.pop_back();
    pending.swap(buckets[r]);
    buckets.erase(r);
    if (!std::is_sorted(pending.begin(), pending.end())) std::sort(pending.begin(), pending.end());
    for (const int32_t pos : pending) {
      Scratch::Sym& left = sym[pos];
      if (left.id < 0 || left.next < 0) continue;  // merged away, or now last
      const int32_t nx = left.next;
      const PairMap::Slot* m = pm.find(left.id, sym[nx].id);
      if (!m || m->rank != r) continue;  // stale: a neighbour changed
      left.id = m->id;
      left.next = sym[nx].next;
      if (left.next >= 0) sym[left.next].prev = pos;
      sym[nx].id = -1;
      for (const int32_t at : {left.prev, left.next >= 0 ? pos : -1}) {
        if (at < 0) continue;
        const int32_t rk = pm.rank(sym[at].id, sym[sym[at].next].id);
        if (rk == NO_RANK) continue;
        if (rk <= r) {  // out of training order (ids is untouched so far)
          merge_heap(ids, s);
          return;
        }
        add(rk, at);
      }
    }
    pending.clear();
  }
  ids.clear();
  for (int32_t i = 0; i >= 0; i = sym[i].next) ids.push_back(sym[i].id);
}

// merge_large's order with a heap of candidate pairs (lazy deletion), for merge lists in
// any order.
void BpeTokenizer::merge_heap(std::vector<int32_t>& ids, Scratch& s) const {
  const PairMap& pm = *merges_;
  const int32_t n = static_cast<int32_t>(ids.size());
  auto& sym = s.syms;
  sym.resize(n);
  for (int32_t i = 0; i < n; ++i) sym[i] = {ids[i], i - 1, i + 1 < n ? i + 1 : -1};
  auto& heap = s.heap;
  heap.clear();
  for (int32_t i = 0; i + 1 < n; ++i) {
    const int32_t rk = pm.rank(ids[i], ids[i + 1]);
    if (rk != NO_RANK) heap.push_back({rk, i});
  }
  std::make_heap(heap.begin(), heap.end());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Scratch::Cand c = heap.back();
    heap.pop_back();
    Scratch::Sym& left = sym[c.pos];
    if (left.id < 0 || left.next < 0) continue;  // merged away, or now last
    const int32_t nx = left.next;
    const PairMap::Slot* m = pm.find(left.id, sym[nx].id);
    if (!m || m->rank != c.rank) continue;  // stale: a neighbour changed
    left.id = m->id;
    left.next = sym[nx].next;
    if (left.next >= 0) sym[left.next].prev = c.pos;
    sym[nx].id = -1;
    if (left.prev >= 0) {
      const int32_t rk = pm.rank(sym[left.prev].id, left.id);
      if (rk != NO_RANK) {
        heap.push_back({rk, left.prev});
        std::push_heap(heap.begin(), heap.end());
      }
    }
    if (left.next >= 0) {
      const int32_t rk = pm.rank(left.id, sym[left.next].id);
      if (rk != NO_RANK) {
        heap.push_back({rk, c.pos});
        std::push_heap(heap.begin(), heap.end());
      }
    }
  }
  ids.clear();
  for (int32_t i = 0; i >= 0; i = sym[i].next) ids.push_back(sym[i].id);
}

// ---- decode and lookups ------------------------------------------------------------------

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += token_bytes(id);
  return out;
}

const std::string& BpeTokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    throw Error("token id " + std::to_string(id) + " out of range [0, " +
                std::to_string(vocab_size()) + ")");
  return bytes_[id];
}

int32_t BpeTokenizer::token_type(int32_t id) const {
  token_bytes(id);  // range check
  return types_[id];
}

bool BpeTokenizer::is_special(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return false;
  return types_[id] == TYPE_CONTROL || types_[id] == TYPE_USER_DEFINED;
}

int32_t BpeTokenizer::find(const std::string& token) const {
  auto it = ids_.find(token);
  return it == ids_.end() ? -1 : it->second;
}

}  // namespace nanochat
