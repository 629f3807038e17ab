// CPU feature detection (cpuid + xgetbv on x86-64; all false elsewhere).
#pragma once

namespace nanochat {

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA, with OS-enabled YMM state
  bool avx512bw = false;    // AVX-512 F/BW/VL, with OS-enabled ZMM state
  bool avx512vnni = false;  // AVX-512 VNNI (vpdpbusd)
};

// Detected once, then cached.
const CpuFeatures& cpu_features();

}  // namespace nanochat
