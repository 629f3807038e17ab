"""The report card of a run: RUN/report.md and RUN/report.json (with RUN/report_curve.png).

    nanochat report RUN                 # uses RUN/*.gguf for the export and engine sections
    nanochat report RUN --export        # none there: export one to a temporary file first

Joins what the run directory holds: its config (config.json), the training curve
(metrics.jsonl, plotted), the held-out bits/byte the trainer logged (and summary.json's
baselines), every evaluation result in RUN/eval/*.json (nanochat eval bpb writes bpb.json,
the code evals humaneval.json / humaneval-rs.json), the model size (parameters, checkpoint
bytes), the GGUF size and a short engine speed measurement (prefill and decode tokens/s of
one greedy completion; `nanochat bench decode` is the benchmark). A part that is missing is
listed as "not run" with the command that produces it; an eval file that cannot be read is
listed as unreadable, naming the file and why, and the rest of the report is still written.

report.json's top-level keys are fixed (KEYS); each section is a dict with "status":
"ok", "not run" (plus "command") or "unreadable" (plus "error").
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from nanochat import atomic

KEYS = ("run", "generated", "environment", "config", "training", "curve", "bpb", "evals",
        "model", "export", "engine", "not_run")
# The evaluations a complete report has, and the command that produces each one's file.
EXPECTED_EVALS = {
    "bpb": "nanochat eval bpb --model {run} --data DIR",
    "humaneval": "nanochat eval humaneval --model {run}/model.gguf -n 10",
    "humaneval-rs": "nanochat eval humaneval-rs --model {run}/model.gguf -n 10",
}
CURVE = "report_curve.png"
SPEED_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the arguments.\"\"\"\n"


def _not_run(command: str, why: str | None = None) -> dict:
    return {"status": "not run", "command": command, **({"why": why} if why else {})}


def read_metrics(run: Path) -> tuple[list[dict], int]:
    """metrics.jsonl's records (lines with an integer step) and the count of other lines."""
    f = run / "metrics.jsonl"
    rows, bad = [], 0
    for line in f.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            rows.append(r)
        else:
            bad += 1
    return rows, bad


