#!/usr/bin/env bash
# Runs every `nanochat bench` with --json into OUTDIR (default: bench-results/<date>).
set -euo pipefail
out=${1:-bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
nanochat info --json > "$out/info.json"
lscpu > "$out/lscpu.txt" 2>/dev/null || true
for name in kernels train; do
  echo "nanochat bench $name --json > $out/$name.jsonl"
  nanochat bench "$name" --json > "$out/$name.jsonl"
done
echo "results in $out"
