"""HF activation checkpointing under both transformers names: 5.24 renamed
``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name warns)
and added ``every_n_layers``; 5.17 has the old name only."""

from __future__ import annotations

import torch


def enable_activation_checkpointing(model: torch.nn.Module, use_reentrant: bool = False,
                                    every_n_layers: int = 1) -> None:
    """Checkpoints every ``every_n_layers``-th decoder layer of an HF model."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                              every_n_layers=every_n_layers)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, layer in enumerate(model.model.layers):  # what every_n_layers does in 5.24
        layer.gradient_checkpointing = i % every_n_layers == 0
