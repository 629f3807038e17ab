"""GGUF export: a trained model and its tokenizer -> one GGUF v3 file.

    nanochat export --gguf model.gguf --checkpoint runs/nano [--type tq2_0] [--embd f16]

The file follows the metadata contract in docs/gguf.md: architecture "bitnet" (llama.cpp's
graph) when llama.cpp computes the model exactly, "nanochat" plus nanochat.* keys otherwise;
every BitLinear weight as ggml TQ2_0 (default) or TQ1_0 whose block d is the tensor's
trained absmean scale (fp16), the tied token embedding as F16 (default), Q8_0 or F32, the
RMSNorm gains as F32, and the byte-level BPE tokenizer under tokenizer.ggml.*.

Ternary codes and scales come from `bitlinear.weight_codes` of the latent weights, i.e.
exactly what the trained forward pass multiplies by; they are never re-derived from
dequantized weights (a second absmean over codes * s would shrink every layer). Packing
(TQ2_0/TQ1_0/Q8_0) and writing (atomic: temp file + rename) are done by the C++ core.

    pytest tests/test_export.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from nanochat._core import core
from nanochat.config import ModelConfig
from nanochat.data.chat import CHAT_TEMPLATE
from nanochat.data.tokenizer import Tokenizer
from nanochat.ops import ternary
from nanochat.ops.bitlinear import weight_codes

# ggml tensor type ids (ggml.h `enum ggml_type`) and llama.cpp's LlamaFileType ids
# (general.file_type) of the ternary types; the same numbers as gguf-py's enums.
GGML_F32, GGML_F16, GGML_Q8_0, GGML_TQ1_0, GGML_TQ2_0 = 0, 1, 8, 34, 35
WEIGHT_TYPES = {"tq2_0": GGML_TQ2_0, "tq1_0": GGML_TQ1_0}
EMBD_TYPES = {"f16": GGML_F16, "q8_0": GGML_Q8_0, "f32": GGML_F32}
FILE_TYPES = {"tq1_0": 36, "tq2_0": 37}  # LLAMA_FTYPE_MOSTLY_TQ1_0 / _TQ2_0
TYPE_NAMES = {GGML_F32: "f32", GGML_F16: "f16", GGML_Q8_0: "q8_0", GGML_TQ1_0: "tq1_0",
              GGML_TQ2_0: "tq2_0"}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
QK_K = 256  # weights per TQ1_0/TQ2_0 block: every ternary row length must be a multiple
QK8_0 = 32
Q8_0_BLOCK_BYTES = 34

EOT = "<|assistant_end|>"  # tokenizer.ggml.eot_token_id: the end of a chat turn
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL / _CONTROL

# Per block, in file order: (GGUF name, module attribute, kind); "ternary" are BitLinear.
BLOCK_TENSORS = (
    ("attn_norm", "norm"), ("attn_q", "ternary"), ("attn_k", "ternary"), ("attn_v", "ternary"),
    ("attn_sub_norm", "norm"), ("attn_output", "ternary"), ("ffn_norm", "norm"),
    ("ffn_gate", "ternary"), ("ffn_up", "ternary"), ("ffn_sub_norm", "norm"),
    ("ffn_down", "ternary"),
)
# A MoE block's FFN in place of the dense ffn_gate/up/sub_norm/down (nanochat/model/moe.py):
# "router" full precision, "experts" (E, out, in) ternary with one scale per expert.
MOE_TENSORS = (("ffn_gate_inp.weight", "ffn_gate_inp", "router"),
               ("exp_probs_b.bias", "expert_bias", "router"),
               ("ffn_gate_exps.weight", "ffn_gate_exps", "experts"),
               ("ffn_up_exps.weight", "ffn_up_exps", "experts"),
               ("ffn_sub_norm_exps.weight", "ffn_sub_norm_exps", "norm"),
               ("ffn_down_exps.weight", "ffn_down_exps", "experts"))
SHEXP_TENSORS = (("ffn_gate_shexp.weight", "ffn_gate_shexp", "ternary"),
                 ("ffn_up_shexp.weight", "ffn_up_shexp", "ternary"),
                 ("ffn_sub_norm_shexp.weight", "ffn_sub_norm_shexp", "norm"),
                 ("ffn_down_shexp.weight", "ffn_down_shexp", "ternary"))
# An MTP head's join (nanochat/model/mtp.py), after its block's tensors: blk.{n_layers + j}.nextn.*
MTP_TENSORS = (("enorm", "norm"), ("hnorm", "norm"), ("eh_proj", "ternary"),
               ("shared_head_norm", "norm"))

KV = tuple  # (key, gguf type name, value), as nanochat._C.gguf_write takes them


# ---- Q8_0 over the C++ core ------------------------------------------------------------


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml Q8_0 bytes (rows, cols/32*34) of float32 x (rows, cols); byte-equal to
    gguf.quants.quantize(x, Q8_0) (ggml's quantize_row_q8_0_ref)."""
    ternary._check(x, "x", "float32", 2)
    rows, cols = x.shape
    if cols % QK8_0:
        raise ValueError(f"x: row length {cols} is not a multiple of the {QK8_0}-weight "
                         "Q8_0 block")
    out = np.empty((rows, cols // QK8_0 * Q8_0_BLOCK_BYTES), dtype=np.uint8)
    core().q8_0_quantize(ternary._buffer(x, "x"), ternary._buffer(out, "out"))
    return out


def dequantize_q8_0(packed: np.ndarray, cols: int) -> np.ndarray:
    """float32 (rows, cols) = d * q of Q8_0 bytes (rows, cols/32*34)."""
    ternary._check(packed, "packed", "uint8", 2)
    if cols % QK8_0:
        raise ValueError(f"cols: {cols} is not a multiple of the {QK8_0}-weight Q8_0 block")
    x = np.empty((packed.shape[0], cols), dtype=np.float32)
    core().q8_0_dequantize(ternary._buffer(packed, "packed"), ternary._buffer(x, "x"))
    return x


# ---- what the file declares ----------------------------------------------------------------


def architecture(cfg: ModelConfig) -> tuple[str, list[KV]]:
    """general.architecture and the nanochat.* keys the model needs beyond it.

    "bitnet" when llama.cpp's bitnet graph computes this model exactly: SiLU gated FFN and
    no option that graph lacks. Anything else is "nanochat", which always states its
    activation; each later option (MoE, mHC residual streams, sliding-window attention,
    MTP heads) adds its reserved nanochat.* keys (docs/gguf.md) to `extensions` and so
    forces "nanochat".
    """
    extensions: list[KV] = []
    if cfg.mtp.heads > 1:  # MTP heads 2..n as blocks n_layers.. (nanochat/model/mtp.py)
        extensions.append(("nanochat.nextn_predict_layers", "u32", cfg.mtp.heads - 1))
    if "S" in cfg.attention.pattern:  # per-block sliding window (nanochat/ops/attention.py)
        extensions += [
            ("nanochat.attention.sliding_window", "u32", cfg.attention.window),
            ("nanochat.attention.sliding_window_pattern", "array[bool]",
             [cfg.attention.layer_window(i) is not None for i in range(cfg.n_layers)])]
    if cfg.moe.experts:  # every block's FFN is a mixture of ternary experts (nanochat/model/moe.py)
        m = cfg.moe
        extensions += [
            ("nanochat.expert_count", "u32", m.experts),
            ("nanochat.expert_used_count", "u32", m.top_k),
            ("nanochat.expert_feed_forward_length", "u32", m.expert_hidden or cfg.ffn_hidden),
            ("nanochat.expert_shared_count", "u32", int(m.shared_expert)),
            ("nanochat.expert_gating_func", "string", "sigmoid"),
            ("nanochat.expert_weights_norm", "bool", m.top_k > 1),
            ("nanochat.leading_dense_block_count", "u32", 0)]
    if cfg.mhc.streams > 1:  # mHC residual streams around every sub-layer (nanochat/model/mhc.py)
        m = cfg.mhc
        extensions += [
            ("nanochat.hc.stream_count", "u32", m.streams),
            ("nanochat.hc.sinkhorn_iterations", "u32", m.sinkhorn_iters),
            ("nanochat.hc.dynamic", "bool", bool(m.dynamic)),
            ("nanochat.hc.res_type", "string", m.res)]
    if cfg.activation == "silu" and not extensions:
        return "bitnet", []
    return "nanochat", [("nanochat.ffn_activation", "string", cfg.activation), *extensions]


def check_supported(cfg: ModelConfig) -> None:
    """Refuse a model the engine would reject, naming the config key: every option
    (sliding window, MoE, mHC, MTP) exports, within the engine's limits (model.cpp)."""
    unsupported = []
    if cfg.moe.experts > 1024:
        unsupported.append(f"model.moe.experts = {cfg.moe.experts} (the engine runs <= 1024)")
    if cfg.mhc.streams > 1 and cfg.mhc.sinkhorn_iters > 100000:
        unsupported.append(f"model.mhc.sinkhorn_iters = {cfg.mhc.sinkhorn_iters} (the engine "
                           f"runs <= 100000)")
    if unsupported:
        raise ValueError(f"export: the GGUF engine does not support {'; '.join(unsupported)}")


def metadata(cfg: ModelConfig, tok: Tokenizer, weight_type: str, name: str) -> list[KV]:
    """Every metadata key/value of the file, in file order (docs/gguf.md)."""
    arch, extra = architecture(cfg)
    kvs: list[KV] = [
        ("general.architecture", "string", arch),
        ("general.name", "string", name),
        ("general.file_type", "u32", FILE_TYPES[weight_type]),
        ("general.quantization_version", "u32", QUANTIZATION_VERSION),
        (f"{arch}.vocab_size", "u32", cfg.vocab_size),
        (f"{arch}.context_length", "u32", cfg.max_seq_len),
        (f"{arch}.embedding_length", "u32", cfg.d_model),
        (f"{arch}.block_count", "u32", cfg.n_layers),
        (f"{arch}.feed_forward_length", "u32", cfg.ffn_hidden),
        (f"{arch}.attention.head_count", "u32", cfg.n_heads),
        (f"{arch}.attention.head_count_kv", "u32", cfg.n_kv_heads),
        (f"{arch}.rope.dimension_count", "u32", cfg.head_dim),
        (f"{arch}.rope.freq_base", "f32", float(cfg.rope_theta)),
        (f"{arch}.attention.layer_norm_rms_epsilon", "f32", float(cfg.norm_eps)),
        *extra,
    ]
    return kvs + tokenizer_metadata(tok)


def tokenizer_metadata(tok: Tokenizer) -> list[KV]:
    """tokenizer.ggml.*: byte-level BPE as llama.cpp's "gpt2" model reads it, with the
    tokenizer's pre-tokenizer ("gpt-2" ours, "llama-bpe" an imported LLaMA-3 one)."""
    bos = tok.bos_id
    types = [TOKEN_CONTROL if tok.is_special(i) else TOKEN_NORMAL for i in range(tok.vocab_size)]
    eot = tok.special_tokens.get(EOT)  # an imported tokenizer has no chat turn token of ours
    template = CHAT_TEMPLATE if eot is not None else tok.chat_template
    if eot is None and template is not None:  # an imported one's own template and its end
        from nanochat.data.template import ChatTemplate

        eot = ChatTemplate.of(tok, "the checkpoint's tokenizer").end_of_turn(tok)
    return [
        ("tokenizer.ggml.model", "string", "gpt2"),
        ("tokenizer.ggml.pre", "string", tok.pre_tokenizer),
        ("tokenizer.ggml.tokens", "array[string]", tok.tokens()),
        ("tokenizer.ggml.token_type", "array[i32]", types),
        ("tokenizer.ggml.merges", "array[string]", tok.merges()),
        ("tokenizer.ggml.bos_token_id", "u32", bos),
        # Training puts <|bos|> before every document, so predicting it ends one.
        ("tokenizer.ggml.eos_token_id", "u32", tok.eos_id),
        *([("tokenizer.ggml.eot_token_id", "u32", eot)] if eot is not None else []),
        ("tokenizer.ggml.add_bos_token", "bool", True),
        ("tokenizer.ggml.add_eos_token", "bool", False),
        # the chat template in Jinja, as llama.cpp and its server read it: ours (nanochat/
        # data/chat.py), or an imported tokenizer's own (nanochat/data/template.py), if any
        *([("tokenizer.chat_template", "string", template)] if template is not None else []),
    ]


def _plan(model: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(GGUF name, kind, parameter) for every tensor, in file order. Fails on a model
    parameter it does not map, so a new option cannot be dropped from the file silently."""
    plan = [("token_embd.weight", "embd", model.token_embd.weight),
            ("output_norm.weight", "norm", model.output_norm.weight)]
    for i, block in enumerate(model.blocks):
        moe = getattr(block, "moe", None)
        for attr, kind in BLOCK_TENSORS:
            if moe is not None and attr.startswith("ffn_") and attr != "ffn_norm":
                continue  # the experts below replace the dense FFN
            plan.append((f"blk.{i}.{attr}.weight", kind, getattr(block, attr).weight))
        if moe is not None:
            for name, attr, kind in MOE_TENSORS + (SHEXP_TENSORS if moe.shared else ()):
                t = getattr(moe, attr)
                plan.append((f"blk.{i}.{name}", kind, getattr(t, "weight", t)))
        for sub in ("attn", "ffn"):  # mHC coefficients of each sub-layer, f32 as trained
            hc = getattr(block, f"mhc_{sub}", None)
            if hc is None:
                continue
            plan += [(f"blk.{i}.hc_{sub}_pre.weight", "norm", hc.b_pre),
                     (f"blk.{i}.hc_{sub}_post.weight", "norm", hc.b_post),
                     (f"blk.{i}.hc_{sub}_res.weight",
                      "hc_res" if hc.res == "sinkhorn" else "norm", hc.b_res)]
            if hc.dynamic:
                plan += [(f"blk.{i}.hc_{sub}_fn.weight", "norm", hc.phi),
                         (f"blk.{i}.hc_{sub}_alpha.weight", "norm", hc.alpha)]
    for j, head in enumerate(getattr(model, "mtp", ())):  # MTP head j+2: blk.{n_layers + j}
        b = f"blk.{len(model.blocks) + j}"
        for attr, kind in BLOCK_TENSORS:
            plan.append((f"{b}.{attr}.weight", kind, getattr(head.block, attr).weight))
        for attr, kind in MTP_TENSORS:
            plan.append((f"{b}.nextn.{attr}.weight", kind, getattr(head, attr).weight))
    mapped = {id(p) for _, _, p in plan}  # (expert_bias is a buffer, not a parameter)
    unmapped = [n for n, p in model.named_parameters() if id(p) not in mapped]
    if unmapped:
        raise ValueError(f"export: the GGUF layout has no tensor for model parameter(s) "
                         f"{', '.join(unmapped)}")
    return plan


def _check_shapes(plan, cfg: ModelConfig, embd_type: str) -> None:
    """Row lengths (GGUF dims[0]) must fill whole blocks of their type."""
    dim_names = {cfg.d_model: "d_model", cfg.ffn_hidden: "ffn_hidden"}
    for name, kind, p in plan:
        cols = p.shape[-1]
        what = dim_names.get(cols, "its row length")
        if kind in ("ternary", "experts") and cols % QK_K:
            raise ValueError(
                f"{name}: input dimension {cols} ({what}) is not a multiple of {QK_K}, "
                f"the TQ1_0/TQ2_0 block; pick sizes that are")
        if kind == "embd" and embd_type == "q8_0" and cols % QK8_0:
            raise ValueError(f"{name}: d_model {cols} is not a multiple of {QK8_0}, the Q8_0 "
                             "block; use --embd f16 or f32")


def _cpu_f32(p: torch.Tensor) -> np.ndarray:
    return p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _tensor_bytes(name: str, kind: str, p: torch.Tensor, weight_type: str, embd_type: str):
    """(ggml type id, GGUF dims, uint8 bytes) of one tensor."""
    dims = list(reversed(p.shape))  # GGUF order: fastest-varying first
    if kind == "hc_res":  # Sinkhorn logits (n*n,) row-major: the (n, n) matrix, dims [n, n]
        n = round(p.numel() ** 0.5)
        dims, kind = [n, n], "norm"
    pack = ternary.pack_tq2_0 if weight_type == "tq2_0" else ternary.pack_tq1_0
    if kind == "experts":  # (E, out, in): each expert its own codes and scale, stacked
        raws = []
        for e in range(p.shape[0]):
            codes, scale = weight_codes(p[e].detach().to("cpu"))
            raws.append(pack(codes.contiguous().numpy(), scale).reshape(-1))
        return WEIGHT_TYPES[weight_type], dims, np.concatenate(raws)
    if kind == "ternary":
        codes, scale = weight_codes(p.detach().to("cpu"))
        codes = codes.contiguous().numpy()
        return WEIGHT_TYPES[weight_type], dims, pack(codes, scale)
    w = _cpu_f32(p)
    if kind in ("norm", "router") or embd_type == "f32":
        return GGML_F32, dims, w.view(np.uint8)
    if embd_type == "f16":
        return GGML_F16, dims, w.astype(np.float16).view(np.uint8)  # round to nearest even
    try:
        return GGML_Q8_0, dims, quantize_q8_0(w)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


# ---- the exporter --------------------------------------------------------------------------


def export_gguf(model, tokenizer: Tokenizer, path: str | os.PathLike,
                weight_type: str = "tq2_0", embd_type: str = "f16",
                name: str | None = None) -> dict:
    """Write `model` (a nanochat.model.gpt.GPT) and `tokenizer` to `path` as GGUF v3.

    weight_type: "tq2_0" | "tq1_0" for every BitLinear weight; embd_type: "f16" | "q8_0" |
    "f32" for the tied token embedding. Returns a summary dict (architecture, tensor count,
    bytes, types, elapsed seconds). The file appears only when complete; on any error no
    file (and no temp file) is left and an existing `path` is untouched.
    """
    t0 = time.perf_counter()
    weight_type, embd_type = str(weight_type).lower(), str(embd_type).lower()
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"--type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    if embd_type not in EMBD_TYPES:
        raise ValueError(f"--embd must be one of {', '.join(EMBD_TYPES)}, got {embd_type!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    cfg: ModelConfig = model.config
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}")

    check_supported(cfg)
    plan = _plan(model)
    _check_shapes(plan, cfg, embd_type)
    name = name if name is not None else "nanochat"
    kvs = metadata(cfg, tokenizer, weight_type, name)

    entries, keep, types = [], [], {}
    ternary_params = ternary_bytes = 0
    for tname, kind, p in plan:
        typ, dims, raw = _tensor_bytes(tname, kind, p, weight_type, embd_type)
        raw = np.ascontiguousarray(raw).reshape(-1)
        keep.append(raw)  # the writer reads these buffers by address
        entries.append((tname, typ, dims, ternary._buffer(raw, tname)))
        types[TYPE_NAMES[typ]] = types.get(TYPE_NAMES[typ], 0) + 1
        if kind in ("ternary", "experts"):
            ternary_params += p.numel()
            ternary_bytes += raw.nbytes
    core().gguf_write(str(path), kvs, entries)
    arch = kvs[0][2]
    return {
        "path": str(path),
        "architecture": arch,
        "name": name,
        "weight_type": weight_type,
        "embd_type": embd_type,
        "tensors": len(entries),
        "types": types,
        "metadata_keys": len(kvs),
        "bytes": path.stat().st_size,
        "ternary_params": ternary_params,
        "ternary_bytes": ternary_bytes,
        "total_params": sum(p.numel() for _, _, p in plan),
        "elapsed_s": time.perf_counter() - t0,
    }


def default_name(checkpoint: Path) -> str:
    """general.name of a checkpoint: its run directory's name (runs/nano/checkpoints/
    step_000250 -> "nano"), else the checkpoint directory's own name."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent.name
    return checkpoint.name


def export_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike, **kw) -> dict:
    """Export a training checkpoint (a checkpoint dir or a run dir: its latest) to GGUF.
    Keyword arguments are export_gguf's; the summary also names the checkpoint."""
    from nanochat.model.load import load_model

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
    # Fail on a missing output directory before the (slow) checkpoint load.
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f"output directory {Path(path).parent} does not exist")
    model, tok, state = load_model(checkpoint)
    kw.setdefault("name", default_name(state["path"]))
    summary = export_gguf(model, tok, path, **kw)
    summary["checkpoint"] = str(state["path"])
    summary["step"] = state.get("step")
    return summary


def format_summary(s: dict) -> str:
    """The text `nanochat export` prints."""
    mib = 2**20
    types = ", ".join(f"{n} {t}" for t, n in sorted(s["types"].items(), key=lambda kv: -kv[1]))
    arch = s["architecture"] + (" (llama.cpp's bitnet graph)" if s["architecture"] == "bitnet"
                                else " (nanochat engine only)")
    bpw = 8 * s["ternary_bytes"] / max(s["ternary_params"], 1)
    lines = []
    if "checkpoint" in s:
        lines.append(f"checkpoint   : {s['checkpoint']} (step {s['step']})")
    lines += [
        f"wrote        : {s['path']}  ({s['bytes'] / mib:.2f} MiB)",
        f"architecture : {arch}, name {s['name']!r}",
        f"tensors      : {s['tensors']} ({types}); {s['metadata_keys']} metadata keys",
        f"weights      : {s['ternary_params']:,} ternary as {s['weight_type']} "
        f"({s['ternary_bytes'] / mib:.2f} MiB, {bpw:.4f} bits/weight); token_embd "
        f"{s['embd_type']}",
        f"elapsed      : {s['elapsed_s']:.2f} s",
    ]
    return "\n".join(lines)
