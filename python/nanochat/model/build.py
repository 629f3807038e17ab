"""The one model builder: a GPT set up the way the trainer trains it.

The trainer, every bench, the recipes, checkpoint loading (sampling, export, Collider's
reference model) build through here, so a bench's baseline is the trainer's own step. The
keyword arguments override the run config's [train] choices for one build (a bench's
variant); left None, the config decides.
"""

from __future__ import annotations

import torch

from nanochat.config import RunConfig
from nanochat.model.block import OPS, Block, RMSNorm
from nanochat.model.gpt import GPT


def build_model(cfg: RunConfig, device: str | torch.device = "cpu", *, seed: int | None = 0,
                bitlinear: str | None = None, backward: str | None = None,
                fused_loss: str | None = None, ops: str = "auto") -> GPT:
    """A freshly initialised GPT of cfg.model on `device` with cfg.train's BitLinear path,
    backward precision and head loss. `seed` seeds torch before the weights are drawn
    (None: the caller's RNG state). ops: "auto" (nanochat's RMSNorm, SwiGLU and attention
    ops) or "torch" (torch's functions and autograd: a bench's plain-torch baseline)."""
    if ops not in OPS:
        raise ValueError(f"build_model: ops must be one of {OPS}, got {ops!r}")
    t = cfg.train
    if seed is not None:
        torch.manual_seed(seed)
    model = GPT(cfg.model, bitlinear=bitlinear or t.bitlinear).to(device)
    model.set_bitlinear_backward(backward or t.bitlinear_backward)
    model.set_fused_loss(fused_loss or t.fused_loss, t.fused_loss_precision)
    for m in model.modules():
        if isinstance(m, (Block, RMSNorm)):
            m.ops = ops
    return model
