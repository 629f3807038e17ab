#!/usr/bin/env bash
# The C++ unit tests on aarch64 from an x86-64 Linux machine: cross-build the core and
# nanochat_tests (no Python extension), then run them under qemu-user on two emulated CPUs:
#   -cpu max         NEON + dotprod + i8mm: best ISA neon_dotprod (the SDOT kernels, and the
#                    SMMLA ternary GEMM for several tokens)
#   -cpu cortex-a72  Armv8.0 NEON, no dotprod: best ISA neon (the baseline NEON kernels)
# Tests that loop over supported_isas() compare every NEON kernel (engine and training: the
# codes GEMM, fused loss, 8-bit optimizer, SwiGLU, attention, bf16 rows) with the scalar
# reference on each CPU; Gemm.KernelsHonourTileRangesAndStrides also calls the SDOT kernel
# by name where neon_dotprod's kernel is the i8mm one. Needs (Debian/Ubuntu): g++-aarch64-linux-gnu qemu-user googletest.
# Usage: tools/arm64_test.sh [build dir (default build-arm64)] [extra gtest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-arm64}
shift $(( $# > 0 ? 1 : 0 ))
gtest_src=${NANOCHAT_GTEST_SOURCE_DIR:-/usr/src/googletest}
sysroot=/usr/aarch64-linux-gnu
for tool in aarch64-linux-gnu-g++ qemu-aarch64; do
  command -v "$tool" >/dev/null ||
    { echo "$tool not found: apt-get install g++-aarch64-linux-gnu qemu-user googletest" >&2; exit 1; }
done
[[ -f "$gtest_src/CMakeLists.txt" ]] ||
  { echo "no GoogleTest sources in $gtest_src (apt-get install googletest)" >&2; exit 1; }

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# -Wno-deprecated: GoogleTest 1.12's own old cmake_minimum_required warns on recent CMake.
cmake -S . -B "$build" "${generator[@]}" --no-warn-unused-cli -Wno-deprecated \
  -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
  -DNANOCHAT_BUILD_TESTS=ON -DNANOCHAT_PYTHON=OFF -DNANOCHAT_CUDA=OFF \
  -DNANOCHAT_GTEST_SOURCE_DIR="$gtest_src" >/dev/null
cmake --build "$build" -j "${JOBS:-2}" --target nanochat_tests

# Two tests run on native hosts only. ThreadPool.FailedThreadStartIsAnError lowers
# RLIMIT_AS in a child so thread stacks run out; under qemu-user that limit starves qemu
# itself, which aborts (an assertion in its TCG). EngineLoad.ModelOwnsItsWeights is a
# "threadsafe" death test, which re-executes the test binary: an aarch64 binary that the
# host cannot exec without binfmt_misc. A --gtest_filter in "$@" replaces this one.
run() {
  local cpu=$1
  shift
  echo "--- qemu-aarch64 -cpu $cpu"
  qemu-aarch64 -L "$sysroot" -cpu "$cpu" "$build/nanochat_tests" --gtest_brief=1 \
    --gtest_filter='-ThreadPool.FailedThreadStartIsAnError:EngineLoad.ModelOwnsItsWeights' "$@"
}
run max "$@"
# Pinning neon_dotprod throws unless the CPU reports SDOT: proves it was detected.
NANOCHAT_ISA=neon_dotprod run max --gtest_filter='Dispatch.ArmIsasFollowTheCpu'
# qemu raises SIGILL on SDOT for cortex-a72, so this pass also shows none runs on the neon path.
run cortex-a72 "$@"
