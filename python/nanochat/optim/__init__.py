"""Optimizers: AdamW, Muon and Lion with fp32 or blockwise 8-bit state (fused C++ kernels),
GaLore 2 low-rank state, and the "hybrid optimizer" builder the trainer uses.

    from nanochat.optim import build_optimizer, state_bytes
    opt = build_optimizer(model, cfg)      # groups from cfg.optim, logged at start-up
    state_bytes(opt)                       # bytes of real state tensors (logged to TensorBoard)

Grouping: every BitLinear latent weight (and every MoE expert tensor a module lists in
`expert_matrices()`, 3-D (E, out, in): Muon orthogonalizes each expert's matrix) is a
"matrix" and gets `optim.name`; the token embedding is "embedding"; everything else (norms,
scalars, mHC mixing parameters, MoE routers, any future non-BitLinear parameter) is
"scalar", and embedding/scalar get `optim.rest`. `optim.overrides` rules ("PATTERN=OPTIMIZER",
fnmatch on the parameter name, first match wins) beat both. The default config (AdamW, fp32
state, no GaLore) builds torch.optim.AdamW exactly as before, so default runs and their
checkpoints are unchanged. Modules: adamw.py, muon.py, lion.py, state8bit.py, galore.py,
hybrid.py. `nanochat bench optim` measures them; tests: tests/test_optim*.py, test_galore.py.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from nanochat.optim.hybrid import HybridOptimizer, state_bytes

__all__ = ["HybridOptimizer", "build_optimizer", "parameter_kinds", "state_bytes"]

LABELS = {"adamw": "AdamW", "muon": "Muon", "lion": "Lion"}


def parameter_kinds(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) by kind: "matrix" (BitLinear weights, MoE expert tensors),
    "embedding" (nn.Embedding weights) and "scalar" (everything else)."""
    from nanochat.model.bitlinear import BitLinear

    matrices, embeddings = set(), set()
    for m in model.modules():
        if isinstance(m, BitLinear):
            matrices.add(id(m.weight))
        if callable(getattr(m, "expert_matrices", None)):
            matrices.update(id(p) for p in m.expert_matrices())
        if isinstance(m, nn.Embedding):
            embeddings.add(id(m.weight))
    kinds: dict[str, list] = {"matrix": [], "embedding": [], "scalar": []}
    for name, p in model.named_parameters():
        kind = "matrix" if id(p) in matrices else "embedding" if id(p) in embeddings else "scalar"
        kinds[kind].append((name, p))
    return kinds


def _assign(o, kind: str, name: str, p: nn.Parameter) -> str:
    for i, rule in enumerate(o.overrides):
        pattern, _, algo = rule.partition("=")
        if fnmatch.fnmatchcase(name, pattern.strip()):
            algo = algo.strip()
            if algo == "muon" and p.ndim < 2:
                raise ValueError(f"optim.overrides[{i}] = {rule!r} matches {name} of shape "
                                 f"{tuple(p.shape)}: Muon needs a matrix")
            return algo
    return o.name if kind == "matrix" else o.rest


def build_optimizer(model: nn.Module, cfg, log=print) -> torch.optim.Optimizer:
    """The optimizer cfg.optim describes, one parameter group per (kind, optimizer); logs
    every group with all of its parameter names."""
    o = cfg.optim
    base = {"matrix": (o.lr, o.weight_decay), "embedding": (o.embed_lr, 0.0),
            "scalar": (o.scalar_lr, 0.0)}
    groups: dict[tuple[str, str], list[tuple[str, nn.Parameter]]] = {}
    for kind, named in parameter_kinds(model).items():
        for name, p in named:
            algo = _assign(o, kind, name, p)
            groups.setdefault((kind, algo), []).append((name, p))
    default = {"matrix": o.name, "embedding": o.rest, "scalar": o.rest}
    param_groups = []
    for (kind, algo), named in groups.items():
        lr, wd = base[kind]
        if algo == "lion":
            lr, wd = lr * o.lion.lr_scale, wd / o.lion.lr_scale
        betas = (o.lion.beta1, o.lion.beta2) if algo == "lion" else (o.beta1, o.beta2)
        use_galore = o.galore.enabled and algo == "adamw" and kind == "matrix"
        g = {"params": [p for _, p in named],
             "name": kind if algo == default[kind] else f"{kind}/{algo}",
             "algo": algo, "base_lr": lr, "lr": lr, "weight_decay": wd, "betas": betas,
             "eps": o.eps, "state": o.state, "block": o.block_size, "min_8bit": o.min_8bit_size,
             "momentum": o.muon.momentum, "nesterov": o.muon.nesterov,
             "ns_steps": o.muon.ns_steps, "muon_scale": o.muon.scale,
             "ns_dtype": o.muon.ns_dtype,
             "galore": ({"rank": o.galore.rank, "update_every": o.galore.update_every,
                         "alpha": o.galore.alpha, "oversample": o.galore.oversample,
                         "power_iters": o.galore.power_iters} if use_galore else None)}
        param_groups.append(g)
        extra = (f", state {o.state}" + (" (GaLore)" if use_galore else "")
                 + (f", scale {o.muon.scale}, NS {o.muon.ns_dtype}" if algo == "muon" else ""))
        log(f"optimizer group {g['name']:9s}: {LABELS[algo]} lr={lr:g} wd={wd:g}{extra}, "
            f"{len(named)} tensors, {sum(p.numel() for _, p in named):,} params: "
            f"{', '.join(n for n, _ in named)}")
    plain = all(g["algo"] == "adamw" and g["galore"] is None for g in param_groups)
    if plain and o.state == "fp32":
        # Today's optimizer, unchanged: torch's AdamW (fused on CUDA).
        for g in param_groups:
            for k in ("algo", "state", "block", "min_8bit", "momentum", "nesterov", "ns_steps",
                      "muon_scale", "ns_dtype", "galore", "betas", "eps"):
                g.pop(k)
        fused = {"fused": True} if next(model.parameters()).is_cuda else {}
        return torch.optim.AdamW(param_groups, betas=(o.beta1, o.beta2), eps=o.eps, **fused)
    return HybridOptimizer(param_groups)
