// BpeTokenizer: GPT-2 pre-tokenizer splits (expected pieces taken from HF tokenizers'
// ByteLevel pre-tokenizer), BPE merge order against a plain reference, invalid UTF-8,
// special tokens, constructor and GGUF errors, and the Unicode class tables.
// (tests/test_engine_tokenizer.py compares whole corpora with HF token for token.)
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/tokenizer.h"
#include "engine/unicode_data.h"
#include "gguf/gguf.h"
#include "gpt2_bytes.h"
#include "nanochat/error.hpp"

using nanochat::BpeTokenizer;
using nanochat::Error;

using nanochat_test::byte_symbol;

namespace {

std::string byte_level(const std::string& raw) {
  std::string s;
  for (unsigned char c : raw) s += byte_symbol(c);
  return s;
}

// A tiny vocabulary: two specials, the 256 byte symbols, then merge results.
struct Vocab {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges;

  Vocab() {
    add("<|bos|>", 3);
    add("<|user_start|>", 3);
    for (int b = 0; b < 256; ++b) add(byte_symbol(b), 1);
  }
  int32_t add(const std::string& t, int32_t type) {
    auto it = std::find(tokens.begin(), tokens.end(), t);
    if (it != tokens.end()) return static_cast<int32_t>(it - tokens.begin());
    tokens.push_back(t);
    types.push_back(type);
    return static_cast<int32_t>(tokens.size() - 1);
  }
  // A merge of two raw byte strings; its result joins the vocabulary.
  void merge(const std::string& l, const std::string& r) {
    merges.push_back(byte_level(l) + " " + byte_level(r));
    add(byte_level(l + r), 1);
  }
  BpeTokenizer build() const { return BpeTokenizer(tokens, types, merges); }
  int32_t id(const std::string& raw) const {
    auto it = std::find(tokens.begin(), tokens.end(), byte_level(raw));
    return it == tokens.end() ? -1 : static_cast<int32_t>(it - tokens.begin());
  }
};

std::vector<std::string> pieces(const std::string& text) {
  std::vector<std::string> out;
  for (const auto& r : BpeTokenizer::pre_tokenize(text))
    out.push_back(text.substr(r.first, r.second - r.first));
  return out;
}

// Plain BPE: merge the lowest-rank adjacent pair, leftmost first, until none applies.
std::vector<std::string> reference_bpe(const std::string& raw,
                                       const std::vector<std::pair<std::string, std::string>>& m) {
  std::vector<std::string> sym;
  for (char c : raw) sym.push_back(std::string(1, c));
  for (;;) {
    size_t best_rank = m.size(), best = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i)
      for (size_t r = 0; r < best_rank; ++r)
        if (m[r].first == sym[i] && m[r].second == sym[i + 1]) {
          best_rank = r;
          best = i;
          break;
        }
    if (best_rank == m.size()) return sym;
    sym[best] += sym[best + 1];
    sym.erase(sym.begin() + best + 1);
  }
}

