"""Saving and loading the GraphMoE adapter alone: the tensors GraphMoE added (router, expert LoRA,
GRU, attention LoRA) as safetensors, and the :class:`GraphMoEConfig` as JSON. The base model's
weights are never written: they come from the base checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import GraphMoEConfig
from ..layer import GraphMoEMLP
from ..version import __version__
from .attention_lora import LoRALinear
from .convert import CONFIG_ATTRIBUTE, apply_graphmoe, is_converted

WEIGHTS_NAME = "graphmoe_adapter.safetensors"
CONFIG_NAME = "graphmoe_config.json"
# Fields that only steer how a layer runs or trains; an adapter loads whatever they are.
RUNTIME_FIELDS = frozenset(
    {"backend", "recompute_intermediates", "lora_dropout", "router_aux_loss_coef",
     "router_init_std"}
)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The GraphMoE-added parameters of ``model`` under their ``state_dict`` names."""
    state = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, GraphMoEMLP):
            base = {f"{proj}.{p}" for proj in ("gate_proj", "up_proj", "down_proj")
                    for p, _ in getattr(module, proj).named_parameters()}
            state.update((prefix + n, p) for n, p in module.named_parameters() if n not in base)
        elif isinstance(module, LoRALinear):
            state.update({prefix + "lora_A": module.lora_A, prefix + "lora_B": module.lora_B})
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes ``path/graphmoe_adapter.safetensors`` and ``path/graphmoe_config.json``.

    Returns the directory. Raises ``ValueError`` when ``model`` is not a converted model.
    """
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if not isinstance(config, GraphMoEConfig) or not is_converted(model):
        raise ValueError(
            f"{type(model).__name__} is not a GraphMoE model; convert it with apply_graphmoe first"
        )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    metadata = {"format": "pt", "graphmoe_fused_version": __version__,
                "graphmoe_config": config.to_json()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
    (directory / CONFIG_NAME).write_text(config.to_json() + "\n", encoding="utf-8")
    return directory


def load_adapter_config(path: str | os.PathLike) -> GraphMoEConfig:
    """The :class:`GraphMoEConfig` saved in adapter directory ``path``."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a GraphMoE adapter directory")
    return GraphMoEConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))


def _check_same_architecture(model_config: GraphMoEConfig, saved: GraphMoEConfig) -> None:
    have, want = model_config.to_dict(), saved.to_dict()
    differ = sorted(k for k in want if k not in RUNTIME_FIELDS and have.get(k) != want[k])
    if differ:
        details = ", ".join(f"{k}: model {have.get(k)!r} vs adapter {want[k]!r}" for k in differ)
        raise ValueError(f"the model was converted with a different GraphMoEConfig ({details})")


def load_adapter(model: nn.Module, path: str | os.PathLike, **config_overrides) -> nn.Module:
    """Loads an adapter saved by :func:`save_adapter` into ``model`` and returns it.

    An unconverted model is first converted with the saved config (``config_overrides``, e.g.
    ``backend="reference"``, replace fields of it); a converted one must have been converted with
    the same architecture fields. Keys and shapes must match exactly; values are cast to each
    parameter's dtype and device and copied in place (optimizers keep their references).
    Nothing is copied unless every key and shape matches; a model that this call converted stays
    converted (with fresh adapters) when the check then fails.

    Raises:
        FileNotFoundError: ``path`` lacks the adapter files.
        ValueError: differing config, missing or unexpected keys, or a shape mismatch.
    """
    saved = load_adapter_config(path)
    if not is_converted(model):
        config = GraphMoEConfig.from_dict({**saved.to_dict(), **config_overrides})
        apply_graphmoe(model, config)
    else:
        if config_overrides:
            raise ValueError("config_overrides apply only when load_adapter converts the model")
        config = getattr(model, CONFIG_ATTRIBUTE, None)
        if not isinstance(config, GraphMoEConfig):
            raise ValueError("the model holds GraphMoE layers but no graphmoe_config")
        _check_same_architecture(config, saved)

    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    params = adapter_state_dict(model)
    with safe_open(str(weights_file), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
        if missing or unexpected:
            raise ValueError(
                f"adapter keys do not match the model: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
            )
        tensors = {k: f.get_tensor(k) for k in sorted(keys)}
    for key, tensor in tensors.items():
        if tensor.shape != params[key].shape:
            raise ValueError(
                f"adapter tensor {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[key].shape)}"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor.to(device=params[key].device, dtype=params[key].dtype))
    return model
