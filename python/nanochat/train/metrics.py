"""Training metrics: TensorBoard event files plus a JSONL log, one object per line.

    RUN/metrics.jsonl   {"step": 10, "loss": 5.1, "lr": 0.003, "tokens_per_s": 4100, ...}
    RUN/tb/             events.out.tfevents.* (tensorboard --logdir RUN/tb)

Every value logged to one is logged to the other under the same name.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from nanochat import atomic


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a torn or foreign line."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class MetricsLogger:
    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        if purge_step is not None and self.jsonl_path.exists():
            # A resumed run repeats no step: drop lines logged after the checkpoint, and a
            # line torn by a crash mid-write.
            keep = [line for line in self.jsonl_path.read_text(errors="replace").splitlines()
                    if _step(line) is not None and _step(line) <= purge_step]
            atomic.write_text(self.jsonl_path, "".join(line + "\n" for line in keep))
        self._jsonl = open(self.jsonl_path, "a")
        self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, **values: float) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.flush()
        self._tb.close()
