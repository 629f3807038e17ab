"""The training loop: BitNet b1.58 QAT (optimizer: nanochat.optim), WSD schedule, async data, evals,
TensorBoard/JSONL metrics, atomic checkpoints and bit-exact resume.

    nanochat train                       # tiny model on the Python stdlib, ~10 minutes
    nanochat train --config nano_125m --data DIR --out runs/x --steps 5000
    nanochat train --out runs/x --resume # continue where runs/x stopped

`train()` is the whole job; the CLI only parses arguments. SIGINT/SIGTERM finish
the current step, write a checkpoint and return.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat import atomic, checkpoint, malloc
from nanochat.config import RunConfig, from_dict
from nanochat.data.dataset import TokenData, unigram_bigram_bpb
from nanochat.data.loader import BatchLoader, eval_batches
from nanochat.model.build import build_model
from nanochat.model.gpt import GPT
from nanochat.model.load import load_model
from nanochat.optim import build_optimizer, state_bytes
from nanochat.train.collider import Collider
from nanochat.train.distributed import Group, check_parallel
from nanochat.train.metrics import MetricsLogger, peak_memory_bytes
from nanochat.train.schedule import progress, wsd_factor


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # train loss of every step run here
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens_per_s: float = 0.0
    interrupted: bool = False
    checkpoint: Path | None = None
    model: object = None  # the trained GPT, for the summary and sample
    data: object = None  # the TokenData it trained on


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def _reference_model(cfg: RunConfig, device) -> GPT | None:
    """Collider's frozen reference model (train.collider.reference), or None."""
    c = cfg.train.collider
    if not (c.enabled and c.reference):
        return None
    try:
        ref, _, _ = load_model(c.reference)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"train.collider.reference: {e}") from None
    if ref.config.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"train.collider.reference {c.reference}: vocab_size "
                         f"{ref.config.vocab_size}, the model trains with {cfg.model.vocab_size}")
    ref.set_bitlinear_kernel("auto")
    return ref.to(device).eval().requires_grad_(False)