std::string temp_path(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/nanochat_tok_" + name + "_" +
         std::to_string(::getpid()) + ".gguf";
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

// ---- pre-tokenizer ------------------------------------------------------------------------

TEST(TokenizerPreTokenize, MatchesHfByteLevelSplits) {
  // Expected pieces: HF tokenizers 0.23 ByteLevel(add_prefix_space=False, use_regex=True).
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"Hello world", {"Hello", " world"}},
      {"don't I'm we'll they're I've he'd it's",
       {"don", "'t", " I", "'m", " we", "'ll", " they", "'re", " I", "'ve", " he", "'d", " it",
        "'s"}},
      {"'S \u2019s x''s 'sup 'LL",
       {"'", "S", " \u2019", "s", " x", "''", "s", " '", "sup", " '", "LL"}},
      {"abc123 456 \u00bd\u216b x1 \u0663\u0664",
       {"abc", "123", " 456", " \u00bd\u216b", " x", "1", " \u0663\u0664"}},
      {"a!!! ?? (x)->y;", {"a", "!!!", " ??", " (", "x", ")->", "y", ";"}},
      {"a   b", {"a", "  ", " b"}},
      {"a\n\n  b", {"a", "\n\n ", " b"}},
      {"x  ", {"x", "  "}},
      {"   ", {"   "}},
      {"\t\tx", {"\t", "\t", "x"}},
      {"a \tb", {"a", " ", "\t", "b"}},
      {"a\r\nb", {"a", "\r", "\n", "b"}},
      {"line1\r\n\tline2\r\n", {"line", "1", "\r\n", "\t", "line", "2", "\r\n"}},
      {"\u4f60\u597d\u4e16\u754c \u0645\u0631\u062d\u0628\u0627 "
       "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
       {"\u4f60\u597d\u4e16\u754c", " \u0645\u0631\u062d\u0628\u0627",
        " \u041f\u0440\u0438\u0432\u0435\u0442", " \u043c\u0438\u0440"}},
      {"hi \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 "
       "\U0001f1eb\U0001f1f7!",
       {"hi", " \U0001f44d\U0001f3fd", " \U0001f468\u200d\U0001f469\u200d\U0001f467",
        " \U0001f1eb\U0001f1f7!"}},
      {"e\u0301te", {"e", "\u0301", "te"}},
      {"a\u00a0b", {"a", "\u00a0", "b"}},
      {"a \u00a0b", {"a", " ", "\u00a0", "b"}},
      {"x \u3000y", {"x", " ", "\u3000", "y"}},
      {"'", {"'"}},
      {" '", {" '"}},
      {"'l", {"'", "l"}},
      {"x\u2028y\u0085z", {"x", "\u2028", "y", "\u0085", "z"}},
      {"\u216b\u1c89!", {"\u216b", "\u1c89", "!"}},  // U+1C89: a letter since Unicode 16
      {"", {}},
  };
  for (const auto& c : cases) EXPECT_EQ(pieces(c.first), c.second) << c.first;
}

TEST(TokenizerPreTokenize, InvalidUtf8BytesAreOtherCharacters) {
  // Each byte that starts no valid sequence is one "other" character: it joins a
  // punctuation run (with an optional leading space) and splits letter runs.
  using V = std::vector<std::string>;
  EXPECT_EQ(pieces("a\xff" "b"), (V{"a", "\xff", "b"}));
  EXPECT_EQ(pieces("x \xff\xfe!y"), (V{"x", " \xff\xfe!", "y"}));
  EXPECT_EQ(pieces("ab\xe2\x82"), (V{"ab", "\xe2\x82"}));               // truncated
  EXPECT_EQ(pieces("\xc0\xaf" "a"), (V{"\xc0\xaf", "a"}));              // overlong
  EXPECT_EQ(pieces("a\xed\xa0\x80" "b"), (V{"a", "\xed\xa0\x80", "b"}));  // surrogate
  EXPECT_EQ(pieces("\xf4\x90\x80\x80"), (V{"\xf4\x90\x80\x80"}));        // > U+10FFFF
  EXPECT_EQ(pieces("\xe4\xbd" "\xe4\xbd\xa0"), (V{"\xe4\xbd", "\xe4\xbd\xa0"}));  // then 你
  EXPECT_EQ(pieces(std::string("a\0b", 3)), (V{"a", std::string(1, '\0'), "b"}));
}

TEST(TokenizerPreTokenize, RandomBytesTileTheInput) {
  std::mt19937 rng(7);
  const std::string alphabet = "a \t\n'sll1!\xc3\xa9\xe4\xbd\xa0\xf0\x9f\x98\x80";
  for (int it = 0; it < 3000; ++it) {
    std::string s;
    const int n = static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i)
      s += rng() % 4 == 0 ? static_cast<char>(rng() & 0xFF) : alphabet[rng() % alphabet.size()];
    size_t pos = 0;
    for (const auto& r : BpeTokenizer::pre_tokenize(s)) {
      ASSERT_EQ(r.first, pos);
      ASSERT_GT(r.second, r.first);
      pos = r.second;
    }
    ASSERT_EQ(pos, s.size());
  }
}

