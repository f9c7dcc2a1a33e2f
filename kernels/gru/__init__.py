"""The fused low-rank GRU cell and the residual into the next round."""

from .lowrank_gru import fused_lowrank_gru

__all__ = ["fused_lowrank_gru"]
