"""graphmoe_fused: GraphMoE (recurrent LoRA mixture-of-experts) layers with fused Triton kernels."""

__version__ = "0.1.0"  # before the imports: adapters.py records it in saved files

from .adapters import load_adapter, load_adapter_config, save_adapter  # noqa: E402
from .config import GraphMoEConfig  # noqa: E402
from .gru import LowRankGRU  # noqa: E402
from .hf import apply_graphmoe, find_decoder_layers, graphmoe_layers  # noqa: E402
from .layer import GraphMoEMLP  # noqa: E402
from .lora import LoRALinear  # noqa: E402
from .params import GraphMoEParams, RoundOptions, RoutedOutput  # noqa: E402
from .stats import (  # noqa: E402
    ParameterReport,
    count_parameters,
    parameter_report,
    reset_routing_statistics,
    routing_fractions,
    routing_statistics,
)

__all__ = [
    "GraphMoEConfig",
    "GraphMoEMLP",
    "GraphMoEParams",
    "LoRALinear",
    "LowRankGRU",
    "ParameterReport",
    "RoundOptions",
    "RoutedOutput",
    "apply_graphmoe",
    "count_parameters",
    "find_decoder_layers",
    "graphmoe_layers",
    "load_adapter",
    "load_adapter_config",
    "parameter_report",
    "reset_routing_statistics",
    "routing_fractions",
    "routing_statistics",
    "save_adapter",
]