// ---- BPE ---------------------------------------------------------------------------------

TEST(TokenizerBpe, MergesByRankThenLeftmost) {
  Vocab v;
  v.merge("h", "e");
  v.merge("l", "l");
  v.merge("he", "ll");
  v.merge("hell", "o");
  v.merge(" ", "w");
  v.merge("a", "a");
  v.merge("b", "c");  // rank 6, before "a b": "abc" -> a, bc
  v.merge("a", "b");
  BpeTokenizer t = v.build();
  EXPECT_EQ(t.vocab_size(), static_cast<int32_t>(v.tokens.size()));
  EXPECT_EQ(t.encode("hello"), (std::vector<int32_t>{v.id("hello")}));
  EXPECT_EQ(t.encode("hell"), (std::vector<int32_t>{v.id("hell")}));
  EXPECT_EQ(t.encode("help"), (std::vector<int32_t>{v.id("he"), v.id("l"), v.id("p")}));
  EXPECT_EQ(t.encode("hello wo"),
            (std::vector<int32_t>{v.id("hello"), v.id(" w"), v.id("o")}));
  EXPECT_EQ(t.encode("aaa"), (std::vector<int32_t>{v.id("aa"), v.id("a")}));  // leftmost
  EXPECT_EQ(t.encode("abc"), (std::vector<int32_t>{v.id("a"), v.id("bc")}));  // by rank
  EXPECT_EQ(t.encode("ab"), (std::vector<int32_t>{v.id("ab")}));
  EXPECT_EQ(t.encode(""), std::vector<int32_t>{});
  EXPECT_EQ(t.decode(t.encode("hello wo")), "hello wo");
}

TEST(TokenizerBpe, PieceThatIsATokenStillGoesThroughMerges) {
  // ignore_merges = false (HF's BPE default, llama.cpp's gpt2): "xyz" is a token, but
  // no merge builds it, so it encodes as bytes.
  Vocab v;
  v.add(byte_level("xyz"), 1);
  v.merge("x", "y");
  BpeTokenizer t = v.build();
  EXPECT_EQ(t.encode("xyz"), (std::vector<int32_t>{v.id("xy"), v.id("z")}));
}

TEST(TokenizerBpe, RandomMergesMatchReferenceShortAndLongPieces) {
  // Letter-only text is one piece, so this checks the merge loop itself; lengths go past
  // 64 bytes, where the heap path takes over.
  std::mt19937 rng(3);
  for (int trial = 0; trial < 20; ++trial) {
    Vocab v;
    std::vector<std::pair<std::string, std::string>> m;
    std::vector<std::string> have = {"a", "b", "c"};
    for (int k = 0; k < 40; ++k) {
      const std::string l = have[rng() % have.size()], r = have[rng() % have.size()];
      if (l.size() + r.size() > 12) continue;
      if (std::find(m.begin(), m.end(), std::make_pair(l, r)) != m.end()) continue;
      m.emplace_back(l, r);
      v.merge(l, r);
      if (std::find(have.begin(), have.end(), l + r) == have.end()) have.push_back(l + r);
    }
    BpeTokenizer t = v.build();
    for (int it = 0; it < 30; ++it) {
      const int n = 1 + static_cast<int>(rng() % (it < 20 ? 64 : 400));
      std::string s;
      for (int i = 0; i < n; ++i) s += static_cast<char>('a' + rng() % 3);
      std::vector<int32_t> want;
      for (const std::string& sym : reference_bpe(s, m)) want.push_back(v.id(sym));
      ASSERT_EQ(t.encode(s), want) << s;
    }
  }
}

