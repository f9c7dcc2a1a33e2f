"""Whole-layer benchmarks: GraphMoE per backend vs the dense frozen SwiGLU MLP, and the cost of
each extra self-rethinking round (the paper's Fig. 5c).

Groups (pytest-benchmark tables): ``layer-fwd``, ``layer-fwd_bwd``, ``rounds-fwd-<backend>``,
``paired-fwd_bwd``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
import torch

from bench.harness import (
    BACKENDS,
    MODES,
    BenchContext,
    backend_skip_reason,
    build_dense,
    build_layer,
    build_mixlora,
    layer_input,
    module_step,
    run_benchmark,
    skip_unless_backend,
    timed_call,
)

# "mixlora": the peer users would pick instead (bench/peers.py), on the same weights.
IMPLS = ("dense", "mixlora", *BACKENDS)
ROUNDS = (1, 2, 3, 4, 5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_layer(benchmark: Any, ctx: BenchContext, impl: str, mode: str) -> None:
    """One layer at the shape's T: ``fwd`` (inference, no_grad) or ``fwd_bwd`` (training step:
    input requires grad, LoRA/router/GRU trainable, base frozen). ``dense`` is the floor one
    GraphMoE round cannot beat; the report compares GraphMoE with T × dense."""
    if impl == "dense":
        module = build_dense(ctx)
        rounds = 1
    elif impl == "mixlora":
        module = build_mixlora(ctx)
        rounds = ctx.shape.num_rounds
    else:
        skip_unless_backend(impl, ctx.device)
        module = build_layer(ctx, impl)
        rounds = ctx.shape.num_rounds
    x, grad = layer_input(ctx, requires_grad=mode == "fwd_bwd")
    benchmark.group = f"layer-{mode}"
    benchmark.extra_info.update(ctx.info(kind="layer", impl=impl, mode=mode, rounds=rounds))
    run_benchmark(benchmark, ctx, module_step(ctx, module, x, grad, mode))
    if mode == "fwd" and impl in ("torch", "triton"):
        # A fast wrong answer is no speedup: record how far this run's output is from the
        # oracle on the same weights (correctness itself is tests/' job).
        with torch.no_grad():
            y = module(x).float()
            y_ref = build_layer(ctx, "reference")(x).float()
        benchmark.extra_info["max_rel_diff_vs_reference"] = float(
            (y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("rounds", ROUNDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rounds(benchmark: Any, ctx: BenchContext, backend: str, rounds: int) -> None:
    """Inference latency at T = 1..5 (same weights for every T); the report divides by T = 1.

    The reference backend is included on every device: at cpu-small a T = 5 reference forward
    takes about 2 s on two cores, so the whole sweep takes about half a minute.
    """
    skip_unless_backend(backend, ctx.device)
    layer = build_layer(ctx, backend, num_rounds=rounds)
    x, grad = layer_input(ctx, requires_grad=False)
    benchmark.group = f"rounds-fwd-{backend}"
    benchmark.extra_info.update(ctx.info(kind="rounds", impl=backend, mode="fwd", rounds=rounds))
    run_benchmark(benchmark, ctx, module_step(ctx, layer, x, grad, "fwd"))


def test_paired_ratios(benchmark: Any, ctx: BenchContext) -> None:
    """The target ratios of issue 3 (fwd+bwd: fast backend vs reference, vs T × dense), from
    calls interleaved round by round.

    Separate benchmarks run minutes apart; on a shared machine the load changes in between
    and their ratio inherits that drift. Here every round times each implementation once, in a
    rotating order, and the report takes the median of the per-round ratios. The figures are in
    ``extra_info["paired"]``; the benchmark's own time is the whole loop and means little.
    """
    impls = ["dense", "reference", "mixlora"] + [
        b for b in BACKENDS if b != "reference" and backend_skip_reason(b, ctx.device) is None
    ]
    if len(impls) == 3:
        pytest.skip("no fast backend available to pair with the reference")
    steps = {}
    for impl in impls:
        builders = {"dense": build_dense, "mixlora": build_mixlora}
        module = builders[impl](ctx) if impl in builders else build_layer(ctx, impl)
        x, grad = layer_input(ctx, requires_grad=True)
        steps[impl] = module_step(ctx, module, x, grad, "fwd_bwd")
    count = 1
    if not benchmark.disabled:
        for step in steps.values():  # warm-up, excluded
            timed_call(step)
        per_round = sum(timed_call(step) for step in steps.values())
        count = max(5, ctx.min_rounds, min(ctx.max_rounds, math.ceil(3 * ctx.budget_s / per_round)))
    times: dict[str, list[float]] = {impl: [] for impl in impls}

    def loop() -> None:
        for i in range(count):
            for impl in impls[i % len(impls):] + impls[:i % len(impls)]:
                times[impl].append(timed_call(steps[impl]))

    benchmark.group = "paired-fwd_bwd"
    benchmark.extra_info.update(ctx.info(kind="paired", impl="all", mode="fwd_bwd",
                                         rounds=ctx.shape.num_rounds))
    benchmark.pedantic(loop, rounds=1)
    t_count = ctx.shape.num_rounds
    paired: dict[str, dict[str, float]] = {}
    for impl in impls:
        entry = {"median_s": statistics.median(times[impl]), "rounds": len(times[impl])}
        if impl not in ("dense", "reference"):
            pairs = zip(times[impl], times["reference"], times["mixlora"], times["dense"],
                        strict=True)
            ratios = [(ref / t, mix / t, t / (t_count * dense)) for t, ref, mix, dense in pairs]
            entry["speedup_vs_reference"] = statistics.median(r[0] for r in ratios)
            entry["speedup_vs_mixlora"] = statistics.median(r[1] for r in ratios)
            entry["vs_T_dense"] = statistics.median(r[2] for r in ratios)
        paired[impl] = entry
    benchmark.extra_info["paired"] = paired
