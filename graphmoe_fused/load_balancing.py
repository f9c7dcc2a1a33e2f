"""Load-balancing loss (Eq. 8, Switch/Mixtral reading) and the expert selection counts.

Per layer and round: ``L = n · Σ_i f_i P_i`` with ``f_i`` the share of (non-padding) tokens that
chose expert ``i`` (``Σ f = k``) and ``P_i`` the mean router probability; uniform routing gives
``k``.

Pure maths on router outputs. How the loss reaches a model's loss and the router's gradient (under
checkpointing, ``Trainer``, ``torch.compile``): :mod:`graphmoe_fused.hf.aux_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(
    router_probs: torch.Tensor, expert_index: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_t`` for each round.

    Args:
        router_probs: ``[T, M, n]`` softmax probabilities (differentiable).
        expert_index: ``[T, M, k]`` chosen experts.
        token_mask: ``[M]`` bool, ``False`` for padding tokens; ``None`` counts every token.
    Returns:
        ``[T]`` fp32 (or wider) losses; no host synchronisation.
    """
    num_experts = router_probs.shape[-1]
    chosen = expert_selection_counts(expert_index, num_experts, token_mask).to(router_probs.dtype)
    if token_mask is None:
        weight = router_probs.new_ones(router_probs.shape[1])
    else:
        weight = token_mask.to(router_probs.dtype)
    count = weight.sum().clamp_min(1)
    f = chosen / count  # [T, n]
    mean_prob = torch.einsum("tmn,m->tn", router_probs, weight) / count
    return num_experts * (f * mean_prob).sum(-1)


def expert_selection_counts(
    expert_index: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[T, n]`` int64: how many (non-padding) tokens chose each expert in each round."""
    one_hot = F.one_hot(expert_index, num_experts).sum(-2)  # [T, M, n]
    if token_mask is not None:
        one_hot = one_hot * token_mask[None, :, None].to(one_hot.dtype)
    return one_hot.sum(1)
