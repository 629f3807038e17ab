"""The `nanochat` command: thin argument parsing over the package.

    nanochat train [--config tiny] [--data DIR] [--out DIR] [--steps N] [--resume]
    nanochat sft --checkpoint RUN --data FILE.jsonl [--data ...] --out RUN2 [--steps N]
    nanochat sample --checkpoint DIR --prompt "def "
    nanochat export --gguf OUT.gguf --checkpoint DIR [--type tq2_0|tq1_0] [--embd f16|q8_0|f32]
    nanochat data prepare [--source PATH ...] [--out DIR] [--vocab-size N] [--ext .py ...]
    nanochat data chat --out chat.jsonl [--source PATH ...] [--limit N]
    nanochat generate --model OUT.gguf --prompt "def " [--json]
    nanochat chat --model OUT.gguf
    nanochat serve --model OUT.gguf [--port 8000] [--api-key KEY] (pip install '.[serve]')
    nanochat validate
    nanochat info [--json] [--cmake-dir]
    nanochat model info [--config tiny] [--json] [--batch B --seq T] [--set K=V]
    nanochat recipe nano_125m|small_560m|medium_3b [--dry-run] [--data DIR] [--out DIR]
    nanochat bench kernels|train|decode|collider|arch|optim|loss|e3|serve|data [--json]
    nanochat eval bpb --model RUN|X.gguf --data DIR [--json]
    nanochat eval humaneval|humaneval-rs (--model X.gguf | --samples FILE) [-n N] [--json]
    nanochat eval lm-eval --model nanochat --model_args path=RUN --tasks T (pip install '.[eval]')
    nanochat report RUN [--export]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _embedding_paths() -> dict[str, str]:
    """Where `pip install .` put the C/C++ embedding library (inside the package)."""
    import importlib.util
    from pathlib import Path

    # Next to the compiled extension, which editable installs keep in site-packages too.
    root = Path(importlib.util.find_spec("nanochat._C").origin).resolve().parent
    paths = {"cmake_dir": root / "share" / "cmake" / "nanochat", "include_dir": root / "include",
             "lib": root / "lib" / "libnanochat.so"}
    for name, path in paths.items():
        if not path.exists():
            raise FileNotFoundError(f"{name}: {path} is missing; reinstall the package "
                                    f"(pip install .) to get the embedding library")
    return {k: str(v) for k, v in paths.items()}


def _cmd_info(args: argparse.Namespace) -> int:
    from nanochat import __version__
    from nanochat._core import core

    wanted = [k for k in ("cmake_dir", "include_dir", "lib") if getattr(args, k)]
    # One path per line in this order, for scripts:
    # -Dnanochat_DIR="$(nanochat info --cmake-dir)"
    if wanted:
        paths = _embedding_paths()
        print("\n".join(paths[k] for k in wanted))
        return 0

    info = dict(core().info())
    info["version"] = __version__
    info["core_version"] = core().info()["version"]
    try:
        info["embedding"] = _embedding_paths()
    except FileNotFoundError:
        info["embedding"] = None
    if args.json:
        print(json.dumps(info))
        return 0
    feats = info["features"]
    cuda = info["cuda"]
    print(f"nanochat {info['version']}")
    print("  cpu features : " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats.items()))
    print(f"  cuda         : compiled={'yes' if cuda['compiled'] else 'no'}, "
          f"devices={cuda['devices']}")
    print(f"  threads      : {info['threads']}  (NANOCHAT_NUM_THREADS overrides)")
    print(f"  kernel paths : {', '.join(info['isas'])}  (NANOCHAT_ISA pins one)")
    print(f"  active ISA   : {info['isa']}; per op: "
          + ", ".join(f"{op}={path}" for op, path in info["ops"].items()))
    emb = info["embedding"]
    print(f"  C/C++ library: {emb['lib'] if emb else 'not installed'}"
          + ("  (find_package: nanochat info --cmake-dir)" if emb else ""))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from nanochat import config as C
    from nanochat.model import gpt

    if args.model == "info":
        cfg = C.load_config(args.config, args.set)
        info = gpt.model_info(cfg.model, args.batch or cfg.train.batch_size,
                              args.seq or cfg.train.seq_len)
        print(json.dumps(info) if args.json else gpt.format_model_info(info))
        return 0
    raise AssertionError(args.model)


def _cmd_sft(args: argparse.Namespace) -> int:
    from nanochat.train.sft import sft

    if not args.resume and not args.checkpoint:
        raise ValueError("--checkpoint RUN (the model to fine-tune) is required, or --resume")
    sft(args.data, args.out, args.checkpoint, args.steps, args.set, resume=args.resume,
        progress_bar=not args.no_progress)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from nanochat import config as C
    from nanochat.train import loop as T
    from nanochat.train.distributed import Group

    if args.nproc is not None:
        return _launch_torchrun(args.nproc)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not args.out:  # each rank would name its own directory by the clock
        raise ValueError("under torchrun, give the run directory: --out RUN_DIR")
    cfg = C.load_config(args.config, args.set)
    overrides = []
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.time_budget is not None:
        overrides.append(f"train.time_budget_s={args.time_budget}")
    cfg = C.apply_overrides(cfg, overrides)
    group = Group.from_env(T.pick_device(cfg.train.device).type)
    run_dir = Path(args.out) if args.out else Path("runs") / time.strftime(
        f"%Y%m%d-%H%M%S-{Path(args.config).stem}")
    if group.main:
        print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tb'})", flush=True)
    try:
        if args.data:
            data_dir = Path(args.data)
        else:
            from nanochat.data import corpus

            sources = cfg.data.sources or None
            for turn in ("main", "others"):  # rank 0 prepares (and caches), then the rest read
                if group.main == (turn == "main"):
                    manifest = corpus.prepare(sources, None, cfg.model.vocab_size,
                                              cfg.data.val_fraction, cfg.data.extensions,
                                              progress=group.main)
                group.barrier()
            data_dir = Path(manifest.out_dir)
        result = T.train(cfg, data_dir, run_dir, resume=args.resume,
                         progress_bar=not args.no_progress, group=group)
        if group.main:
            T.summarize(result, cfg, prompt=args.sample_prompt)
        group.barrier()
    finally:
        group.close()
    return 0


def _launch_torchrun(nproc: int) -> int:
    """`nanochat train --nproc N ...`: the same command under torchrun on this machine."""
    import subprocess

    from nanochat.train.launch import torchrun_command

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = torchrun_command(nproc, argv)
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _cmd_sample(args: argparse.Namespace) -> int:
    from nanochat.infer.sample import sample_from_checkpoint

    text = sample_from_checkpoint(args.checkpoint, args.prompt, max_tokens=args.max_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nanochat.export import export_checkpoint, format_summary

    if args.hf:
        from nanochat.interop.hf_bitnet import export_hf

        print(f"wrote {export_hf(args.checkpoint, args.hf)} (transformers BitNetForCausalLM)")
        return 0
    summary = export_checkpoint(args.checkpoint, args.gguf, weight_type=args.type,
                                embd_type=args.embd, name=args.name)
    print(format_summary(summary))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from nanochat.interop.hf_bitnet import import_hf

    import_hf(args.dir, args.out)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from nanochat.data import corpus

    if args.data == "prepare":
        opts = {k: v for k, v in (("text_field", args.text_field), ("workers", args.workers),
                                  ("shard_tokens", args.shard_tokens),
                                  ("tokenizer_sample_bytes", args.tokenizer_sample_bytes))
                if v is not None}
        m = corpus.prepare(args.source or None, args.out, args.vocab_size, args.val_fraction,
                           args.ext or [".py"], progress=not args.no_progress,
                           tokenizer=args.tokenizer, record_options=opts)
        print("\n".join(corpus.summary_lines(m)))
        return 0
    if args.data == "chat":
        from nanochat.data import chatgen

        n = chatgen.generate(args.out, args.source or None, args.limit)
        print(f"{n} conversations -> {args.out}")
        return 0
    raise AssertionError(args.data)


def _sampling(args: argparse.Namespace) -> dict:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def _open_engine(args: argparse.Namespace):
    from pathlib import Path

    from nanochat.infer.engine import Engine
    from nanochat.ops import ternary

    if not Path(args.model).is_file():
        raise FileNotFoundError(f"--model: {args.model} does not exist (export one with "
                                f"nanochat export --gguf)")
    if args.threads:
        ternary.set_num_threads(args.threads)
    if args.max_kv_mib < 1:
        raise ValueError(f"--max-kv-mib must be >= 1, got {args.max_kv_mib}")
    return Engine(args.model, n_ctx=args.ctx, max_kv_bytes=args.max_kv_mib << 20)


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.chat:
        return _generate_chat(args)
    eng = _open_engine(args)
    kw = dict(max_tokens=args.max_tokens, stop=args.stop, **_sampling(args))
    if args.json:
        r = eng.complete(args.prompt, **kw)
        r["prompt"] = args.prompt
        print(json.dumps(r))
        return 0
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for _, piece in eng.generate(args.prompt, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = eng.last_result
    if r is not None and not args.quiet:
        print(f"[{r['prompt_tokens']} prompt tokens, {len(r['tokens'])} generated "
              f"({r['stop_reason']}); prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
              f"decode {r['decode_tokens_per_s']:.0f} tok/s]", file=sys.stderr)
    return 0


def _generate_chat(args: argparse.Namespace) -> int:
    """generate --chat: --prompt as one user turn in the chat template; the reply."""
    from nanochat.infer import chat

    if args.stop:
        raise ValueError("--stop does not apply with --chat (the reply ends at the end of the "
                         "turn)")
    eng = _open_engine(args)
    conv = chat.open_conversation(eng, args.system)
    pieces = []
    for piece in conv.reply(args.prompt, max_tokens=args.max_tokens, **_sampling(args)):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    r = dict(eng.last_result or {})
    if args.json:
        print(json.dumps({**r, "prompt": args.prompt, "text": "".join(pieces), "chat": True}))
        return 0
    sys.stdout.write("\n")
    if r and not args.quiet:
        print(f"[{r['prompt_tokens']} prompt tokens, {len(r['tokens'])} generated "
              f"({r['stop_reason']})]", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from nanochat.infer import chat

    return chat.repl(_open_engine(args), args.max_tokens, _sampling(args), system=args.system)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from nanochat.infer import server
    except ImportError as e:  # starlette / uvicorn: the optional `serve` dependencies
        raise ValueError(f"{e.name} is not installed: pip install 'nanochat-ternary[serve]'")
    return server.main(args)


def _cmd_validate(args: argparse.Namespace) -> int:
    from nanochat import validate

    return validate.main(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from nanochat.bench import machine_line

    # Which machine and kernel paths gave the numbers (stderr under --json: stdout stays
    # one JSON object per line).
    print(machine_line(), file=sys.stderr if getattr(args, "json", False) else sys.stdout,
          flush=True)
    return args.bench_module.main(args)


def _eval_commands() -> dict:
    """`nanochat eval NAME`: each value has a docstring (first line: the --help summary),
    add_arguments(parser) and main(args) -> exit status; a module of those works too."""
    from nanochat.eval import bpb, humaneval

    return {"bpb": bpb, "humaneval": humaneval.PYTHON, "humaneval-rs": humaneval.RUST}


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from nanochat.eval import lm_eval as adapter
    except ImportError as e:  # lm-eval: the optional `eval` dependency
        raise ValueError(f"{e.name} is not installed: pip install 'nanochat-ternary[eval]'")
    return adapter.cli(args.lm_eval_args)


def _cmd_report(args: argparse.Namespace) -> int:
    from nanochat.eval import report

    return report.main(args)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE.gguf",
                   help="a GGUF model (nanochat export --gguf)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: $NANOCHAT_API_KEY; unset: open)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences generated at once, 1..128 (default 16)")
    p.add_argument("--ctx", type=int, default=0,
                   help="context of one sequence, prompt + max_tokens (default: the model's, "
                   "at most 4096)")
    p.add_argument("--threads", type=int, default=0,
                   help="kernel threads (default: NANOCHAT_NUM_THREADS or all cores)")
    p.add_argument("--kv-mib", type=int, default=4096,
                   help="KV cache of all running sequences together, MiB (default 4096); a "
                   "request that fits later waits, one that never fits gets 400")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for room; beyond it 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens per engine step beside the decode rows, 1..128 "
                   "(default 64)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nanochat",
        description="Ternary (BitNet b1.58) language models: train, export to GGUF, "
                    "run fast on CPUs.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pt = sub.add_parser(
        "train", help="train a ternary model (default: tiny on the Python stdlib, ~10 min)",
        description="Train a BitNet b1.58 model. With no arguments: prepares the local Python "
        "standard library as the corpus (cached), trains the `tiny` config within its time "
        "budget, evaluates held-out bits/byte against unigram/bigram baselines and prints a "
        "sample. Checkpoints, TensorBoard events and metrics.jsonl go to the run directory.")
    pt.add_argument("--config", default="tiny",
                    help="built-in config name (tiny, nano_125m, ...) or a TOML file "
                    "(default: tiny)")
    pt.add_argument("--data", help="prepared data dir (nanochat data prepare); default: "
                    "prepare the config's [data] sources, the Python stdlib unless set")
    pt.add_argument("--out", help="run directory (default: runs/<time>-<config>)")
    pt.add_argument("--steps", type=int, help="max optimizer steps (train.max_steps)")
    pt.add_argument("--time-budget", type=float,
                    help="wall-clock budget in seconds, 0 = none (train.time_budget_s)")
    pt.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its latest checkpoint")
    pt.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    pt.add_argument("--sample-prompt", default="def ", help="prompt of the end-of-run sample")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    pt.add_argument("--nproc", type=int, metavar="N",
                    help="data-parallel training in N processes on this machine: runs this "
                    "command under `torchrun --standalone --nproc_per_node N` (DDP; gloo on "
                    "CPU, NCCL on CUDA). Multi-node: launch `torchrun ... -m nanochat train` "
                    "yourself")
    pt.set_defaults(func=_cmd_train)

    pft = sub.add_parser(
        "sft", help="chat fine-tuning: a run on conversations (OpenAI messages) -> a chat run",
        description="Fine-tunes RUN on conversations (JSON lines or parquet rows with an OpenAI "
        "`messages` list), loss on the assistant's tokens only, conversations packed with "
        "attention kept inside each; the same trainer, schedules and checkpoints as `train`. "
        "Writes --out as a normal run directory (export --gguf works) plus sft.json. "
        "docs/post-training.md.")
    pft.add_argument("--checkpoint", help="run or checkpoint dir to start from")
    pft.add_argument("--data", action="append", required=True, metavar="FILE",
                     help="conversations, .jsonl or .parquet (repeatable)")
    pft.add_argument("--out", required=True, help="the fine-tuned run's directory")
    pft.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    pft.add_argument("--resume", action="store_true", help="continue --out from its latest "
                     "checkpoint")
    pft.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                     help="override a config value of RUN's, e.g. --set optim.lr=1e-3")
    pft.add_argument("--no-progress", action="store_true", help="no progress bar")
    pft.set_defaults(func=_cmd_sft)

    ps = sub.add_parser("sample", help="generate text from a checkpoint (torch, KV cache)")
    ps.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir (latest)")
    ps.add_argument("--prompt", default="", help="text to continue")
    ps.add_argument("--max-tokens", type=int, default=200)
    ps.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ps.add_argument("--top-k", type=int, default=None)
    ps.add_argument("--top-p", type=float, default=None)
    ps.add_argument("--seed", type=int, default=None)
    ps.set_defaults(func=_cmd_sample)

    pe = sub.add_parser(
        "export", help="write a checkpoint as one GGUF file (ternary TQ2_0/TQ1_0 weights)",
        description="Export a training checkpoint to GGUF v3 (layout: docs/gguf.md). Every "
        "BitLinear weight is stored as its trained ternary codes in ggml TQ2_0 or TQ1_0 "
        "blocks whose scale is the layer's trained absmean scale (fp16); the tied token "
        "embedding as F16, Q8_0 or F32; norms as F32; the tokenizer as GPT-2 byte-level BPE. "
        "SiLU models are written as llama.cpp's 'bitnet' architecture, others (e.g. relu2) "
        "as 'nanochat'. The file is written to a temporary name and renamed when complete.",
        epilog="example: nanochat export --gguf nano.gguf --checkpoint runs/nano --embd q8_0")
    dest = pe.add_mutually_exclusive_group(required=True)
    dest.add_argument("--gguf", metavar="OUT.gguf",
                      help="output file (its directory must exist; an existing file is replaced)")
    dest.add_argument("--hf", metavar="OUT_DIR",
                      help="instead: a transformers BitNetForCausalLM directory (config.json, "
                      "model.safetensors with the latent weights, tokenizer files; "
                      "docs/interop.md); OUT_DIR must not exist")
    pe.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="checkpoint dir (RUN/checkpoints/step_N) or run dir (its latest)")
    pe.add_argument("--type", default="tq2_0", type=str.lower, choices=("tq2_0", "tq1_0"),
                    help="ternary block type: tq2_0 (2.06 bits/weight, faster) or tq1_0 "
                    "(1.69 bits/weight, smaller) (default: tq2_0)")
    pe.add_argument("--embd", default="f16", type=str.lower, choices=("f16", "q8_0", "f32"),
                    help="type of the token embedding, also the tied LM head (default: f16)")
    pe.add_argument("--name", help="general.name (default: the run directory's name)")
    pe.set_defaults(func=_cmd_export)

    pim = sub.add_parser("import", help="turn another project's checkpoint into a run directory")
    isub = pim.add_subparsers(dest="source", required=True, metavar="SOURCE")
    pih = isub.add_parser(
        "hf", help="a transformers BitNet checkpoint (model_type bitnet)",
        description="Read a transformers BitNetForCausalLM directory (config.json, "
        "model.safetensors or a sharded index, tokenizer.json; master-weight 'online' or "
        "packed 'offline' form) into a nanochat run directory with one step-0 checkpoint, "
        "which `nanochat sample`, `export --gguf`/`--hf` and `train --resume` take. Only "
        "safetensors are read; every key, shape and dtype is checked (docs/interop.md).",
        epilog="example: nanochat import hf ./bitnet-b1.58-2B-4T-bf16 --out runs/2b4t")
    pih.add_argument("dir", metavar="DIR", help="the checkpoint directory")
    pih.add_argument("--out", required=True, metavar="RUN",
                     help="run directory to create (must hold no checkpoint yet)")
    pih.set_defaults(func=_cmd_import)

    def engine_args(sp: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
        sp.add_argument("--model", required=True, metavar="FILE.gguf",
                        help="a GGUF model (nanochat export --gguf)")
        sp.add_argument("--max-tokens", type=int, default=max_tokens,
                        help=f"tokens to generate at most (default {max_tokens})")
        sp.add_argument("--temperature", type=float, default=temperature,
                        help=f"sampling temperature; 0 = greedy (default {temperature})")
        sp.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
        sp.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: smallest set with this probability (1: off)")
        sp.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages recently seen tokens (1: off)")
        sp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        sp.add_argument("--threads", type=int, default=0,
                        help="kernel threads (default: NANOCHAT_NUM_THREADS or all cores)")
        sp.add_argument("--ctx", type=int, default=0,
                        help="context length in tokens (default: the model's, at most 4096; "
                        "a larger one up to the model's is allowed within --max-kv-mib)")
        sp.add_argument("--max-kv-mib", type=int, default=4096, metavar="MIB",
                        help="largest KV cache to allocate, in MiB (default: 4096); a "
                        "--ctx that needs more is refused")

    pg = sub.add_parser(
        "generate", help="complete a prompt with a GGUF model on the C++ engine",
        description="Streams a completion of --prompt from a GGUF model on the C++ inference "
        "engine (the prompt is tokenized like the training data; bos first when the model asks "
        "for it). With --json prints one object: prompt, prompt_tokens, tokens (generated ids), "
        "text, stop_reason, prefill_tokens_per_s, decode_tokens_per_s, ...")
    engine_args(pg, 128, 0.8)
    pg.add_argument("--prompt", required=True, help="text to continue")
    pg.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="stop when the text ends with TEXT (repeatable; trimmed off)")
    pg.add_argument("--json", action="store_true", help="one JSON object instead of streaming")
    pg.add_argument("--chat", action="store_true", help="--prompt is one user turn in the "
                    "chat template; prints the assistant's reply (its `text` under --json)")
    pg.add_argument("--system", help="with --chat: a system prompt (merged into the user turn)")
    pg.add_argument("--quiet", action="store_true", help="no speed line on stderr")
    pg.set_defaults(func=_cmd_generate)

    pc = sub.add_parser(
        "chat", help="interactive chat with a GGUF model on the C++ engine",
        description="A conversation on the C++ engine with nanochat's chat template "
        "(<|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>); the history "
        "stays in the KV cache. /reset forgets it, /quit or Ctrl-D leaves. Reads one message "
        "per line, so it also takes piped input.")
    engine_args(pc, 256, 0.7)
    pc.add_argument("--system", help="a system prompt, prepended to the first message")
    pc.set_defaults(func=_cmd_chat)

    psv = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching (C++ engine)",
        description="Serves a GGUF model over HTTP: /v1/models, /v1/completions, "
        "/v1/chat/completions (JSON or SSE streams), /health and /metrics (Prometheus). All "
        "requests share one engine scheduler that runs the next token of every active "
        "sequence in one forward pass. Needs the `serve` extra (starlette, uvicorn).")
    _serve_arguments(psv)
    psv.set_defaults(func=_cmd_serve)

    pv = sub.add_parser(
        "validate", help="30-second end-to-end check: train, export, engine, parity, generate",
        description="Checks an install end to end on a micro model: prepares a few stdlib "
        "modules, trains a 2-layer BitNet for a few dozen steps, exports it to GGUF, loads it "
        "in the C++ engine, checks torch and the engine agree (logits and greedy tokens) and "
        "generates. One line per stage with PASS/FAIL and its time; exit status 1 on failure.")
    pv.add_argument("--keep", metavar="DIR", help="work in DIR and keep its files "
                    "(default: a temporary folder, removed afterwards)")
    pv.add_argument("--json", action="store_true", help="one JSON object per stage")
    pv.add_argument("--verbose", action="store_true", help="tracebacks of failing stages")
    pv.set_defaults(func=_cmd_validate)

    from nanochat.config import DataConfig, ModelConfig

    pd = sub.add_parser("data", help="prepare a corpus: tokenizer + train/val token files")
    dsub = pd.add_subparsers(dest="data", required=True, metavar="ACTION")
    pdp = dsub.add_parser(
        "prepare", help="collect source files, train the tokenizer, tokenize (cached)",
        description="Walk the sources for files with the given extensions, skip binary and "
        "non-UTF-8 files, drop duplicates, split train/val by file, train a byte-level BPE "
        "tokenizer on train and write token shards (train_00000.bin, val_00000.bin, ...), "
        "tokenizer/ and manifest.json. "
        "Sources that are or hold parquet / JSON lines files (*.parquet, *.jsonl, .jsonl.gz, "
        ".jsonl.zst) are read record by record instead, tokenized in --workers processes "
        "and written as token shards (docs/data.md). "
        "Reuses the output directory when the settings and the files are unchanged.")
    pdp.add_argument("--source", action="append", metavar="PATH",
                     help="directory or file to read (repeatable; default: this Python's "
                     "standard library, without site-packages)")
    pdp.add_argument("--text-field", metavar="NAME",
                     help="parquet column / JSON key holding the text (default: text)")
    pdp.add_argument("--workers", type=int, metavar="N",
                     help="tokenizer processes for parquet/JSONL (default: the CPU cores)")
    pdp.add_argument("--shard-tokens", type=int, metavar="N",
                     help="tokens per shard file (default: 2**28)")
    pdp.add_argument("--tokenizer-sample-bytes", type=int, metavar="N",
                     help="bytes of train text the tokenizer trains on, for parquet/JSONL "
                     "(default: 100000000)")
    pdp.add_argument("--out", metavar="DIR", help="output directory (default: "
                     "$NANOCHAT_CACHE/data/<settings hash>, ~/.cache/nanochat if unset)")
    vocab, val = ModelConfig().vocab_size, DataConfig().val_fraction
    pdp.add_argument("--vocab-size", type=int, default=vocab,
                     help=f"tokenizer vocabulary, = model.vocab_size ({vocab})")
    pdp.add_argument("--tokenizer", metavar="DIR",
                     help="use this tokenizer directory instead of training one (e.g. an "
                     "imported model's RUN/checkpoints/step_000000/tokenizer, to fine-tune it)")
    pdp.add_argument("--val-fraction", type=float, default=val,
                     help=f"fraction of files held out for validation ({val})")
    pdp.add_argument("--ext", action="append", metavar=".EXT",
                     help="file extension to include (repeatable; default: .py)")
    pdp.add_argument("--no-progress", action="store_true", help="no progress bars")
    pdc = dsub.add_parser(
        "chat", help="generate a small chat set (JSON lines) from Python sources for `sft`",
        description="Conversations from documented functions of Python sources (default: this "
        "Python's standard library, PSF license): 'Write a Python function `sig`: "
        "<docstring's first sentence>' -> its source, and 'What does `module.sig` do?' -> its docstring.")
    pdc.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write them")
    pdc.add_argument("--source", action="append", metavar="PATH",
                     help="directory or .py file (repeatable; default: the stdlib)")
    pdc.add_argument("--limit", type=int, default=0, help="keep the first N (default: all)")
    pd.set_defaults(func=_cmd_data)

    pi = sub.add_parser("info", help="version, CPU features, CUDA, threads and kernel dispatch")
    pi.add_argument("--json", action="store_true", help="one JSON object instead of text")
    pi.add_argument("--cmake-dir", dest="cmake_dir", action="store_true",
                    help="print the folder for find_package(nanochat) (C/C++ embedding) and exit")
    pi.add_argument("--include-dir", dest="include_dir", action="store_true",
                    help="print the folder holding nanochat/nanochat.h and nanochat.hpp and exit")
    pi.add_argument("--lib", action="store_true", help="print the path of libnanochat.so and exit")
    pi.set_defaults(func=_cmd_info)

    from nanochat.train import recipes

    pr = sub.add_parser("recipe", help="the production training recipes (nano/small/medium)",
                        description=recipes.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes.add_arguments(pr)
    pr.set_defaults(func=recipes.main)

    pm = sub.add_parser("model", help="model sizes: parameter counts and memory estimates")
    msub = pm.add_subparsers(dest="model", required=True, metavar="ACTION")
    pmi = msub.add_parser(
        "info", help="parameter counts and memory of a config (built on the meta device)",
        description="Build the config's model on the meta device (no memory) and print its "
        "parameter counts and rough training / packed-inference memory.")
    pmi.add_argument("--config", default="tiny",
                     help="built-in config name (tiny, nano_125m, ...) or a TOML file")
    pmi.add_argument("--json", action="store_true", help="one JSON object instead of text")
    pmi.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                     help="override a config value, e.g. model.moe.experts=8 (repeatable)")
    pmi.add_argument("--batch", type=int, help="batch for the memory estimate "
                     "(default: the config's train.batch_size)")
    pmi.add_argument("--seq", type=int, help="sequence length for the memory estimate "
                     "(default: the config's train.seq_len)")
    pm.set_defaults(func=_cmd_model)

    pb = sub.add_parser("bench", help="benchmarks that compare alternatives side by side")
    bsub = pb.add_subparsers(dest="bench", required=True, metavar="NAME")
    from nanochat.bench import arch as bench_arch
    from nanochat.bench import collider as bench_collider
    from nanochat.bench import data as bench_data
    from nanochat.bench import decode as bench_decode
    from nanochat.bench import e3 as bench_e3
    from nanochat.bench import kernels
    from nanochat.bench import loss as bench_loss
    from nanochat.bench import optim as bench_optim
    from nanochat.bench import serve as bench_serve
    from nanochat.bench import train as bench_train

    benches = [
        (kernels, "kernels", "ternary GEMV/GEMM per kernel path and thread count vs torch f32"),
        (bench_decode, "decode", "prefill/decode tokens/s of the C++ engine vs llama.cpp"),
        (bench_train, "train", "training tokens/s and peak memory, C++ BitLinear vs torch; "
         "--nproc N: N torchrun ranks vs 1"),
        (bench_collider, "collider", "Collider token filtering: backward/step time, held-out loss"),
        (bench_arch, "arch", "step time and memory of mHC, MoE, hybrid attention vs plain"),
        (bench_optim, "optim", "optimizer-state bytes and step time: AdamW/Muon/Lion fp32 and "
         "8-bit, GaLore 2"),
        (bench_loss, "loss", "fused LM/MTP-head cross-entropy vs naive torch: peak memory, time"),
        (bench_e3, "e3", "the seed's five training setups, one report: loss, speed, memory, "
         "claims checked"),
        (bench_serve, "serve", "nanochat serve under 1/4/8/16 streaming clients: tokens/s, "
         "TTFT, inter-token latency"),
        (bench_data, "data", "data prepare's tokenization (1, 2 workers) vs HF encode_batch"),
    ]
    for module, name, help_text in benches:
        pn = bsub.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(pn)
        pn.set_defaults(bench_module=module)
    pb.set_defaults(func=_cmd_bench)

    pev = sub.add_parser("eval", help="evaluate a model: bits/byte, code benchmarks, lm-eval "
                         "tasks (docs/evaluation.md)",
                         description="Evaluate a model. See docs/evaluation.md.")
    esub = pev.add_subparsers(dest="eval", required=True, metavar="NAME")
    for name, cmd in _eval_commands().items():
        pn = esub.add_parser(name, help=cmd.__doc__.strip().splitlines()[0],
                             description=cmd.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(pn)
        pn.set_defaults(func=lambda a, cmd=cmd: cmd.main(a))
    # every argument goes to lm_eval's own parser unchanged (no prefix char: none is ours)
    pel = esub.add_parser(
        "lm-eval", add_help=False, prefix_chars="\0",
        help="lm-evaluation-harness with the model 'nanochat' registered; arguments as "
        "lm_eval's (pip install '.[eval]'; docs/evaluation.md)")
    pel.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    pel.set_defaults(func=_cmd_lm_eval)

    from nanochat.eval import report

    prp = sub.add_parser("report", help="a run's report card: config, curve, evals, sizes, speed",
                         description=report.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(prp)
    prp.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input; anything else is a bug: traceback
        print(f"nanochat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
