"""Grouped top-k LoRA-expert SwiGLU: the LoRA layout, the gate/up side, the down side and the
backward of a round."""

from .backward import ExpertBackward, expert_round_backward
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
    "ExpertBackward",
    "MAX_MASKED_DENSE_COLS",
    "ExpertLoRA",
    "GateUpOutput",
    "expert_down",
    "expert_gate_up",
    "expert_lora_in",
    "expert_lora_layout",
    "expert_round_backward",
    "masked_dense_supported",
    "padded_rank",
]
