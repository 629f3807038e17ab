// CPU feature detection (cpuid + xgetbv on x86-64; all false elsewhere).
#pragma once

namespace nanochat {

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA, with OS-enabled YMM state
  bool avx512bw = false;    // AVX-512 F/BW/VL, with OS-enabled ZMM state
  bool avx512vnni = false;  // AVX-512 VNNI (vpdpbusd)
  bool avx512bf16 = false;  // AVX-512 BF16 (vdpbf16ps): bf16 GEMMs at ~2x the f32 rate
  bool amx_bf16 = false;    // AMX tiles with bf16 (Sapphire Rapids and later)
};

// Detected once, then cached.
const CpuFeatures& cpu_features();

}  // namespace nanochat
