"""The `nanochat` command: thin argument parsing over the package.

    nanochat data prepare [--source PATH ...] [--out DIR] [--vocab-size N] [--ext .py ...]
    nanochat info [--json]
    nanochat model info [--config tiny] [--json] [--batch B --seq T]
    nanochat bench kernels [--json] [--quick] [--threads 1,2] [--isa ...]
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from nanochat import __version__
    from nanochat._core import core

    info = dict(core().info())
    info["version"] = __version__
    info["core_version"] = core().info()["version"]
    if args.json:
        print(json.dumps(info))
        return 0
    feats = info["features"]
    cuda = info["cuda"]
    print(f"nanochat {info['version']}")
    print(f"  cpu features : " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats.items()))
    print(f"  cuda         : compiled={'yes' if cuda['compiled'] else 'no'}, devices={cuda['devices']}")
    print(f"  threads      : {info['threads']}  (NANOCHAT_NUM_THREADS overrides)")
    print(f"  kernel paths : {', '.join(info['isas'])}")
    print(f"  ternary_gemm : dispatches to {info['isa']}  (NANOCHAT_ISA pins one)")
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from nanochat import config as C
    from nanochat import gpt

    if args.model == "info":
        cfg = C.load_config(args.config)
        info = gpt.model_info(cfg.model, args.batch or cfg.train.batch_size,
                              args.seq or cfg.train.seq_len)
        print(json.dumps(info) if args.json else gpt.format_model_info(info))
        return 0
    raise AssertionError(args.model)


def _cmd_data(args: argparse.Namespace) -> int:
    from nanochat import corpus

    if args.data == "prepare":
        m = corpus.prepare(args.source or None, args.out, args.vocab_size, args.val_fraction,
                           args.ext or [".py"], progress=not args.no_progress)
        print("\n".join(corpus.summary_lines(m)))
        return 0
    raise AssertionError(args.data)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "kernels":
        from nanochat.bench import kernels

        return kernels.main(args)
    raise AssertionError(args.bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nanochat",
        description="Ternary (BitNet b1.58) language models: train, export to GGUF, run fast on CPUs.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from nanochat.config import DataConfig, ModelConfig

    pd = sub.add_parser("data", help="prepare a corpus: tokenizer + train/val token files")
    dsub = pd.add_subparsers(dest="data", required=True, metavar="ACTION")
    pdp = dsub.add_parser(
        "prepare", help="collect source files, train the tokenizer, tokenize (cached)",
        description="Walk the sources for files with the given extensions, skip binary and "
        "non-UTF-8 files, drop duplicates, split train/val by file, train a byte-level BPE "
        "tokenizer on train and write train.bin/val.bin, tokenizer/ and manifest.json. "
        "Reuses the output directory when the settings and the files are unchanged.")
    pdp.add_argument("--source", action="append", metavar="PATH",
                     help="directory or file to read (repeatable; default: this Python's "
                     "standard library, without site-packages)")
    pdp.add_argument("--out", metavar="DIR", help="output directory (default: "
                     "$NANOCHAT_CACHE/data/<settings hash>, ~/.cache/nanochat if unset)")
    vocab, val = ModelConfig().vocab_size, DataConfig().val_fraction
    pdp.add_argument("--vocab-size", type=int, default=vocab,
                     help=f"tokenizer vocabulary, = model.vocab_size ({vocab})")
    pdp.add_argument("--val-fraction", type=float, default=val,
                     help=f"fraction of files held out for validation ({val})")
    pdp.add_argument("--ext", action="append", metavar=".EXT",
                     help="file extension to include (repeatable; default: .py)")
    pdp.add_argument("--no-progress", action="store_true", help="no progress bars")
    pd.set_defaults(func=_cmd_data)

    pi = sub.add_parser("info", help="version, CPU features, CUDA, threads and kernel dispatch")
    pi.add_argument("--json", action="store_true", help="one JSON object instead of text")
    pi.set_defaults(func=_cmd_info)

    pm = sub.add_parser("model", help="model sizes: parameter counts and memory estimates")
    msub = pm.add_subparsers(dest="model", required=True, metavar="ACTION")
    pmi = msub.add_parser(
        "info", help="parameter counts and memory of a config (built on the meta device)",
        description="Build the config's model on the meta device (no memory) and print its "
        "parameter counts and rough training / packed-inference memory.")
    pmi.add_argument("--config", default="tiny",
                     help="built-in config name (tiny, nano_125m, ...) or a TOML file")
    pmi.add_argument("--json", action="store_true", help="one JSON object instead of text")
    pmi.add_argument("--batch", type=int, help="batch for the memory estimate "
                     "(default: the config's train.batch_size)")
    pmi.add_argument("--seq", type=int, help="sequence length for the memory estimate "
                     "(default: the config's train.seq_len)")
    pm.set_defaults(func=_cmd_model)

    pb = sub.add_parser("bench", help="benchmarks that compare alternatives side by side")
    bsub = pb.add_subparsers(dest="bench", required=True, metavar="NAME")
    from nanochat.bench import kernels

    kernels.add_arguments(
        bsub.add_parser(
            "kernels",
            help="ternary GEMV/GEMM per kernel path and thread count vs torch f32 matmul",
            description=kernels.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nanochat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
