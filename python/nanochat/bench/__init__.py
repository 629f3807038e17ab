"""`nanochat bench NAME`: side-by-side measurements that print ratios (see docs/benchmarks.md)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux, sysctl on macOS), else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):  # x86; aarch64 kernels say "Model"
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                           text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a benchmark ran on: CPU, threads, and the kernel path each op takes now (the
    ISA that NANOCHAT_ISA or the CPU selects), as `nanochat info` reports them."""
    from nanochat._core import core

    info = core().info()
    return {"cpu": cpu_model(), "threads": info["threads"], "isa": info["isa"],
            "ops": info.get("ops", {})}


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    ops = ", ".join(f"{k}={v}" for k, v in m["ops"].items())
    return f"machine: {m['cpu']}, {m['threads']} threads, ISA {m['isa']}" + (
        f"; kernel paths: {ops}" if ops else "")
