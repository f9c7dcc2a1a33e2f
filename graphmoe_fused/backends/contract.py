"""The plain-tensor contract every backend implements.

A backend is a function ``(x, params, options) -> RoutedOutput`` on a flattened input
``x [M, d]``. Keeping the contract to tensors and a frozen options record is what lets the
reference, the torch path and the Triton path stand side by side behind one layer.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Set to a truthy value to fill every buffer the fast backends allocate uninitialised with NaN
# (floats) or -1 (integers): an element a backend forgets to write then fails a comparison
# instead of hiding behind whatever ``torch.empty`` returned. The tests run with it on. The
# kernels read the same variable (``kernels/utils.py``); it is defined again here because the
# torch backend must not import the kernels (triton is absent on macOS and Windows).
POISON_ENV = "GRAPHMOE_FUSED_POISON_OUTPUTS"
# The truthy spellings triton's own TRITON_INTERPRET knob accepts (as kernels/utils.py).
_TRUTHY = ("1", "true", "on", "yes", "y")

GRU_CANDIDATE_INPUTS = ("y", "x")
GRU_CANDIDATE_ACTIVATIONS = ("sigmoid", "tanh")


class GraphMoEParams(NamedTuple):
    """All weights of one GraphMoE layer (shapes for d, D' = intermediate, n, r, dh)."""

    gate_weight: torch.Tensor  # [D', d]  frozen base
    up_weight: torch.Tensor  # [D', d]  frozen base
    down_weight: torch.Tensor  # [d, D']  frozen base
    router_weight: torch.Tensor  # [n, d]
    lora_A_gate: torch.Tensor  # [n, r, d]
    lora_B_gate: torch.Tensor  # [n, D', r]
    lora_A_up: torch.Tensor  # [n, r, d]
    lora_B_up: torch.Tensor  # [n, D', r]
    lora_A_down: torch.Tensor  # [n, r, D']
    lora_B_down: torch.Tensor  # [n, d, r]
    gru_weight_z: torch.Tensor  # [dh, dh + d]
    gru_weight_r: torch.Tensor  # [dh, dh + d]
    gru_weight_o: torch.Tensor  # [dh, dh + d]
    gru_bias_o: torch.Tensor  # [dh]
    gru_weight_g: torch.Tensor  # [d, dh]


@dataclass(frozen=True)
class RoundOptions:
    """The non-tensor inputs of a GraphMoE forward.

    ``dropout_seed`` fixes the LoRA dropout masks (see ``graphmoe_fused.backends.dropout``):
    the same seed gives the same masks in every backend and again in a backward that
    recomputes. ``deterministic`` asks the Triton kernels for the same bits run to run (fixed-
    order reductions instead of float atomics); the other backends are deterministic anyway.
    """

    top_k: int
    lora_scaling: float
    num_rounds: int
    gru_candidate_input: str = "y"
    gru_candidate_activation: str = "sigmoid"
    dropout_p: float = 0.0
    dropout_seed: int = 0
    recompute_intermediates: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        # The layer builds these from a validated config, but the backends are public functions
        # too: a bad value fails here, by name, not as a shape error deep inside a round.
        for name in ("top_k", "num_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RoundOptions.{name}={value!r} must be an integer >= 1")
        if not _is_number(self.lora_scaling) or not math.isfinite(self.lora_scaling):
            raise ValueError(
                f"RoundOptions.lora_scaling={self.lora_scaling!r} must be a finite number"
            )
        if not _is_number(self.dropout_p) or not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"RoundOptions.dropout_p={self.dropout_p!r} must be in [0, 1)")
        if isinstance(self.dropout_seed, bool) or not isinstance(self.dropout_seed, int):
            raise ValueError(f"RoundOptions.dropout_seed={self.dropout_seed!r} must be an int")
        if not isinstance(self.deterministic, bool):
            raise ValueError(
                f"RoundOptions.deterministic={self.deterministic!r} must be True or False"
            )
        if self.gru_candidate_input not in GRU_CANDIDATE_INPUTS:
            raise ValueError(
                f"RoundOptions.gru_candidate_input={self.gru_candidate_input!r} must be one "
                f"of {GRU_CANDIDATE_INPUTS}"
            )
        if self.gru_candidate_activation not in GRU_CANDIDATE_ACTIVATIONS:
            raise ValueError(
                f"RoundOptions.gru_candidate_activation={self.gru_candidate_activation!r} must "
                f"be one of {GRU_CANDIDATE_ACTIVATIONS}"
            )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RoutedOutput(NamedTuple):
    """What a backend returns.

    ``router_probs`` is differentiable (the load-balancing loss flows through it);
    ``expert_index`` is integer, for the loss's selection counts and the routing statistics.
    """

    y: torch.Tensor  # [M, d], x's dtype
    router_probs: torch.Tensor  # [T, M, n], fp32 (or wider when x is)
    expert_index: torch.Tensor  # [T, M, k], int64


FROZEN_BASE = ("gate_weight", "up_weight", "down_weight")


