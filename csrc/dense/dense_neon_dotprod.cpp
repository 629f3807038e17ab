// The Q8_0 GEMM of the neon_dotprod dense kernels (built with -march=armv8.2-a+dotprod; chosen
// only where the CPU reports dotprod, see dense.cpp). vdotq_s32 sums the 4 products of one
// block's codes per int32 lane, which is the Q8R lane order as it is (dense_neon_q8.h).
// |lane| <= 32 * 128 * 128 = 2^19 per block. The other dense kernels are dense_neon.cpp's.
#include "dense/dense_neon_q8.h"

namespace nanochat {
namespace {

struct DotSdot {
  struct Acc {
    int32x4_t v;
  };
  static void zero(Acc& s) { s.v = vdupq_n_s32(0); }
  static void add(Acc& s, int8x16_t w, int8x16_t x) { s.v = vdotq_s32(s.v, w, x); }
  static int32x4_t sum(const Acc& s) { return s.v; }
};

}  // namespace

void dense_q8_gemm_neon_dotprod(const DenseMatrix& w, const DenseActs& a, int64_t r0, int64_t r1,
                                float* y, int64_t ldy) {
  neon_drive<Q8<DotSdot>::Tile>(w, a, r0, r1, y, ldy);
}

}  // namespace nanochat
