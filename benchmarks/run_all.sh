#!/usr/bin/env bash
# Runs every `nanochat bench` NAME (the ten below; tests/test_readme.py checks the list is
# the CLI's) with --json and its default arguments into OUTDIR (default
# bench-results/<date>), one file per bench, plus the machine description. On 2 CPU cores
# this takes hours (e3 alone ~25 min, optim and collider tens of minutes each).
# decode compares against llama.cpp only where llama-cpp-python is installed.
set -euo pipefail
out=${1:-bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
nanochat info --json > "$out/info.json"
lscpu > "$out/lscpu.txt" 2>/dev/null || true
for name in kernels decode train collider arch optim loss e3 serve data; do
  extra=()
  if [ "$name" = e3 ]; then extra=(--out "$out/e3"); fi  # its report, plots and runs
  echo "nanochat bench $name --json ${extra[*]} > $out/$name.jsonl"
  nanochat bench "$name" --json "${extra[@]}" > "$out/$name.jsonl"
done
echo "results in $out"
