// The check every op taking a row list (Collider's kept rows) runs before touching memory.
#pragma once

#include <cstdint>
#include <string>

#include "nanochat/error.hpp"

namespace nanochat {

// Throws Error("fn: name[i] = v is not a sorted row index below total") unless rows[0, n)
// strictly increase within [0, total).
inline void check_row_list(const char* fn, const char* name, const int64_t* rows, int64_t n,
                           int64_t total) {
  for (int64_t i = 0; i < n; ++i)
    if (rows[i] < 0 || rows[i] >= total || (i > 0 && rows[i] <= rows[i - 1]))
      throw Error(std::string(fn) + ": " + name + "[" + std::to_string(i) + "] = " +
                  std::to_string(rows[i]) + " is not a sorted row index below " +
                  std::to_string(total));
}

}  // namespace nanochat