// A merge list out of training order (a pair holding "ab" ranked before the merge that
// makes "ab"): long pieces leave the by-rank sweep for the heap, with the same result.
TEST(TokenizerBpe, MergeListOutOfTrainingOrder) {
  Vocab v;
  v.add(byte_level("ab"), 1);
  const std::vector<std::pair<std::string, std::string>> m = {
      {"x", "ab"}, {"a", "b"}, {"xab", "xab"}, {"b", "x"}};
  for (const auto& [l, r] : m) v.merge(l, r);
  BpeTokenizer t = v.build();
  std::mt19937 rng(5);
  for (int it = 0; it < 40; ++it) {
    std::string s;
    const int n = 65 + int(rng() % 300);
    for (int i = 0; i < n; ++i) s += it < 5 ? "xab"[i % 3] : "xab"[rng() % 3];
    std::vector<int32_t> want;
    for (const std::string& sym : reference_bpe(s, m)) want.push_back(v.id(sym));
    ASSERT_EQ(t.encode(s), want) << s;
  }
}

TEST(TokenizerBpe, LongWhitespaceRunAndRepeatedPieces) {
  Vocab v;
  v.merge(" ", " ");
  v.merge("  ", "  ");
  v.merge("    ", "    ");
  v.merge("\n", "\n");
  BpeTokenizer t = v.build();
  const std::string ws(203, ' ');  // at the end: one piece of 203 spaces
  std::vector<int32_t> want(25, v.id("        "));
  want.push_back(v.id("  "));
  want.push_back(v.id(" "));
  EXPECT_EQ(t.encode(ws), want);
  // Before a word the run gives its last space to the word.
  std::vector<int32_t> ids = t.encode(ws + "x");
  EXPECT_EQ(ids.back(), v.id("x"));
  EXPECT_EQ(ids[ids.size() - 2], v.id(" "));
  EXPECT_EQ(t.decode(ids), ws + "x");
  // The per-call piece cache must not change results.
  std::string text;
  for (int i = 0; i < 500; ++i) text += "ab  \n\ncd ";
  std::vector<int32_t> once = t.encode("ab  \n\ncd ");
  std::vector<int32_t> many = t.encode(text);
  EXPECT_EQ(t.decode(many), text);
  EXPECT_EQ(std::vector<int32_t>(many.begin(), many.begin() + 6),
            std::vector<int32_t>(once.begin(), once.begin() + 6));
}

TEST(TokenizerBpe, InvalidUtf8RoundTripsAndNeverCrashes) {
  Vocab v;
  v.merge("\xc3", "\xa9");
  BpeTokenizer t = v.build();
  const std::string s = "caf\xc3\xa9 \xff\xfe \xe2\x82 \xc3";
  std::vector<int32_t> ids = t.encode(s);
  EXPECT_EQ(t.decode(ids), s);
  EXPECT_NE(std::find(ids.begin(), ids.end(), v.id("\xc3\xa9")), ids.end());
  std::mt19937 rng(11);
  for (int it = 0; it < 2000; ++it) {
    std::string r(rng() % 64, '\0');
    for (char& c : r) c = static_cast<char>(rng() & 0xFF);
    ASSERT_EQ(t.decode(t.encode(r)), r);
    ASSERT_EQ(t.decode(t.encode(r, true)), r);
  }
}

// ---- special tokens ------------------------------------------------------------------------

