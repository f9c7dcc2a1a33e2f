"""Pieces of one round: the expert MLP (routing + k LoRA experts, no GRU) and the GRU cell.

Their ratio is the "GRU share of a round" of the report (the paper's Fig. 6 claims < 5%).

Groups: ``expert-round-{mode}`` (each backend's layer at T = 1: one routing + expert pass, the
GRU never runs), ``gru-cell-{mode}`` (one GRU step plus the residual ``x + W_g h'``),
``triton-round-kernels`` (the raw router, ``expert_gate_up`` and ``expert_down`` kernels, and
the expert pair; CUDA only).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmoe_fused as gm
from bench.harness import (
    BACKENDS,
    MODES,
    BenchContext,
    Step,
    build_layer,
    function_step,
    layer_input,
    make_tensor,
    module_step,
    randomize_,
    run_benchmark,
    skip_unless_backend,
    synchronize,
    triton_runnable,
)
from graphmoe_fused.backends.reference import lowrank_gru_step as lowrank_gru_reference
from graphmoe_fused.backends.torch import gru as torch_gru
from graphmoe_fused.backends.torch.routing import router_probabilities, select_experts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_round(benchmark: Any, ctx: BenchContext, backend: str, mode: str) -> None:
    """Routing + the chosen experts for one round (T = 1, so no GRU and no second round)."""
    skip_unless_backend(backend, ctx.device)
    layer = build_layer(ctx, backend, num_rounds=1)
    x, grad = layer_input(ctx, requires_grad=mode == "fwd_bwd")
    benchmark.group = f"expert-round-{mode}"
    benchmark.extra_info.update(ctx.info(kind="expert_round", impl=backend, mode=mode, rounds=1))
    run_benchmark(benchmark, ctx, module_step(ctx, layer, x, grad, mode))


class _GRUHolder(nn.Module):
    """Gives the GRU the parameter names it has inside a layer, so randomize_ scales alike."""

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__()
        s = ctx.shape
        self.gru = gm.LowRankGRU(s.d, s.dh, device=ctx.device, dtype=ctx.dtype)


def _gru_case(ctx: BenchContext, mode: str) -> tuple[gm.LowRankGRU, list[torch.Tensor],
                                                      tuple[torch.Tensor, ...] | None]:
    """The GRU's weights, its inputs ``h [M, dh]``, ``y [M, d]``, ``x [M, d]`` and, for
    fwd_bwd, the gradients of its two outputs ``h'`` and ``x_next``."""
    s = ctx.shape
    gru = randomize_(_GRUHolder(ctx), ctx.seed).gru
    need_grad = mode == "fwd_bwd"
    inputs = [
        make_tensor(ctx, s.tokens, s.dh, seed=ctx.seed + 11, requires_grad=need_grad),
        make_tensor(ctx, s.tokens, s.d, seed=ctx.seed + 12, requires_grad=need_grad),
        make_tensor(ctx, s.tokens, s.d, seed=ctx.seed + 13, requires_grad=need_grad),
    ]
    grads = None
    if need_grad:
        grads = (make_tensor(ctx, s.tokens, s.dh, seed=ctx.seed + 14),
                 make_tensor(ctx, s.tokens, s.d, seed=ctx.seed + 15))
    return gru, inputs, grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ("reference", "torch", "triton"))
def test_gru_cell(benchmark: Any, ctx: BenchContext, impl: str, mode: str) -> None:
    """One GRU step and the residual into the next round: ``h' = GRU(h, y)``, ``x + W_g h'``.

    ``reference``: ``graphmoe_fused.backends.reference.lowrank_gru_step`` under autograd (what the
    reference backend runs). ``torch``: the torch backend's own step
    (``graphmoe_fused.torch_gru``: fp32 state, its hand-written backward that recomputes the
    gates), weights prepared once outside the timing as the backend does per call.
    ``triton``: ``kernels.lowrank_gru.fused_lowrank_gru`` on CUDA, forward only.
    """
    gru, (h, y, x), grads = _gru_case(ctx, mode)
    if impl == "reference":
        def cell() -> tuple[torch.Tensor, torch.Tensor]:
            h_new = lowrank_gru_reference(h, y, x, gru.weight_z, gru.weight_r, gru.weight_o,
                                          gru.bias_o)
            return h_new, x + F.linear(h_new, gru.weight_g)

        step = function_step(ctx, cell, grads, [h, y, x, *gru.parameters()])
    elif impl == "torch":
        step = _torch_gru_step(ctx, gru, h, y, x, grads)
    else:
        if not triton_runnable(ctx.device):
            pytest.skip("the fused Triton GRU needs a CUDA device (or TRITON_INTERPRET=1)")
        if mode == "fwd_bwd":
            pytest.skip("kernels.gru.fused_lowrank_gru is forward-only")
        from graphmoe_fused.kernels.gru import fused_lowrank_gru

        def fused() -> tuple[torch.Tensor, torch.Tensor]:
            return fused_lowrank_gru(h, y, x, gru.weight_z, gru.weight_r, gru.weight_o,
                                            gru.bias_o, gru.weight_g)

        step = function_step(ctx, fused, None, [])
    benchmark.group = f"gru-cell-{mode}"
    benchmark.extra_info.update(ctx.info(kind="gru_cell", impl=impl, mode=mode, rounds=1))
    run_benchmark(benchmark, ctx, step)


