// What the libFuzzer targets share: an input as a file path. The readers take a path (they
// mmap it), so each input is written to one anonymous in-memory file (memfd) and opened
// through /proc/self/fd: no disk I/O per execution.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace nanochat_fuzz {

inline const std::string& input_path(const uint8_t* data, size_t size) {
  static const int fd = ::memfd_create("nanochat-fuzz", MFD_CLOEXEC);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0 || ::ftruncate(fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, off_t(done));
    if (n <= 0) std::abort();
    done += size_t(n);
  }
  return path;
}

}  // namespace nanochat_fuzz
