"""FSDP2 for :func:`~graphmoe_fused.training.train` (``fsdp=True``): torch's ``fully_shard`` on
every decoder layer and on the root, so the frozen base is sharded over the processes and the
GraphMoE tensors (inside the decoder layers) are trained as sharded DTensors.

Used where accelerate's own FSDP2 is not active (on the CPU, accelerate has no FSDP at all);
under ``accelerate launch --use_fsdp --fsdp_version 2`` accelerate does the wrapping instead.
Writing the adapter gathers the full tensors (a collective: every process calls it) and the
main process writes exactly what :func:`~graphmoe_fused.hf.adapters.save_adapter` writes for
the unsharded model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..hf.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _graphmoe_config_of,
    adapter_metadata,
    adapter_state_dict,
    base_state_dict,
)
from ..hf.convert import find_decoder_layers


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch
        from torch.distributed._tensor import DTensor
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor_type())


def shard_model(model: nn.Module, device: torch.device, world: int) -> None:
    """``fully_shard`` each decoder layer of ``model`` (converted, on ``device``), then the root,
    over a 1-D mesh of the ``world`` processes (the default process group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for _name, layer in find_decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_base_elements(model: nn.Module) -> tuple[int, int]:
    """``(elements of the frozen base this process holds, elements of the whole base)``."""
    local = total = 0
    for p in base_state_dict(model).values():
        total += p.numel()
        local += p.to_local().numel() if is_sharded(p) else p.numel()
    return local, total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain CPU tensor; a DTensor is gathered (a collective: call it on every
    process)."""
    t = t.detach()
    if is_sharded(t):
        t = t.full_tensor()
    return t.to("cpu").contiguous()


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`~graphmoe_fused.hf.adapters.adapter_state_dict` of ``model`` as full plain CPU
    tensors (every process must call it, in the same order)."""
    return {name: full_tensor(p) for name, p in adapter_state_dict(model).items()}


def write_adapter(model: nn.Module, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str], path: str | os.PathLike) -> Path:
    """Writes ``tensors`` (:func:`full_adapter_state`) as
    :func:`~graphmoe_fused.hf.adapters.save_adapter` would: the same files, ``metadata`` being
    :func:`~graphmoe_fused.hf.adapters.adapter_metadata` of the model before it was sharded (the
    base fingerprint reads the full base weights)."""
    config = _graphmoe_config_of(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
    (directory / CONFIG_NAME).write_text(config.to_json() + "\n", encoding="utf-8")
    return directory


def unsharded_metadata(model: nn.Module) -> dict[str, str]:
    """The adapter metadata of ``model`` (call it before sharding)."""
    return adapter_metadata(model, _graphmoe_config_of(model))