def _torch_gru_step(ctx: BenchContext, gru: gm.LowRankGRU, h: torch.Tensor, y: torch.Tensor,
                    x: torch.Tensor, grads: tuple[torch.Tensor, ...] | None) -> Step:
    """The torch backend's GRU work for one non-final round, forward and (for fwd_bwd) the
    backward it runs inside its autograd Function (no autograd graph of its own)."""
    cd = ctx.dtype
    acc = torch.promote_types(cd, torch.float32)
    with torch.no_grad():
        w = torch_gru.prepare_gru(gru.weight_z, gru.weight_r, gru.weight_o, gru.bias_o,
                                  gru.weight_g, cd, acc)
        w_acc = torch_gru.prepare_gru(gru.weight_z, gru.weight_r, gru.weight_o, gru.bias_o,
                                      gru.weight_g, acc, acc)
        h_acc, y, x = h.detach().to(acc), y.detach(), x.detach()

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        h_new = torch_gru.gru_step(h_acc, y, x, w, "y", "sigmoid")
        return h_new, x + (h_new.to(cd) @ w.g.t()).to(x.dtype)

    def run() -> None:
        with torch.no_grad():
            h_new, _ = forward()
            if grads is not None:
                grad_h_next, grad_x_next = (g.to(acc) for g in grads)
                _grad_weight_g = grad_x_next.t() @ h_new
                grad_state = torch.addmm(grad_h_next, grad_x_next, w_acc.g)
                torch_gru.gru_step_backward(grad_state, h_acc, y, x, w, w_acc, "y", "sigmoid")
        synchronize(ctx.device)

    return Step(run, lambda: synchronize(ctx.device))


@pytest.mark.parametrize("kernel", ("router_topk", "expert_gate_up", "expert_down",
                                    "gate_up+down"))
def test_triton_expert_kernel(benchmark: Any, ctx: BenchContext, kernel: str) -> None:
    """The raw kernels of one round, forward, called as ``triton_backend`` calls them: the
    router (``fused_router_topk``), the two expert kernels with the routing given, and the
    expert pair back to back (the expert MLP alone: no router, GRU or autograd; compare with
    ``layer-fwd`` of ``dense``, the same 3 GEMMs)."""
    if not triton_runnable(ctx.device):
        pytest.skip("Triton expert kernels need a CUDA device (or TRITON_INTERPRET=1)")
    from graphmoe_fused.kernels.expert import expert_down, expert_gate_up, expert_lora_layout
    from graphmoe_fused.kernels.routing import fused_router_topk
    s = ctx.shape
    layer = build_layer(ctx, "reference", num_rounds=1)
    p = layer.params()
    c = layer.config.lora_scaling
    x, _ = layer_input(ctx, requires_grad=False)
    with torch.no_grad():
        weights, experts = select_experts(router_probabilities(F.linear(x, p.router_weight)),
                                          s.top_k)
        # The kernels' LoRA layout is rebuilt once per forward, not per round: kept out of the
        # per-kernel timing.
        lora = expert_lora_layout(p.lora_A_gate, p.lora_B_gate, p.lora_A_up,
                                          p.lora_B_up, p.lora_A_down, p.lora_B_down)

    def run_gate_up() -> Any:
        return expert_gate_up(x, p.gate_weight, p.up_weight, lora, weights, experts, c)

    def run_down(h_mix: torch.Tensor, a_mix: torch.Tensor) -> torch.Tensor:
        return expert_down(h_mix, p.down_weight, lora, a_mix, c)

    with torch.no_grad():
        h_mix, a_mix = run_gate_up()  # the down kernel's inputs

    def run() -> None:
        with torch.no_grad():
            if kernel == "router_topk":
                fused_router_topk(x, p.router_weight, s.top_k)
            elif kernel == "expert_gate_up":
                run_gate_up()
            elif kernel == "expert_down":
                run_down(h_mix, a_mix)
            else:
                run_down(*run_gate_up())
        synchronize(ctx.device)

    benchmark.group = "triton-round-kernels"
    benchmark.extra_info.update(ctx.info(kind="triton_kernel", impl=kernel, mode="fwd", rounds=1))
    run_benchmark(benchmark, ctx, Step(run, lambda: synchronize(ctx.device)))
