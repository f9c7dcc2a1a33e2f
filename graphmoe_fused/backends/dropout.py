"""LoRA-input dropout masks, drawn from a seed so every backend (and a recomputing backward)
sees the same masks.

Per round ``t`` a generator seeded with ``seed + t`` draws, in this order, the keep-mask of the
round input ``x_t`` (``[M, d]``, shared by the gate and up LoRA of every expert) and the
keep-mask of each chosen slot's activation ``h_j`` (``[M, k, D']``, the down LoRA's input).
The base (frozen) path never sees dropout.
"""

from __future__ import annotations

import torch

from .contract import new_empty


def lora_dropout_masks(
    seed: int, round_index: int, num_tokens: int, hidden: int, top_k: int,
    intermediate: int, p: float, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean keep-masks ``(keep_x [M, d], keep_h [M, k, D'])`` for one round."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + round_index)
    # bernoulli_ overwrites every element of its (possibly poisoned) buffer.
    keep_x = new_empty((num_tokens, hidden), torch.float32, device).bernoulli_(
        1.0 - p, generator=generator
    )
    keep_h = new_empty((num_tokens, top_k, intermediate), torch.float32, device).bernoulli_(
        1.0 - p, generator=generator
    )
    return keep_x.bool(), keep_h.bool()


def apply_dropout(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask (what ``F.dropout`` computes)."""
    return t * keep.to(t.dtype) * (1.0 / (1.0 - p))
