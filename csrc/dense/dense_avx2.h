// The AVX2 dense kernels (dense_avx2.cpp) by name, so the AVX-VNNI table (dense_avxvnni.cpp)
// can take every kernel but the Q8_0 GEMM from them. Plain declarations: no ISA flags needed
// to include this.
#pragma once

#include <cstdint>

#include "dense/dense.h"

namespace nanochat::dense_avx2 {

void gemm(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1, float* y, int64_t ldy);
void scores(const float* q, int64_t nq, const float* k, int64_t stride, int64_t n, int64_t d,
            float scale, float* out);
void accumulate(const float* p, int64_t nq, const float* v, int64_t stride, int64_t n, int64_t d,
                float* acc);
void silu_mul(const float* g, const float* u, int64_t n, float* out);
float exp_sum(float* p, int64_t n, float m);
void quantize(const float* x, int64_t tokens, int64_t k, int8_t* q, float* x_scale, int32_t* qsum);

}  // namespace nanochat::dense_avx2
