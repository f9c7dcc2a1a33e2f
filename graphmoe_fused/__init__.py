"""graphmoe_fused: GraphMoE (recurrent LoRA mixture-of-experts) layers with fused Triton kernels."""

from .backends.contract import GraphMoEParams, RoundOptions, RoutedOutput
from .config import GraphMoEConfig
from .hf.adapters import load_adapter, load_adapter_config, save_adapter
from .hf.attention_lora import LoRALinear
from .hf.convert import apply_graphmoe, find_decoder_layers, graphmoe_layers
from .hf.pretrained import from_pretrained, get_peft_model, prepare_peft_model
from .hf.stats import (
    ParameterReport,
    count_parameters,
    parameter_report,
    reset_routing_statistics,
    routing_fractions,
    routing_statistics,
)
from .layer import GraphMoEMLP
from .lowrank_gru import LowRankGRU
from .version import __version__

__all__ = [
    "GraphMoEConfig",
    "GraphMoEMLP",
    "GraphMoEParams",
    "LoRALinear",
    "LowRankGRU",
    "ParameterReport",
    "RoundOptions",
    "RoutedOutput",
    "__version__",
    "apply_graphmoe",
    "count_parameters",
    "find_decoder_layers",
    "from_pretrained",
    "get_peft_model",
    "graphmoe_layers",
    "load_adapter",
    "load_adapter_config",
    "parameter_report",
    "prepare_peft_model",
    "reset_routing_statistics",
    "routing_fractions",
    "routing_statistics",
    "save_adapter",
]
