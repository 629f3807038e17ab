"""nanochat validate: a 30-second end-to-end check for someone who just installed nanochat.

Runs the whole product path on a micro model and prints one line per stage with pass/fail
and its time:

  data      tokenize a few stdlib modules (byte-level BPE, 512 tokens)
  train     a micro BitNet (2 layers, d 256) for a few dozen steps: the loss must fall
  export    the checkpoint to GGUF (TQ2_0 + F16), read back by the C++ reader
  load      the GGUF in the C++ engine
  parity    torch vs engine logits within tolerance, and the same greedy tokens
  generate  the engine streams a completion

Exit status 0 when every stage passes, 1 otherwise (the failing stage says why).

    nanochat validate [--keep DIR] [--json]
"""

from __future__ import annotations

import json
import sysconfig
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py",
         "bisect.py", "heapq.py", "glob.py", "queue.py", "sched.py", "string.py", "csv.py"]
STEPS = 40
PARITY_TOL = 5e-3  # max |logit diff| / max |logit|: summation order + fp16 weight scale
# Greedy tokens may part only where torch's top two logits are this close (of the logit
# range): logits agree to ~1e-3, so a closer pair can rank either way, and a few dozen
# steps leave the micro model's logits flat enough to sit on such a tie now and then.
TIE = 2e-3


class StageFailed(Exception):
    pass


def greedy_divergence(model, ids: list[int], got: list[int],
                      want: list[int]) -> tuple[int, float] | None:
    """Where greedy tokens `got` (the engine's) first part from torch's `want` after the
    prompt `ids`, and how far below torch's top logit the engine's token sits there, as a
    fraction of torch's logit range (inf when one run is a prefix of the other); None when
    they agree."""
    import torch

    if got == want:
        return None
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
        return min(len(got), len(want)), float("inf")
    with torch.no_grad():
        at = model(torch.tensor([ids + want]))[0, len(ids) - 1 + i].numpy()
    return i, float((at.max() - at[got[i]]) / (at.max() - at.min()))


