"""transformers' BitNet checkpoints (`model_type: "bitnet"`, BitNetForCausalLM) in and out.

    nanochat import hf DIR --out RUN                 # -> a run dir: sample, export --gguf, train
    nanochat data prepare --tokenizer RUN/checkpoints/step_000000/tokenizer --source SRC --out DATA
    nanochat train --config RUN/config.toml --out RUN --resume --data DATA --steps 300
    nanochat export --hf OUT_DIR --checkpoint RUN    # -> BitNetForCausalLM.from_pretrained(OUT_DIR)
    nanochat sft --checkpoint RUN --data chat.jsonl --out RUN2   # with DIR's chat template

The graph is ours (nanochat/model/gpt.py): transformers' BitNet is the Llama stack with
attn_sub_norm before o_proj and ffn_sub_norm before down_proj, NEOX (rotate_half) RoPE, GQA,
tied embeddings; its layers map one to one onto our module names (`_LAYER_KEYS`).

Weights come in two forms (quantization_config):
- master weights, `linear_class: autobitlinear, quantization_mode: online` (the "-bf16"
  checkpoints): float (out, in) matrices quantized on every forward with the same per-tensor
  absmean / per-token absmax int8 arithmetic as ours; they become our latent weights as they are.
- packed, `quantization_mode: offline`: uint8 (out/4, in), 4 codes a byte along the output
  dimension, code + 1 in bits 2i..2i+1 of byte r for output row i*out/4 + r
  (integrations/bitnet.py pack_weights), plus a one-element `weight_scale`. Its direction
  follows the class transformers builds: `bitlinear` (BitLinear.post_quant_process) divides,
  y = x.codes / weight_scale, so the absmean scale is 1/weight_scale; `autobitlinear` offline
  multiplies, scale = weight_scale. tests/test_hf_bitnet.py packs master weights both ways
  and checks transformers' own forward and our import against the master form.
  The latent weight we store for codes c and scale s is c * s / p (p: the fraction of nonzero
  codes), whose absmean is s, so re-quantizing gives back exactly c and s (a plain c * s would
  shrink the scale by p).

The checkpoint's chat template (tokenizer_config.json's chat_template, or chat_template.jinja)
is kept with the tokenizer (nanochat/data/template.py renders it in a Jinja sandbox).

Nothing from disk runs code: config.json is JSON, weights are read with safetensors only
(no pickle), every key, shape and dtype is checked, and errors name the file and key.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from nanochat import atomic
from nanochat.config import ModelConfig, RunConfig

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_JSON_BYTES = 64 << 20  # config.json / the shard index; a bigger one is not a config

# our per-layer name -> transformers' (under model.layers.N.)
_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
    "ffn_down": "mlp.down_proj",
}
_LINEAR = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# config.json fields that do not change the forward (read or ignored on purpose)
_IGNORED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
            "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
            "attention_dropout", "_name_or_path", "auto_map"}
_USED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
         "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings",
         "attention_bias", "head_dim", "quantization_config"}
_ACTIVATIONS = {"relu2": "relu2", "silu": "silu"}  # transformers' hidden_act -> ours
_QUANT_KEYS = {"quant_method", "linear_class", "quantization_mode", "use_rms_norm",
               "rms_norm_eps", "modules_to_not_convert"}


class HFImportError(ValueError):
    """A transformers checkpoint nanochat cannot take; the message names the file and key."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFImportError(f"{path}: missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise HFImportError(f"{path}: {path.stat().st_size} bytes, larger than any config")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise HFImportError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _field(d: dict, key: str, kind, where: str, default=None):
    v = d.get(key, default)
    ok = isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, float, (int, float)))
    if not ok:
        raise HFImportError(f"{where}: {key} must be {getattr(kind, '__name__', kind)}, "
                            f"got {v!r}")
    return v


