"""The `torch` backend: the GraphMoE layer in plain PyTorch, the fast way, on any device
(see :mod:`.rounds`)."""

from .rounds import check_expert_index, graphmoe_torch, graphmoe_torch_unchecked
from .workspace import release_workspace

__all__ = ["check_expert_index", "graphmoe_torch", "graphmoe_torch_unchecked",
           "release_workspace"]
