// CPU feature detection: cpuid + xgetbv on x86-64, HWCAP (Linux) or sysctl (macOS) on
// aarch64; all false elsewhere.
#pragma once

namespace nanochat {

struct CpuFeatures {
  // x86-64
  bool avx2 = false;        // AVX2 + FMA + F16C, with OS-enabled YMM state
  bool avx_vnni = false;    // AVX-VNNI: the VEX (256-bit) vpdpbusd, on AVX2 CPUs
  bool avx512bw = false;    // AVX-512 F/BW/VL, with OS-enabled ZMM state
  bool avx512vnni = false;  // AVX-512 VNNI (vpdpbusd)
  bool avx512bf16 = false;  // AVX-512 BF16 (vdpbf16ps): bf16 GEMMs at ~2x the f32 rate
  bool amx_bf16 = false;    // AMX tiles with bf16 (Sapphire Rapids and later)
  // aarch64 (Advanced SIMD is part of the base architecture)
  bool neon = false;        // AArch64 Advanced SIMD
  bool dotprod = false;     // SDOT/UDOT (Armv8.2 dotprod)
  bool i8mm = false;        // SMMLA (Armv8.6 i8mm)
};

// Detected once, then cached.
const CpuFeatures& cpu_features();

}  // namespace nanochat
