// AVX-VNNI dense kernels (built with -mavx2 -mfma -mf16c -mavxvnni): the Q8_0 GEMM on the
// VEX vpdpbusd (dense_q8_avx2.h), every other kernel the AVX2 one.
#include "dense/dense.h"
#include "dense/dense_avx2.h"
#include "dense/dense_q8_avx2.h"

namespace nanochat {
namespace {

void gemm(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (w.type == DenseType::Q8_0)
    gemm_q8_avx2(w, a, r0, r1, y, ldy);
  else
    dense_avx2::gemm(w, a, r0, r1, y, ldy);
}

}  // namespace

const DenseKernels kDenseAvxVnni = {"avx_vnni",
                                    gemm,
                                    dense_avx2::scores,
                                    dense_avx2::accumulate,
                                    dense_avx2::silu_mul,
                                    dense_avx2::exp_sum,
                                    dense_avx2::quantize};

}  // namespace nanochat