def read_config(src: Path) -> tuple[ModelConfig, dict]:
    """(our ModelConfig, the quantization settings) of a transformers BitNet config.json.
    Unknown fields and options our graph does not run are errors naming the field."""
    where = str(src / CONFIG)
    d = _read_json(src / CONFIG)
    unknown = sorted(set(d) - _IGNORED - _USED)
    if unknown:
        raise HFImportError(f"{where}: unknown or unsupported field(s) {', '.join(unknown)}")
    if d.get("model_type") != "bitnet":
        raise HFImportError(f"{where}: model_type must be 'bitnet', got {d.get('model_type')!r}")
    arch = d.get("architectures", ["BitNetForCausalLM"])
    if arch != ["BitNetForCausalLM"]:
        raise HFImportError(f"{where}: architectures must be ['BitNetForCausalLM'], got {arch!r}")
    act = d.get("hidden_act", "relu2")
    if act not in _ACTIVATIONS:
        raise HFImportError(f"{where}: hidden_act {act!r} is not supported (relu2 or silu)")
    if d.get("tie_word_embeddings") is not True:
        raise HFImportError(f"{where}: tie_word_embeddings must be true (our LM head is the "
                            f"token embedding), got {d.get('tie_word_embeddings')!r}")
    if d.get("attention_bias", False) is not False:
        raise HFImportError(f"{where}: attention_bias must be false (our layers have no bias)")
    hidden = _field(d, "hidden_size", int, where)
    heads = _field(d, "num_attention_heads", int, where)
    if heads <= 0 or hidden % heads:
        raise HFImportError(f"{where}: hidden_size {hidden} is not a multiple of "
                            f"num_attention_heads {heads}")
    if d.get("head_dim") not in (None, hidden // heads):
        raise HFImportError(f"{where}: head_dim {d['head_dim']!r} must be hidden_size / "
                            f"num_attention_heads = {hidden // heads}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise HFImportError(f"{where}: rope_parameters must be an object, got {rope!r}")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
    if extra or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFImportError(f"{where}: rope_parameters {rope!r}: only the default RoPE "
                            f"(rope_type 'default', rope_theta) is supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 500000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise HFImportError(f"{where}: rope_theta must be a number, got {theta!r}")
    quant = d.get("quantization_config")
    if not isinstance(quant, dict):
        raise HFImportError(f"{where}: quantization_config is missing: transformers runs such a "
                            f"checkpoint in full precision, not ternary, so importing it as a "
                            f"BitNet b1.58 model would change what it computes")
    qwhere = f"{where}: quantization_config"
    unknown = sorted(set(quant) - _QUANT_KEYS)
    if unknown:
        raise HFImportError(f"{qwhere}: unknown field(s) {', '.join(unknown)}")
    if quant.get("quant_method") != "bitnet":
        raise HFImportError(f"{qwhere}.quant_method must be 'bitnet', got "
                            f"{quant.get('quant_method')!r}")
    q = {"linear_class": quant.get("linear_class", "bitlinear"),
         "mode": quant.get("quantization_mode", "offline")}
    if q["linear_class"] not in ("bitlinear", "autobitlinear"):
        raise HFImportError(f"{qwhere}.linear_class {q['linear_class']!r} is not supported")
    if q["mode"] not in ("online", "offline"):
        raise HFImportError(f"{qwhere}.quantization_mode {q['mode']!r} is not supported")
    if q["linear_class"] == "bitlinear" and q["mode"] == "online":
        raise HFImportError(f"{qwhere}: linear_class 'bitlinear' holds packed weights only "
                            f"(quantization_mode must be 'offline')")
    if quant.get("use_rms_norm", False):
        raise HFImportError(f"{qwhere}.use_rms_norm = true (an extra RMSNorm inside every "
                            f"linear layer) is not part of our graph")
    if quant.get("modules_to_not_convert") not in (None, [], ["lm_head"]):
        raise HFImportError(f"{qwhere}.modules_to_not_convert "
                            f"{quant['modules_to_not_convert']!r}: every layer must be ternary")
    try:
        cfg = ModelConfig(
            vocab_size=_field(d, "vocab_size", int, where), d_model=hidden,
            n_layers=_field(d, "num_hidden_layers", int, where), n_heads=heads,
            n_kv_heads=_field(d, "num_key_value_heads", int, where, heads),
            ffn_hidden=_field(d, "intermediate_size", int, where),
            max_seq_len=_field(d, "max_position_embeddings", int, where, 2048),
            rope_theta=float(theta),
            norm_eps=float(_field(d, "rms_norm_eps", (int, float), where, 1e-5)),
            activation=_ACTIVATIONS[act])
        cfg.validate()
    except ValueError as e:
        raise HFImportError(f"{where}: {e}") from None
    return cfg, q


def _weight_files(src: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (one file, or a sharded index)."""
    if (src / INDEX).is_file():
        index = _read_json(src / INDEX)
        wm = index.get("weight_map")
        if not isinstance(wm, dict):
            raise HFImportError(f"{src / INDEX}: weight_map must be an object")
        out = {}
        for key, fname in wm.items():
            # a shard name is a plain file name inside src: no path may leave the directory
            if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
                raise HFImportError(f"{src / INDEX}: weight_map[{key!r}] = {fname!r} is not a "
                                    f"file name in {src}")
            if not fname.endswith(".safetensors"):
                raise HFImportError(f"{src / INDEX}: weight_map[{key!r}] = {fname!r}: only "
                                    f".safetensors files are read (never pickle)")
            out[key] = src / fname
        return out
    if (src / SINGLE).is_file():
        return {k: src / SINGLE for k in _keys(src / SINGLE)}
    raise HFImportError(f"{src}: no {SINGLE} or {INDEX} (only safetensors are read; "
                        f"pytorch_model.bin is a pickle and is refused)")


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise HFImportError(f"{file}: not a readable safetensors file: {e}") from None


def _read_tensors(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    out = {}
    for f, keys in by_file.items():
        if not f.is_file():
            raise HFImportError(f"{f}: missing (named by {INDEX})")
        try:
            with safe_open(str(f), framework="pt") as h:
                present = set(h.keys())
                for k in keys:
                    if k not in present:
                        raise HFImportError(f"{f}: tensor {k} is missing (the index names it)")
                    out[k] = h.get_tensor(k)
        except HFImportError:
            raise
        except Exception as e:
            raise HFImportError(f"{f}: cannot read: {e}") from None
    return out


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Ternary codes (out, in) int8 from transformers' packing (out/4, in) uint8."""
    r = packed.shape[0]
    out = torch.empty((4 * r, *packed.shape[1:]), dtype=torch.int8)
    for i in range(4):  # output rows i*r .. i*r + r - 1 sit in bits 2i..2i+1
        out[i * r:(i + 1) * r] = ((packed >> (2 * i)) & 3).to(torch.int8) - 1
    return out


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """transformers' packing of ternary codes (out, in), out a multiple of 4 -> uint8."""
    r = codes.shape[0] // 4
    c = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((r, *codes.shape[1:]), dtype=torch.uint8)
    for i in range(4):
        packed |= c[i * r:(i + 1) * r] << (2 * i)
    return packed


def latent_from_codes(codes: torch.Tensor, scale: float) -> torch.Tensor:
    """A float32 weight whose absmean quantization gives back `codes` and `scale`."""
    nonzero = int(codes.count_nonzero())
    if nonzero == 0:
        return torch.zeros(codes.shape, dtype=torch.float32)
    return codes.to(torch.float32) * (scale * codes.numel() / nonzero)


def _check(t: torch.Tensor, key: str, file: Path, shape: tuple, dtypes) -> None:
    if tuple(t.shape) != tuple(shape):
        raise HFImportError(f"{file}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise HFImportError(f"{file}: {key} has dtype {t.dtype}, expected one of "
                            f"{', '.join(str(d) for d in dtypes)}")


def read_state(src: Path, cfg: ModelConfig, quant: dict) -> dict[str, torch.Tensor]:
    """Our GPT state dict (float32) from the checkpoint's safetensors, every tensor checked."""
    files = _weight_files(src)
    packed = quant["mode"] == "offline"
    expected: dict[str, tuple[str, tuple, tuple]] = {  # hf key -> (our key, shape, dtypes)
        "model.embed_tokens.weight": ("token_embd.weight", (cfg.vocab_size, cfg.d_model),
                                      _FLOAT_DTYPES),
        "model.norm.weight": ("output_norm.weight", (cfg.d_model,), _FLOAT_DTYPES)}
    hd = cfg.head_dim
    shapes = {"attn_q": (cfg.n_heads * hd, cfg.d_model), "attn_k": (cfg.n_kv_heads * hd,
              cfg.d_model), "attn_v": (cfg.n_kv_heads * hd, cfg.d_model),
              "attn_output": (cfg.d_model, cfg.n_heads * hd),
              "ffn_gate": (cfg.ffn_hidden, cfg.d_model), "ffn_up": (cfg.ffn_hidden, cfg.d_model),
              "ffn_down": (cfg.d_model, cfg.ffn_hidden), "attn_norm": (cfg.d_model,),
              "attn_sub_norm": (cfg.d_model,), "ffn_norm": (cfg.d_model,),
              "ffn_sub_norm": (cfg.ffn_hidden,)}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_KEYS.items():
            hf = f"model.layers.{i}.{theirs}.weight"
            shape = shapes[ours]
            if ours in _LINEAR and packed:
                if shape[0] % 4:
                    raise HFImportError(f"{src}: {hf}: {shape[0]} output rows, not a multiple "
                                        f"of 4, cannot be packed 4 to a byte")
                expected[hf] = (f"blocks.{i}.{ours}.weight", (shape[0] // 4, shape[1]),
                                (torch.uint8,))
                expected[f"model.layers.{i}.{theirs}.weight_scale"] = (
                    f"blocks.{i}.{ours}.scale", (1,), _FLOAT_DTYPES)
            else:
                expected[hf] = (f"blocks.{i}.{ours}.weight", shape, _FLOAT_DTYPES)
    missing = sorted(set(expected) - set(files))
    if missing:
        held = ", ".join(sorted({f.name for f in files.values()}))
        raise HFImportError(f"{src}: missing tensor(s) {', '.join(missing[:8])}"
                            f"{' ...' if len(missing) > 8 else ''} (not in {held})")
    extra = sorted(set(files) - set(expected) - {"lm_head.weight"})
    if extra:
        raise HFImportError(f"{files[extra[0]]}: unexpected tensor(s) {', '.join(extra[:8])}")
    raw = _read_tensors(files)
    # a tied checkpoint may store the head too: it must then be the embedding
    if "lm_head.weight" in raw and not torch.equal(raw["lm_head.weight"],
                                                   raw["model.embed_tokens.weight"]):
        raise HFImportError(f"{files['lm_head.weight']}: lm_head.weight differs from "
                                f"model.embed_tokens.weight, but tie_word_embeddings is true")
    state, scales = {}, {}
    for hf, (ours, shape, dtypes) in expected.items():
        t = raw[hf]
        if t.dim() == 0 and shape == (1,):
            t = t.reshape(1)
        _check(t, hf, files[hf], shape, dtypes)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HFImportError(f"{files[hf]}: {hf} holds a NaN or infinity")
        if ours.endswith(".scale"):
            scales[ours[:-len(".scale")] + ".weight"] = (hf, t.float().item())
        else:
            state[ours] = t if t.dtype == torch.uint8 else t.to(torch.float32)
    for ours, (hf, ws) in scales.items():
        if not ws > 0:
            raise HFImportError(f"{files[hf]}: {hf} = {ws}, must be > 0")
        # see the module doc: BitLinear divides by weight_scale, AutoBitLinear multiplies
        s = 1.0 / ws if quant["linear_class"] == "bitlinear" else ws
        p = state[ours]
        if bool(((p & 0x55) & (p >> 1) & 0x55).any()):  # a 2-bit field holding 3
            raise HFImportError(f"{files[hf.replace('weight_scale', 'weight')]}: "
                                f"{hf.replace('weight_scale', 'weight')} holds code 3 "
                                f"(valid packed codes are 0, 1, 2)")
        state[ours] = latent_from_codes(unpack_codes(p), s)
    return state


def _tokenizer_dir(src: Path, cfg: ModelConfig, tmp: Path, bos_id, eos_id) -> Path:
    from nanochat.data.tokenizer import Tokenizer

    if not (src / "tokenizer.json").is_file():
        raise HFImportError(f"{src}: tokenizer.json is missing (the run needs the model's "
                            f"tokenizer)")
    from nanochat.data.template import read_hf_template

    if isinstance(eos_id, list):  # several end tokens (LLaMA-3 instruct): the first ends text
        eos_id = eos_id[0] if eos_id else None
    try:  # the chat template travels with the tokenizer (chat fine-tuning, export, chat)
        template = read_hf_template(src)
    except ValueError as e:
        raise HFImportError(str(e)) from None
    tok = Tokenizer.load_foreign(src / "tokenizer.json", bos_id, eos_id, template)
    if tok.vocab_size > cfg.vocab_size:
        raise HFImportError(f"{src / 'tokenizer.json'}: {tok.vocab_size} tokens, more than "
                            f"the model's vocab_size {cfg.vocab_size}")
    return tok.save(tmp / "tokenizer")


def import_hf(src: str | os.PathLike, out: str | os.PathLike, log=print) -> Path:
    """Write a nanochat run directory (one step-0 checkpoint) for the checkpoint in `src`."""
    from nanochat import checkpoint
    from nanochat.data.tokenizer import Tokenizer
    from nanochat.model.build import build_model
    from nanochat.optim import build_optimizer

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise HFImportError(f"{src}: not a directory")
    if checkpoint.list_checkpoints(out):
        raise HFImportError(f"--out {out} already holds checkpoints; choose a new directory")
    cfg_model, quant = read_config(src)
    conf = _read_json(src / CONFIG)
    state = read_state(src, cfg_model, quant)
    run = RunConfig(model=cfg_model)
    run.train.seq_len = min(run.train.seq_len, cfg_model.max_seq_len)
    run.validate()
    model = build_model(run, bitlinear="torch", seed=None)  # the weights come from the file
    model.load_state_dict(state)
    opt = build_optimizer(model, run, log=lambda *_: None)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = _tokenizer_dir(src, cfg_model, Path(tmp), conf.get("bos_token_id"),
                                 conf.get("eos_token_id"))
        st = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0,
              "elapsed_s": 0.0, "train_s": 0.0, "rng": {"torch": torch.get_rng_state(),
                                                         "cuda": None},
              "config": run.to_dict(), "loader": {"step": 0},
              "tokenizer_sha256": Tokenizer.load(tok_dir).sha256(),
              "imported_from": str(src.resolve())}
        out.mkdir(parents=True, exist_ok=True)
        path = checkpoint.save(out, 0, st, run.to_dict(), tok_dir, keep=1)
    atomic.write_text(out / "config.json", json.dumps(run.to_dict(), indent=2) + "\n")
    # the model's config for fine-tuning: nanochat train --config RUN/config.toml --resume
    atomic.write_text(out / "config.toml", to_toml(run.to_dict()))
    log(f"imported {src} ({quant['linear_class']}, {quant['mode']}): "
        f"{sum(p.numel() for p in model.parameters()):,} params -> {path}")
    return path


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # Python's repr of a float (1e-05, inf) is a valid TOML float
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"config value {v!r} has no TOML form")


def to_toml(d: dict, prefix: str = "") -> str:
    """A RunConfig dict as TOML (`nanochat train --config RUN/config.toml` reads it)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] + lines + [""]) if prefix and lines else lines
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out)


# ---- export ---------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int) -> dict:
    """config.json of our model as transformers' BitNet with master weights (online QAT)."""
    why = []
    if cfg.mhc.streams > 1:
        why.append("model.mhc.streams > 1")
    if cfg.moe.experts:
        why.append("model.moe.experts > 0")
    if "S" in cfg.attention.pattern:
        why.append("sliding-window layers (model.attention.pattern)")
    if cfg.mtp.heads > 1:
        why.append("model.mtp.heads > 1")
    if why:
        raise ValueError(f"export --hf: transformers' BitNet has no {', '.join(why)}")
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": cfg.activation, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": True, "attention_bias": False, "dtype": "float32",
        "bos_token_id": bos_id, "eos_token_id": eos_id,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"},
    }


def export_hf(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `out/` (config.json, model.safetensors, tokenizer files) from a nanochat
    checkpoint; the directory appears only when complete."""
    from safetensors.torch import save_file

    from nanochat.model.load import load_model

    out = Path(out)
    if out.exists():
        raise ValueError(f"--hf {out} already exists; choose a new directory")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {out.parent} does not exist")
    model, tok, _ = load_model(checkpoint_path)
    cfg = model.config
    conf = hf_config(cfg, tok.bos_id, tok.eos_id)
    sd = model.state_dict()
    tensors = {"model.embed_tokens.weight": sd["token_embd.weight"],
               "model.norm.weight": sd["output_norm.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_KEYS.items():
            tensors[f"model.layers.{i}.{theirs}.weight"] = sd[f"blocks.{i}.{ours}.weight"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()},
                  str(tmp / SINGLE), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
        tok.save_hf(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

