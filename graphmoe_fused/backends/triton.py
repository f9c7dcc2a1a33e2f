"""The `triton` backend: the GraphMoE layer on the hand-written Triton kernels.

Per round ``t`` (docs/design.md §1), four launches plus the small rank-``r`` one:

1. ``fused_router_topk``: softmax router probabilities, top-k, renormalised weights;
2. ``expert_gate_up``: ``c · x_lora A^T`` for all experts, then one pass over ``x`` computing the
   base gate and up products, every chosen slot's LoRA delta, SwiGLU, the routing-weighted mix
   ``h_mix`` and the down LoRA's rank-``r`` input ``a_mix``;
3. ``expert_down``: ``y = W_D h_mix + c · a_mix B_D^T`` (3 base GEMMs per token per round in all);
4. ``fused_lowrank_gru``: the GRU state and the next round's input (not after the last round).

LoRA dropout: the kernels hash the masks of :func:`.dropout.lora_dropout_masks` (the options'
seed, the round index, the token, the column) in registers where they apply them, so no mask
tensor and no ``dropout(x_t)`` is made on this path; the masks are bit for bit the reference's,
and the backward's. ``RoundOptions.deterministic`` makes the gate/up kernel sum ``a_mix`` over
its ``D'`` tiles in a fixed order instead of with fp32 atomics, so the forward gives the same
bits run to run (the next round's routing depends on ``a_mix``).

Training: the forward runs as the custom op ``graphmoe_fused::triton_rounds`` (:mod:`.triton_ops`,
so ``torch.compile`` keeps it as one node), which returns, besides the outputs, what the
backward needs: the routing, the GRU states, the non-final outputs, each round's rank-r
``a_mix`` and, with ``recompute_intermediates=False``, the base gate/up products. The round
inputs ``x_2..x_T`` are not kept: the backward rebuilds them from the states with the forward's
own projection launch (``kernels.gru.gru_project``): the same bits, ``[M, d]`` less memory per
non-final round.
Its registered backward (``graphmoe_fused::rounds_backward``) runs from those: each round's
experts and each GRU cell on the backward kernels, the chain over the rounds and the router's
small softmax/top-k backward in PyTorch. Nothing is routed or run forward again, so the gradient
is that of the function the kernels computed, with their routing (at a near tie another top-k
could pick another expert than the router kernel, whose logits are summed in another order).

Devices: CUDA; CPU only under ``TRITON_INTERPRET=1`` (set before importing triton), for tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from typing import NamedTuple

import torch

from .contract import (
    GraphMoEParams,
    RoundOptions,
    RoutedOutput,
    autocast_off,
    check_frozen_base,
    check_inputs,
    compute_dtype,
    new_empty,
)
from .torch import graphmoe_torch
from .triton_ops import run_rounds


def triton_available() -> bool:
    """Whether triton can be imported (its wheels exist for Linux only)."""
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` here, or ``None`` when they can: triton must be
    installed, and the device CUDA (or the CPU under the Triton interpreter, for tests)."""
    if not triton_available():
        return ("the 'triton' backend needs the triton package, which is not installed (it is "
                "published for Linux only); use backend torch or auto")
    if device.type in ("cuda", "meta"):  # meta: shapes only, the ops' fake implementations
        return None
    if device.type == "cpu":
        from ..kernels.utils import is_interpreter

        if is_interpreter():
            return None
    return (f"the 'triton' backend needs a CUDA device, but the input is on {device} (its "
            "kernels run on the CPU only under TRITON_INTERPRET=1, set before triton is "
            "imported, for tests); use backend torch or auto")


def check_runnable(x: torch.Tensor) -> None:
    """Raises ``RuntimeError`` unless the kernels can run on ``x``'s device."""
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)


def _kernels_cover(p: GraphMoEParams) -> str | None:
    """Why the kernels cannot take these weights, or ``None`` when they can."""
    from ..kernels.expert import MAX_MASKED_DENSE_COLS, masked_dense_supported
    from ..kernels.routing import MAX_EXPERTS

    n, r = p.lora_A_gate.shape[:2]
    if n > MAX_EXPERTS:
        return f"{n} experts is more than the routing kernel's {MAX_EXPERTS}"
    if not masked_dense_supported(n, r):
        return f"n·r = {n * r} is past the masked-dense LoRA limit of {MAX_MASKED_DENSE_COLS}"
    return None


class _KernelForward(NamedTuple):
    """What the kernels computed: the backend's outputs, and what the backward needs of the
    rounds: the GRU states and the non-final outputs (``T - 1`` each), and every round's
    routing-weighted down-LoRA input ``a_mix`` (``T``, rank r: the backward kernels take it
    instead of per-slot activations)."""

    routed: RoutedOutput
    states: list[torch.Tensor]  # h_1 .. h_{T-1}
    outputs: list[torch.Tensor]  # y_1 .. y_{T-1}
    a_mixes: list[torch.Tensor]  # [M, n·r] fp32 per round
    bases: list[torch.Tensor]  # G_1, U_1, G_2, ... (recompute_intermediates=False), or none


