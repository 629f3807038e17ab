// libnanochat: the shared library of the embedding API. Its code is the whole core
// (linked in as a whole archive, see CMakeLists.txt); this file only gives the target a
// translation unit of its own and records what it was built with, for `strings`.
#include "nanochat/nanochat.h"

extern "C" NC_API const char nanochat_build_info[] = "nanochat " NANOCHAT_VERSION;