def plot_curve(rows: list[dict], out: Path) -> dict:
    """Train loss and held-out loss against step, held-out bits/byte beside; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def series(key):
        pts = [(r["step"], r[key]) for r in rows
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    for key, label in (("loss", "train loss"), ("val_loss", "held-out loss")):
        x, y = series(key)
        if x:
            ax1.plot(x, y, label=label, marker="o" if len(x) < 20 else None)
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats/token")
    ax1.legend()
    ax1.grid(alpha=0.3)
    x, y = series("val_bpb")
    if x:
        ax2.plot(x, y, color="C2", marker="o" if len(x) < 20 else None)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out bits/byte")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(out, buf.getvalue())
    return {"status": "ok", "png": out.name, "points": {
        k: len(series(k)[0]) for k in ("loss", "val_loss", "val_bpb")}}


def read_evals(run: Path) -> dict:
    """Every RUN/eval/*.json by file stem; an unreadable one is reported, not raised."""
    out = {}
    d = run / "eval"
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            r = json.loads(f.read_text())
            if not isinstance(r, dict):
                raise ValueError(f"expected a JSON object, got {type(r).__name__}")
        except (ValueError, UnicodeDecodeError, OSError) as e:
            print(f"nanochat report: warning: {f} is unreadable: {e}", file=sys.stderr)
            out[f.stem] = {"status": "unreadable", "file": str(f), "error": str(e)}
            continue
        out[f.stem] = {"status": "ok", "file": str(f), **r}
    for name, cmd in EXPECTED_EVALS.items():
        out.setdefault(name, _not_run(cmd.format(run=run)))
    return out


def _find_gguf(run: Path) -> Path | None:
    found = sorted(p for p in run.glob("*.gguf") if p.is_file())
    if not found:
        return None
    return run / "model.gguf" if run / "model.gguf" in found else found[0]


def engine_speed(gguf: Path, tokens: int) -> dict:
    """One greedy completion of SPEED_PROMPT on the engine (the better of two runs)."""
    from nanochat.infer.engine import Engine

    eng = Engine(gguf)
    best = None
    for _ in range(2):
        eng.reset()
        r = eng.complete(SPEED_PROMPT, max_tokens=tokens, temperature=0.0, stop_at_eos=False)
        if best is None or r["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
            best = r
    return {"status": "ok", "gguf": str(gguf), "prompt_tokens": best["prompt_tokens"],
            "generated_tokens": len(best["tokens"]), "decode_steps": best["decode_steps"],
            "prefill_tokens_per_s": best["prefill_tokens_per_s"],
            "decode_tokens_per_s": best["decode_tokens_per_s"],
            "threads": _threads()}


def _threads() -> int:
    from nanochat.ops import ternary

    return ternary.num_threads()


def build(run: Path, export: bool = False, speed_tokens: int = 64, log=print) -> dict:
    """The report as a dict with KEYS; writes the curve PNG into the run."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    from nanochat import __version__
    from nanochat.bench import machine_line

    rep: dict = {"run": str(run), "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                             time.gmtime())}
    import torch

    rep["environment"] = {"nanochat": __version__, "torch": torch.__version__,
                          "python": sys.version.split()[0], "machine": machine_line()}

    cfg_file = run / "config.json"
    try:
        rep["config"] = {"status": "ok", **json.loads(cfg_file.read_text())}
    except FileNotFoundError:
        rep["config"] = _not_run(f"nanochat train --out {run}", f"{cfg_file} is missing")
    except ValueError as e:
        rep["config"] = {"status": "unreadable", "error": f"{cfg_file}: {e}"}

    # training: the metrics log and the summary the trainer prints
    rows, bad = ([], 0)
    if (run / "metrics.jsonl").is_file():
        rows, bad = read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_bpb" in r]
    summary = {}
    if (run / "summary.json").is_file():
        try:
            summary = json.loads((run / "summary.json").read_text())
        except ValueError as e:
            log(f"nanochat report: warning: {run / 'summary.json'} is unreadable: {e}")
    if rows:
        last = train_rows[-1] if train_rows else {}
        rep["training"] = {
            "status": "ok", "steps": max(r["step"] for r in rows),
            "train_s": max((r.get("train_s", 0.0) for r in rows), default=0.0),
            "final_train_loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"),
            "peak_memory_bytes": max((r.get("peak_memory_bytes", 0) for r in rows), default=0),
            "unreadable_lines": bad, "sample": summary.get("sample")}
        rep["curve"] = plot_curve(rows, run / CURVE)
    else:
        rep["training"] = _not_run(f"nanochat train --out {run}", "no metrics.jsonl")
        rep["curve"] = _not_run(f"nanochat train --out {run}", "no metrics.jsonl")

    if val_rows:
        v = val_rows[-1]
        rep["bpb"] = {"status": "ok", "step": v["step"], "val_bpb": v["val_bpb"],
                      "val_loss": v.get("val_loss"),
                      **{k: summary[k] for k in ("unigram_bpb", "bigram_bpb", "vs_unigram")
                         if k in summary}}
    else:
        rep["bpb"] = _not_run(f"nanochat train --out {run}", "no held-out eval in metrics.jsonl")

    rep["evals"] = read_evals(run)

    # model: parameters and checkpoint bytes
    try:
        from nanochat.model.load import load_model

        model, _, state = load_model(run)
        ckpt = Path(state["path"])
        rep["model"] = {"status": "ok", "checkpoint": str(ckpt), "step": state["step"],
                        "params": model.num_params(),
                        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*")
                                                if f.is_file()),
                        "weights_bytes": sum(t.numel() * t.element_size()
                                             for t in state["model"].values())}
        del state
    except (FileNotFoundError, ValueError) as e:
        rep["model"] = {"status": "unreadable", "error": str(e)}
        model = None

    # export and engine speed: the run's GGUF, or a temporary export
    gguf, tmp = _find_gguf(run), None
    export_cmd = f"nanochat export --gguf {run}/model.gguf --checkpoint {run}"
    try:
        if gguf is None and export and model is not None:
            from nanochat.export import export_checkpoint

            tmp = tempfile.TemporaryDirectory(prefix="nanochat-report-")
            gguf = Path(tmp.name) / "model.gguf"
            log(f"exporting {run} to a temporary {gguf}")
            export_checkpoint(run, gguf)
        if gguf is None:
            rep["export"] = _not_run(export_cmd + "  (or nanochat report --export)")
            rep["engine"] = _not_run(export_cmd + f"; nanochat report {run}")
        else:
            from nanochat.infer.engine import Engine

            info = Engine(gguf, n_ctx=16).info
            rep["export"] = {"status": "ok", "gguf": str(gguf) if tmp is None else None,
                             "temporary": tmp is not None, "bytes": gguf.stat().st_size,
                             "weight_type": info["weight_type"],
                             "embd_type": info["embd_type"], "n_params": info["n_params"]}
            rep["engine"] = (engine_speed(gguf, speed_tokens) if speed_tokens > 0 else
                             _not_run(f"nanochat report {run} --speed-tokens 64"))
            if tmp is not None:
                rep["engine"]["gguf"] = "temporary export"
    finally:
        if tmp is not None:
            tmp.cleanup()

    rep["not_run"] = [{"section": name, "command": sec["command"]}
                      for name, sec in [(k, rep[k]) for k in ("config", "training", "curve",
                                                              "bpb", "model", "export",
                                                              "engine")]
                      + [(f"eval {k}", v) for k, v in rep["evals"].items()]
                      if sec.get("status") == "not run"]
    return rep


def _fmt(v, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def markdown(rep: dict) -> str:
    """report.md: one section per key, "not run" lines with their commands."""
    L = [f"# nanochat report: {rep['run']}", "", f"Generated {rep['generated']}.", ""]
    env = rep["environment"]
    L += ["## Environment", "", f"- nanochat {env['nanochat']}, torch {env['torch']}, "
          f"Python {env['python']}", f"- {env['machine']}", ""]

    def missing(sec: dict) -> list[str]:
        if sec["status"] == "not run":
            return [f"not run: `{sec['command']}`" + (f" ({sec['why']})" if "why" in sec
                                                      else ""), ""]
        return [f"unreadable: {sec.get('error')}", ""]

    L += ["## Config", ""]
    c = rep["config"]
    if c["status"] == "ok":
        m, t = c.get("model", {}), c.get("train", {})
        L += [f"- model: d_model {m.get('d_model')}, {m.get('n_layers')} layers, "
              f"{m.get('n_heads')} heads ({m.get('n_kv_heads')} kv), ffn {m.get('ffn_hidden')}, "
              f"vocab {m.get('vocab_size')}, context {m.get('max_seq_len')}, "
              f"{m.get('activation')}",
              f"- train: batch {t.get('batch_size')} x seq {t.get('seq_len')} x accum "
              f"{t.get('grad_accum')}, max_steps {t.get('max_steps')}, time budget "
              f"{t.get('time_budget_s')} s, optimizer {c.get('optim', {}).get('name', '-')}, "
              f"lr {c.get('optim', {}).get('lr')}",
              "", "<details><summary>config.json</summary>", "", "```json",
              json.dumps({k: v for k, v in c.items() if k != "status"}, indent=2), "```", "",
              "</details>", ""]
    else:
        L += missing(c)

    L += ["## Training", ""]
    tr = rep["training"]
    if tr["status"] == "ok":
        L += [f"- steps: {_fmt(tr['steps'])}, training time {tr['train_s']:.1f} s, "
              f"final train loss {_fmt(tr['final_train_loss'])}, "
              f"{_fmt(tr['tokens_per_s'], 0)} tokens/s, peak memory "
              f"{_mib(tr['peak_memory_bytes'])}"]
        if tr["unreadable_lines"]:
            L.append(f"- metrics.jsonl: {tr['unreadable_lines']} unreadable line(s) skipped")
        if rep["curve"]["status"] == "ok":
            L += ["", f"![training curve]({rep['curve']['png']})"]
        if tr.get("sample"):
            L += ["", "Sample at the end of training:", "", "```", tr["sample"], "```"]
        L.append("")
    else:
        L += missing(tr)

    L += ["## Held-out bits per byte", ""]
    b = rep["bpb"]
    if b["status"] == "ok":
        line = f"- trainer's held-out eval at step {_fmt(b['step'])}: **{_fmt(b['val_bpb'])}**"
        if "unigram_bpb" in b:
            line += (f" bits/byte (unigram {_fmt(b['unigram_bpb'])}, bigram "
                     f"{_fmt(b['bigram_bpb'])}; {b['vs_unigram']:.0%} below unigram)")
        L += [line, ""]
    else:
        L += missing(b)

    L += ["## Evaluations", "", "| eval | result | details | seconds |", "|---|---|---|---|"]
    for name, e in rep["evals"].items():
        if e["status"] == "not run":
            L.append(f"| {name} | not run | `{e['command']}` | |")
        elif e["status"] == "unreadable":
            L.append(f"| {name} | unreadable | {e['file']}: {e['error']} | |")
        elif "bpb" in e:
            L.append(f"| {name} | {_fmt(e['bpb'])} bits/byte | {e.get('model')}: "
                     f"{_fmt(e.get('tokens'))} tokens, {_fmt(e.get('bytes'))} bytes | "
                     f"{_fmt(e.get('seconds'), 1)} |")
        elif "pass@1" in e:
            details = (f"{e.get('model')}: {_fmt(e.get('problems'))} problems, n="
                       f"{e.get('n')}, temperature {e.get('temperature')}")
            res = f"pass@1 {_fmt(e['pass@1'])}" + (
                f", pass@10 {_fmt(e['pass@10'])}" if e.get("pass@10") is not None else "")
            L.append(f"| {name} | {res} | {details} | {_fmt(e.get('seconds'), 1)} |")
        else:
            scalars = {k: v for k, v in e.items() if isinstance(v, (int, float, str))
                       and k not in ("status", "file", "seconds")}
            L.append(f"| {name} | | {', '.join(f'{k} {_fmt(v)}' for k, v in scalars.items())} "
                     f"| {_fmt(e.get('seconds'), 1)} |")
    L.append("")

    L += ["## Model size", ""]
    m = rep["model"]
    if m["status"] == "ok":
        p = m["params"]
        L += [f"- parameters: {_fmt(p['total'])} ({_fmt(p['ternary'])} ternary, "
              f"{_fmt(p['embedding'])} embedding)",
              f"- checkpoint {m['checkpoint']} (step {_fmt(m['step'])}): "
              f"{_mib(m['checkpoint_bytes'])} on disk with the optimizer state; weights "
              f"{_mib(m['weights_bytes'])}", ""]
    else:
        L += missing(m)

    L += ["## Export", ""]
    x = rep["export"]
    if x["status"] == "ok":
        where = "a temporary export" if x["temporary"] else x["gguf"]
        L += [f"- GGUF ({where}): {_mib(x['bytes'])}, weights {x['weight_type']}, embedding "
              f"{x['embd_type']}, {_fmt(x['n_params'])} parameters", ""]
    else:
        L += missing(x)

    L += ["## Engine speed", ""]
    s = rep["engine"]
    if s["status"] == "ok":
        L += [f"- C++ engine on {s['gguf']}, {s['threads']} threads: prefill "
              f"{s['prefill_tokens_per_s']:,.0f} tokens/s ({s['prompt_tokens']} tokens), decode "
              f"{s['decode_tokens_per_s']:,.0f} tokens/s ({s['decode_steps']} steps); one "
              f"short run, not a benchmark (`nanochat bench decode`)", ""]
    else:
        L += missing(s)

    L += ["## Not run", ""]
    L += [f"- {n['section']}: `{n['command']}`" for n in rep["not_run"]] or ["- nothing"]
    return "\n".join(L) + "\n"


def write(run: Path, export: bool = False, speed_tokens: int = 64, log=print) -> dict:
    rep = build(run, export=export, speed_tokens=speed_tokens, log=log)
    atomic.write_text(Path(run) / "report.json", json.dumps(rep, indent=2) + "\n")
    atomic.write_text(Path(run) / "report.md", markdown(rep))
    return rep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the run directory")
    p.add_argument("--export", action="store_true",
                   help="without a RUN/*.gguf: export one to a temporary file for the export "
                   "size and engine speed")
    p.add_argument("--speed-tokens", type=int, default=64,
                   help="tokens to decode for the engine speed (0: skip; default 64)")
    p.add_argument("--json", action="store_true", help="print report.json instead of a summary")


def main(args: argparse.Namespace) -> int:
    if args.speed_tokens < 0:
        raise ValueError(f"--speed-tokens must be >= 0, got {args.speed_tokens}")
    from nanochat import checkpoint  # torch: not at import, the CLI builds its parser here

    run = Path(args.run)
    checkpoint.resolve(run)  # a clear error for a directory that is no run
    rep = write(run, export=args.export, speed_tokens=args.speed_tokens,
                log=(lambda *a: print(*a, file=sys.stderr)) if args.json else print)
    if args.json:
        print(json.dumps(rep))
    else:
        print(f"wrote {run / 'report.md'} and {run / 'report.json'}"
              + (f" ({len(rep['not_run'])} part(s) not run)" if rep["not_run"] else ""))
    return 0
