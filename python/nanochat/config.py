"""Run configuration: TOML files parsed into typed dataclasses. Unknown keys are errors.

A config file has up to five tables, each optional (missing keys keep their defaults):

    [model]     architecture (ModelConfig)
    [train]     batch, steps, budget, eval, checkpoints (TrainConfig)
    [optim]     optimizer (OptimConfig)
    [schedule]  WSD learning-rate schedule (ScheduleConfig)
    [data]      corpus sources and split (DataConfig)

`nanochat train --config configs/models/tiny.toml --set train.lr=1e-3` loads a file and
applies dotted overrides; `load_config` and `apply_overrides` are the Python entry points.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


def _config_dir() -> Path:
    """configs/ as installed in the wheel, else the source tree's (editable installs)."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent.parent / "configs"):
        if d.is_dir():
            return d
    return here / "configs"


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the file and key."""


# The choices of every string-valued option. Fields annotated with these are checked in one
# place (_check_choice); other modules take their tuples from here (typing.get_args).
MHCRes = Literal["sinkhorn", "lite"]  # H_res: Sinkhorn-Knopp, or a mix of permutations
MoEBalance = Literal["bias", "none"]
Activation = Literal["silu", "relu2"]
BitLinearKernel = Literal["auto", "cpp", "torch"]
BackwardPrecision = Literal["auto", "bf16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
Parallel = Literal["ddp", "fsdp"]  # under torchrun: replicated (DDP) or sharded (FSDP2)
CheckpointFormat = Literal["auto", "gathered", "sharded"]
FusedLoss = Literal["auto", "on", "off"]
FusedLossPrecision = Literal["f32", "bf16"]
MuonScale = Literal["moonlight", "original"]
NSDtype = Literal["auto", "bfloat16", "float32"]
Optimizer = Literal["adamw", "muon", "lion"]
RestOptimizer = Literal["adamw", "lion"]  # Muon is for matrices
StatePrecision = Literal["fp32", "8bit"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
OPTIMIZERS = typing.get_args(Optimizer)


@dataclass
class MHCConfig:
    """[model.mhc] manifold-constrained hyper-connections (nanochat/model/mhc.py)."""
    streams: int = 1  # n residual streams; 1 is the plain residual (no mHC parameters)
    res: MHCRes = "sinkhorn"  # H_res: "sinkhorn" (Sinkhorn-Knopp) or "lite" (mix of permutations)
    sinkhorn_iters: int = 20
    dynamic: bool = True  # coefficients also computed from the RMS-normed streams

    def validate(self, where: str = "model.mhc") -> None:
        if not 1 <= self.streams <= 8:
            raise ConfigError(f"{where}.streams must be in 1..8, got {self.streams}")
        _check_choices(self, where)
        if self.res == "lite" and self.streams > 5:
            raise ConfigError(f"{where}: res = 'lite' mixes all streams! permutations; "
                              f"streams must be <= 5, got {self.streams}")
        _positive(self, where, "sinkhorn_iters")
        if self.sinkhorn_iters > 1000:  # the C++ engine refuses more (kMaxSinkhornIterations)
            raise ConfigError(f"{where}.sinkhorn_iters must be <= 1000, got "
                              f"{self.sinkhorn_iters}")


@dataclass
class MoEConfig:
    """[model.moe] mixture of ternary experts in place of the FFN (nanochat/model/moe.py)."""
    experts: int = 0  # routed experts E; 0 keeps the dense FFN
    top_k: int = 2
    expert_hidden: int = 0  # hidden width of each expert; 0: model.ffn_hidden
    shared_expert: bool = False  # one always-on expert of the same width
    balance: MoEBalance = "bias"  # "bias" (DeepSeek-V3 auxiliary-loss-free) or "none"
    bias_rate: float = 1e-3  # bias step per training forward (gamma)

    def validate(self, where: str = "model.moe") -> None:
        if self.experts < 0 or self.expert_hidden < 0:
            raise ConfigError(f"{where}: experts and expert_hidden must be >= 0")
        if self.experts and not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"{where}.top_k must be in 1..experts ({self.experts}), "
                              f"got {self.top_k}")
        _check_choices(self, where)
        if self.bias_rate < 0:
            raise ConfigError(f"{where}.bias_rate must be >= 0, got {self.bias_rate}")


@dataclass
class AttentionConfig:
    """[model.attention] per-layer full causal ("L") or sliding-window ("S") attention."""
    pattern: str = "L"  # repeated over the layers: "SSSL" = three windowed, then one full
    window: int = 1024  # keys a sliding-window query sees, itself included

    def validate(self, where: str = "model.attention") -> None:
        if not self.pattern or set(self.pattern) - {"L", "S"}:
            raise ConfigError(f"{where}.pattern must be a non-empty string of L and S, "
                              f"got {self.pattern!r}")
        _positive(self, where, "window")

    def layer_window(self, layer: int) -> int | None:
        """The window of layer `layer`, None for full causal attention."""
        return self.window if self.pattern[layer % len(self.pattern)] == "S" else None


@dataclass
class MTPConfig:
    """[model.mtp] multi-token prediction (nanochat/model/mtp.py): `heads` tokens predicted per
    position, head 1 the ordinary next-token head, heads 2..n sequential MTP modules. The
    training loss is loss_weights[0] * L_1 + weight * sum_{k>=2} loss_weights[k-1] * L_k."""
    heads: int = 1  # 1: off (the plain LM); 4 is the usual setting
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125])
    weight: float = 0.2  # scales the extra heads' (2..n) terms

    def validate(self, where: str = "model.mtp") -> None:
        _positive(self, where, "heads")
        if len(self.loss_weights) < self.heads:
            raise ConfigError(f"{where}.loss_weights has {len(self.loss_weights)} entries, "
                              f"fewer than heads ({self.heads})")
        if any(not w >= 0 for w in self.loss_weights) or not self.weight >= 0:
            raise ConfigError(f"{where}: loss_weights and weight must be >= 0")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # grouped-query attention when < n_heads
    ffn_hidden: int = 768
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation: Activation = "silu"  # "silu" (llama.cpp's bitnet graph) or "relu2" (BitNet 2B4T)
    init_std: float = 0.02
    mhc: MHCConfig = field(default_factory=MHCConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)  # multi-token prediction, off

    def validate(self, where: str = "model") -> None:
        self.mhc.validate(f"{where}.mhc")
        self.moe.validate(f"{where}.moe")
        self.attention.validate(f"{where}.attention")
        self.mtp.validate(f"{where}.mtp")
        _positive(self, where, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                  "ffn_hidden", "max_seq_len", "rope_theta", "norm_eps", "init_std")
        if self.d_model % self.n_heads:
            raise ConfigError(f"{where}.d_model ({self.d_model}) must be divisible by "
                              f"n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{where}.n_heads ({self.n_heads}) must be a multiple of "
                              f"n_kv_heads ({self.n_kv_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"{where}: head dim {self.d_model // self.n_heads} "
                              f"must be even (RoPE)")
        _check_choices(self, where)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class ColliderConfig:
    """Collider token filtering ([train.collider], nanochat/train/collider.py has the full definition):
    per micro-batch, drop up to `sparsity` of the tokens, lowest score first, among those whose
    min-max normalized score is below `threshold`; dropped tokens get no gradient in any layer."""
    enabled: bool = False
    sparsity: float = 0.35  # most tokens dropped, as a fraction of the (non-ignored) tokens
    threshold: float = 0.3  # only tokens with normalized score < threshold may be dropped
    reference: str = ""  # checkpoint or run dir of a frozen reference model: excess-loss scores

    def validate(self, where: str = "train.collider") -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"{where}.sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"{where}.threshold must be in [0, 1], got {self.threshold}")


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int = 2000
    time_budget_s: float = 0.0  # 0: no budget; otherwise stop (after a decay) at this wall time
    eval_every: int = 100
    eval_tokens: int = 32768
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    seed: int = 1337
    bitlinear: BitLinearKernel = "auto"  # "auto" (C++ kernel where faster), "cpp", "torch"
    # C++ BitLinear backward GEMMs: "auto" (bf16 on CPUs with AVX512-BF16/AMX), "bf16", "float32"
    bitlinear_backward: BackwardPrecision = "auto"
    prefetch: int = 4  # batches the loader keeps ready
    device: Device = "auto"
    sample_tokens: int = 128  # length of the end-of-run sample
    collider: ColliderConfig = field(default_factory=ColliderConfig)  # token filtering, off
    # LM-head loss: "on" the C++ fused chunked cross-entropy (nanochat/ops/fused_loss.py), "off"
    # full logits + F.cross_entropy, "auto" fused when MTP is on or on CPU at vocab >= 16384
    fused_loss: FusedLoss = "auto"
    fused_loss_precision: FusedLossPrecision = "f32"  # the fused loss's GEMMs (bf16: AVX512-BF16)
    # Under torchrun: "ddp" (every rank holds the whole model, gradients averaged) or "fsdp"
    # (FSDP2: parameters, gradients and optimizer state sharded over the ranks)
    parallel: Parallel = "ddp"
    # "sharded": every rank writes its own shards (torch.distributed.checkpoint); "gathered":
    # rank 0 writes the whole state to one state.pt; "auto": sharded under torchrun only
    checkpoint_format: CheckpointFormat = "auto"

    def validate(self, where: str = "train") -> None:
        self.collider.validate(f"{where}.collider")
        _positive(self, where, "batch_size", "seq_len", "grad_accum", "max_steps", "eval_every",
                  "eval_tokens", "log_every", "checkpoint_every", "keep_checkpoints", "prefetch")
        if self.time_budget_s < 0:
            raise ConfigError(f"{where}.time_budget_s must be >= 0, got {self.time_budget_s}")
        _check_choices(self, where)


@dataclass
class MuonConfig:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # quintic Newton-Schulz iterations
    # "moonlight" (0.2*sqrt(max(rows, cols)): AdamW's LR and WD carry over) or "original"
    scale: MuonScale = "moonlight"
    # Newton-Schulz matmul precision: "auto" (bf16 on CUDA and on CPUs with AVX512-BF16/AMX,
    # as the Muon reference runs it; else float32), "bfloat16" or "float32"
    ns_dtype: NSDtype = "auto"

    def validate(self, where: str = "optim.muon") -> None:
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{where}.momentum must be in [0, 1), got {self.momentum}")
        if self.ns_steps < 1:
            raise ConfigError(f"{where}.ns_steps must be >= 1, got {self.ns_steps}")
        _check_choices(self, where)


@dataclass
class LionConfig:
    beta1: float = 0.9
    beta2: float = 0.99
    lr_scale: float = 0.3  # Lion LR = lr_scale * the AdamW LR of that kind; WD / lr_scale

    def validate(self, where: str = "optim.lion") -> None:
        if not 0 <= self.beta1 <= 1:
            raise ConfigError(f"{where}.beta1 must be in [0, 1], got {self.beta1}")
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"{where}.beta2 must be in [0, 1), got {self.beta2}")
        _positive(self, where, "lr_scale")


@dataclass
class GaLoreConfig:
    enabled: bool = False  # low-rank projected AdamW state for the 2-D matrices
    rank: int = 0  # 0: min(rows, cols) // 4 of each matrix
    update_every: int = 200  # T: steps between projector refreshes (randomized SVD)
    alpha: float = 0.25  # scale of the back-projected update
    oversample: int = 8  # randomized SVD: extra sketch columns
    power_iters: int = 2  # randomized SVD: power iterations

    def validate(self, where: str = "optim.galore") -> None:
        if self.rank < 0:
            raise ConfigError(f"{where}.rank must be >= 0 (0: a quarter of each matrix's smaller "
                              f"dim), got {self.rank}")
        _positive(self, where, "update_every", "alpha")
        if self.oversample < 0 or self.power_iters < 0:
            raise ConfigError(f"{where}: oversample and power_iters must be >= 0")


@dataclass
class OptimConfig:
    name: Optimizer = "adamw"  # the BitLinear matrices
    rest: RestOptimizer = "adamw"  # everything else (embeddings, norms, mHC, routers)
    # "PATTERN=OPTIMIZER" rules on parameter names (fnmatch, first match wins), e.g.
    # ["*.attn_q.weight=adamw", "*router*=lion"]; they beat name/rest
    overrides: list[str] = field(default_factory=list)
    state: StatePrecision = "fp32"  # optimizer-state precision (8bit: blockwise, C++ kernels)
    block_size: int = 2048  # 8-bit state: elements per absmax block (multiple of 64)
    min_8bit_size: int = 4096  # 8-bit state: smaller tensors keep fp32 state
    lr: float = 3e-3  # peak LR of the ternary (BitLinear) matrices
    embed_lr: float = 3e-3  # embeddings (tied with the LM head)
    scalar_lr: float = 3e-3  # norms and other 1-D parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only; never on norms or embeddings
    grad_clip: float = 1.0  # 0 disables
    muon: MuonConfig = field(default_factory=MuonConfig)
    lion: LionConfig = field(default_factory=LionConfig)
    galore: GaLoreConfig = field(default_factory=GaLoreConfig)

    def validate(self, where: str = "optim") -> None:
        _check_choices(self, where)
        for i, rule in enumerate(self.overrides):
            pattern, sep, opt = rule.partition("=")
            if not sep or not pattern.strip() or opt.strip() not in OPTIMIZERS:
                raise ConfigError(f"{where}.overrides[{i}] = {rule!r}: expected "
                                  f"'PATTERN=OPTIMIZER' with OPTIMIZER one of "
                                  f"{', '.join(OPTIMIZERS)}")
        if not (0 < self.block_size <= 1 << 20 and self.block_size % 64 == 0):
            raise ConfigError(f"{where}.block_size must be a positive multiple of 64 up to 2^20, "
                              f"got {self.block_size}")
        if self.min_8bit_size < 0:
            raise ConfigError(f"{where}.min_8bit_size must be >= 0, got {self.min_8bit_size}")
        _positive(self, where, "lr", "embed_lr", "scalar_lr", "eps")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise ConfigError(f"{where}.{k} must be in [0, 1), got {getattr(self, k)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{where}: weight_decay and grad_clip must be >= 0")
        self.muon.validate(f"{where}.muon")
        self.lion.validate(f"{where}.lion")
        self.galore.validate(f"{where}.galore")
        if self.galore.enabled and self.name != "adamw":
            raise ConfigError(f"{where}.galore.enabled: GaLore projects AdamW's state; it needs "
                              f"{where}.name = 'adamw', got {self.name!r}")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # last fraction of the run spent decaying
    decay_shape: DecayShape = "1-sqrt"
    final_lr_fraction: float = 0.0

    def validate(self, where: str = "schedule") -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"{where}.decay_fraction must be in [0, 1], "
                              f"got {self.decay_fraction}")
        _check_choices(self, where)
        if not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError(f"{where}.final_lr_fraction must be in [0, 1]")


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)  # empty: the Python standard library
    val_fraction: float = 0.05
    extensions: list[str] = field(default_factory=lambda: [".py"])

    def validate(self, where: str = "data") -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"{where}.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                              f"({self.model.max_seq_len})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(value, typ, where: str):
    """The one check of a Literal option: the error names the key and the allowed values."""
    allowed = typing.get_args(typ)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(repr(a) for a in allowed)}, "
                          f"got {value!r}")
    return value


def _check_choices(obj, where: str) -> None:
    """Every Literal field of one config table (values set in Python skip _coerce)."""
    for name, typ in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(typ) is Literal:
            _check_choice(getattr(obj, name), typ, f"{where}.{name}")


def _positive(obj, where: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise ConfigError(f"{where}.{n} must be > 0, got {v}")


def _coerce(value, typ, where: str):
    """Check/convert one TOML value against a dataclass field type."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        return _check_choice(value, typ, where)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    # TOML integers are 64-bit, but tomllib takes any length (and float() of a long one raises)
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise ConfigError(f"{where}: integer {value} is outside the 64-bit range")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool) and not (
        isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    if typ is float and not math.isfinite(value):  # nan slips past every `<`/`>` check
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def _build(cls, table: dict, where: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in table.items():
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], v, f"{where}.{k}" if where else k)
        else:
            kwargs[k] = _coerce(v, hints[k], f"{where}.{k}" if where else k)
    return cls(**kwargs)


