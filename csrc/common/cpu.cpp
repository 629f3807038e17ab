#include "common/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <cstdint>
#define NANOCHAT_X86 1
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#define NANOCHAT_ARM64_LINUX 1
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#define NANOCHAT_ARM64_APPLE 1
#endif

namespace nanochat {

namespace {

#ifdef NANOCHAT_X86
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef NANOCHAT_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  const bool f16c = c & (1u << 29);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;             // SSE + AVX state
  const bool zmm_os = ymm_os && (xcr0 & 0xE0) == 0xE0;  // opmask + ZMM state
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned max_subleaf = a;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16);
  const bool avx512bw = b & (1u << 30);
  const bool avx512vl = b & (1u << 31);
  const bool avx512vnni = c & (1u << 11);
  const bool amx_bf16 = d & (1u << 22);
  const bool amx_tile = d & (1u << 24);
  f.avx2 = ymm_os && avx2 && fma && f16c;
  f.avx512bw = zmm_os && avx512f && avx512bw && avx512vl;
  f.avx512vnni = f.avx512bw && avx512vnni;
  f.amx_bf16 = amx_bf16 && amx_tile && (xcr0 & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512bf16 = f.avx512bw && (a & (1u << 5));
    f.avx_vnni = f.avx2 && (a & (1u << 4));
  }
#elif defined(NANOCHAT_ARM64_LINUX)
  // HWCAP bits from the kernel's uapi/asm/hwcap.h (named here so no header version matters).
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.neon = hw & (1ul << 1);                     // HWCAP_ASIMD
  f.dotprod = f.neon && (hw & (1ul << 20));     // HWCAP_ASIMDDP
  f.i8mm = f.neon && (hw2 & (1ul << 13));       // HWCAP2_I8MM
#elif defined(NANOCHAT_ARM64_APPLE)
  auto has = [](const char* name) {
    int v = 0;
    size_t n = sizeof(v);
    return sysctlbyname(name, &v, &n, nullptr, 0) == 0 && v != 0;
  };
  f.neon = true;
  f.dotprod = has("hw.optional.arm.FEAT_DotProd");
  f.i8mm = has("hw.optional.arm.FEAT_I8MM");
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace nanochat
