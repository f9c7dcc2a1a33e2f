"""The training-round roofline (``python -m bench.roofline``) counts what it says it counts."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.roofline import (
    GPUS,
    GRU_TOKEN_GROUPS,
    LORA_CHUNK,
    ORDERS,
    ROUTING_SEED,
    TILE_COLS,
    TILE_ROWS,
    TORCH_OPS,
    LoraColumns,
    compare_kernels,
    dense_round,
    gemm,
    gpu_spec,
    graphmoe_round,
    lora_columns,
    report,
    step_floor,
)
from bench.shapes import SHAPES


def test_dense_baseline_is_six_gemm_units():
    s = SHAPES["llama3-8b"]
    unit = gemm(s.tokens, s.intermediate, s.d)
    assert unit == 2 * 8192 * 14336 * 4096
    assert sum(k.flops for k in dense_round(s)) == 6 * unit


def lora_flops(s, recompute: bool, order: str) -> float:
    unit = gemm(s.tokens, s.intermediate, s.d)
    base = sum(k.flops for k in graphmoe_round(s, recompute, order)
               if not k.name.startswith(("GRU", "router", "lora_in")))
    return base - (8 if recompute else 6) * unit


def test_base_gemm_units_of_a_graphmoe_round():
    # Everything but the rank-r and GRU products: 6 base GEMM units with G and U saved, 8 with
    # them recomputed; the LoRA products on top do not depend on that choice.
    s = SHAPES["llama3-8b"]
    unit = gemm(s.tokens, s.intermediate, s.d)
    for order in ORDERS:
        assert lora_flops(s, False, order) == lora_flops(s, True, order), order
    # Grouped (one expert's r columns per slot), counted by hand in [m, r] × [r, D'] products:
    # the gate/up deltas are 2 for slot 0 (gate, up in) and 4 for each later slot (the previous
    # slot's out, its own in): 2(2k − 1) per kernel that derives them. Forward: the deltas and
    # A_D (k); gate/up backward: the deltas, A_Dᵀ b, d a_g, d a_u (3k); weight gradients: the
    # deltas, A_Dᵀ b, ∂B_G, ∂B_U, ∂A_D (4k). Then the down kernel's dense n·r product (B_D;
    # the backward's b runs in lora_in, left out with it) and the ones over the slots' union of
    # k·r columns (∂B_D, dx's two A paths).
    m, d, f, n, k, r = s.tokens, s.d, s.intermediate, s.num_experts, s.top_k, s.lora_r
    deltas = 2 * (2 * k - 1)
    expected = (3 * deltas + k + 3 * k + 4 * k) * gemm(m, f, r)
    expected += gemm(m, d, n * r) + gemm(m, k * r, d) + 2 * gemm(m, d, 2 * k * r)
    assert abs(lora_flops(s, False, "grouped") - expected) < 1e-9 * expected
    # Tokens in their order: every 32- or 64-row tile holds all 8 experts in each slot, so the
    # loops run over nearly all n·r columns: more than a base GEMM unit on top.
    assert 1.0 * unit < lora_flops(s, False, "tokens") < 1.2 * unit
    # Sorted: within 25 % of the grouped ideal.
    assert lora_flops(s, False, "grouped") < lora_flops(s, False, "routing") \
        < 1.25 * lora_flops(s, False, "grouped")


def kernel_loop_columns(index, tile_rows: int, r_pad: int, chunk: int, n: int):
    """The chunk loops of kernels/expert/token_order.py, run literally on each tile: per slot
    ``range(start, end, chunk)`` from chunk_range, and for the union every chunk of
    ``range(0, n·r_pad, chunk)`` that slots_use_chunk keeps."""
    k = index.shape[1]
    slot, union, tiles = [0] * k, 0, 0
    for tile in index.split(tile_rows):
        tiles += 1
        for j in range(k):
            first, last = int(tile[:, j].min()), int(tile[:, j].max())
            slot[j] += len(range(first * r_pad // chunk * chunk, (last + 1) * r_pad, chunk))
        for c0 in range(0, n * r_pad, chunk):
            lo, hi = c0 // r_pad, (c0 + chunk - 1) // r_pad
            union += bool(((tile >= lo) & (tile <= hi)).any())
    return [x * chunk / tiles for x in slot], union * chunk / tiles


@pytest.mark.parametrize("rank", [4, 16, 64])
def test_lora_columns_are_the_kernels_chunk_loops(rank):
    # r = 4: four experts per 16-wide chunk; r = 64: four chunks per expert.
    s = replace(SHAPES["llama3-8b"], tokens=1000, lora_r=rank)
    g = torch.Generator().manual_seed(ROUTING_SEED)
    index = torch.rand(s.tokens, s.num_experts, generator=g).argsort(dim=1)[:, :s.top_k]
    key = index[:, 0] * s.num_experts + index[:, 1]
    for order, tokens in (("tokens", index), ("routing", index[key.argsort(stable=True)])):
        got = lora_columns(s, 64, order)
        slot, union = kernel_loop_columns(tokens, 64, rank, LORA_CHUNK, s.num_experts)
        assert got.slot == pytest.approx(slot) and got.union == pytest.approx(union), order
    assert lora_columns(s, 64, "grouped") == LoraColumns((float(rank),) * 2, 2.0 * rank)


def test_tile_shapes_are_the_kernels_first_gpu_configs():
    from kernels.expert import backward, gate_up
    from kernels.gru.lowrank_gru_backward import TOKEN_GROUPS

    firsts = {"gate_up": gate_up._GATE_UP_GPU, "gate_up_backward": backward._GATE_UP_BWD_GPU,
              "gate_up_wgrad": backward._WGRAD_GPU, "dx": backward._DX_GPU}
    for name, configs in firsts.items():
        assert TILE_ROWS[name] == configs[0].kwargs["BLOCK_M"], name
        assert all(c.kwargs["LORA_CHUNK"] == LORA_CHUNK for c in configs), name
        if name in TILE_COLS:
            assert TILE_COLS[name] == configs[0].kwargs["BLOCK_N"], name
    # Training keeps the base products by default: the forward runs its SAVE_BASE list.
    assert gate_up._GATE_UP_SAVE_BASE_GPU[0].kwargs["BLOCK_N"] == TILE_COLS["gate_up"]
    assert TOKEN_GROUPS == GRU_TOKEN_GROUPS


def test_atomics_of_the_weight_gradient_kernel_by_hand():
    # 8192 tokens in 32-row tiles; per tile, each slot's loops visit its chunks (16 columns
    # each) and add a [16, D'] fp32 block to each of ∂B_G, ∂B_U, ∂A_D per chunk.
    s = SHAPES["llama3-8b"]
    (wgrad,) = [k for k in graphmoe_round(s, False) if k.launches == ("_gate_up_wgrad_kernel",)]
    columns = sum(lora_columns(s, 32, "routing").slot)
    assert wgrad.atomics == pytest.approx(8192 / 32 * columns * 3 * 14336 * 4)
    assert wgrad.atomics > 2 * wgrad.bytes  # the reason the column is there


def test_report_prints_every_gpu_and_both_modes():
    text = report("llama3-8b")
    for gpu in GPUS:
        assert f"({gpu})" in text
    assert "recompute_intermediates=False" in text and "recompute_intermediates=True" in text


def test_every_kernel_the_package_launches_has_a_roofline_row():
    # A new kernel without a row would land among the torch ops of bench.gpu_check's profile,
    # its time set against no floor.
    root = Path(__file__).resolve().parents[1] / "kernels"
    jitted = {name for path in root.rglob("*.py") for name in
              re.findall(r"@triton\.jit\s+def (\w+)\(", path.read_text(encoding="utf-8"))
              if name.endswith("_kernel")}
    assert len(jitted) >= 17
    named = {n for row in graphmoe_round(SHAPES["llama3-8b"], False) for n in row.launches}
    assert named == jitted


def test_profiled_kernels_are_set_against_the_rows_that_name_them():
    s = replace(SHAPES["llama3-8b"], num_rounds=3)
    rows = graphmoe_round(s, False)
    measured = {"_lora_in_kernel": (9, 3e-4), "_dx_kernel": (3, 6e-3),
                "_dh_base_kernel_0d1d2d3": (3, 3e-3),  # an older triton's specialised name
                "sm90_xmma_gemm_bf16bf16": (4, 1e-4), "Memset (Device)": (20, 2e-5)}
    groups = {g.name: g for g in compare_kernels(rows, "H100", 3, measured)}
    # lora_in runs in forward and again in backward: one group, both rows' floors, 3 rounds.
    lora = groups["_lora_in_kernel"]
    assert len(lora.rows) == 2 and (lora.calls, lora.measured_s) == (9, 3e-4)
    assert lora.floor_s == pytest.approx(
        3 * sum(r.floor("H100") for r in rows if r.launches == ("_lora_in_kernel",)))
    assert groups["_dh_base_kernel"].calls == 3
    dx = groups["_dx_kernel"]
    assert dx.ratio == pytest.approx(6e-3 / dx.floor_s)
    # The rest (cuBLAS, memsets) against the rows no kernel of ours does, the GRU's W_g
    # backward (between rounds: T - 1 times) and the router's backward; last in the list.
    torch_ops = list(groups.values())[-1]
    assert torch_ops.name == TORCH_OPS and (torch_ops.calls, torch_ops.measured_s) == (24, 1.2e-4)
    no_launch = [r for r in rows if not r.launches]
    assert {r.between_rounds for r in no_launch} == {True, False}
    assert torch_ops.floor_s == pytest.approx(step_floor(no_launch, "H100", 3))
    # Nothing measured: no ratio; the groups' floors add up to the step's; the weight gradients'
    # atomics once per round.
    wgrad = groups["_gate_up_wgrad_kernel"]
    assert wgrad.ratio is None
    (row,) = [r for r in rows if r.launches == ("_gate_up_wgrad_kernel",)]
    assert wgrad.atomics == pytest.approx(3 * row.atomics) and torch_ops.atomics == 0
    assert sum(g.floor_s for g in groups.values()) == pytest.approx(step_floor(rows, "H100", 3))
    assert sum(g.calls for g in groups.values()) == sum(c for c, _ in measured.values())


@pytest.mark.parametrize(("device", "spec"), [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L4", None)])
def test_gpu_spec_from_the_device_name(device, spec):
    assert gpu_spec(device) == spec
