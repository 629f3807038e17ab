#!/usr/bin/env python3
"""Render `nanochat bench kernels --json` lines as the markdown table in docs/benchmarks.md.

    nanochat bench kernels --json > kernels.jsonl
    python benchmarks/render.py kernels.jsonl
"""

import json
import sys


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main(path: str) -> None:
    # the GEMV/GEMM rows (the quantize, layer and attention rows have other columns)
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [m for m in rows if m["op"] in ("gemv", "gemm")]
    print("| op | rows x cols | tokens | threads | kernel | time | GOPS | weight GB/s | of read BW | vs torch f32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    labels = {"tk2x8": "tiles", "tk2_dram": "dram", "tk2x8_dram": "tiles dram"}
    for m in rows:
        vs = f"{m['vs_torch']:.2f}x" if m.get("vs_torch") else "-"
        kernel = m["isa"] if m["kernel"] == "tk2" else f"{labels.get(m['kernel'], m['kernel'])} ({m['isa']})"
        print(f"| {m['op']} | {m['rows']}x{m['cols']} | {m['tokens']} | {m['threads']} | {kernel} "
              f"| {fmt_time(m['seconds'])} | {m['gops']:.1f} | {m['weight_gbps']:.1f} "
              f"| {m['bw_fraction']:.0%} | {vs} |")
    bws = sorted({(m["threads"], m["read_bw_gbps"]) for m in rows})
    print()
    print("Read bandwidth measured in the same run: "
          + ", ".join(f"{t} thread(s) {b:.1f} GB/s" for t, b in bws) + ".")


if __name__ == "__main__":
    main(sys.argv[1])