def _forward(x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions) -> _KernelForward:
    """The T rounds on the kernels, no autograd. ``x`` and ``p`` share one dtype."""
    from ..kernels.expert import expert_down, expert_gate_up, expert_lora_layout
    from ..kernels.gru import fused_lowrank_gru
    from ..kernels.routing import fused_router_topk

    c = opt.lora_scaling
    # The LoRA factors change every training step but not between rounds: one copy per forward.
    lora = expert_lora_layout(p.lora_A_gate, p.lora_B_gate, p.lora_A_up, p.lora_B_up,
                              p.lora_A_down, p.lora_B_down)
    h = None  # the zero state of round 1, which the GRU kernel skips
    x_t = x
    all_probs, all_index = [], []
    states, outputs, a_mixes, bases = [], [], [], []
    inter = p.gate_weight.shape[0]
    for t in range(opt.num_rounds):
        probs, weights, experts = fused_router_topk(x_t, p.router_weight, opt.top_k)
        all_probs.append(probs)
        all_index.append(experts)

        base = None
        if not opt.recompute_intermediates:  # kept for the backward, as a dense MLP keeps them
            base = (new_empty((x.shape[0], inter), x.dtype, x.device),
                    new_empty((x.shape[0], inter), x.dtype, x.device))
            bases += base
        h_mix, a_mix = expert_gate_up(
            x_t, p.gate_weight, p.up_weight, lora, weights, experts, c,
            dropout_p=opt.dropout_p, dropout_seed=opt.dropout_seed, round_index=t,
            deterministic=opt.deterministic, base_out=base,
        )
        y = expert_down(h_mix, p.down_weight, lora, a_mix, c)
        a_mixes.append(a_mix)
        if t == opt.num_rounds - 1:
            break
        h, x_t = fused_lowrank_gru(
            h, y, x_t, p.gru_weight_z, p.gru_weight_r, p.gru_weight_o, p.gru_bias_o,
            p.gru_weight_g, opt.gru_candidate_input, opt.gru_candidate_activation,
        )
        states.append(h)
        outputs.append(y)
    routed = RoutedOutput(y, torch.stack(all_probs), torch.stack(all_index))
    return _KernelForward(routed, states, outputs, a_mixes, bases)


def graphmoe_triton(x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions) -> RoutedOutput:
    """The backend contract of :mod:`graphmoe_fused.backends.contract` on the Triton kernels.

    Forward: the kernels (router/top-k, fused LoRA-expert gate/up, down, low-rank GRU) per round.
    Backward: the torch backend's chain over the rounds, from the routing and GRU states the
    kernels computed (see the module docstring), for ``x`` and every parameter that requires grad;
    ``router_probs`` is a differentiable output.

    Args:
        x: ``[M, d]`` round-1 input, fp16/bf16/fp32, on CUDA (CPU only under
            ``TRITON_INTERPRET=1``).
        p: the layer's weights; the base projections must not require grad (they are frozen).
        opt: rounds, top-k, scaling, GRU options and dropout.
    Returns:
        ``y_T`` in x's dtype, the ``[T, M, n]`` fp32 router probabilities and the ``[T, M, k]``
        int64 chosen experts.
    Raises:
        RuntimeError: off CUDA without the interpreter, or when a base weight requires grad.
        TypeError: for an input dtype the kernels do not take (fp64: use ``backend="torch"``).
        ValueError: inputs whose shapes or devices do not fit together (each named).

    Configurations the kernels do not cover (more than 64 experts, or ``n·r`` past the
    masked-dense limit of 256) run on the torch backend instead, with a warning.
    """
    check_inputs(x, p, opt, "triton")
    check_runnable(x)
    check_frozen_base(p, "triton")
    cd = compute_dtype(x)
    if cd not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"the triton backend computes in fp16, bf16 or fp32, not {cd}; use "
            "backend='torch' or 'reference' for this dtype"
        )
    reason = _kernels_cover(p)
    if reason is not None:
        warnings.warn(f"triton backend: {reason}; running the torch backend instead",
                      stacklevel=2)
        return graphmoe_torch(x, p, opt)
    # Autocast would not reach inside the kernels: the casts are made here, explicitly, where
    # autograd casts the gradients back. A parameter in another dtype is copied on every call
    # (keep the layer in the compute dtype to avoid that).
    params = GraphMoEParams(*(t if t.dtype == cd else t.to(cd) for t in p))
    if not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in p))):
        # Nothing will run backward: keep no base products whatever the option says.
        opt = dataclasses.replace(opt, recompute_intermediates=True)
    with autocast_off(x.device.type):
        out = run_rounds(x.to(cd), params, opt)
    return RoutedOutput(out.y.to(x.dtype), out.router_probs, out.expert_index)
