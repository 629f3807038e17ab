// nanochat::Error: every argument, format and file error the library reports, from the
// kernels to the inference engine. Public (installed) so embedders can catch it.
#pragma once

#include <stdexcept>

namespace nanochat {

struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

}  // namespace nanochat
