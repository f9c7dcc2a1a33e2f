"""graphmoe_fused: GraphMoE (recurrent LoRA mixture-of-experts) layers with fused Triton kernels."""

from .config import GraphMoEConfig
from .gru import LowRankGRU
from .layer import GraphMoEMLP
from .params import GraphMoEParams, RoundOptions, RoutedOutput

__all__ = [
    "GraphMoEConfig",
    "GraphMoEMLP",
    "GraphMoEParams",
    "LowRankGRU",
    "RoundOptions",
    "RoutedOutput",
]
__version__ = "0.1.0"
