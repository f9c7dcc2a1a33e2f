"""Router probabilities and top-k selection, shared by the reference and the torch backend."""

from __future__ import annotations

import torch


def router_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over experts in fp32, or wider when the logits already are (fp64 checks)."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.softmax(logits.to(compute_dtype), dim=-1)


def select_experts(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token, weights renormalised to sum to one (MixLoRA).

    A stable descending sort breaks ties by the lowest expert index, the same choice on every
    device and in every backend (``torch.topk`` leaves ties unspecified).
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights = sorted_probs[..., :top_k]
    return weights / weights.sum(dim=-1, keepdim=True), order[..., :top_k]
