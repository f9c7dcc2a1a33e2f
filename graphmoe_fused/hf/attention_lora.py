"""`LoRALinear`: a frozen ``nn.Linear`` plus a trainable low-rank delta (the attention adapters).

It stays an ``nn.Linear`` (so ``isinstance`` checks and HF weight init still see one) and keeps the
base module's ``weight``/``bias`` parameters under their own names: a converted model's state dict
has ``q_proj.weight`` where the base model had it, so base checkpoints still load, and adds only
``q_proj.lora_A`` / ``q_proj.lora_B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """``y = W x + b + (alpha / r) · B A dropout(x)`` around an existing ``nn.Linear``.

    The base ``weight`` and ``bias`` are the very ``Parameter`` objects of ``base`` (shared, never
    copied) and are frozen. ``lora_A [r, in]`` is kaiming-uniform(a=√5) and ``lora_B [out, r]`` is
    zero, so a fresh adapter computes exactly what ``base`` did.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(base, LoRALinear):
            raise ValueError("this projection already has a LoRA adapter")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r={r!r} must be an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout={dropout!r} must be in [0, 1)")
        # nn.Module's init, not nn.Linear's: nn.Linear's would allocate a weight we do not want.
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.lora_alpha = r, alpha
        self.scaling = alpha / r
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform(a=√5) (as ``nn.Linear``), B zeros: the adapter starts as identity."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return base + self.scaling * delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}"
