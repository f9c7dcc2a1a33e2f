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
from typing import Any

import torch
from torch import nn

from ..hf.adapters import (
    _graphmoe_config_of,
    adapter_metadata,
    adapter_state_dict,
    base_state_dict,
    unwrap_peft,
    write_adapter_files,
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
    """``fully_shard`` each decoder layer of ``model`` (converted, wherever it is: the CPU), then
    the root, over a 1-D mesh of the ``world`` processes (the default process group) on
    ``device``'s type. ``fully_shard`` moves each process's shards to the mesh device itself, so
    no process ever holds the whole model on ``device``; whatever it does not manage is moved
    afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for _name, layer in find_decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    move_remaining(model, device)


def move_remaining(model: nn.Module, device: torch.device) -> None:
    """Moves the plain (not sharded) parameters and buffers of ``model`` that are not on
    ``device`` yet (tied ones stay tied); sharded ones stay where ``fully_shard`` put them."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for name, t in slots.items():
                if t is None or is_sharded(t) or t.device == device:
                    continue
                if id(t) not in moved:
                    with torch.no_grad():
                        new = t.to(device)
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    moved[id(t)] = new
                slots[name] = moved[id(t)]


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
    :func:`~graphmoe_fused.hf.adapters.save_adapter` would (the same writer,
    :func:`~graphmoe_fused.hf.adapters.write_adapter_files`), ``metadata`` being
    :func:`~graphmoe_fused.hf.adapters.adapter_metadata` of the model before it was sharded (the
    base fingerprint reads the full base weights)."""
    return write_adapter_files(path, tensors, metadata, _graphmoe_config_of(model))


def has_sharded_adapter(model: nn.Module) -> bool:
    """Whether any adapter parameter of ``model`` is a DTensor (FSDP2-sharded)."""
    return any(is_sharded(p) for p in adapter_state_dict(model).values())


def sharded_metadata(model: nn.Module) -> dict[str, str]:
    """The adapter metadata of an already sharded ``model``: its name, no weight fingerprint
    (reading the sharded base would take a collective); no collective is called."""
    inner = unwrap_peft(model)
    name = getattr(inner, "name_or_path", None) or getattr(
        getattr(inner, "config", None), "_name_or_path", None)
    identity: dict[str, Any] = {"name_or_path": name or None, "fingerprint": None}
    return adapter_metadata(model, _graphmoe_config_of(model), identity)


def unsharded_metadata(model: nn.Module) -> dict[str, str]:
    """The adapter metadata of ``model`` (call it before sharding)."""
    return adapter_metadata(model, _graphmoe_config_of(model))
