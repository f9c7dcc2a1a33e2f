"""The training-round roofline (``python -m bench.roofline``) counts what it says it counts."""

from __future__ import annotations

from bench.roofline import GPUS, dense_round, gemm, graphmoe_round, report
from bench.shapes import SHAPES


def test_dense_baseline_is_six_gemm_units():
    s = SHAPES["llama3-8b"]
    unit = gemm(s.tokens, s.intermediate, s.d)
    assert unit == 2 * 8192 * 14336 * 4096
    assert sum(k.flops for k in dense_round(s)) == 6 * unit


def test_base_gemm_units_of_a_graphmoe_round():
    # Everything but the rank-r and GRU products: 6 base GEMM units with G and U saved, 8 with
    # them recomputed. With r = 0 LoRA columns nothing else is left but the router and GRU.
    s = SHAPES["llama3-8b"]
    unit = gemm(s.tokens, s.intermediate, s.d)
    for recompute, units in ((False, 6), (True, 8)):
        kernels = graphmoe_round(s, recompute)
        base = sum(k.flops for k in kernels if not k.name.startswith(("GRU", "router", "lora_in")))
        lora = base - units * unit
        # The masked-dense LoRA products, forward and backward (the weight-gradient kernel
        # re-derives each slot's deltas): nearly a whole unit, 15/16 at this shape.
        assert 0.9 * unit < lora < 1.0 * unit
        grouped = graphmoe_round(s, recompute, grouped=True)
        grouped_lora = sum(k.flops for k in grouped
                           if not k.name.startswith(("GRU", "router", "lora_in"))) - units * unit
        assert abs(grouped_lora * s.num_experts - lora) < 1e-6 * lora  # n times fewer columns


def test_report_prints_every_gpu_and_both_modes():
    text = report("llama3-8b")
    for gpu in GPUS:
        assert f"({gpu})" in text
    assert "recompute_intermediates=False" in text and "recompute_intermediates=True" in text
