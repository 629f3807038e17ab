// AVX-VNNI ternary kernel (built with -mavx2 -mfma -mavxvnni): the AVX2 kernel's tiles with
// the VEX vpdpbusd in place of vpmaddubsw + vpmaddwd, see kernels_avx2_impl.h.
#include "ternary/kernels_avx2_impl.h"

namespace nanochat {

void gemm_avxvnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  gemm_256(a, r0, r1, t0, t1);
}

}  // namespace nanochat
