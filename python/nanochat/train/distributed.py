"""Data-parallel training with PyTorch's DistributedDataParallel, under torchrun.

    torchrun --nproc_per_node 2 -m nanochat train --data DIR --out runs/x   # or:
    nanochat train --nproc 2 --data DIR --out runs/x

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `Group.from_env()` joins the process group
(gloo on CPU, NCCL on CUDA) and every rank builds the same model from the same seed, which
DDP then keeps identical by averaging gradients in the backward. Each rank draws its batches
from its own contiguous shard of the training tokens (`shard`), so ranks never read the same
window; the loader's position is the shared step counter, saved in the checkpoint. Rank 0
alone logs, writes metrics, TensorBoard, checkpoints and the sample; the others wait at the
next collective. Decisions that end the loop (time budget, a signal) are taken on rank 0 and
broadcast, so no rank waits forever for one that left. A rank that fails makes torchrun stop
the others (its exit code is the job's).

Checkpoints are the single-process format (the model and optimizer state are replicated, so
rank 0's copy is the whole state): a run saved with N ranks resumes with any number,
`nanochat export` and `sample` read it as usual.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank of world (1 = not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str = "cpu", timeout_s: float = 1800.0) -> "Group":
        """The job torchrun started (joined once per process), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        try:
            rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or bad "
                             f"({e}); launch with torchrun") from None
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(local)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if device_type == "cpu" and "NANOCHAT_NUM_THREADS" not in os.environ:
            from nanochat.ops import ternary  # the core's pool: torchrun's per-rank share

            ternary.set_num_threads(torch.get_num_threads())
        return cls(rank, world, local)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run forward/backward through: DDP over it when distributed."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda"
                                       else None)

    def shard(self, tokens: np.ndarray, seq_len: int) -> np.ndarray:
        """This rank's contiguous, disjoint slice of the training tokens."""
        if self.world == 1:
            return tokens
        n = len(tokens) // self.world
        if n < seq_len + 1:
            raise ValueError(f"{len(tokens)} training tokens split over {self.world} ranks "
                             f"leave {n} each, fewer than one window of seq_len {seq_len}")
        return tokens[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of a per-rank number over the ranks (every rank gets it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / self.world

    def agree(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's decision, on every rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.broadcast(t, src=0)
        return bool(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
