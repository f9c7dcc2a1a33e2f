"""graphmoe_fused: GraphMoE (recurrent LoRA mixture-of-experts) layers with fused Triton kernels."""

import os as _os
from importlib.util import find_spec as _find_spec

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

# Installed, the top-level kernels/ folder is graphmoe_fused.kernels (setup.py maps it). Run from
# a source checkout that was never installed (a GPU machine without network cannot fetch the
# build dependencies `pip install` asks for) it is found here instead, from the checkout's root.
_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _find_spec(f"{__name__}.kernels") is None and _os.path.isfile(
        _os.path.join(_CHECKOUT, "kernels", "__init__.py")):
    __path__.append(_CHECKOUT)

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
