"""Tiny Hugging Face models and batches for the integration tests (fp32, seeded, no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import graphmoe_fused as gm
from graphmoe_fused.hf.adapters import adapter_state_dict
from graphmoe_fused.hf.checkpointing import (  # noqa: F401 (the tests' name for it)
    enable_activation_checkpointing as enable_checkpointing,
)

VOCAB = 97
SHAPES = {
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
    "max_position_embeddings": 64,
}
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded tiny causal LM in eval mode; the same seed gives the same weights."""
    config_cls, model_cls = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**SHAPES, **overrides})).eval()


def graphmoe_config(**overrides) -> gm.GraphMoEConfig:
    """The tests' GraphMoE config: small, the reference backend, no dropout unless asked."""
    values = {"num_experts": 4, "top_k": 2, "lora_r": 4, "lora_alpha": 8, "num_rounds": 3,
              "gru_hidden_ratio": 0.25, "lora_dropout": 0.0, "backend": "reference"}
    return gm.GraphMoEConfig(**{**values, **overrides})


def converted(arch: str = "llama", seed: int = 0, randomize: bool = True,
              model_overrides: dict | None = None, **cfg_overrides) -> torch.nn.Module:
    """A tiny model converted to GraphMoE; ``randomize`` makes every adapter tensor non-zero
    (LoRA B and W_g are zero at init, which would hide most bugs)."""
    model = tiny_model(arch, seed, **(model_overrides or {}))
    gm.apply_graphmoe(model, graphmoe_config(**cfg_overrides))
    if randomize:
        randomize_adapters_(model, seed)
    return model


def randomize_adapters_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Seeded normals in every GraphMoE-added tensor; base weights untouched."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in sorted(adapter_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def batch(batch_size: int = 3, seq_len: int = 7, seed: int = 0, pad: bool = True):
    """``(input_ids, attention_mask, labels)``; with ``pad`` some sequences are left-padded and
    their padding is ignored by the labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if pad:
        for b in range(1, batch_size):
            mask[b, : min(2 * b, seq_len - 1)] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradient of every trainable parameter (zeros where none arrived), by name."""
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}