@torch.no_grad()
def evaluate(model: GPT, data: TokenData, cfg: RunConfig,
             device: torch.device) -> tuple[float, float]:
    """Held-out mean loss (nats/token) and bits per UTF-8 byte on the val split."""
    was_training = model.training
    model.eval()
    token_bytes = torch.as_tensor(data.token_bytes, dtype=torch.float64)
    nats, n_tokens, n_bytes = 0.0, 0, 0.0
    for x, y in eval_batches(data.val, cfg.train.batch_size, cfg.train.seq_len,
                             cfg.train.eval_tokens):
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y, loss_reduction="none")
        nats += float(loss.double().sum())
        n_tokens += y.numel()
        n_bytes += float(token_bytes[y.cpu()].sum())
    model.train(was_training)
    if n_tokens == 0:
        raise ValueError("the validation split is shorter than one eval sequence; "
                         "prepare more data or lower train.seq_len")
    return nats / n_tokens, nats / (math.log(2) * max(n_bytes, 1.0))


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps (a second SIGINT aborts)."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals: main only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint "
              "(Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: RunConfig, data_dir: Path | None, run_dir: Path, resume: bool = False,
          progress_bar: bool = True, stop_at_step: int | None = None,
          log=print, group: Group | None = None, source=None,
          init_model: dict | None = None) -> TrainResult:
    """Train `cfg` on prepared data in `data_dir`, writing checkpoints/logs to `run_dir`.

    `resume` continues from the run's latest checkpoint (its config wins over `cfg`
    for the model; the schedule/budget settings of `cfg` apply). `stop_at_step`
    stops early as if interrupted (used to test bit-exact resume). `group`: this process's
    place in a torchrun job (nanochat/train/distributed.py); rank 0 alone logs and writes.
    `source`: data other than a token directory (data_dir is then unused): an object with
    the TokenData attributes the loop reads (tokenizer, dir holding tokenizer/), loader(...)
    and evaluate(model, cfg, device) (chat fine-tuning: nanochat/train/sft.py). `init_model`:
    the weights a fresh run starts from (a resumed one loads its own checkpoint).
    """
    group = group or Group()
    if not group.main:
        log, progress_bar = (lambda *_: None), False
    run_dir = Path(run_dir)
    malloc.tune()  # reuse activation buffers instead of re-faulting them each step
    data = source if source is not None else TokenData(data_dir)
    if data.tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size = {cfg.model.vocab_size} but the tokenizer in "
                         f"{data_dir} has {data.tokenizer.vocab_size} tokens; prepare data with "
                         f"--vocab-size {cfg.model.vocab_size} or set model.vocab_size")
    t = cfg.train
    device = pick_device(t.device)

    state = None
    if resume:
        if group.main:
            checkpoint.recover(run_dir)  # a save killed part way leaves temp dirs behind
        group.barrier()
        # a sharded checkpoint's tensors are read below, each rank its own part
        state = checkpoint.load(run_dir, log=log, consolidate=False)
        saved = from_dict(state["config"], f"checkpoint {state['path']}")
        if saved.model != cfg.model:
            raise ValueError(f"checkpoint {state['path']} was trained with a different model "
                             f"config ({saved.model}) than the one given ({cfg.model})")
        # The batches a step sees depend on these; with any changed, resume is not exact.
        changed = [f"train.{k} (saved {getattr(saved.train, k)}, now {getattr(t, k)})"
                   for k in ("batch_size", "seq_len", "grad_accum", "seed")
                   if getattr(saved.train, k) != getattr(t, k)]
        if changed:
            raise ValueError(f"checkpoint {state['path']}: cannot resume exactly with changed "
                             f"{', '.join(changed)}; keep the saved values or start a new run")
        if state["tokenizer_sha256"] != data.tokenizer.sha256():
            raise ValueError(f"checkpoint {state['path']} used a different tokenizer "
                             f"than {data_dir}")

    if group.world > 1 and t.collider.enabled:
        raise ValueError("train.collider.enabled: token filtering does not run under torchrun "
                         "yet; train with one process or turn it off")
    if source is not None and group.world > 1:
        raise ValueError("training on a custom data source runs in one process")
    if source is not None and t.collider.enabled:  # its scoring passes carry no doc_start
        raise ValueError("train.collider.enabled: Collider's token filtering does not run on "
                         "packed conversations; turn it off (--set train.collider.enabled=false)")
    check_parallel(cfg, group)
    sharded = group.world > 1 and t.parallel == "fsdp"
    # every rank writes a sharded checkpoint; FSDP's ranks all take part in gathering one too
    shard_files = t.checkpoint_format == "sharded" or (t.checkpoint_format == "auto"
                                                       and group.world > 1)
    every_rank_saves = sharded or shard_files
    model = build_model(cfg, device, seed=t.seed)
    if init_model is not None and state is None:
        model.load_state_dict(init_model)
    collider = Collider.from_config(t.collider, _reference_model(cfg, device), log=log)
    if state is not None and "shards" not in state:
        model.load_state_dict(state["model"])
    # DDP averages gradients; FSDP shards the parameters in place, so the optimizer is built
    # on what wrap() leaves
    net = group.wrap(model, t.parallel)
    opt = build_optimizer(model, cfg, log=log if state is None else (lambda *_: None))
    step, elapsed_before, train_s = 0, 0.0, 0.0
    if state is not None:
        if "shards" in state:
            group.load_sharded(net, opt, state["shards"])
        else:
            group.load_optimizer(net, opt, state["optimizer"])
        step = state["step"]
        elapsed_before = state["elapsed_s"]
        train_s = state.get("train_s", elapsed_before)  # older checkpoints: wall time
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        log(f"resumed from {state['path']} at step {step}")
        if state.get("world", 1) != group.world:  # each rank's shard of the data changes
            log(f"note: saved with {state.get('world', 1)} rank(s), resumed with "
                f"{group.world}: the batches from here on differ from the original run's")
    elif group.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    counts = model.num_params()
    log(f"model: {counts['total']:,} params ({counts['ternary']:,} ternary), device {device}, "
        f"bitlinear={t.bitlinear} (backward {t.bitlinear_backward}), "
        f"threads={torch.get_num_threads()}"
        + (f", {group.world} ranks ({t.parallel})" if group.world > 1 else ""))
    # purge from the step we start at: a resumed run repeats no step, and a fresh run in a
    # directory that already has a log (a first run killed before its first checkpoint)
    # starts it over
    metrics = MetricsLogger(run_dir, purge_step=step) if group.main else None
    loader_args = {"seed": t.seed,
                   "start_step": state["loader"]["step"] if state is not None else 0,
                   "prefetch": t.prefetch, "device": str(device),
                   "pin_memory": device.type == "cuda"}
    loader = (data.loader(t.batch_size, t.seq_len, **loader_args) if source is not None else
              BatchLoader(group.shard(data.train, t.seq_len), t.batch_size, t.seq_len,
                          **loader_args))
    if source is not None:
        def evaluate_run(model, data, cfg, device):
            return source.evaluate(model, cfg, device)
    else:
        evaluate_run = evaluate
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * group.world
    result = TrainResult(run_dir=run_dir, step=step)
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=step, unit="step", dynamic_ncols=True,
                   file=sys.stderr, desc="train")

    def save() -> Path | None:
        """Every rank calls it when every_rank_saves; rank 0 returns the checkpoint dir."""
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        st = {"step": step, "elapsed_s": elapsed, "train_s": train_s, "rng": rng,
              "config": cfg.to_dict(), "loader": loader.state_dict(),
              "tokenizer_sha256": data.tokenizer.sha256(), "world": group.world}
        if shard_files:
            return checkpoint.save_sharded(run_dir, step, group.sharded_state(net, opt), st,
                                           cfg.to_dict(), data.dir / "tokenizer",
                                           keep=t.keep_checkpoints)
        full = group.full_state(net, opt)
        if full is None:
            return None
        return checkpoint.save(run_dir, step, {"model": full[0], "optimizer": full[1], **st},
                               cfg.to_dict(), data.dir / "tokenizer", keep=t.keep_checkpoints)

    start = time.perf_counter()
    elapsed = elapsed_before
    # Throughput windows count training steps only (train_s), not evals or checkpoints.
    window_train_s, window_tokens, window_wait = train_s, 0, 0.0
    last_saved, saved_step, last_eval = None, -1, -1
    try:
        with _StopFlag() as flag:
            model.train()
            while step < t.max_steps:
                elapsed = elapsed_before + time.perf_counter() - start
                if group.agree(bool(t.time_budget_s) and elapsed >= t.time_budget_s, device):
                    log(f"time budget of {t.time_budget_s:g}s reached at step {step}")
                    break
                if group.agree(flag.stop or (stop_at_step is not None and step >= stop_at_step),
                               device):
                    result.interrupted = True
                    break
                step_t0 = time.perf_counter()
                lr_factor = wsd_factor(step, progress(step, t.max_steps, elapsed, t.time_budget_s),
                                       cfg.schedule)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor
                loss_sum, kept_sum = 0.0, 0.0
                for micro in range(t.grad_accum):
                    x, y, *doc = loader.next()  # doc: packed rows' doc_start (sft.py)
                    window_wait += loader.last_wait_s
                    if collider is not None:  # token filtering: score, select, gathered backward
                        loss_f, kept = collider.forward_backward(model, x, y, t.grad_accum,
                                                                 autocast)
                        loss_sum, kept_sum = loss_sum + loss_f, kept_sum + kept
                        continue
                    # the ranks average gradients in the last micro-batch's backward only
                    with group.gradient_sync(net, micro == t.grad_accum - 1):
                        with autocast:
                            _, loss = net(x, y, doc_start=doc[0]) if doc else net(x, y)
                        (loss / t.grad_accum).backward()
                    loss_sum += float(loss.detach())
                grad_norm = (_norm(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                  cfg.optim.grad_clip))
                             if cfg.optim.grad_clip > 0 else None)
                opt.step()
                opt.zero_grad(set_to_none=True)
                train_s += time.perf_counter() - step_t0
                step += 1
                loss_val = group.mean(loss_sum / t.grad_accum, device)
                if not math.isfinite(loss_val):
                    raise FloatingPointError(f"loss became {loss_val} at step {step}; "
                                             f"lower optim.lr")
                result.losses.append(loss_val)
                window_tokens += tokens_per_step
                if bar is not None:
                    if t.time_budget_s:  # a budget-bound run: total = steps expected in it
                        p = progress(step, t.max_steps,
                                     elapsed_before + time.perf_counter() - start,
                                     t.time_budget_s)
                        bar.total = max(step, min(t.max_steps, round(step / max(p, 1e-9))))
                    bar.update(1)

                is_last = step >= t.max_steps
                if (step % t.log_every == 0 or is_last) and group.main:
                    span = train_s - window_train_s
                    tps = window_tokens / span if span > 0 else 0.0
                    result.tokens_per_s = tps
                    metrics.log(step, loss=loss_val, lr=opt.param_groups[0]["lr"],
                                grad_norm=grad_norm, tokens_per_s=tps, data_wait_s=window_wait,
                                data_wait_fraction=window_wait / span if span > 0 else 0.0,
                                peak_memory_bytes=peak_memory_bytes(device), train_s=train_s,
                                optim_state_bytes=state_bytes(opt),
                                collider_kept_fraction=(kept_sum / t.grad_accum if collider
                                                        else None))
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}",
                                        lr=f"{opt.param_groups[0]['lr']:.2e}")
                    window_train_s, window_tokens, window_wait = train_s, 0, 0.0
                # a sharded model's forward is collective: every rank evaluates
                if (step % t.eval_every == 0 or is_last) and (group.main or sharded):
                    result.val_loss, result.val_bpb = evaluate_run(model, data, cfg, device)
                    last_eval = step
                    if group.main:
                        metrics.log(step, val_loss=result.val_loss, val_bpb=result.val_bpb,
                                    train_s=train_s)
                        msg = (f"step {step}: val loss {result.val_loss:.4f}, "
                               f"val bits/byte {result.val_bpb:.4f}")
                        (bar.write(msg) if bar is not None else log(msg))
                if (step % t.checkpoint_every == 0 or is_last) and (group.main or
                                                                    every_rank_saves):
                    elapsed = elapsed_before + time.perf_counter() - start
                    last_saved, saved_step = save(), step
            elapsed = elapsed_before + time.perf_counter() - start
            if (group.main or sharded) and last_eval != step:
                result.val_loss, result.val_bpb = evaluate_run(model, data, cfg, device)
                if group.main:
                    metrics.log(step, val_loss=result.val_loss, val_bpb=result.val_bpb,
                                train_s=train_s)
            if (group.main or every_rank_saves) and saved_step != step:
                last_saved, saved_step = save(), step
    finally:
        if bar is not None:
            bar.close()
        loader.close()
        if metrics is not None:
            metrics.close()
    result.step = step
    result.checkpoint = last_saved
    if sharded and group.main:  # the end-of-run sample runs on rank 0 alone: a whole model
        model = build_model(cfg, device, seed=None)
        model.load_state_dict(checkpoint.load(last_saved, log=lambda *_: None)["model"])
    result.model = model
    result.data = data
    return result


