"""Grouped top-k LoRA-expert SwiGLU: the LoRA layout, the gate/up side and the down side."""

from .down import expert_down
from .gate_up import GateUpOutput, expert_gate_up, expert_lora_in
from .layout import (
    MAX_MASKED_DENSE_COLS,
    ExpertLoRA,
    expert_lora_layout,
    masked_dense_supported,
    padded_rank,
)

__all__ = [
    "MAX_MASKED_DENSE_COLS",
    "ExpertLoRA",
    "GateUpOutput",
    "expert_down",
    "expert_gate_up",
    "expert_lora_in",
    "expert_lora_layout",
    "masked_dense_supported",
    "padded_rank",
]