TEST(TokenizerSpecial, ParsedOnlyWithParseSpecial) {
  Vocab v;
  const int32_t bang = v.add("<|bos|>!", 4);  // user-defined; longer than <|bos|>
  v.merge("h", "i");
  BpeTokenizer t = v.build();
  const std::string s = "hi<|bos|> <|user_start|><|bos|>!x";
  std::vector<int32_t> plain = t.encode(s);
  for (int32_t id : plain) EXPECT_FALSE(t.is_special(id));
  EXPECT_EQ(t.decode(plain), s);
  std::vector<int32_t> sp = t.encode(s, true);
  EXPECT_EQ(sp, (std::vector<int32_t>{v.id("hi"), 0, v.id(" "), 1, bang, v.id("x")}));
  // Control tokens decode to nothing, user-defined ones to their text.
  EXPECT_EQ(t.decode(sp), "hi <|bos|>!x");
  EXPECT_TRUE(t.is_special(0));
  EXPECT_TRUE(t.is_special(bang));
  EXPECT_FALSE(t.is_special(v.id("hi")));
  EXPECT_FALSE(t.is_special(-1));
  EXPECT_FALSE(t.is_special(t.vocab_size()));
  EXPECT_EQ(t.token_bytes(0), "");
  EXPECT_EQ(t.token_type(0), 3);
  EXPECT_EQ(t.token_type(bang), 4);
  // Text around a special is pre-tokenized on its own: the space before <|bos|> ends a
  // segment, and so is a piece by itself.
  EXPECT_EQ(t.encode("a <|bos|>", true), (std::vector<int32_t>{v.id("a"), v.id(" "), 0}));
  EXPECT_EQ(t.encode("<|bos", true), t.encode("<|bos"));  // partial: plain text
}

TEST(TokenizerSpecial, LookupsAndBadIds) {
  Vocab v;
  v.merge("h", "i");
  BpeTokenizer t = v.build();
  EXPECT_EQ(t.find("<|bos|>"), 0);
  EXPECT_EQ(t.find(byte_symbol(' ')), v.id(" "));
  EXPECT_EQ(t.find("hi"), v.id("hi"));
  EXPECT_EQ(t.find("nope"), -1);
  EXPECT_EQ(t.token_bytes(v.id(" ")), " ");
  EXPECT_THROW(t.token_bytes(-1), Error);
  EXPECT_THROW(t.token_bytes(t.vocab_size()), Error);
  EXPECT_THROW(t.decode({0, t.vocab_size()}), Error);
  EXPECT_THROW(t.token_type(INT32_MAX), Error);
  BpeTokenizer copy = t;  // copies stay valid (no pointers into the original)
  EXPECT_EQ(copy.encode("hi <|bos|>", true), t.encode("hi <|bos|>", true));
}

// Leftmost-longest special matching against a brute-force reference, with specials that
// are prefixes, suffixes and overlaps of one another (the automaton's failure links).
TEST(TokenizerSpecial, MatcherAgreesWithBruteForce) {
  std::mt19937 rng(7);
  const std::string alphabet = "<|ab>";
  for (int round = 0; round < 40; ++round) {
    Vocab v;
    std::vector<std::string> specials;
    const int n_special = 1 + int(rng() % 12);
    for (int k = 0; k < n_special; ++k) {
      std::string sp;
      const int len = 1 + int(rng() % 5);
      for (int i = 0; i < len; ++i) sp += alphabet[rng() % alphabet.size()];
      if (v.id(sp) >= 0 || std::find(specials.begin(), specials.end(), sp) != specials.end())
        continue;  // a one-byte string is a byte symbol already
      v.add(sp, (rng() & 1) ? 3 : 4);
      specials.push_back(sp);
    }
    const BpeTokenizer t = v.build();
    for (int trial = 0; trial < 50; ++trial) {
      std::string text;
      const int len = int(rng() % 40);
      for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
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
        for (int32_t id : t.encode(text.substr(seg, i - seg))) want.push_back(id);
        want.push_back(t.find(text.substr(i, best)));
        i += best;
        seg = i;
      }
      for (int32_t id : t.encode(text.substr(seg))) want.push_back(id);
      ASSERT_EQ(t.encode(text, true), want) << "text " << text;
    }
  }
}

// ---- construction errors -------------------------------------------------------------------

