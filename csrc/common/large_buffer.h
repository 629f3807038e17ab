// LargeBuffer: an owned, aligned byte buffer for big read-mostly arrays (packed weights,
// KV caches). From 2 MiB up it is 2 MiB-aligned and asks for transparent huge pages
// (MADV_HUGEPAGE; many kernels ship THP in "madvise" mode), so streaming the weights once
// per decoded token costs one TLB miss per 2 MiB instead of per 4 KiB: the 1-thread
// ternary GEMV over 126 MB of weights went from ~75% to ~100% of a plain read loop's
// rate with it on Zen 4. Contents are uninitialized.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nanochat {

class LargeBuffer {
 public:
  LargeBuffer() = default;
  explicit LargeBuffer(size_t bytes);  // throws std::bad_alloc
  ~LargeBuffer();
  LargeBuffer(LargeBuffer&& o) noexcept;
  LargeBuffer& operator=(LargeBuffer&& o) noexcept;
  LargeBuffer(const LargeBuffer&) = delete;
  LargeBuffer& operator=(const LargeBuffer&) = delete;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace nanochat