def _norm(total) -> float:
    """clip_grad_norm_'s total norm; a DTensor under FSDP (the norm over every shard)."""
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


def summarize(result: TrainResult, cfg: RunConfig, prompt: str = "def ", log=print) -> dict:
    """Held-out bits/byte next to unigram/bigram baselines, speed, and a sample."""
    data = result.data
    # the same tokens evaluate() scores
    uni, bi = unigram_bigram_bpb(data, max_tokens=cfg.train.eval_tokens)
    model = result.model
    ids = data.tokenizer.encode(prompt)
    x = torch.tensor([[data.tokenizer.bos_id] + ids], device=next(model.parameters()).device)
    out = model.generate(x, max_new_tokens=cfg.train.sample_tokens, temperature=0.8, top_k=40,
                         seed=cfg.train.seed, stop_ids=(data.tokenizer.bos_id,))
    sample = prompt + data.tokenizer.decode(out[0, x.shape[1]:].tolist())
    summary = {
        "run_dir": str(result.run_dir), "step": result.step, "val_loss": result.val_loss,
        "val_bpb": result.val_bpb, "unigram_bpb": uni, "bigram_bpb": bi,
        "vs_unigram": 1 - result.val_bpb / uni if uni else None,
        "tokens_per_s": result.tokens_per_s, "checkpoint": str(result.checkpoint),
        "interrupted": result.interrupted, "sample": sample,
    }
    atomic.write_text(Path(result.run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    log("")
    log(f"held-out bits/byte: {result.val_bpb:.4f}   (unigram {uni:.4f}, bigram {bi:.4f}; "
        f"{summary['vs_unigram']:.0%} below unigram)")
    log(f"training speed:     {result.tokens_per_s:,.0f} tokens/s   steps: {result.step}")
    log(f"checkpoint:         {result.checkpoint}")
    log("sample:")
    log("  " + sample.replace("\n", "\n  "))
    return summary
