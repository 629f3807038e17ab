"""`nanochat bench NAME`: side-by-side measurements that print ratios (see docs/benchmarks.md)."""

from __future__ import annotations


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):  # x86 / some ARM kernels
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_line() -> str:
    """'CPU: <model>; kernel ISA: <isa>' (with '(NANOCHAT_ISA)' when pinned): the header
    line of a bench, so every number names the machine and the kernel path that ran."""
    import os

    from nanochat import ternary

    pinned = " (NANOCHAT_ISA)" if os.environ.get("NANOCHAT_ISA") else ""
    return f"CPU: {cpu_model()}; kernel ISA: {ternary.active_isa()}{pinned}"
