"""`GraphMoEConfig`: every hyper-parameter of a GraphMoE layer, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

BACKENDS = ("auto", "reference", "torch", "triton")
GRU_CANDIDATE_INPUTS = ("y", "x")
GRU_CANDIDATE_ACTIVATIONS = ("sigmoid", "tanh")


@dataclass
class GraphMoEConfig:
    """Hyper-parameters of GraphMoE (defaults: the paper's, Table 2 and Section 4.4).

    Args:
        num_experts: number of LoRA experts ``n`` per layer.
        top_k: experts chosen per token per round ``k`` (``1 <= k <= n``).
        lora_r: rank ``r`` of every expert's LoRA factors.
        lora_alpha: LoRA scaling numerator; the deltas are scaled by ``lora_alpha / lora_r``.
        lora_dropout: dropout probability on the LoRA inputs, applied in training only.
        num_rounds: self-rethinking rounds ``T``.
        gru_hidden_ratio: GRU width is ``int(gru_hidden_ratio * hidden_size)`` (paper footnote 5).
        router_aux_loss_coef: coefficient of the load-balancing loss added to the model loss.
        backend: ``"reference"`` (Algorithm 1, the oracle), ``"torch"`` (fast pure PyTorch),
            ``"triton"`` (hand-written kernels) or ``"auto"`` (triton on CUDA, torch elsewhere).
        gru_candidate_input: second input of the GRU candidate: ``"y"`` (the experts' output,
            Eq. 6) or ``"x"`` (the round's input, Algorithm 1 line 19).
        gru_candidate_activation: ``"sigmoid"`` (as printed in Eq. 6) or ``"tanh"`` (standard GRU).
        attention_lora: also train LoRA adapters on q/k/v/o projections (the paper does).
        attention_lora_r: rank of the attention adapters (``None``: ``lora_r``).
        attention_lora_alpha: alpha of the attention adapters (``None``: ``lora_alpha``).
        router_init_std: standard deviation of the router's normal init.
        recompute_intermediates: ``False`` (the default): the fast backends save the base
            gate and up products (``2·D'`` values per token per round, as a dense SwiGLU MLP
            saves its own; with LoRA dropout the torch backend also keeps the masks, ``k·D' + d``
            bytes) and recompute only the rank-``r`` deltas. ``True``: they save nothing
            ``D'``-wide and recompute the base gate/up products in backward (+2 base GEMMs
            per round: 8 instead of 6 forward+backward), the memory lever for long sequences.
        deterministic: the Triton kernels reduce across tiles without float atomics (per-tile
            partials summed in a fixed order), so a run gives bit-identical outputs and
            gradients every time, at some cost in speed. The reference and torch backends are
            deterministic anyway.
    """

    num_experts: int = 8
    top_k: int = 2
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    num_rounds: int = 3
    gru_hidden_ratio: float = 0.1
    router_aux_loss_coef: float = 0.01
    backend: str = "auto"
    gru_candidate_input: str = "y"
    gru_candidate_activation: str = "sigmoid"
    attention_lora: bool = True
    attention_lora_r: int | None = None
    attention_lora_alpha: float | None = None
    router_init_std: float = 0.02
    recompute_intermediates: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        self._check_int("num_experts", minimum=1)
        self._check_int("top_k", minimum=1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must not exceed num_experts={self.num_experts}"
            )
        self._check_int("lora_r", minimum=1)
        self._check_positive("lora_alpha")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        self._check_int("num_rounds", minimum=1)
        self._check_positive("gru_hidden_ratio")
        if not (isinstance(self.router_aux_loss_coef, (int, float))
                and math.isfinite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
            raise ValueError(
                f"router_aux_loss_coef={self.router_aux_loss_coef!r} must be a finite number >= 0"
            )
        self._check_choice("backend", BACKENDS)
        self._check_choice("gru_candidate_input", GRU_CANDIDATE_INPUTS)
        self._check_choice("gru_candidate_activation", GRU_CANDIDATE_ACTIVATIONS)
        if self.attention_lora_r is not None:
            self._check_int("attention_lora_r", minimum=1)
        if self.attention_lora_alpha is not None:
            self._check_positive("attention_lora_alpha")
        self._check_positive("router_init_std")
        for name in ("attention_lora", "recompute_intermediates", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise ValueError(f"{name}={value!r} must be a finite number > 0")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} must be one of {choices}")

    @property
    def lora_scaling(self) -> float:
        """``c = lora_alpha / lora_r``, the factor on every expert's low-rank delta."""
        return self.lora_alpha / self.lora_r

    def gru_hidden_size(self, hidden_size: int) -> int:
        """GRU width ``dh = int(ratio * d)``; raises ``ValueError`` when that is 0."""
        dh = int(self.gru_hidden_ratio * hidden_size)
        if dh < 1:
            raise ValueError(
                f"gru_hidden_ratio={self.gru_hidden_ratio} gives a GRU hidden size of "
                f"int({self.gru_hidden_ratio} * {hidden_size}) = 0; raise the ratio"
            )
        return dh

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GraphMoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GraphMoEConfig fields: {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
