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

`train.parallel = "fsdp"` shards instead (PyTorch's FSDP2, `fully_shard` on every block and
then the whole model): each rank keeps 1/N of the parameters, gradients and optimizer state
as DTensor shards and gathers a block's weights just before it runs (bf16 parameters with
f32 gradient reduction on CUDA). Element-wise optimizers (AdamW, Lion) update their shard;
Muon's Newton-Schulz needs whole matrices, and DTensor's matmul gathers them, so every rank
orthogonalizes the full matrix and keeps its rows (exact, at the cost of the gather). 8-bit
optimizer state and GaLore are refused under FSDP: their blockwise codes and projections
are defined on whole tensors.

Checkpoints are sharded under torchrun (`train.checkpoint_format`, nanochat/checkpoint.py):
every rank writes its own part of the model and optimizer state with
torch.distributed.checkpoint (DCP) from the state dicts of
torch.distributed.checkpoint.state_dict (FSDP's DTensor shards; DDP's replicated tensors,
which DCP writes once), and resuming loads them into the current world's state dicts, so a
run saved with N ranks resumes with any number and either strategy. "gathered" writes the
single-process format instead (FSDP gathers the full state to rank 0), which loads under
any world too. `nanochat export` and `sample` read either.
"""

from __future__ import annotations

import contextlib
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

    def wrap(self, model: torch.nn.Module, parallel: str = "ddp") -> torch.nn.Module:
        """The model to run forward/backward through: itself in one process; DDP over it, or
        the model itself sharded in place by FSDP2 ("fsdp"), under torchrun."""
        if self.world == 1:
            return model
        dev = next(model.parameters()).device
        if parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(dev.type, (self.world,))
            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if dev.type == "cuda" else MixedPrecisionPolicy())
            for block in [*model.blocks, *model.mtp]:  # one all-gather per block
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)  # embedding, final norm: the root
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda"
                                       else None)

    def gradient_sync(self, net: torch.nn.Module, sync: bool):
        """Context of one micro-batch's backward: gradients are averaged over the ranks when
        `sync` (the last micro-batch of a step), only accumulated otherwise."""
        if self.world == 1 or sync and not _sharded(net):
            return contextlib.nullcontext()
        if _sharded(net):
            net.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return net.no_sync()

    def full_state(self, net: torch.nn.Module, opt: torch.optim.Optimizer
                   ) -> tuple[dict, dict] | None:
        """(model state, optimizer state) in the single-process format, on rank 0 (None on
        the others). Under FSDP every rank must call it: the shards are gathered."""
        if not _sharded(net):
            model = getattr(net, "module", net)  # DDP's wrapped model: its own names
            return (model.state_dict(), opt.state_dict()) if self.main else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(net, options=full)
        opt_sd = get_optimizer_state_dict(net, opt, options=full)
        return (model_sd, _ids_from_names(opt_sd, opt, net)) if self.main else None

    def load_optimizer(self, net: torch.nn.Module, opt: torch.optim.Optimizer,
                       state: dict) -> None:
        """Load a single-process optimizer state (every rank holds the whole of it)."""
        if not _sharded(net):
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(net, opt, _names_from_ids(state, opt, net),
                                 options=StateDictOptions(full_state_dict=True))

    def sharded_state(self, net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
        """This rank's model and optimizer state for a sharded checkpoint (parameter names as
        keys, whatever the wrapper); every rank calls it."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, opt_sd = get_state_dict(net, opt)
        return {"model": model_sd, "optim": opt_sd}

    def load_sharded(self, net: torch.nn.Module, opt: torch.optim.Optimizer,
                     shards) -> None:
        """Load a sharded checkpoint's model and optimizer state, resharded to this world's
        layout; every rank calls it."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from nanochat import checkpoint

        sd = checkpoint.read_shards(shards, self.sharded_state(net, opt))
        set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

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


def check_parallel(cfg, group: Group) -> None:
    """Refuse what train.parallel cannot run with this config (before anything starts)."""
    if group.world > 1 and cfg.train.parallel == "fsdp" and (cfg.optim.state == "8bit"
                                                              or cfg.optim.galore.enabled):
        raise ValueError("train.parallel = 'fsdp': optim.state = '8bit' and optim.galore are "
                         "defined on whole tensors, not FSDP's shards; use optim.state = "
                         "'fp32' without GaLore, or train.parallel = 'ddp'")


def _sharded(net: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def _param_names(opt: torch.optim.Optimizer, net: torch.nn.Module) -> list[str]:
    """The optimizer's parameters by name, in its state_dict()'s id order."""
    name = {id(p): n for n, p in net.named_parameters()}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def _ids_from_names(sd: dict, opt: torch.optim.Optimizer, net: torch.nn.Module) -> dict:
    """get_optimizer_state_dict's name-keyed state -> torch's id-keyed state_dict()."""
    ids = {n: i for i, n in enumerate(_param_names(opt, net))}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {ids[n]: v for n, v in sd["state"].items()}, "param_groups": groups}


def _names_from_ids(sd: dict, opt: torch.optim.Optimizer, net: torch.nn.Module) -> dict:
    names = _param_names(opt, net)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {names[i]: v for i, v in sd["state"].items()}, "param_groups": groups}