def validate(workdir: Path, report) -> bool:
    """Runs every stage in `workdir`; report(dict) gets one record per stage."""
    state: dict = {}
    ok = True

    @contextmanager
    def stage(name: str):
        nonlocal ok
        t0 = time.perf_counter()
        rec = {"stage": name, "ok": False, "detail": ""}
        try:
            if not ok:
                rec["detail"] = "skipped (an earlier stage failed)"
                yield rec
                return
            yield rec
            rec["ok"] = True
        except Exception as e:  # a stage's failure is reported, not raised
            ok = False
            rec["detail"] = f"{type(e).__name__}: {e}"
            if not isinstance(e, StageFailed):
                rec["traceback"] = traceback.format_exc()
        finally:
            rec["seconds"] = time.perf_counter() - t0
            report(rec)

    with stage("data") as rec:
        if ok:
            from nanochat.data import corpus

            stdlib = Path(sysconfig.get_paths()["stdlib"])
            src = workdir / "src"
            src.mkdir(parents=True, exist_ok=True)
            for f in FILES:
                (src / f.replace("/", "_")).write_text((stdlib / f).read_text())
            m = corpus.prepare([str(src)], workdir / "data", vocab_size=512, val_fraction=0.2,
                               progress=False)
            state["data"] = Path(m.out_dir)
            rec["detail"] = f"{len(FILES)} files, vocab 512"

    with stage("train") as rec:
        if ok:
            import torch

            from nanochat.config import RunConfig, apply_overrides
            from nanochat.train.loop import train

            cfg = apply_overrides(RunConfig(), [
                "model.vocab_size=512", "model.d_model=256", "model.n_layers=2",
                "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=512",
                "model.max_seq_len=128", "train.batch_size=8", "train.seq_len=64",
                f"train.max_steps={STEPS}", "train.eval_every=1000", "train.eval_tokens=2048",
                "train.log_every=1", "train.checkpoint_every=1000", "train.sample_tokens=1",
                "schedule.warmup_steps=5", "optim.lr=3e-3"])
            torch.manual_seed(0)
            run = workdir / "run"
            losses: list[float] = []
            train(cfg, state["data"], run, progress_bar=False, log=lambda *a, **k: None)
            for line in (run / "metrics.jsonl").read_text().splitlines():
                m = json.loads(line)
                if "loss" in m:
                    losses.append(m["loss"])
            if len(losses) < 10:
                raise StageFailed(f"only {len(losses)} logged steps")
            first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
            rec["detail"] = f"{STEPS} steps, loss {first:.2f} -> {last:.2f}"
            if not last < first - 0.3:
                raise StageFailed(f"the loss did not fall: {first:.3f} -> {last:.3f}")
            state["run"] = run

    with stage("export") as rec:
        if ok:
            from nanochat._core import core
            from nanochat.export import export_checkpoint

            path = workdir / "model.gguf"
            s = export_checkpoint(state["run"], path)
            f = core().GgufFile(str(path))
            n = len(f.tensors())
            if n != s["tensors"]:
                raise StageFailed(f"wrote {s['tensors']} tensors, read back {n}")
            state["gguf"] = path
            rec["detail"] = (f"{path.name}: {s['bytes'] / 1e6:.2f} MB, {n} tensors, "
                             f"{s['architecture']}")

    with stage("load") as rec:
        if ok:
            from nanochat.infer.engine import Engine

            state["engine"] = eng = Engine(str(state["gguf"]))
            i = eng.info
            rec["detail"] = (f"{i['architecture']}, {i['n_layers']} layers, vocab "
                             f"{i['vocab_size']}, {i['weight_type']} / {i['embd_type']}")

    with stage("parity") as rec:
        if ok:
            import numpy as np
            import torch

            from nanochat.model.load import load_model

            model, tok, _ = load_model(state["run"])
            eng = state["engine"]
            ids = [tok.bos_id] + tok.encode("def read(path):\n    with open(path) as f:\n")
            with torch.no_grad():
                ref = model(torch.tensor([ids]))[0].numpy()
            eng.reset()
            got = eng.eval_all(ids)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            if err > PARITY_TOL:
                raise StageFailed(f"logits differ by {err:.2e} of their range (> {PARITY_TOL})")
            want = model.generate(ids, 16, temperature=0.0)[len(ids):].tolist()
            eng.reset()
            mine = eng.complete(ids, max_tokens=16, temperature=0.0, stop_at_eos=False)["tokens"]
            rec["detail"] = f"logits within {err:.1e} of range, 16 greedy tokens identical"
            part = greedy_divergence(model, ids, mine, want)
            if part is not None:
                i, gap = part
                if gap >= TIE:
                    raise StageFailed(f"greedy tokens differ: engine {mine} vs torch {want}")
                rec["detail"] = (f"logits within {err:.1e} of range, greedy tokens identical "
                                 f"up to a torch near-tie at step {i} ({gap:.1e} of range)")

    with stage("generate") as rec:
        if ok:
            eng = state["engine"]
            eng.reset()
            r = eng.complete("def ", max_tokens=32, temperature=0.8, seed=1)
            if not r["tokens"] and r["stop_reason"] != "stop_token":
                raise StageFailed("no tokens generated")
            text = r["text"].replace("\n", "\\n")
            rec["detail"] = (f"{len(r['tokens'])} tokens, {r['decode_tokens_per_s']:.0f} tok/s: "
                             f"def {text[:48]!s}")
    return ok


def main(args) -> int:
    def report(rec: dict) -> None:
        if args.json:
            print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}), flush=True)
            return
        mark = "PASS" if rec["ok"] else ("SKIP" if rec["detail"].startswith("skipped") else "FAIL")
        print(f"{mark}  {rec['stage']:<9} {rec['seconds']:6.1f}s  {rec['detail']}", flush=True)
        if "traceback" in rec and args.verbose:
            print(rec["traceback"], flush=True)

    t0 = time.perf_counter()
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        ok = validate(work, report)
    else:
        with tempfile.TemporaryDirectory(prefix="nanochat-validate-") as d:
            ok = validate(Path(d), report)
    if not args.json:
        print(f"{'all stages passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f}s")
    return 0 if ok else 1
