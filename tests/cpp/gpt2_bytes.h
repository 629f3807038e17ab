// GPT-2's bytes_to_unicode (the byte-level vocabulary form), written out independently of
// the library's own, for the C++ tests and fuzz targets that build byte-level vocabularies.
#pragma once

#include <string>

namespace nanochat_test {

// The vocabulary symbol (UTF-8) of byte b.
inline std::string byte_symbol(int b) {
  auto printable = [](int c) {
    return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE;
  };
  int cp = b;
  if (!printable(b)) {
    cp = 256;
    for (int c = 0; c < b; ++c) cp += printable(c) ? 0 : 1;
  }
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

}  // namespace nanochat_test
