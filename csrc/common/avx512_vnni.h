// vpdpbusd for the AVX-512 VNNI kernel files (the ternary GEMV/GEMM, the Q8_0 head). Included
// only by files built with -mavx512vnni; in an anonymous namespace like avx512_math.h.
#pragma once

#include <immintrin.h>

namespace nanochat {
namespace {

// acc + vpdpbusd(u, s) in place. GCC 12 treats the intrinsic as a three-operand op and
// copies accumulators around it (a vmovdqa per vpdpbusd, then spills in the 4-row GEMV);
// the asm names the accumulator as read-write, so it stays in its register.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
#if defined(__GNUC__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(s));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u, s);
#endif
}

}  // namespace
}  // namespace nanochat
