"""Text generation from a training checkpoint with the torch model (KV cache).

    nanochat sample --checkpoint runs/x --prompt "def parse(" --max-tokens 100
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanochat.model.load import load_model


def sample_from_checkpoint(path: str | Path, prompt: str, max_tokens: int = 200,
                           temperature: float = 0.8, top_k: int | None = None,
                           top_p: float | None = None, seed: int | None = None) -> str:
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    model, tok, _ = load_model(path)
    ids = [tok.bos_id] + tok.encode(prompt)
    limit = model.config.max_seq_len
    if len(ids) + max_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + --max-tokens {max_tokens} exceeds the "
                         f"model's context of {limit} tokens")
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop_ids=(tok.bos_id,))
    return prompt + tok.decode(out[0, len(ids):].tolist())
