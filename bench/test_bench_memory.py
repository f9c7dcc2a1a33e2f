"""Activation memory of one training step: bytes saved for backward per token per layer, and
on a GPU the peak of fwd+bwd above the resident weights and inputs.

The figures are in each benchmark's ``extra_info`` (``saved_bytes_per_token``,
``cuda_peak_fwd_bwd_bytes`` ...); the time of the group ``memory`` is one instrumented fwd+bwd and
means little. The counting rule is :class:`bench.harness.SavedTensorCounter`'s.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import graphmoe_fused as gm
from bench.harness import (
    AUX_LOSS_COEF,
    BACKENDS,
    BenchContext,
    build_dense,
    build_layer,
    build_mixlora,
    layer_input,
    measure_memory,
    skip_unless_backend,
)

IMPLS = ("dense", "mixlora", *BACKENDS)


@pytest.mark.parametrize("impl", IMPLS)
def test_memory(benchmark: Any, ctx: BenchContext, impl: str) -> None:
    if impl == "dense":
        module: torch.nn.Module = build_dense(ctx)
        rounds = 1
    elif impl == "mixlora":  # its aux loss is not ours: the layer alone is measured
        module = build_mixlora(ctx)
        rounds = ctx.shape.num_rounds
    else:
        skip_unless_backend(impl, ctx.device)
        module = build_layer(ctx, impl)
        rounds = ctx.shape.num_rounds
    x, grad = layer_input(ctx, requires_grad=True)
    aux_grad = torch.tensor(AUX_LOSS_COEF, device=ctx.device)

    def forward() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        if isinstance(module, gm.GraphMoEMLP):
            y, aux = module(x, return_aux_loss=True)
            return (y, aux), (grad, aux_grad.to(aux.dtype))
        return (module(x),), (grad,)

    result: dict[str, Any] = {}

    def run() -> None:
        result.update(measure_memory(ctx, forward, exclude=module.parameters()))

    def setup() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None

    if ctx.device.type == "cuda":
        # The first call allocates cuBLAS workspaces and compiles kernels; keep that out of the
        # peak. (The saved bytes do not depend on it, so the CPU run skips this.)
        setup()
        torch.autograd.backward(*forward())
    benchmark.group = "memory"
    benchmark.extra_info.update(ctx.info(kind="memory", impl=impl, mode="fwd_bwd", rounds=rounds))
    # One instrumented call is the measurement; repeating it would give the same bytes.
    benchmark.pedantic(run, setup=setup, rounds=1)
    benchmark.extra_info.update(result)
