"""What a converted model reports about itself: expert workload (the paper's Fig. 4) and the
trainable-parameter share (the paper's "Param" column)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layer import GraphMoEMLP
from .attention_lora import LoRALinear
from .convert import graphmoe_layers


def routing_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per GraphMoE layer (by module name), ``[T, n]`` int64 counts of the non-padding tokens that
    chose each expert in each round since the last reset. A forward that activation checkpointing
    re-runs in backward is not counted again. Returns copies."""
    return {name: layer.expert_counts.detach().clone() for name, layer in
            graphmoe_layers(model).items()}


def reset_routing_statistics(model: nn.Module) -> None:
    """Zeroes the expert counts of every GraphMoE layer in ``model``."""
    for layer in graphmoe_layers(model).values():
        layer.reset_routing_stats()


def counts_to_lists(counts: Mapping[str, torch.Tensor]) -> dict[str, list[list[int]]]:
    """``counts`` (as from :func:`routing_statistics`) as JSON-ready nested lists of ints."""
    return {name: [[int(v) for v in row] for row in c.tolist()] for name, c in counts.items()}


def routing_document(counts: Mapping[str, torch.Tensor], *, num_experts: int, num_rounds: int,
                     top_k: int, phase: str, tokens: int | None = None) -> dict[str, Any]:
    """The ``routing_statistics.json`` object that training and evaluation write: ``{num_experts,
    num_rounds, top_k, phase, tokens, layers: {layer name: [T][n] counts}}``, in that key order.

    ``tokens`` None: every token picks ``top_k`` experts in round 1, so it is that round's total
    over ``top_k``, of any layer (they all see the same tokens); 0 without layers."""
    if tokens is None:
        first = next(iter(counts.values()), None)
        tokens = 0 if first is None else int(first[0].sum()) // top_k
    return {"num_experts": num_experts, "num_rounds": num_rounds, "top_k": top_k,
            "phase": phase, "tokens": int(tokens), "layers": counts_to_lists(counts)}


def routing_fractions(counts: torch.Tensor) -> torch.Tensor:
    """Per-round share of the selections each expert received (each row sums to 1; a round
    with no tokens yet gives zeros). ``counts``: ``[..., T, n]`` as from
    :func:`routing_statistics`."""
    counts = counts.to(torch.float64)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts of a (converted) model; shared parameters are counted once.

    ``trainable``: parameters with ``requires_grad``. ``total``: all parameters. ``added``: the
    ones GraphMoE added (router, expert LoRA, GRU, attention LoRA); ``base = total − added`` is the
    original model. ``percent_of_base`` = trainable / base is the paper's "Param" column (it
    reproduces both its 5.9% for GraphMoE and 3.0% for MixLoRA at LLaMA-3-8B shapes);
    ``percent_of_total`` = trainable / total is the share PEFT's ``print_trainable_parameters``
    would print.
    """

    trainable: int
    total: int
    added: int

    @property
    def base(self) -> int:
        return self.total - self.added

    @property
    def percent_of_total(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent_of_total:.2f} "
            f"(of the base model's {self.base:,}: {self.percent_of_base:.2f}%)"
        )


def _added_parameters(model: nn.Module) -> dict[int, nn.Parameter]:
    added: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, GraphMoEMLP):
            base = {id(p) for proj in (module.gate_proj, module.up_proj, module.down_proj)
                    for p in proj.parameters()}
            added.update((id(p), p) for p in module.parameters() if id(p) not in base)
        elif isinstance(module, LoRALinear):
            added.update((id(p), p) for p in (module.lora_A, module.lora_B))
    return added


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable / total / GraphMoE-added parameter counts of ``model``. Needs no weights: works on
    a model built on the meta device."""
    params = list(model.parameters())  # deduplicated (tied embeddings once)
    return ParameterReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        added=sum(p.numel() for p in _added_parameters(model).values()),
    )


# The name the README uses; the same function.
count_parameters = parameter_report
