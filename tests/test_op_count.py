"""``bench.op_count`` counts what eager PyTorch launches, on the meta device."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.harness import DenseSwiGLU, SavedTensorCounter, build_layer
from bench.op_count import (
    TRITON_ROUND_OPS,
    Op,
    count_ops,
    count_step,
    floor,
    launches,
    meta_context,
    report,
)
from bench.roofline import ALL_GPUS
from bench.shapes import SHAPES

TINY = SHAPES["tiny"]


def test_dense_step_is_six_gemms_and_the_activation_passes():
    s = TINY
    ops = count_step(s, "dense").ops
    names = [op.name for op in ops]
    gemms = [op for op in ops if op.flops]
    assert [op.name for op in gemms] == ["aten.mm"] * 6
    assert sum(op.flops for op in gemms) == 6 * 2 * s.tokens * s.d * s.intermediate
    # fp32 at this shape: no tensor cores, the fp32 peak.
    assert not any(op.tensor_cores for op in gemms)
    for name in ("aten.silu", "aten.silu_backward"):
        assert names.count(name) == 1
    # silu reads G and writes silu(G): two [M, D'] fp32 tensors.
    (silu,) = [op for op in ops if op.name == "aten.silu"]
    assert silu.bytes == 2 * s.tokens * s.intermediate * 4
    assert launches(ops) == sum(1 for op in ops if op.bytes)


def test_bytes_follow_the_tensor_extent_and_views_move_nothing():
    a = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    row = torch.empty(1, 32, device="meta", dtype=torch.bfloat16)
    ops = count_ops(lambda: (a.t(), a + row.expand(64, 32), a.copy_(a)))
    assert [op.name for op in ops] == ["aten.add", "aten.copy_"]
    # add: a read, the expanded row read once (stride 0), the result written.
    assert ops[0].bytes == (64 * 32 + 32 + 64 * 32) * 2
    # copy_ overwrites its destination without reading it.
    assert ops[1].bytes == 2 * 64 * 32 * 2


def test_floor_is_max_of_compute_and_memory():
    peak, bandwidth = ALL_GPUS["H100"]
    op = Op("aten.mm", flops=peak * 1e-3, bytes=bandwidth * 2e-3, tensor_cores=True)
    assert floor([op], "H100") == pytest.approx(2e-3)
    assert floor([op, Op("aten.mm", peak * 3e-3, 0.0, True)], "H100") == pytest.approx(5e-3)


def test_meta_saved_bytes_equal_the_cpu_count():
    """The saved-tensor rule keys meta storages as it keys real ones (views share one)."""
    s = TINY
    meta = count_step(s, "dense")
    ctx = replace(meta_context(s, 0.0, False), device=torch.device("cpu"))
    layer = DenseSwiGLU(build_layer(ctx, "torch"))
    counter = SavedTensorCounter(layer.parameters())
    with counter.hooks():
        layer(torch.randn(s.tokens, s.d, requires_grad=True))
    assert counter.nbytes == meta.saved_bytes > 0


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_torch_backend_runs_its_gpu_plan_on_meta(dropout):
    s = TINY
    counted = count_step(s, "torch", dropout)
    base_units = 2 * s.tokens * s.d * s.intermediate
    # At least the 6 base GEMMs of each of the T rounds.
    assert sum(op.flops for op in counted.ops) >= 6 * s.num_rounds * base_units
    assert counted.saved_bytes > 0


def test_torch_backend_multiplies_bf16_operands_on_a_gpu():
    """In bf16 the torch backend's products take bf16 operands on a GPU, the GRU backward's
    ``d``-wide ones too (fp32 accumulation through ``mm(out_dtype=)``; in fp32 they were 2.9 %
    of the step's FLOPs and 16 % of its H100 floor): only the rank-r and ``dh``-wide products
    are left at the fp32 rate."""
    s = SHAPES["llama3-8b"]
    assert s.dtype == torch.bfloat16
    ops = count_step(s, "torch").ops
    fp32_flops = sum(op.flops for op in ops if not op.tensor_cores)
    assert 0 < fp32_flops < 0.005 * sum(op.flops for op in ops)


def test_triton_backend_fills_no_zero_gradients_for_its_saved_outputs():
    """The outputs kept for backward only get no materialised zero gradient (an [M, D'] memset
    per base product, before ``set_materialize_grads(False)``)."""
    pytest.importorskip("triton")
    s = TINY
    ops = count_ops(lambda: count_step(s, "triton"))
    names = [op.name for op in ops]
    assert "graphmoe_fused.triton_rounds" in names and "graphmoe_fused.rounds_backward" in names
    ops = count_step(s, "triton").ops
    assert not set(TRITON_ROUND_OPS) & {op.name for op in ops}
    base_bytes = s.tokens * s.intermediate * 4
    assert not [op for op in ops if op.name == "aten.zeros" and op.bytes >= base_bytes]


def test_report_names_every_target():
    pytest.importorskip("triton")
    text = report("tiny")
    assert "of 3 × the eager dense MLP" in text
    assert text.count("over triton:") == 4
    assert "saved for backward per token, triton / torch backend" in text


def test_triton_backend_keeps_no_more_for_backward_than_the_torch_backend():
    """At the headline shape (meta: no data), with the base products kept by both: the kernels
    rebuild the round inputs instead of keeping them (issue 8's memory target)."""
    pytest.importorskip("triton")
    s = SHAPES["llama3-8b"]
    triton_saved = count_step(s, "triton").saved_bytes
    torch_saved = count_step(s, "torch").saved_bytes
    assert 0 < triton_saved <= torch_saved
