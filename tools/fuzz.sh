#!/usr/bin/env bash
# Runs every libFuzzer target built in BUILD_DIR (fuzz_NAME, from tests/fuzz/fuzz_NAME.cpp)
# for SECONDS each on its seed corpus tests/fuzz/corpus/NAME. Builds nothing:
#   cmake -S . -B build-fuzz -G Ninja -DNANOCHAT_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++-14 \
#     -DNANOCHAT_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo && cmake --build build-fuzz --target fuzz
#   tools/fuzz.sh build-fuzz 60
# New inputs go to a temporary directory (the repo's corpus is only read); a crash, leak,
# sanitizer report, timeout or out-of-memory fails the run, and its input is kept in
# $FUZZ_ARTIFACTS (default: a temporary directory, printed).
set -euo pipefail
if (( $# != 2 )); then
  echo "usage: $0 BUILD_DIR SECONDS_PER_TARGET" >&2
  exit 2
fi
build=$1
seconds=$2
root="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d "${TMPDIR:-/tmp}/nanochat-fuzz.XXXXXX")
artifacts=${FUZZ_ARTIFACTS:-$work/artifacts}
mkdir -p "$artifacts"
shopt -s nullglob
targets=("$build"/fuzz_*)
if (( ${#targets[@]} == 0 )); then
  echo "$0: no fuzz_* executables in $build (configure with -DNANOCHAT_FUZZ=ON, build --target fuzz)" >&2
  exit 2
fi
failed=0
for exe in "${targets[@]}"; do
  [[ -x $exe && -f $exe ]] || continue
  name=$(basename "$exe")
  name=${name#fuzz_}
  seeds="$root/tests/fuzz/corpus/$name"
  if [[ ! -d $seeds ]]; then
    echo "$0: no seed corpus $seeds for $exe" >&2
    exit 2
  fi
  mkdir -p "$work/$name"
  echo "=== fuzz $name: ${seconds}s, seeds $seeds"
  # -rss_limit_mb: a model file must not make the engine allocate GBs (ASan's shadow
  # included); -timeout: one input taking 10 s is a hang.
  if ! "$exe" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$artifacts/$name-" "$work/$name" "$seeds" 2>"$work/$name.log"; then
    tail -n 60 "$work/$name.log"
    echo "=== fuzz $name: FAILED (input in $artifacts)"
    failed=1
  else
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)" "$work/$name.log" || true
    echo "=== fuzz $name: ok, corpus $(ls "$work/$name" | wc -l) new inputs"
  fi
done
if (( failed )); then
  echo "fuzzing found a failure; inputs in $artifacts" >&2
  exit 1
fi
rm -rf "$work"
