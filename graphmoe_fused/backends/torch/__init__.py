"""The `torch` backend: the GraphMoE layer in plain PyTorch, the fast way, on any device
(see :mod:`.rounds`)."""

from .rounds import graphmoe_torch

__all__ = ["graphmoe_torch"]
