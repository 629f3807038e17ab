"""`nanochat bench train` names the machine: the CPU model and the kernel ISA that ran."""

from __future__ import annotations

import pytest
from nanochat.ops import ternary


def test_text_output_names_the_cpu_and_the_pinned_isa(run_nanochat):
    isa = "avx2" if "avx2" in ternary.supported_isas() else "scalar"
    r = run_nanochat(["bench", "train", "--configs", "tiny", "--batch", "1", "--seq", "32",
                      "--steps", "1", "--rounds", "1", "--threads", "1"], timeout=300,
                     NANOCHAT_ISA=isa)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("machine: ") and f"ISA {isa}" in lines[0]
    assert not lines[0].startswith("machine: ,")  # a model name, not an empty field
    rows = [ln.split() for ln in lines[2:]]
    assert [row[1] for row in rows] == ["cpp", "torch"]
    assert all(row[2] == isa for row in rows)  # each child ran on the pinned ISA


@pytest.mark.slow  # three torchrun processes and three torch imports: ~30 s on 2 loaded cores
def test_nproc_rows_for_one_and_two_gloo_ranks(run_nanochat):
    """`bench train --nproc 2`: one torchrun job of 1 rank and one of 2, side by side."""
    import json

    r = run_nanochat(["bench", "train", "--nproc", "2", "--configs", "tiny", "--batch", "1",
                      "--seq", "16", "--steps", "2", "--rounds", "1", "--threads", "2",
                      "--json"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("machine: ")  # the CPU line; stdout stays JSON
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(m["nproc"], m["parallel"], m["threads_per_rank"]) for m in rows] == [
        (1, "none", 2), (2, "ddp", 1)]
    for m in rows:
        assert m["cpu"] and m["isa"] and m["backend"] == "gloo"
        assert m["tokens_per_s"] > 0 and len(m["peak_rss_bytes_per_rank"]) == m["nproc"]
        assert m["command"].startswith(f"torchrun --standalone --nproc_per_node={m['nproc']} ")
    assert rows[0]["scaling_vs_1"] == 1.0
    assert abs(rows[1]["scaling_vs_1"] - rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]) < 1e-9


def test_nproc_zero_is_a_clear_error(run_nanochat):
    r = run_nanochat(["bench", "train", "--nproc", "0", "--configs", "tiny"], timeout=120)
    assert r.returncode != 0 and "--nproc must be an integer >= 1, got 0" in r.stderr
