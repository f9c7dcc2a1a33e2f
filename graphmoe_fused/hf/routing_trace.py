"""Which experts each token chose in each round, recorded during forwards: what the rounds-
experiment reports as the routing change between rounds (does a later round's router pick other
experts, the point of self-rethinking?)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..layer import GraphMoEMLP, RoutingEvent
from .convert import graphmoe_layers


def changed_between_rounds(expert_index: torch.Tensor) -> torch.Tensor:
    """``[T - 1]``: for each pair of consecutive rounds, the share of tokens whose *set* of chosen
    experts differs (the order of the top-k slots does not count).

    ``expert_index``: ``[T, M, k]`` integer, as in ``RoutedOutput.expert_index``.
    """
    if expert_index.dim() != 3:
        raise ValueError(f"expert_index must be [T, M, k], got shape {tuple(expert_index.shape)}")
    chosen = expert_index.sort(dim=-1).values
    if chosen.shape[1] == 0:
        return torch.zeros(max(chosen.shape[0] - 1, 0), dtype=torch.float64)
    differs = (chosen[1:] != chosen[:-1]).any(dim=-1)
    return differs.to(torch.float64).mean(dim=-1)


@contextmanager
def trace_routing(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every forward of each GraphMoE layer appends its ``[T, M', k]`` expert
    choices (the ``M'`` non-padding tokens when the model passed a token mask) to the list under
    the layer's name; the lists are what the block yields. Cheap: indices only, on the CPU."""
    traces: dict[str, list[torch.Tensor]] = {}
    handles = []

    def record(name: str):
        def hook(layer: GraphMoEMLP, event: RoutingEvent, y: torch.Tensor) -> None:
            index = event.routed.expert_index.detach()
            if event.token_mask is not None:
                index = index[:, event.token_mask.to(index.device)]
            traces.setdefault(name, []).append(index.cpu())
        return hook

    for name, layer in graphmoe_layers(model).items():
        handles.append(layer.register_routing_hook(record(name)))
    try:
        yield traces
    finally:
        for handle in handles:
            handle.remove()