def from_dict(d: dict, where: str = "config") -> RunConfig:
    """RunConfig from a nested dict (a parsed TOML file or a checkpoint's saved config)."""
    try:
        return _build(RunConfig, d, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a TOML file, or a built-in name such as 'tiny' (configs/models/tiny.toml)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    builtin = CONFIG_DIR / "models" / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(x.stem for x in (CONFIG_DIR / "models").glob("*.toml"))
    raise ConfigError(f"unknown config {name_or_path!r}: not a file and not one of {names}")


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    path = resolve_config_path(name_or_path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (TOML is UTF-8): {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    cfg = from_dict(data, str(path))
    return apply_overrides(cfg, overrides or [], str(path))


def apply_overrides(cfg: RunConfig, overrides: list[str], where: str = "--set") -> RunConfig:
    """Apply 'table.key=value' overrides (nested tables too: 'model.moe.experts=8'); values
    are parsed as TOML (strings may be bare)."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected table.key=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        *tables, name = key.strip().split(".")
        node = d
        for i, t in enumerate(tables):
            if not isinstance(node.get(t), dict):
                path = ".".join(tables[:i + 1])
                valid = ", ".join(k for k, v in node.items() if isinstance(v, dict))
                raise ConfigError(f"--set {item!r}: unknown table {path!r}; valid: {valid}")
            node = node[t]
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as relu2
        node[name] = value
    return from_dict(d, where)
