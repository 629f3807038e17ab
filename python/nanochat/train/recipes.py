"""The seed's production training recipes as runnable commands: nano 125M, small 560M, medium 3B.

    nanochat recipe nano_125m --dry-run                  # plan, token budget, memory, time
    nanochat recipe small_560m --data DIR --out runs/small   # train it (one CUDA GPU)
    nanochat recipe medium_3b --dry-run --tokens-per-s 90000 # time from your own measurement

The seed (shared/seeds) names three runs: Nano 125M, "2 hours", dense; Small 560M, "8 hours",
hybrid attention; Medium 3B, "24 hours", mixture of experts. It gives no batch, token budget or
schedule, so these are ours: about 20 training tokens per parameter (for the MoE: per active
parameter, 0.87B), sequences of the config's max_seq_len, a few hundred thousand tokens per
optimizer step, and the WSD schedule (linear warmup, constant, 1-sqrt decay over the last
20%). Each recipe is `nanochat train --config NAME --set ...` with the overrides printed in
the plan (`--set` adds your own, e.g. train.collider.enabled=true or model.mhc.streams=4).

Data: a corpus prepared with `nanochat data prepare --source DIR --vocab-size 32768` (the
configs' vocabulary); pass its directory with --data.

On N GPUs (`--nproc N`): the recipe keeps its global batch (sequences per optimizer step)
and splits it over the ranks: each rank runs micro-batches of gcd(recipe micro-batch,
sequences / N) with the accumulation that makes up its share (N must divide the sequences
per step), under FSDP2 (`train.parallel = "fsdp"`, train/distributed.py). The plan's memory
is per rank: fp32 parameters, fp32 gradients (the f32 reduce-scatter of the mixed-precision
policy) and the optimizer state are sharded 1/N; on top of them the units FSDP has gathered
(the root, embedding and final norm, kept from forward to backward, and two blocks in
flight: the running one and the prefetched one) in bf16 with their bf16 gradients and
their f32 reduce-scatter input, 8 bytes per parameter; activations are per micro-batch and
not sharded. The command becomes `torchrun --standalone --nproc_per_node N -m nanochat
train ...`; without --dry-run, `nanochat recipe NAME --nproc N --data DIR` runs it.

Expected time = token budget / tokens per second. The tokens/s is measured here by default
(--measure-steps steps of the real config on this machine's device, after a warm-up, at
--measure-batch sequences; a config whose training state does not fit in half the memory is
measured at depths 1 and 2 and extrapolated linearly in the depth), or taken from
--tokens-per-s. The plan says which. A CPU measurement is a floor, not a GPU forecast. With N ranks the
plan assumes N times one device's tokens/s (linear scaling: an upper bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from nanochat.train import launch


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str  # also the config name (configs/models/NAME.toml)
    micro_batch: int  # sequences per forward
    grad_accum: int  # forwards per optimizer step
    steps: int
    warmup_steps: int
    seed_hours: float  # the seed's wall-clock target
    note: str

    def per_rank(self, nproc: int) -> tuple[int, int]:
        """(micro-batch, gradient accumulation) of each of nproc ranks: the same sequences
        per optimizer step as on one GPU, split evenly."""
        import math

        from nanochat.train.launch import check_nproc

        check_nproc(nproc)
        total = self.micro_batch * self.grad_accum
        if total % nproc:
            ok = ", ".join(str(k) for k in range(1, total + 1) if total % k == 0)
            raise ValueError(f"--nproc {nproc}: recipe {self.name}'s {total} sequences per "
                             f"optimizer step do not split evenly over {nproc} ranks; use "
                             f"one of {ok}")
        share = total // nproc
        micro = math.gcd(self.micro_batch, share)
        return micro, share // micro

    def overrides(self, seq: int, nproc: int = 1) -> list[str]:
        every = max(1, self.steps // 40)
        micro, accum = self.per_rank(nproc)
        return [f"train.batch_size={micro}", f"train.grad_accum={accum}",
                f"train.seq_len={seq}", f"train.max_steps={self.steps}",
                "train.time_budget_s=0", f"train.eval_every={every}",
                f"train.checkpoint_every={every * 2}", "train.eval_tokens=1048576",
                "train.device=cuda", f"schedule.warmup_steps={self.warmup_steps}",
                "schedule.decay_fraction=0.2", 'schedule.decay_shape="1-sqrt"',
                *(['train.parallel="fsdp"'] if nproc > 1 else [])]


RECIPES = {r.name: r for r in (
    # 16 x 1024 x 8 = 131,072 tokens a step; 19,000 steps = 2.49B tokens (20 per parameter)
    Recipe("nano_125m", 16, 8, 19_000, 500, 2.0, "dense, full attention"),
    # 4 x 2048 x 32 = 262,144 tokens a step; 42,000 steps = 11.0B tokens (20 per parameter)
    Recipe("small_560m", 4, 32, 42_000, 1_000, 8.0, "hybrid attention SSSL, window 512"),
    # 2 x 2048 x 128 = 524,288 tokens a step; 33,500 steps = 17.6B tokens (20 per active
    # parameter); fp32 AdamW state alone is 46 GiB: an 8-bit optimizer state helps here
    Recipe("medium_3b", 2, 128, 33_500, 1_000, 24.0,
           "16 ternary experts top-2 + shared, 3.07B total / 0.87B active"),
)}


def build(name: str, extra: list[str] | None = None, nproc: int = 1):
    """(Recipe, RunConfig) of a recipe on nproc ranks (each rank's batch), with extra --set
    overrides applied last."""
    from nanochat.config import ConfigError, apply_overrides, load_config

    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    r = RECIPES[name]
    base = load_config(name)
    cfg = apply_overrides(base, r.overrides(base.model.max_seq_len, nproc) + list(extra or []),
                          f"recipe {name}")
    return r, cfg


def train_args(name: str, overrides: list[str], data: str = "DIR",
               out: str | None = None) -> list[str]:
    """`nanochat train` arguments of a recipe run."""
    argv = ["train", "--config", name, "--data", data, "--out", out or f"runs/{name}"]
    for o in overrides:
        argv += ["--set", o]
    return argv


def command(name: str, overrides: list[str], nproc: int, data: str = "DIR",
            out: str | None = None) -> list[str]:
    """argv of the run: `nanochat train ...`, under torchrun when nproc > 1."""
    from nanochat.train.launch import torchrun_command

    argv = train_args(name, overrides, data, out)
    return ["nanochat", *argv] if nproc == 1 else torchrun_command(nproc, argv)


def rank_memory(cfg, nproc: int) -> dict:
    """Bytes per rank of the training state at the micro-batch (module doc): one process
    holds the whole fp32 state; FSDP2 over nproc > 1 ranks shards it and adds the gathered
    bf16 units."""
    import torch

    from nanochat.model.build import build_model
    from nanochat.model.gpt import model_info

    t = cfg.train
    info = model_info(cfg.model, t.batch_size, t.seq_len)
    mem = {"params": info["params_bytes"], "grads": info["params_bytes"],
           "optimizer": info["optimizer_state_bytes"], "gathered": 0,
           "activations": info["activation_bytes"]}
    if nproc > 1:
        with torch.device("meta"):  # shapes only, no memory
            model = build_model(cfg, "meta", seed=None)
        blocks = [sum(p.numel() for p in b.parameters()) for b in [*model.blocks, *model.mtp]]
        root = info["total_params"] - sum(blocks)
        for k in ("params", "grads", "optimizer"):
            mem[k] = -(-mem[k] // nproc)  # ceil: a shard is padded to equal sizes
        # bf16 weights + bf16 gradients + their f32 reduce-scatter input
        mem["gathered"] = (root + 2 * max(blocks)) * (2 + 2 + 4)
    mem["total"] = sum(mem.values())
    return mem


def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _time_steps(cfg, batch: int, seq: int, steps: int, device) -> float:
    """Seconds per optimizer step (the trainer's model, forward + backward + AdamW) on
    random tokens."""
    import torch

    from nanochat.model.build import build_model

    model = build_model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=device)

    def step():
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def measure_tokens_per_s(cfg, batch: int, steps: int) -> tuple[float, str]:
    """Training tokens/s of cfg.model at `batch` x train.seq_len on this machine, and how
    it was measured (the full model, or depths 1 and 2 extrapolated when it does not fit)."""
    import torch

    from nanochat.model.gpt import model_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = cfg.train.seq_len
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    need = model_info(cfg.model, batch, seq)["training_state_bytes"]
    if need < 0.5 * _available_bytes(device):
        sec = _time_steps(cfg, batch, seq, steps, device)
        return batch * seq / sec, f"measured: {steps} steps of the full model on {where}"
    t1, t2 = (_time_steps(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=n)),
                          batch, seq, steps, device) for n in (1, 2))
    sec = t1 + (t2 - t1) * (cfg.model.n_layers - 1)
    return batch * seq / sec, (f"measured at depth 1 ({t1:.2f} s/step) and 2 ({t2:.2f} s/step) "
                               f"on {where}, extrapolated to {cfg.model.n_layers} layers (the "
                               f"full model's training state, {need / 2**30:.0f} GiB, does not "
                               f"fit here)")


def plan(name: str, extra: list[str] | None = None, tokens_per_s: float | None = None,
         measure_steps: int = 2, measure_batch: int = 1, nproc: int = 1) -> dict:
    """The recipe on nproc ranks: batch, budget, per-rank memory, time and the command.
    tokens_per_s is one device's; the plan's is nproc times it."""
    from nanochat.model.gpt import model_info

    r, cfg = build(name, extra, nproc)
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * nproc
    info = model_info(cfg.model, t.batch_size, t.seq_len)
    mem = rank_memory(cfg, nproc)
    if tokens_per_s is not None:
        source = "given with --tokens-per-s"
    else:
        tokens_per_s, source = measure_tokens_per_s(cfg, measure_batch, measure_steps)
    if nproc > 1:
        source += f"; x {nproc} ranks, assuming linear scaling"
    budget = tokens_per_step * t.max_steps
    overrides = r.overrides(cfg.model.max_seq_len, nproc) + list(extra or [])
    return {
        "recipe": name, "note": r.note, "config": cfg.to_dict(),
        "overrides": overrides,
        "total_params": info["total_params"], "active_params": info["active_params"],
        "tokens_per_step": tokens_per_step, "steps": t.max_steps, "token_budget": budget,
        "tokens_per_active_param": budget / info["active_params"],
        "nproc": nproc, "parallel": "fsdp" if nproc > 1 else "none",
        "micro_batch_per_rank": t.batch_size, "grad_accum_per_rank": t.grad_accum,
        "global_batch_sequences": t.batch_size * t.grad_accum * nproc,
        "memory_per_rank": mem,  # bytes, per rank
        "training_state_bytes": mem["total"],
        "param_state_bytes": mem["params"] + mem["grads"] + mem["optimizer"],
        "activation_bytes": mem["activations"],
        "tokens_per_s": tokens_per_s * nproc, "tokens_per_s_source": source,
        "expected_hours": budget / (tokens_per_s * nproc) / 3600, "seed_hours": r.seed_hours,
        "command": launch.display(command(name, overrides, nproc)),
    }


def format_plan(p: dict) -> str:
    c = p["config"]
    t, s = c["train"], c["schedule"]

    def gib(b):
        return f"{b / 2**30:.1f} GiB"

    m, n = p["memory_per_rank"], p["nproc"]
    if n == 1:
        memory = [f"  memory     : {gib(p['training_state_bytes'])} training state at the "
                  f"micro-batch (params+grads+AdamW {gib(p['param_state_bytes'])}, activations "
                  f"{gib(p['activation_bytes'])}; rough, fp32, no activation checkpointing)"]
    else:
        memory = [f"  ranks      : {n} GPUs, FSDP2 (bf16 parameters gathered, f32 gradient "
                  f"reduction); per rank {t['batch_size']} x {t['seq_len']} tokens x "
                  f"{t['grad_accum']} accumulation, global batch "
                  f"{p['global_batch_sequences']} sequences",
                  f"  memory     : {gib(p['training_state_bytes'])} per rank (rough, no "
                  "activation checkpointing):",
                  f"               sharded 1/{n}: params {gib(m['params'])}, grads "
                  f"{gib(m['grads'])}, optimizer {gib(m['optimizer'])} (fp32)",
                  f"               gathered bf16 units (root + 2 blocks) {gib(m['gathered'])}, "
                  f"activations per micro-batch {gib(m['activations'])} (fp32 estimate)"]
    return "\n".join([
        f"recipe {p['recipe']}: {p['note']}",
        f"  model      : {p['total_params'] / 1e6:,.0f}M parameters "
        f"({p['active_params'] / 1e6:,.0f}M active)",
        "  data       : --data DIR, a corpus from `nanochat data prepare --source SRC "
        f"--vocab-size {c['model']['vocab_size']}`",
        f"  batch      : {p['global_batch_sequences'] // t['grad_accum']} x {t['seq_len']} "
        f"tokens x {t['grad_accum']} accumulation = {p['tokens_per_step']:,} tokens per step",
        f"  steps      : {p['steps']:,}  (eval every {t['eval_every']}, checkpoint every "
        f"{t['checkpoint_every']})",
        f"  schedule   : WSD, lr {c['optim']['lr']:g}, warmup {s['warmup_steps']}, "
        f"{s['decay_shape']} decay over the last {s['decay_fraction']:.0%}",
        f"  tokens     : {p['token_budget'] / 1e9:.2f}B  "
        f"({p['tokens_per_active_param']:.0f} per active parameter)",
        *memory,
        f"  speed      : {p['tokens_per_s']:,.0f} tokens/s ({p['tokens_per_s_source']})",
        f"  time       : {p['expected_hours']:,.1f} h at that speed (the seed's target: "
        f"{p['seed_hours']:g} h, which needs "
        f"{p['token_budget'] / (p['seed_hours'] * 3600):,.0f} tokens/s)",
        f"  command    : {p['command']}",
    ])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(RECIPES), help="the recipe (and config) name")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, token budget, memory and expected time; train nothing")
    p.add_argument("--data", help="prepared corpus directory (nanochat data prepare)")
    p.add_argument("--out", help="run directory (default runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="extra override after the recipe's (repeatable)")
    p.add_argument("--tokens-per-s", type=float,
                   help="training tokens/s to plan with instead of measuring here")
    p.add_argument("--measure-steps", type=int, default=2, help="timed steps (default 2)")
    p.add_argument("--measure-batch", type=int, default=1,
                   help="sequences per measured step (default 1)")
    p.add_argument("--json", action="store_true", help="the plan as one JSON object")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="N GPUs with FSDP2: the plan's per-rank batch and memory, and the "
                   "torchrun command (run without --dry-run)")


def main(args: argparse.Namespace) -> int:
    import json

    if args.dry_run:
        p = plan(args.name, args.set, args.tokens_per_s, args.measure_steps, args.measure_batch,
                 args.nproc)
        print(json.dumps(p) if args.json else format_plan(p))
        return 0
    from nanochat.train import loop as T

    r, cfg = build(args.name, args.set, args.nproc)
    if not args.data:
        raise ValueError(f"recipe {args.name}: --data DIR is required (a corpus prepared "
                         f"with nanochat data prepare --vocab-size {cfg.model.vocab_size})")
    if args.nproc > 1:  # the planned command, under torchrun
        import subprocess

        cmd = command(args.name, r.overrides(cfg.model.max_seq_len, args.nproc) + args.set,
                      args.nproc, args.data, args.out)
        print("launching: " + launch.display(cmd), flush=True)
        return subprocess.call(cmd)
    run_dir = Path(args.out or f"runs/{args.name}")
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tb'})", flush=True)
    result = T.train(cfg, Path(args.data), run_dir, resume=args.resume)
    T.summarize(result, cfg)
    return 0