def check_frozen_base(p: GraphMoEParams, backend: str) -> None:
    """The fast backends compute no gradient for the base projections (frozen by design,
    design.md §2): one that requires grad while grad mode is on is an error, not a silent zero."""
    if not torch.is_grad_enabled():
        return
    trainable = [name for name in FROZEN_BASE if getattr(p, name).requires_grad]
    if trainable:
        raise RuntimeError(
            f"the {backend} backend treats the base MLP weights as frozen (docs/design.md §2) and "
            f"computes no gradient for them, but {trainable} require grad; call "
            ".requires_grad_(False) on them or use backend='reference'"
        )


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; never on a device autocast does not know
    (``meta``, where a layer runs shapes only, e.g. ``bench.op_count``), where asking raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)``, or nothing to turn off (see
    :func:`autocast_enabled`)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the base GEMMs: autocast's for x's device when autocast is on, else x's own.
    fp64 inputs stay fp64, as autocast itself leaves fp64 alone."""
    device_type = x.device.type
    if x.dtype != torch.float64 and autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def check_inputs(x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions, backend: str) -> None:
    """Raises a ``ValueError`` / ``TypeError`` naming the problem unless ``x``, ``p`` and
    ``opt`` fit together: ``x [M, d]`` floating point, every weight of the shape
    :class:`GraphMoEParams` documents (``d``, ``D'``, ``n``, ``r``, ``dh`` read from ``x``,
    ``gate_weight``, ``router_weight``, ``lora_A_gate`` and ``gru_weight_g``), floating point and
    on ``x``'s device, and ``top_k <= n``. Shape checks only: no device sync."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the {backend} backend takes x as a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"the {backend} backend takes x flattened to [tokens, hidden], got shape "
            f"{tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"the {backend} backend takes floating-point x, got {x.dtype}")
    if not isinstance(opt, RoundOptions):
        raise TypeError(f"the {backend} backend takes a RoundOptions, got {type(opt).__name__}")
    if not isinstance(p, GraphMoEParams):
        raise TypeError(f"the {backend} backend takes a GraphMoEParams, got {type(p).__name__}")
    for name, t in zip(GraphMoEParams._fields, p, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params.{name} must be a torch.Tensor, got {type(t).__name__}")
        ndim = 1 if name == "gru_bias_o" else 3 if name.startswith("lora_") else 2
        if t.dim() != ndim:
            raise ValueError(
                f"params.{name} must be {ndim}-D, got shape {tuple(t.shape)} (see GraphMoEParams)"
            )
    d = x.shape[1]
    if p.gate_weight.shape[1] != d:
        raise ValueError(
            f"x has {d} features but the layer's hidden size is {p.gate_weight.shape[1]} "
            f"(params.gate_weight has shape {tuple(p.gate_weight.shape)})"
        )
    inter, n = p.gate_weight.shape[0], p.router_weight.shape[0]
    r, dh = p.lora_A_gate.shape[1], p.gru_weight_g.shape[1]
    expected = {
        "gate_weight": (inter, d), "up_weight": (inter, d), "down_weight": (d, inter),
        "router_weight": (n, d),
        "lora_A_gate": (n, r, d), "lora_B_gate": (n, inter, r),
        "lora_A_up": (n, r, d), "lora_B_up": (n, inter, r),
        "lora_A_down": (n, r, inter), "lora_B_down": (n, d, r),
        "gru_weight_z": (dh, dh + d), "gru_weight_r": (dh, dh + d),
        "gru_weight_o": (dh, dh + d), "gru_bias_o": (dh,), "gru_weight_g": (d, dh),
    }
    for name, t in zip(GraphMoEParams._fields, p, strict=True):
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"params.{name} has shape {tuple(t.shape)}; expected {expected[name]} for "
                f"hidden={d} (x's last dimension), intermediate={inter}, experts={n}, "
                f"rank={r}, gru_hidden={dh}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"params.{name} has dtype {t.dtype}; expected floating point")
        if t.device != x.device:
            raise ValueError(f"params.{name} is on {t.device} but x is on {x.device}")
    if min(inter, n, r) < 1:
        raise ValueError(
            f"need at least one expert, rank and intermediate unit; got n={n}, r={r}, "
            f"intermediate={inter}"
        )
    if opt.top_k > n:
        raise ValueError(f"top_k={opt.top_k} must not exceed the {n} experts")


def poisoning() -> bool:
    """Whether fast-path buffers are NaN-filled (``POISON_ENV`` set), read at each call."""
    return os.environ.get(POISON_ENV, "0").strip().lower() in _TRUTHY


def new_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, every fast-path buffer's allocator: uninitialised, or NaN (integers: -1)
    when ``POISON_ENV`` is set (read at each call, so a test can switch it)."""
    if poisoning():
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def new_empty_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`new_empty` with ``t``'s shape, dtype and device (always contiguous)."""
    return new_empty(t.shape, t.dtype, t.device)
