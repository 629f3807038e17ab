"""`nanochat bench train` names the machine: the CPU model and the kernel ISA that ran."""

from __future__ import annotations

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