TEST(TokenizerErrors, ConstructorNamesTheEntry) {
  auto err = [](const Vocab& v) { return error_of([&] { v.build(); }); };
  Vocab ok;
  ok.merge("a", "b");
  EXPECT_NO_THROW(ok.build());
  EXPECT_NO_THROW(BpeTokenizer(ok.tokens, {}, ok.merges));  // types optional

  Vocab dup = ok;
  dup.tokens.push_back(dup.tokens[5]);
  dup.types.push_back(1);
  EXPECT_NE(err(dup).find("duplicates tokens[5]"), std::string::npos) << err(dup);

  Vocab nobyte = ok;
  nobyte.tokens[2 + 'q'] = "<|q|>";
  EXPECT_NE(err(nobyte).find("no token for byte 0x71"), std::string::npos) << err(nobyte);

  Vocab ctrlbyte = ok;
  ctrlbyte.types[2 + 'q'] = 3;
  EXPECT_NE(err(ctrlbyte).find("byte 0x71"), std::string::npos) << err(ctrlbyte);

  Vocab part = ok;
  part.merges.push_back("ab zz");
  EXPECT_NE(err(part).find("merges[1] \"ab zz\": \"zz\" is not a token"), std::string::npos)
      << err(part);

  Vocab result = ok;
  result.merges.push_back("ab ab");
  EXPECT_NE(err(result).find("the result \"abab\" is not a token"), std::string::npos)
      << err(result);

  for (const char* bad : {"ab", "a  b", " ab", "ab ", "a b c"}) {
    Vocab form = ok;
    form.merges.push_back(bad);
    EXPECT_NE(err(form).find("not \"left right\""), std::string::npos) << err(form);
  }

  Vocab twice = ok;
  twice.merges.push_back("a b");
  EXPECT_NE(err(twice).find("merges[1] \"a b\" duplicates merges[0]"), std::string::npos)
      << err(twice);

  Vocab badtype = ok;
  badtype.types[3] = 9;
  EXPECT_NE(err(badtype).find("token_type[3] = 9"), std::string::npos) << err(badtype);

  Vocab shorttypes = ok;
  shorttypes.types.pop_back();
  EXPECT_NE(err(shorttypes).find("token_type: "), std::string::npos) << err(shorttypes);

  Vocab empty = ok;
  empty.tokens.push_back("");
  empty.types.push_back(1);
  EXPECT_NE(err(empty).find("is empty"), std::string::npos) << err(empty);

  Vocab notbl = ok;
  notbl.add("a b", 1);  // U+0020 is not a byte symbol (the space byte is "\u0120")
  EXPECT_NE(err(notbl).find("not in GPT-2 byte-level form"), std::string::npos) << err(notbl);
  Vocab badutf8 = ok;
  badutf8.add("\xff", 1);
  EXPECT_NE(err(badutf8).find("not in GPT-2 byte-level form"), std::string::npos);

  EXPECT_NE(error_of([] { BpeTokenizer({}, {}, {}); }).find("vocabulary is empty"),
            std::string::npos);
  EXPECT_EQ(err(dup).rfind("BpeTokenizer: tokens[", 0), 0u);
}

// ---- GGUF ----------------------------------------------------------------------------------

namespace {

void write_tokenizer_gguf(const std::string& path, const Vocab& v, const std::string& model,
                          const std::string& pre, bool with_merges = true) {
  using namespace nanochat::gguf;
  GgufWriter w;
  w.add_kv("general.architecture", Value::string("nanochat"));
  w.add_kv("tokenizer.ggml.model", Value::string(model));
  w.add_kv("tokenizer.ggml.pre", Value::string(pre));
  w.add_kv("tokenizer.ggml.tokens", Value::string_array(v.tokens));
  w.add_kv("tokenizer.ggml.token_type",
           Value::int_array(ValueType::I32, std::vector<int64_t>(v.types.begin(), v.types.end())));
  if (with_merges) w.add_kv("tokenizer.ggml.merges", Value::string_array(v.merges));
  w.write(path);
}

}  // namespace

TEST(TokenizerGguf, FromGgufEqualsDirectConstruction) {
  Vocab v;
  v.merge("h", "i");
  v.merge(" ", "hi");
  const std::string path = temp_path("ok");
  write_tokenizer_gguf(path, v, "gpt2", "gpt-2");
  auto f = nanochat::gguf::GgufFile::open(path);
  BpeTokenizer a = BpeTokenizer::from_gguf(*f);
  BpeTokenizer b = v.build();
  const std::string s = "hi hi <|bos|>hi\n";
  EXPECT_EQ(a.encode(s), b.encode(s));
  EXPECT_EQ(a.encode(s, true), b.encode(s, true));
  EXPECT_EQ(a.vocab_size(), b.vocab_size());
  std::remove(path.c_str());
}

