#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama.cpp source vendored in the llama-cpp-python
# sdist (a pinned, PyPI-hosted copy of llama.cpp, so no git clone), for `nanochat bench serve`'s
# comparison. Idempotent: an existing binary is reused. The last line of stdout is the binary's
# path (bench serve looks at the same place by default). Everything else goes to stderr.
#   tools/build_llama_server.sh [OUT_DIR]    (default: build-llama/ in the repo root)
# Environment: PYTHON (default python3, needs pip), JOBS (default 2), LLAMA_CPP_PYTHON_VERSION.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/build-llama}" && cd "${1:-$root/build-llama}" && pwd)"
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python=${PYTHON:-python3}
jobs=${JOBS:-2}
bin="$out/build/bin/llama-server"
if [[ -x $bin ]]; then
  echo "$bin"
  exit 0
fi
src="$out/llama-cpp-python-$version"
if [[ ! -f $src/vendor/llama.cpp/CMakeLists.txt ]]; then
  echo "$0: downloading the llama-cpp-python==$version sdist" >&2
  "$python" -m pip download -q --no-binary llama-cpp-python --no-deps -d "$out/sdist" \
    "llama-cpp-python==$version" >&2
  shopt -s nullglob
  tarballs=("$out"/sdist/llama[_-]cpp[_-]python-"$version".tar.gz)
  shopt -u nullglob
  if (( ${#tarballs[@]} == 0 )); then
    echo "$0: pip download gave no llama-cpp-python $version sdist in $out/sdist" >&2
    exit 1
  fi
  # Unpack to a temporary directory first so an interrupted run leaves no half tree behind.
  tmp=$(mktemp -d "$out/unpack.XXXXXX")
  tar -xzf "${tarballs[0]}" -C "$tmp"
  mv "$tmp"/*/ "$src"
  rmdir "$tmp"
fi
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
echo "$0: building llama-server from $src/vendor/llama.cpp with -j$jobs" >&2
cmake -S "$src/vendor/llama.cpp" -B "$out/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF "${launcher[@]}" >&2
cmake --build "$out/build" --target llama-server -j"$jobs" >&2
if [[ ! -x $bin ]]; then
  echo "$0: the build finished but $bin is missing" >&2
  exit 1
fi
echo "$bin"
