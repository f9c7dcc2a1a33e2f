"""The parameters of the low-rank GRU of GraphMoE (the "virtual node", Eqs. 6-7), reset-before
form; the maths is in the backends (the literal step: ``backends.reference.lowrank_gru_step``).

    z = σ(W_z [h, y]);  r = σ(W_r [h, y]);  ĥ = act(W_o [r ⊙ h, u] + b_o)
    h' = (1 − z) ⊙ h + z ⊙ ĥ;  g = W_g h'

``u`` is ``y`` (Eq. 6, the default) or the round input ``x`` (Algorithm 1, line 19); ``act`` is
sigmoid (as printed) or tanh (the standard GRU). The concatenation order is ``[h, y]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backends.reference import lowrank_gru_step
from .config import GRU_CANDIDATE_ACTIVATIONS, GRU_CANDIDATE_INPUTS


class LowRankGRU(nn.Module):
    """Parameters of the low-rank GRU; ``forward`` is the reference step plus ``g = W_g h'``."""

    def __init__(
        self,
        hidden_size: int,
        gru_hidden_size: int,
        candidate_input: str = "y",
        candidate_activation: str = "sigmoid",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if candidate_input not in GRU_CANDIDATE_INPUTS:
            raise ValueError(f"candidate_input={candidate_input!r} not in {GRU_CANDIDATE_INPUTS}")
        if candidate_activation not in GRU_CANDIDATE_ACTIVATIONS:
            raise ValueError(
                f"candidate_activation={candidate_activation!r} not in {GRU_CANDIDATE_ACTIVATIONS}"
            )
        d, dh = hidden_size, gru_hidden_size
        kw = {"device": device, "dtype": dtype}
        self.hidden_size, self.gru_hidden_size = d, dh
        self.candidate_input, self.candidate_activation = candidate_input, candidate_activation
        self.weight_z = nn.Parameter(torch.empty(dh, dh + d, **kw))
        self.weight_r = nn.Parameter(torch.empty(dh, dh + d, **kw))
        self.weight_o = nn.Parameter(torch.empty(dh, dh + d, **kw))
        self.bias_o = nn.Parameter(torch.empty(dh, **kw))
        self.weight_g = nn.Parameter(torch.empty(d, dh, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init for the gates; W_g = 0 so a fresh layer leaves x unchanged.
        for w in (self.weight_z, self.weight_r, self.weight_o):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.weight_o.shape[1])
        nn.init.uniform_(self.bias_o, -bound, bound)
        nn.init.zeros_(self.weight_g)

    def forward(
        self, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(h', g)``."""
        h_new = lowrank_gru_step(
            h,
            y,
            x,
            self.weight_z,
            self.weight_r,
            self.weight_o,
            self.bias_o,
            self.candidate_input,
            self.candidate_activation,
        )
        return h_new, F.linear(h_new, self.weight_g)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, gru_hidden_size={self.gru_hidden_size}, "
            f"candidate_input={self.candidate_input!r}, "
            f"candidate_activation={self.candidate_activation!r}"
        )
