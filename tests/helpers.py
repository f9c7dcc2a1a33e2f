"""Shared test helpers: layers with every parameter non-zero (zero LoRA B / W_g hide bugs)."""

from __future__ import annotations

import torch

import graphmoe_fused as gm


def randomize_(layer: gm.GraphMoEMLP, seed: int = 0, scale: float = 0.1) -> gm.GraphMoEMLP:
    """Fills every parameter (base weights included) with seeded normals of a moderate scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(layer.named_parameters(remove_duplicate=False)):
            fan_in = p.shape[-1]
            std = scale if name.startswith(("lora_B", "gru.bias")) else fan_in ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(std).to(p.dtype))
    return layer


def make_layer(
    hidden: int = 32, intermediate: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str = "cpu", **cfg_kwargs,
) -> gm.GraphMoEMLP:
    """A standalone GraphMoEMLP with random non-zero weights (dropout off unless asked)."""
    cfg_kwargs.setdefault("lora_dropout", 0.0)
    cfg = gm.GraphMoEConfig(**cfg_kwargs)
    torch.manual_seed(seed)
    layer = gm.GraphMoEMLP(hidden, intermediate, cfg, dtype=dtype, device=device)
    return randomize_(layer, seed)
