// UTF-8 checks for names that end up in moev's JSON files (config paths, class
// folder names, tags): JSON holds UTF-8 text only, so a Latin-1 folder name
// must be refused where it is read, not when the first checkpoint is written.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>

#include "moev/core/error.h"

namespace moev {

// Well-formed UTF-8: no stray continuation bytes, no overlong forms, no
// surrogates, nothing above U+10FFFF.
inline bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n;
    unsigned lo = 0x80, hi = 0xBF;  // the second byte's range, narrowed for the forms below
    if (c < 0x80) n = 0;
    else if (c >= 0xC2 && c <= 0xDF) n = 1;
    else if (c >= 0xE0 && c <= 0xEF) n = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) n = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return false;
    if (i + n >= s.size() && n > 0) return false;  // cut short
    for (size_t k = 1; k <= n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return false;
    }
    i += n + 1;
  }
  return true;
}

// `s` with every byte outside printable ASCII written as \xNN: a message can
// show a name that is not UTF-8 without itself becoming unprintable.
inline std::string escaped_bytes(std::string_view s) {
  std::string out;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7F) {
      out += ch;
    } else {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    }
  }
  return out;
}

// Refuses a name that is not UTF-8, naming where it came from (`what`).
inline void check_utf8(std::string_view s, const std::string& what) {
  MOEV_CHECK(valid_utf8(s), what, " '", escaped_bytes(s), "' is not valid UTF-8; moev keeps names and paths in ",
             "JSON files, which hold UTF-8 text only: rename it (e.g. convmv -f latin1 -t utf8)");
}

}  // namespace moev
