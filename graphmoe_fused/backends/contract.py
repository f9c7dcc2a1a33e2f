"""The plain-tensor contract every backend implements.

A backend is a function ``(x, params, options) -> RoutedOutput`` on a flattened input
``x [M, d]``. Keeping the contract to tensors and a frozen options record is what lets the
reference, the torch path and the Triton path stand side by side behind one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class GraphMoEParams(NamedTuple):
    """All weights of one GraphMoE layer (shapes for d, D' = intermediate, n, r, dh)."""

    gate_weight: torch.Tensor  # [D', d]  frozen base
    up_weight: torch.Tensor  # [D', d]  frozen base
    down_weight: torch.Tensor  # [d, D']  frozen base
    router_weight: torch.Tensor  # [n, d]
    lora_A_gate: torch.Tensor  # [n, r, d]
    lora_B_gate: torch.Tensor  # [n, D', r]
    lora_A_up: torch.Tensor  # [n, r, d]
    lora_B_up: torch.Tensor  # [n, D', r]
    lora_A_down: torch.Tensor  # [n, r, D']
    lora_B_down: torch.Tensor  # [n, d, r]
    gru_weight_z: torch.Tensor  # [dh, dh + d]
    gru_weight_r: torch.Tensor  # [dh, dh + d]
    gru_weight_o: torch.Tensor  # [dh, dh + d]
    gru_bias_o: torch.Tensor  # [dh]
    gru_weight_g: torch.Tensor  # [d, dh]


@dataclass(frozen=True)
class RoundOptions:
    """The non-tensor inputs of a GraphMoE forward.

    ``dropout_seed`` fixes the LoRA dropout masks (see ``graphmoe_fused.dropout``): the same
    seed gives the same masks in every backend and again in a backward that recomputes.
    """

    top_k: int
    lora_scaling: float
    num_rounds: int
    gru_candidate_input: str = "y"
    gru_candidate_activation: str = "sigmoid"
    dropout_p: float = 0.0
    dropout_seed: int = 0
    recompute_intermediates: bool = True


class RoutedOutput(NamedTuple):
    """What a backend returns.

    ``router_probs`` is differentiable (the load-balancing loss flows through it);
    ``expert_index`` is integer, for the loss's selection counts and the routing statistics.
    """

    y: torch.Tensor  # [M, d], x's dtype
    router_probs: torch.Tensor  # [T, M, n], fp32 (or wider when x is)
    expert_index: torch.Tensor  # [T, M, k], int64


FROZEN_BASE = ("gate_weight", "up_weight", "down_weight")


def check_frozen_base(p: GraphMoEParams, backend: str) -> None:
    """The fast backends compute no gradient for the base projections (frozen by design,
    DESIGN §2): one that requires grad while grad mode is on is an error, not a silent zero."""
    if not torch.is_grad_enabled():
        return
    trainable = [name for name in FROZEN_BASE if getattr(p, name).requires_grad]
    if trainable:
        raise RuntimeError(
            f"the {backend} backend treats the base MLP weights as frozen (DESIGN §2) and "
            f"computes no gradient for them, but {trainable} require grad; call "
            ".requires_grad_(False) on them or use backend='reference'"
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the base GEMMs: autocast's for x's device when autocast is on, else x's own.
    fp64 inputs stay fp64, as autocast itself leaves fp64 alone."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
