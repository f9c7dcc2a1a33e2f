"""The fused low-rank GRU cell and the residual into the next round, and its backward."""

from .lowrank_gru import fused_lowrank_gru, gru_project
from .lowrank_gru_backward import GRUBackward, lowrank_gru_backward

__all__ = ["GRUBackward", "fused_lowrank_gru", "gru_project", "lowrank_gru_backward"]