TEST(TokenizerGguf, ErrorsNameFileAndKey) {
  Vocab v;
  v.merge("h", "i");
  const std::string path = temp_path("bad");
  auto from = [&] {
    auto f = nanochat::gguf::GgufFile::open(path);
    BpeTokenizer::from_gguf(*f);
  };
  write_tokenizer_gguf(path, v, "llama", "gpt-2");
  std::string e = error_of(from);
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("tokenizer.ggml.model"), std::string::npos) << e;

  write_tokenizer_gguf(path, v, "gpt2", "llama3");
  e = error_of(from);
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("tokenizer.ggml.pre"), std::string::npos) << e;

  write_tokenizer_gguf(path, v, "gpt2", "gpt-2", false);
  e = error_of(from);
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("tokenizer.ggml.merges"), std::string::npos) << e;

  Vocab bad = v;
  bad.merges.push_back("h zz");
  write_tokenizer_gguf(path, bad, "gpt2", "gpt-2");
  e = error_of(from);
  EXPECT_NE(e.find(path + ": tokenizer.ggml.merges[1]"), std::string::npos) << e;

  Vocab badtype = v;
  badtype.types[7] = 42;
  write_tokenizer_gguf(path, badtype, "gpt2", "gpt-2");
  e = error_of(from);
  EXPECT_NE(e.find(path + ": tokenizer.ggml.token_type[7] = 42"), std::string::npos) << e;
  std::remove(path.c_str());
}

// ---- Unicode tables ------------------------------------------------------------------------

TEST(TokenizerUnicode, TablesAreAPartitionAndLookupsAgree) {
  using namespace nanochat::unicode;
  ASSERT_GT(CLASS_RANGE_COUNT, 100u);
  EXPECT_EQ(CLASS_RANGE_STARTS[0] >> 2, 0u);
  for (size_t i = 1; i < CLASS_RANGE_COUNT; ++i) {
    ASSERT_GT(CLASS_RANGE_STARTS[i] >> 2, CLASS_RANGE_STARTS[i - 1] >> 2);
    ASSERT_NE(CLASS_RANGE_STARTS[i] & 3, CLASS_RANGE_STARTS[i - 1] & 3);  // merged
  }
  for (uint32_t cp = 0; cp < 256; ++cp) ASSERT_EQ(char_class(cp), char_class_search(cp)) << cp;
  EXPECT_EQ(std::string(UNICODE_VERSION), "16.0.0");
  const std::map<uint32_t, CharClass> known = {
      {'A', CharClass::Letter},      {'0', CharClass::Number},     {' ', CharClass::Space},
      {'\t', CharClass::Space},      {0x0B, CharClass::Space},     {0x1C, CharClass::Other},
      {0x85, CharClass::Space},      {0xA0, CharClass::Space},     {0xAA, CharClass::Letter},
      {0xB2, CharClass::Number},     {0xBD, CharClass::Number},    {0xD7, CharClass::Other},
      {0x0301, CharClass::Other},    {0x0663, CharClass::Number},  {0x1C89, CharClass::Letter},
      {0x200B, CharClass::Other},    {0x2028, CharClass::Space},   {0x216B, CharClass::Number},
      {0x3000, CharClass::Space},    {0x4E2D, CharClass::Letter},  {0xD800, CharClass::Other},
      {0xFFFD, CharClass::Other},    {0x1F600, CharClass::Other},  {0x20000, CharClass::Letter},
      {0x10FFFF, CharClass::Other},  {0x110000, CharClass::Other}, {0xFFFFFFFF, CharClass::Other},
  };
  for (const auto& k : known) EXPECT_EQ(char_class(k.first), k.second) << std::hex << k.first;
}
