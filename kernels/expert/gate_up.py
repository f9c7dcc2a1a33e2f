"""Gate/up side of the LoRA-expert SwiGLU: one pass over ``x`` for all ``k`` chosen experts.

For token ``m`` with chosen experts ``e_j`` and renormalised weights ``w_j`` (``j < k``)::

    gate_j = W_G x + c · B_G[e_j] (A_G[e_j] dropout(x))   up_j likewise
    h_j    = silu(gate_j) · up_j
    h_mix  = Σ_j w_j h_j                                   (written: [M, D'], x's dtype)
    a_mix[m, e_j·r : e_j·r + r] += w_j · A_D[e_j] · dropout(h_j)   (written: [M, n·r], fp32)

``W_D`` is linear, so the down side needs only ``h_mix`` for the base product and the rank-``r``
``a_mix`` for the LoRA: the ``k`` separate ``D'``-wide ``h_j`` never reach memory. ``a_mix`` is laid
out as the down kernel's masked-dense operand (each token's row holds its experts' routing-weighted
down-LoRA inputs in their experts' blocks, zeros elsewhere), so there the LoRA is just extra
K-steps of the base GEMM.

Two launches (three with ``deterministic=True``):

1. ``_lora_in_kernel``: ``a_gu = c · dropout(x) · [A_G; A_U]^T`` for *all* ``n`` experts
   (``[M, 2·n·R]``, fp32 accumulation, stored in x's dtype: the rounding it gets anyway as a
   tensor-core operand). That is ``n/k`` times the FLOPs of gathering only the chosen experts, but
   it is a plain dense GEMM (no gather, no sort), and at LLaMA-3-8B shapes it is < 1 % of the base
   gate/up work; folding it into the main kernel instead would redo it once per ``D'`` tile
   (112 times at D' = 14336).
2. ``_expert_gate_up_kernel``: a ``[BLOCK_M, BLOCK_N]`` tile of ``D'`` per program; the K-loop over
   ``d`` loads each ``x`` tile once for both base products. The epilogue adds each slot's LoRA delta
   as a *masked dense* product ``a_masked [BLOCK_M, n·R] @ B_cat^T [n·R, BLOCK_N]``: ``a_masked``
   is ``a_gu`` loaded with a mask that keeps only block ``e_j`` of each row (``R`` contiguous
   values; the rest reads as zero). Every token may pick a different expert; this keeps the
   per-token choice on tensor cores with the ``k`` slots sharing one pair of base products. The
   tile's rows are tokens in routing order (:mod:`.token_order`), so the product runs only over
   the chunks between the lowest and the highest expert the tile's slot chose: about one
   expert's block for the first slot, two for the second (instead of ``n``). Slot ``j`` turns
   slot ``j-1``'s gate and up into its own in place, taking ``j-1``'s delta out and its own in
   (linearity), so the base accumulators are never copied. The down LoRA's input uses the same
   trick on the output side:
   ``dropout(h_j) [BLOCK_M, BLOCK_N] @ A_D_cat^T [BLOCK_N, n·R]``, of which block ``e_j`` is kept
   (a ``[BLOCK_M, R]`` tile), weighted by ``w_j`` and added with one ``tl.atomic_add`` into the
   zeroed fp32 ``a_mix``. A program holds only its ``BLOCK_N`` slice of ``D'``, so the
   ``D'/BLOCK_N`` partial products must meet somewhere: the atomics add ``k·r`` floats per token
   per tile in L2, where per-tile partials would need ``D'/BLOCK_N`` times the memory plus a
   reduction pass. The fp32 summation order then varies between runs: ``a_mix`` is deterministic
   only to fp32 rounding. Both masked-dense products walk their columns in chunks of whole
   expert blocks (``LORA_CHUNK`` columns, or ``R`` if larger), so the epilogue's register
   footprint does not grow with ``n·r``.
3. ``deterministic=True`` only: the gate/up kernel stores each tile's ``[BLOCK_M, r]`` slot
   partials in a ``[D'/BLOCK_N, M, k·r]`` fp32 workspace instead, and ``_a_mix_reduce_kernel``
   sums them into ``a_mix`` in tile order: the same bits every run (round t+1's routing reads
   them), for the workspace's memory and traffic.

LoRA dropout (training): the keep-masks are a counter-based hash of (seed, round, stream, token,
column) (``kernels/dropout.py``, bit for bit the torch backends' ``lora_dropout_masks``), hashed
in registers where they apply: stream 0 on the ``x`` tiles as ``_lora_in_kernel`` loads them,
stream ``1 + j`` on slot ``j``'s ``h_j`` in the epilogue. No mask tensor and no ``dropout(x)``
exist in memory (at LLaMA-3-8B shapes the ``[M, k, D']`` mask was ~0.23 GB read per round).

Unsorted, the masked dense products would cost ``n·r`` instead of ``r`` MACs per slot and output
element; in routing order, about ``1.1·r`` for the first slot and ``1.8·r`` for the second at
n = 8, k = 2 with uniform routing (``python -m bench.roofline``). Past
``MAX_MASKED_DENSE_COLS`` the public functions raise ``ValueError``; a grouped (token-sorted) path,
such as the torch backend, wins there.

Layouts: the LoRA factors come in the kernel layout of :mod:`.layout` (``expert_lora_layout``).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..compile_spec import KernelSpec, variant_name
from ..dropout import drop_threshold, keep_mask, stream_key
from ..utils import (
    INTERPRET,
    INTERPRET_CONFIG,
    cast_rne,
    cfg,
    check_activation,
    check_like,
    check_ndim,
    dot_k,
    dot_k2,
    grouped_tile,
    interpreter_bf16,
    launch,
    load_tile,
    load_tile_t,
    mma,
    new_output,
    on_device_of,
    output_buffer,
    pinned_configs,
    prune_small_m,
    row_major_tile,
    store_rounded,
    tile_grid,
    tile_ids,
    tile_offsets,
    token_bucket,
    unit_stride_rows,
)
from .layout import ExpertLoRA, check_layout, check_routing, padded_rank
from .token_order import chunk_range, routing_order, tile_tokens

__all__ = ["GateUpOutput", "expert_gate_up", "expert_lora_in"]

# ---------------------------------------------------------------------------------------------
# 1. a_gu = c · x_lora · [A_G; A_U]^T, all experts.
# ---------------------------------------------------------------------------------------------

# Every config list below compiles without spills for both sm_80 (A100, mma.sync) and sm_90
# (H100, wgmma): the compile report builds each config for both, and autotune picks per GPU.
#
# Few output columns (2·n·R = 256 at the benchmark shape): one column tile should cover them all
# so x_lora is read once, and a small BLOCK_M keeps enough programs in flight to stream x_lora at
# full HBM bandwidth.
_LORA_IN_GPU = [
    cfg(64, 256, 32, 8, 4), cfg(64, 256, 64, 8, 3), cfg(64, 128, 64, 4, 4),
    cfg(128, 128, 64, 8, 3), cfg(32, 128, 64, 4, 4), cfg(32, 128, 128, 4, 3),
]
LORA_IN_CONFIGS = [INTERPRET_CONFIG] if INTERPRET else _LORA_IN_GPU


def _lora_in_prune(configs, named_args, **kwargs):
    kept = prune_small_m(configs, named_args, **kwargs)
    # A column tile much wider than all 2·n·R columns is pure padding.
    width = triton.next_power_of_2(named_args["N"])
    narrow = [c for c in kept if c.kwargs["BLOCK_N"] <= max(width, 64)]
    return narrow or kept


@triton.jit
def _lora_in_kernel(
    x_ptr, a_ptr, out_ptr, keys_ptr,
    M, N, K,
    stride_xm,
    scaling, dropout_scale,
    M_BUCKET,
    HAS_DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows, row_ok, cols, col_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DROPOUT:
        # dropout(x) made as each x tile arrives: the keep bits of stream 0 (the round input's)
        # are hashed from (token, column) in registers, so x_lora never exists in memory.
        threshold = tl.load(keys_ptr)
        key = tl.load(keys_ptr + 1)
        w_rows = cols.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            a = load_tile(x_ptr, rows, row_ok, stride_xm, k, K)
            keep = keep_mask(key, rows, k, threshold)
            # Rounded to x's dtype, as the torch side's x · keep · 1/(1-p) is: the same
            # operand bits as a materialised dropout(x) would give.
            a = cast_rne(tl.where(keep, a.to(tl.float32) * dropout_scale, 0.0), DTYPE,
                         INTERP_BF16)
            acc = mma(a, load_tile_t(a_ptr, w_rows, col_ok, K, k, K), acc, INTERP_BF16)
    else:
        acc = dot_k(acc, x_ptr, rows, row_ok, stride_xm, a_ptr, cols.to(tl.int64), col_ok, K, K,
                    K, BLOCK_K, INTERP_BF16)
    store_rounded(out_ptr, acc * scaling, rows, row_ok, N, cols, col_ok, INTERP_BF16)


_lora_in_tuned = triton.autotune(
    configs=LORA_IN_CONFIGS,
    key=["M_BUCKET", "N", "K", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _lora_in_prune},
)(_lora_in_kernel)


# ---------------------------------------------------------------------------------------------
# 2. The fused dual GEMM + per-slot LoRA + SwiGLU + weighted mix + down-LoRA input.
# ---------------------------------------------------------------------------------------------

# Through the k-slot epilogue the gate and up accumulators stay live next to the mixed h, the
# slot's h and the chunk being multiplied. Measured with the compile report: 64×128 tiles with 8
# warps are the largest that stay spill-free on sm_80 with triton 3.8-3.9 (3.6-3.7 spill 16-24 B;
# 128×64 spills a few registers there, though not on sm_90). x is shared by W_G and W_U, so a
# 64×128 dual tile reads as little per FLOP as a 64×256 single GEMM. LORA_CHUNK is how many
# masked-dense columns are multiplied at once: 32 spills on sm_80 at 64×128; 16 is one
# m16n8k16 / wgmma K-step. The small tiles (few tokens) are 16×64×64 and 32×64×32: 32×64×64
# spills 8 B on sm_90 with triton 3.6-3.7 (torch 2.11-2.12), 64×32×64 up to 24 B on sm_80, and
# 64×32×32 8 B on sm_80 without dropout (inference).
_GATE_UP_GPU = [
    cfg(64, 128, 64, 8, 3, LORA_CHUNK=16), cfg(64, 128, 32, 8, 4, LORA_CHUNK=16),
    cfg(64, 128, 32, 8, 3, LORA_CHUNK=16), cfg(64, 64, 64, 8, 3, LORA_CHUNK=16),
    cfg(64, 64, 32, 8, 4, LORA_CHUNK=16), cfg(16, 64, 64, 4, 4, LORA_CHUNK=16),
    cfg(32, 64, 32, 4, 4, LORA_CHUNK=16),
]
# Storing the base products too (SAVE_BASE) keeps two more tiles live across the K-loop's end:
# the 64×128×64 and 64×64×64 3-stage configs then spill 16-56 B on sm_80 (compile report), so
# they are left out.
_GATE_UP_SAVE_BASE_GPU = [_GATE_UP_GPU[i] for i in (1, 2, 4, 5, 6)]


def _gate_up_prune(configs, named_args, **kwargs):
    kept = prune_small_m(configs, named_args, **kwargs)
    if kwargs.get("SAVE_BASE"):
        allowed = [(c.kwargs, c.num_warps, c.num_stages) for c in _GATE_UP_SAVE_BASE_GPU]
        kept = [c for c in kept if (c.kwargs, c.num_warps, c.num_stages) in allowed] or kept
    return kept
GATE_UP_CONFIGS = (
    [triton.Config({**INTERPRET_CONFIG.kwargs, "LORA_CHUNK": 16}, num_warps=4, num_stages=1)]
    if INTERPRET else _GATE_UP_GPU
)


@triton.jit
def lora_delta(gate, up, experts, sign, rows, cols, N, a_gu_ptr, bg_ptr, bu_ptr,
               NUM_EXPERTS: tl.constexpr, R_PAD: tl.constexpr, CH: tl.constexpr,
               INTERP_BF16: tl.constexpr):
    """``gate += sign · a_g B_G`` and ``up += sign · a_u B_U`` for each row's expert in
    ``experts`` (``-1``: none) as masked-dense products: of the token's ``a_gu`` row only block
    ``e`` is read (``R`` contiguous values), over the chunks that hold the tile's experts
    (:func:`.token_order.chunk_range`). Shared by the forward and the backward kernels, so both
    derive the same ``gate_j, up_j``."""
    DTYPE: tl.constexpr = bg_ptr.dtype.element_ty
    NR: tl.constexpr = NUM_EXPERTS * R_PAD
    start, end = chunk_range(experts, NUM_EXPERTS, CH, R_PAD)
    for c0 in tl.range(start, end, CH, num_stages=1):
        lc = c0 + tl.arange(0, CH)
        blk = (lc // R_PAD)[None, :] == experts[:, None]
        a_ptrs = a_gu_ptr + rows[:, None] * (2 * NR) + lc[None, :]
        # The sign goes on in fp32 (exact): the interpreter holds bf16 as integers, which a
        # direct negation would corrupt.
        a_g = (tl.load(a_ptrs, mask=blk, other=0.0).to(tl.float32) * sign).to(DTYPE)
        a_u = (tl.load(a_ptrs + NR, mask=blk, other=0.0).to(tl.float32) * sign).to(DTYPE)
        lc64 = lc.to(tl.int64)
        gate = mma(a_g, load_tile(bg_ptr, lc64, lc < NR, N, cols, N), gate, INTERP_BF16)
        up = mma(a_u, load_tile(bu_ptr, lc64, lc < NR, N, cols, N), up, INTERP_BF16)
    return gate, up


@triton.jit
def _expert_gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, a_gu_ptr, bg_ptr, bu_ptr, ad_ptr, w_ptr, idx_ptr, keys_ptr,
    order_ptr, hmix_ptr, a_mix_ptr, ws_ptr, g_ptr, u_ptr,
    M, N, K,
    stride_xm, stride_wg, stride_wu, stride_hm,
    dropout_scale,
    M_BUCKET,
    RANK: tl.constexpr, R_PAD: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, SAVE_BASE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LORA_CHUNK: tl.constexpr,
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    NR: tl.constexpr = NUM_EXPERTS * R_PAD  # rows of the padded [n·R, ·] LoRA matrices
    # Chunks hold whole expert blocks: max(LORA_CHUNK, R_PAD) columns, EPC experts. The chunk
    # loops are not unrolled: unrolled, ptxas interleaves the chunks' loads and addresses and
    # the epilogue spills on sm_80.
    CH: tl.constexpr = LORA_CHUNK + (R_PAD - LORA_CHUNK) * (R_PAD > LORA_CHUNK)
    EPC: tl.constexpr = CH // R_PAD
    # Token-row offsets (int64 from tile_offsets) reach M·D': past 2^31 at LLaMA sizes; the
    # columns join them in 64-bit address arithmetic. pid_n indexes the deterministic path's
    # per-tile partials.
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    positions, _, offs_n, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    # The tile's tokens in routing order (.token_order): few experts per slot and tile.
    rows, mask_m = tile_tokens(order_ptr, positions, M)
    cols = offs_n.to(tl.int64)

    # ---- base products: each x tile loaded once for both W_G and W_U -------------------------
    acc_g, acc_u = dot_k2(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                          x_ptr, rows, mask_m, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu,
                          cols, mask_n, K, K, BLOCK_K, INTERP_BF16)
    if SAVE_BASE:
        # The base products, for a backward that reads them instead of recomputing them
        # (recompute_intermediates=False): [M, D'] each, rows of stride_hm like h_mix.
        store_rounded(g_ptr, acc_g, rows, mask_m, stride_hm, cols, mask_n, INTERP_BF16)
        store_rounded(u_ptr, acc_u, rows, mask_m, stride_hm, cols, mask_n, INTERP_BF16)

    # ---- per slot: LoRA delta, SwiGLU, mix, and the down LoRA's input -----------------------
    # Masked-dense column c is row c of the [n·R, ·] LoRA matrices: expert c // R_PAD. The delta
    # is linear in the masked operand, so slot j turns slot j-1's gate into its own in place
    # (lora_delta: j-1's out, j's in): the base accumulators need no second copy, two fewer live
    # fp32 tiles. Two loops rather than one over (a_j − a_{j−1}): each spans only its own
    # slot's experts, one or two neighbours in a sorted tile.
    gate = acc_g
    up = acc_u
    hmix = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ri = tl.arange(0, R_PAD)
    e_prev = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        e_j = tl.load(idx_ptr + rows * TOP_K + j, mask=mask_m, other=-1)
        # 32-bit ids keep the block masks in 32-bit registers; any id outside [0, n) becomes -1,
        # which matches no block.
        e_j = tl.where((e_j >= 0) & (e_j < NUM_EXPERTS), e_j, -1).to(tl.int32)
        w_j = tl.load(w_ptr + rows * TOP_K + j, mask=mask_m, other=0.0)
        # Slot j-1's LoRA delta out, slot j's in (linearity), over the chunks that hold the
        # tile's experts of each: zero terms when a slot repeats the previous expert.
        moved = e_prev != e_j
        gate, up = lora_delta(gate, up, tl.where(moved, e_prev, -1), -1.0, rows, cols, N,
                              a_gu_ptr, bg_ptr, bu_ptr, NUM_EXPERTS, R_PAD, CH, INTERP_BF16)
        gate, up = lora_delta(gate, up, tl.where(moved, e_j, -1), 1.0, rows, cols, N,
                              a_gu_ptr, bg_ptr, bu_ptr, NUM_EXPERTS, R_PAD, CH, INTERP_BF16)
        e_prev = e_j
        h = gate * tl.sigmoid(gate) * up
        hmix += w_j[:, None] * h
        if HAS_DROPOUT:
            # Slot j's keep bits (stream 1 + j) hashed from (token, column) in registers: no
            # [M, k, D'] mask is read (keys_ptr: threshold, stream 0's key, then the slots').
            keep = keep_mask(tl.load(keys_ptr + 2 + j), rows, cols, tl.load(keys_ptr))
            h = tl.where(keep, h * dropout_scale, 0.0)
        h = cast_rne(h, DTYPE, INTERP_BF16)
        # A_D[e] · h_j over this program's D' slice for every expert e, chunk by chunk; only block
        # e_j is kept (reshaped out of its chunk), so one [BLOCK_M, R] atomic per slot sums the
        # D' slices: an atomic per masked-dense column would cost n times the instructions and
        # addresses (sm_80 has no vector fp32 atomics).
        a_j = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        start, end = chunk_range(e_j, NUM_EXPERTS, CH, R_PAD)
        for c0 in tl.range(start, end, CH, num_stages=1):
            lc = c0 + tl.arange(0, CH)
            ad = load_tile_t(ad_ptr, lc.to(tl.int64), lc < NR, N, cols, N)  # [BLOCK_N, CH]
            part = mma(h, ad, tl.zeros((BLOCK_M, CH), dtype=tl.float32), INTERP_BF16)
            part = tl.reshape(part, (BLOCK_M, EPC, R_PAD))
            chunk_exp = c0 // R_PAD + tl.arange(0, EPC)
            part = tl.where(chunk_exp[None, :, None] == e_j[:, None, None], part, 0.0)
            a_j += tl.sum(part, axis=1)
        if DETERMINISTIC:
            # This tile's own partial of slot j, [M, k·r] per D' tile: plain stores of every
            # row and slot (zeros for an id outside [0, n)), summed in a fixed order by
            # _a_mix_reduce_kernel. No float atomics, so a_mix is the same bits every run.
            tl.store(ws_ptr + pid_n.to(tl.int64) * M * (TOP_K * RANK)
                     + rows[:, None] * (TOP_K * RANK) + j * RANK + ri[None, :],
                     a_j * w_j[:, None], mask=mask_m[:, None] & (ri < RANK)[None, :])
        else:
            tl.atomic_add(a_mix_ptr + rows[:, None] * (NUM_EXPERTS * RANK)
                          + (tl.maximum(e_j, 0) * RANK)[:, None] + ri[None, :],
                          a_j * w_j[:, None], mask=(e_j >= 0)[:, None] & (ri < RANK)[None, :],
                          sem="relaxed")

    store_rounded(hmix_ptr, hmix, rows, mask_m, stride_hm, cols, mask_n, INTERP_BF16)


_expert_gate_up_tuned = triton.autotune(
    configs=GATE_UP_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "NUM_EXPERTS", "TOP_K", "HAS_DROPOUT", "DETERMINISTIC",
         "SAVE_BASE"],
    prune_configs_by={"early_config_prune": _gate_up_prune},
    # Benchmarking launches the kernel repeatedly; the atomics must start from zero each time.
    # (The deterministic path does not read a_mix: its reduction overwrites it afterwards.)
    reset_to_zero=["a_mix_ptr"],
)(_expert_gate_up_kernel)


# ---------------------------------------------------------------------------------------------
# 3. Deterministic a_mix: the per-D'-tile partials summed in a fixed order.
# ---------------------------------------------------------------------------------------------

# A read of ~num_tiles · k·r floats per token, written once as n·r: memory-bound and small next
# to the gate/up kernel; one config, no tuning (nothing here multiplies matrices).
_REDUCE_GPU = triton.Config({"BLOCK_M": 32, "BLOCK_C": 64}, num_warps=4, num_stages=1)
REDUCE_CONFIG = (triton.Config({"BLOCK_M": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)
                 if INTERPRET else _REDUCE_GPU)


@triton.jit
def _a_mix_reduce_kernel(
    ws_ptr, idx_ptr, a_mix_ptr,
    M, NUM_TILES,
    RANK: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``a_mix[m, e·r + i] = Σ_j [e_j = e] Σ_t ws[t, m, j, i]``, every element written (zeros
    in the blocks of experts the token did not choose), tiles summed in order 0, 1, ..."""
    NR: tl.constexpr = NUM_EXPERTS * RANK
    rows, row_ok, cols, col_ok = row_major_tile(M, NR, BLOCK_M, BLOCK_C)
    col_expert = cols // RANK
    col_rank = cols % RANK
    row_stride: tl.constexpr = TOP_K * RANK
    tile_stride = M * row_stride  # one tile's M·k·r partials: < 2^31, added to the pointers
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e_j = tl.load(idx_ptr + rows * TOP_K + j, mask=row_ok, other=-1)
        # Only block e_j of the row is read; an id outside [0, n) matches no block.
        take = (row_ok[:, None] & col_ok[None, :]) & (col_expert[None, :] == e_j[:, None])
        ptrs = ws_ptr + rows[:, None] * row_stride + j * RANK + col_rank[None, :]
        part = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for _ in range(0, NUM_TILES):
            part += tl.load(ptrs, mask=take, other=0.0)
            ptrs += tile_stride
        acc += part
    tl.store(a_mix_ptr + rows[:, None] * NR + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------


def dropout_keys(dropout_p: float, dropout_seed: int, round_index: int, top_k: int,
                 device: torch.device) -> torch.Tensor | None:
    """What the kernels hash their dropout masks with, as an int64 tensor on ``device``:
    ``[threshold, key of stream 0 (x_t), key of stream 1 (slot 0), ..., stream k]``, or
    ``None`` without dropout (``kernels.dropout``: the same masks as the torch backends').

    A tensor rather than scalar arguments: Triton specialises an int argument on its value
    (``== 1``, divisibility by 16, i32 or i64 range), so a key or threshold passed as a scalar
    would compile the kernels again for some seeds. The tensor's contents never reach a
    signature; its H2D copy is a few bytes per round.
    """
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a number, got {type(dropout_p).__name__}")
    for name, value in (("dropout_seed", dropout_seed), ("round_index", round_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    threshold = drop_threshold(dropout_p)  # ValueError outside [0, 1)
    if not 0 <= round_index < 1 << 16:
        raise ValueError(f"round_index={round_index} must be in [0, 65536)")
    if dropout_p == 0:
        return None
    values = [threshold] + [stream_key(dropout_seed, round_index, s) for s in range(1 + top_k)]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _launch_lora_in(x_lora: torch.Tensor, a_in: torch.Tensor, out: torch.Tensor,
                    scaling: float, keys: torch.Tensor | None, dropout_scale: float,
                    config: triton.Config | None = None) -> None:
    num_tokens, hidden = x_lora.shape
    width = out.shape[1]
    launch(
        _lora_in_tuned, _lora_in_kernel, tile_grid(num_tokens, width, "BLOCK_N"),
        (x_lora, a_in, out, keys if keys is not None else out,  # never read without dropout
         num_tokens, width, hidden, x_lora.stride(0), float(scaling), float(dropout_scale),
         token_bucket(num_tokens)),
        {"HAS_DROPOUT": keys is not None, "INTERP_BF16": interpreter_bf16(x_lora.dtype)},
        config,
    )


def _launch_gate_up(x, gate_weight, up_weight, a_gu, lora: ExpertLoRA, weights, index, keys,
                    order, h_mix, a_mix, workspace, dropout_scale,
                    config: triton.Config | None = None,
                    base: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """Launches the fused kernel; returns the ``BLOCK_N`` it ran with (the deterministic
    path's reduction needs the number of ``D'`` tiles)."""
    num_tokens, hidden = x.shape
    inter = gate_weight.shape[0]
    tiles = tile_grid(num_tokens, inter, "BLOCK_N")
    used: dict[str, int] = {}

    def grid(meta):
        # Every launch evaluates the grid, the autotuner's benchmarking runs before the final
        # one: the last BLOCK_N seen is the one the outputs come from (kept per call, where the
        # autotuner's best_config is shared by all callers).
        used["BLOCK_N"] = meta["BLOCK_N"]
        return tiles(meta)

    launch(
        _expert_gate_up_tuned, _expert_gate_up_kernel, grid,
        (
            x, gate_weight, up_weight, a_gu, lora.b_gate, lora.b_up, lora.a_down, weights, index,
            keys if keys is not None else a_mix,  # never read without dropout
            order, h_mix, a_mix,
            workspace if workspace is not None else a_mix,  # written only when deterministic
            *(base if base is not None else (h_mix, h_mix)),  # written only with SAVE_BASE
            num_tokens, inter, hidden,
            x.stride(0), gate_weight.stride(0), up_weight.stride(0), h_mix.stride(0),
            float(dropout_scale),
            token_bucket(num_tokens),
        ),
        {
            "RANK": lora.rank, "R_PAD": padded_rank(lora.rank), "NUM_EXPERTS": lora.num_experts,
            "TOP_K": index.shape[1], "HAS_DROPOUT": keys is not None,
            "DETERMINISTIC": workspace is not None, "SAVE_BASE": base is not None,
            "INTERP_BF16": interpreter_bf16(x.dtype),
        },
        config,
    )
    return used["BLOCK_N"]


def _launch_reduce(workspace: torch.Tensor, index: torch.Tensor, a_mix: torch.Tensor,
                   num_tiles: int, lora: ExpertLoRA) -> None:
    num_tokens, top_k = index.shape
    width = a_mix.shape[1]
    launch(
        None, _a_mix_reduce_kernel, tile_grid(num_tokens, width, "BLOCK_C"),
        (workspace, index, a_mix, num_tokens, num_tiles),
        {"RANK": lora.rank, "NUM_EXPERTS": lora.num_experts, "TOP_K": top_k},
        REDUCE_CONFIG,
    )


def partials_workspace(num_tiles: int, num_tokens: int, width: int,
                       device: torch.device) -> torch.Tensor:
    """The deterministic path's ``[num_tiles, M, k·r]`` fp32 partials (NaN-poisoned in the
    tests, like every kernel output; a module function so a test can look at it)."""
    return new_output((num_tiles, num_tokens, width), torch.float32, device)


# ---------------------------------------------------------------------------------------------
# The public functions.
# ---------------------------------------------------------------------------------------------

def _dropout_scale(keys: torch.Tensor | None, dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p) if keys is not None else 1.0


@on_device_of("x_lora")
def expert_lora_in(x_lora: torch.Tensor, lora: ExpertLoRA, scaling: float, *,
                   dropout_p: float = 0.0, dropout_seed: int = 0, round_index: int = 0,
                   out: torch.Tensor | None = None,
                   config: triton.Config | None = None) -> torch.Tensor:
    """Scaled rank-``r`` inputs of every expert's gate and up LoRA: ``c · dropout(x) · A^T``.
    Runs on ``x_lora``'s device.

    Args:
        x_lora: ``[M, d]`` the gate/up LoRA's input *before* dropout (the round input ``x_t``),
            fp16/bf16/fp32.
        lora: the experts' factors from :func:`expert_lora_layout`, ``x_lora``'s dtype.
        scaling: ``c = lora_alpha / r``, folded in here so the gate/up kernel need not.
        dropout_p, dropout_seed, round_index: LoRA dropout. With ``dropout_p > 0`` the input is
            ``x_lora · keep / (1 − p)``, rounded to ``x_lora``'s dtype, with ``keep`` the
            round's stream-0 mask of ``kernels.dropout`` (bit for bit
            ``graphmoe_fused.backends.dropout.lora_dropout_masks(seed, round, ...)[0]``),
            evaluated as the tiles are loaded: no mask and no ``dropout(x)`` in memory.
        out: optional contiguous ``[M, 2·n·R]`` buffer of ``x_lora``'s dtype (``R``: the rank
            rounded up to a power of two).
        config: pins the block shape (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``)
            instead of autotuning it, so tests reach shapes the single interpreter config does
            not.
    Returns:
        ``[M, 2·n·R]`` in ``x_lora``'s dtype (accumulated in fp32): column ``e·R + i`` is
        ``c · A_G[e, i] · dropout(x_lora)``, column ``n·R + e·R + i`` the same for ``A_U``;
        padded ranks are zero.
    Raises:
        TypeError / ValueError: on a dtype, shape or device mismatch, or dropout arguments out
        of range (``0 <= dropout_p < 1``, ``0 <= round_index < 65536``).
    """
    check_activation("x_lora", x_lora)
    keys = dropout_keys(dropout_p, dropout_seed, round_index, 0, x_lora.device)
    return _lora_in(x_lora, lora, scaling, keys, _dropout_scale(keys, dropout_p), out, config)


def _lora_in(x_lora: torch.Tensor, lora: ExpertLoRA, scaling: float,
             keys: torch.Tensor | None, dropout_scale: float, out: torch.Tensor | None,
             config: triton.Config | None) -> torch.Tensor:
    """:func:`expert_lora_in` once ``x_lora`` is checked and the dropout keys are made (the
    gate/up function shares its keys tensor with its own launch)."""
    num_tokens, hidden = x_lora.shape
    if not isinstance(lora, ExpertLoRA):
        raise TypeError(f"lora must be an ExpertLoRA, got {type(lora).__name__}")
    n, padded = lora.num_experts, padded_rank(lora.rank)
    check_like("lora.a_in", lora.a_in, (2, n, padded, hidden), x_lora, x_lora.dtype)
    out = output_buffer("out", out, (num_tokens, 2 * n * padded), x_lora, x_lora.dtype,
                        contiguous=True)
    if num_tokens > 0:
        _launch_lora_in(unit_stride_rows(x_lora), lora.a_in.contiguous(), out, scaling, keys,
                        dropout_scale, config)
    return out


class GateUpOutput(NamedTuple):
    """What :func:`expert_gate_up` returns."""

    h_mix: torch.Tensor  # [M, D'], x's dtype: Σ_j w_j h_j
    a_mix: torch.Tensor  # [M, n·r], fp32: Σ_j w_j A_D[e_j] dropout(h_j) in block e_j


@on_device_of("x")
def expert_gate_up(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    lora: ExpertLoRA,
    expert_weights: torch.Tensor,
    expert_index: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    round_index: int = 0,
    deterministic: bool = False,
    sort_tokens: bool = True,
    out: torch.Tensor | None = None,
    a_mix_out: torch.Tensor | None = None,
    base_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    configs: dict[str, triton.Config] | None = None,
) -> GateUpOutput:
    """Mixed SwiGLU activation of the chosen LoRA experts, and the down LoRA's rank-``r`` input.

    Per token ``m`` and slot ``j`` (expert ``e_j = expert_index[m, j]``, weight
    ``w_j = expert_weights[m, j]``)::

        gate_j = W_G x + c · B_G[e_j] A_G[e_j] dropout(x),  up_j likewise,
        h_j = silu(gate_j) · up_j
        h_mix[m] = Σ_j w_j h_j
        a_mix[m, e·r + i] = Σ_{j: e_j = e} w_j · (A_D[e] · dropout(h_j))[i]   (0 for other e)

    where ``dropout(t) = t ⊙ keep / (1 − p)`` with the keep-masks of
    ``graphmoe_fused.backends.dropout.lora_dropout_masks(dropout_seed, round_index, ...)``
    (stream 0 for ``x``, stream ``1 + j`` for slot ``j``), bit for bit, hashed in registers
    where the kernels need them: no mask tensor exists; without dropout ``dropout(t) = t``.
    Accumulation is fp32 throughout and the ``k`` separate ``h_j`` never reach memory. Two
    launches (three when ``deterministic``): :func:`expert_lora_in` for the rank-``r`` inputs,
    then the fused kernel. Runs on ``x``'s device.

    Args:
        x: ``[M, d]`` round input, fp16/bf16/fp32 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        gate_weight, up_weight: ``[D', d]`` frozen base projections, ``x``'s dtype.
        lora: the experts' LoRA factors from :func:`expert_lora_layout`, ``x``'s dtype.
        expert_weights: ``[M, k]`` renormalised routing weights (used as fp32).
        expert_index: ``[M, k]`` integer expert ids. They are not range-checked on the host
            (that would synchronise with the device): an id outside ``[0, n)`` adds no LoRA term.
            Repeated ids within a token are fine.
        scaling: ``c = lora_alpha / r``.
        dropout_p: LoRA dropout probability in ``[0, 1)``; 0 (the default) is no dropout.
        dropout_seed: the forward's dropout seed (any int; ``RoundOptions.dropout_seed``).
        round_index: the round ``t`` in ``[0, 65536)``: each round draws its own masks.
        deterministic: ``False``: the ``D'`` tiles add their parts of ``a_mix`` with fp32
            atomics, whose order (and so the last bits of ``a_mix``, and through the next
            round's routing possibly more) varies run to run. ``True``: each tile writes its
            partial to a ``[num_tiles, M, k·r]`` fp32 workspace and a third launch sums them in a
            fixed order: the same bits every run for a given block config (autotuning picks the
            config per process; pin ``configs`` for bit-identity across processes). Costs the
            workspace (``cdiv(D', min BLOCK_N)·M·k·r`` floats, freed on return) and its
            traffic.
        sort_tokens: visit the tokens in routing order (:mod:`.token_order`), so that each
            tile multiplies only the LoRA blocks of the experts its rows chose; ``False``
            visits them in order (the same bits of every output: for comparisons).
        out: optional ``[M, D']`` buffer (``x``'s dtype, unit column stride) for ``h_mix``.
        a_mix_out: optional contiguous ``[M, n·r]`` fp32 buffer for ``a_mix`` (every element
            is written).
        base_out: optional pair of ``[M, D']`` buffers (``x``'s dtype, the row stride of
            ``out``) that receive the base products ``W_G x`` and ``W_U x`` before any LoRA
            delta: what a backward that does not recompute them reads (two more stores per
            tile, no extra FLOPs).
        configs: pins the block shapes of the two launches instead of autotuning them, so
            tests reach shapes the single interpreter config does not: ``"lora_in"`` (see
            :func:`expert_lora_in`) and ``"gate_up"`` (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
            ``GROUP_M`` and ``LORA_CHUNK``, the masked-dense columns multiplied at once: a
            power of two ≥ 16, raised to ``R`` when the padded rank is larger).
    Returns:
        ``GateUpOutput(h_mix, a_mix)``.
    Raises:
        TypeError / ValueError: on a dtype, shape or device mismatch, dropout arguments out of
        range, and ``ValueError`` when ``n·r`` is past the masked-dense limit
        ``MAX_MASKED_DENSE_COLS``.
    """
    configs = pinned_configs(configs, ("lora_in", "gate_up"))
    num_tokens, hidden = check_activation("x", x)
    dt = x.dtype
    inter, _ = check_ndim("gate_weight", gate_weight, 2, "[D', d]")
    check_like("gate_weight", gate_weight, (inter, hidden), x, dt)
    check_like("up_weight", up_weight, (inter, hidden), x, dt)
    check_layout(lora, x, hidden, inter)
    top_k = check_routing(expert_weights, expert_index, x, lora.num_experts)
    for name, flag in (("deterministic", deterministic), ("sort_tokens", sort_tokens)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    keys = dropout_keys(dropout_p, dropout_seed, round_index, top_k, x.device)
    dropout_scale = _dropout_scale(keys, dropout_p)

    out = output_buffer("out", out, (num_tokens, inter), x, dt)
    if base_out is not None:
        if not isinstance(base_out, (tuple, list)) or len(base_out) != 2:
            raise TypeError("base_out must be a pair of [M, D'] buffers (gate, up) or None")
        for name, buf in zip(("base_out[0]", "base_out[1]"), base_out, strict=True):
            check_like(name, buf, (num_tokens, inter), x, dt)
            if inter > 1 and (buf.stride(1) != 1 or buf.stride(0) != out.stride(0)):
                raise ValueError(f"{name} must have unit column stride and out's row stride")
    a_mix = output_buffer("a_mix_out", a_mix_out, (num_tokens, lora.num_experts * lora.rank),
                          x, torch.float32, contiguous=True)
    if num_tokens == 0:
        return GateUpOutput(out, a_mix)

    workspace = None
    if deterministic:
        # Sized for the narrowest column tile the launch may pick (autotuning picks it inside
        # the launch); only the first cdiv(D', BLOCK_N) tiles are written and read.
        pinned = configs.get("gate_up")
        block_n = min(c.kwargs["BLOCK_N"] for c in ([pinned] if pinned else GATE_UP_CONFIGS))
        workspace = partials_workspace(triton.cdiv(inter, block_n), num_tokens,
                                       top_k * lora.rank, x.device)
    else:
        a_mix.zero_()  # the atomics add into it, whoever allocated it
    a_gu = _lora_in(x, lora, scaling, keys, dropout_scale, None, configs.get("lora_in"))
    index = expert_index.contiguous()
    block_n = _launch_gate_up(
        unit_stride_rows(x), unit_stride_rows(gate_weight), unit_stride_rows(up_weight), a_gu,
        lora, expert_weights.to(torch.float32).contiguous(), index, keys,
        routing_order(index, sort_tokens), out, a_mix, workspace, dropout_scale,
        configs.get("gate_up"),
        None if base_out is None else tuple(base_out),
    )
    if workspace is not None:
        _launch_reduce(workspace, index, a_mix, triton.cdiv(inter, block_n), lora)
    return GateUpOutput(out, a_mix)


# ---------------------------------------------------------------------------------------------
# What the compile report builds: the llama3-8b shape of design.md §4 (d=4096, D'=14336, n=8, k=2,
# r=16, 8192 tokens, bf16).
# ---------------------------------------------------------------------------------------------

_NUM_EXPERTS, _RANK, _TOP_K = 8, 16, 2
_LORA_IN_TYPES = {
    "x_ptr": "*bf16", "a_ptr": "*bf16", "out_ptr": "*bf16", "keys_ptr": "*i64", "M": "i32",
    "N": "i32", "K": "i32", "stride_xm": "i32", "scaling": "fp32", "dropout_scale": "fp32",
    "M_BUCKET": "i32",
}
_LORA_IN_ALIGNED = ("x_ptr", "a_ptr", "out_ptr", "keys_ptr", "M", "N", "K", "stride_xm",
                    "M_BUCKET")
_GATE_UP_TYPES = {
    "x_ptr": "*bf16", "wg_ptr": "*bf16", "wu_ptr": "*bf16", "a_gu_ptr": "*bf16",
    "bg_ptr": "*bf16", "bu_ptr": "*bf16", "ad_ptr": "*bf16", "w_ptr": "*fp32", "idx_ptr": "*i64",
    "keys_ptr": "*i64", "order_ptr": "*i32", "hmix_ptr": "*bf16", "a_mix_ptr": "*fp32",
    "ws_ptr": "*fp32", "g_ptr": "*bf16", "u_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
    "stride_xm": "i32", "stride_wg": "i32", "stride_wu": "i32", "stride_hm": "i32",
    "dropout_scale": "fp32", "M_BUCKET": "i32",
}
_GATE_UP_ALIGNED = ("x_ptr", "wg_ptr", "wu_ptr", "a_gu_ptr", "bg_ptr", "bu_ptr", "ad_ptr",
                    "w_ptr", "idx_ptr", "keys_ptr", "order_ptr", "hmix_ptr", "a_mix_ptr",
                    "ws_ptr", "g_ptr", "u_ptr", "M", "N", "K", "stride_xm", "stride_wg",
                    "stride_wu", "stride_hm", "M_BUCKET")
_GATE_UP_SHAPE = {"RANK": _RANK, "R_PAD": padded_rank(_RANK), "NUM_EXPERTS": _NUM_EXPERTS,
                  "TOP_K": _TOP_K, "INTERP_BF16": False}


COMPILE_SPECS = [
    KernelSpec(
        name="expert.lora_in",
        fn=_lora_in_kernel,
        types=_LORA_IN_TYPES,
        constexprs={"HAS_DROPOUT": False, "INTERP_BF16": False},
        configs=_LORA_IN_GPU,
        aligned=_LORA_IN_ALIGNED,
        note="c · x_lora · [A_G; A_U]^T for all 8 experts (256 columns)",
    ),
    KernelSpec(
        name="expert.lora_in",
        fn=_lora_in_kernel,
        types=_LORA_IN_TYPES,
        constexprs={"HAS_DROPOUT": True, "INTERP_BF16": False},
        configs=_LORA_IN_GPU,
        aligned=_LORA_IN_ALIGNED,
        note="training variant: the x dropout mask hashed in registers as x tiles load",
    ),
    # Every combination of the switches a user flips (ptxas's register allocation does not carry
    # from one to another): dropout (training) or none (inference, or lora_dropout=0), the
    # base products stored for backward or not, atomic or deterministic a_mix.
    *(KernelSpec(
        name=variant_name("expert.gate_up", *["no dropout"] * (not dropout),
                          *["save_base"] * save_base, *["deterministic"] * deterministic),
        fn=_expert_gate_up_kernel,
        types=_GATE_UP_TYPES,
        constexprs={**_GATE_UP_SHAPE, "HAS_DROPOUT": dropout, "DETERMINISTIC": deterministic,
                    "SAVE_BASE": save_base},
        configs=_GATE_UP_SAVE_BASE_GPU if save_base else _GATE_UP_GPU,
        aligned=_GATE_UP_ALIGNED,
        note="dual gate/up GEMM + per-slot masked-dense LoRA + SwiGLU + mix + A_D products"
             + (", the h dropout masks hashed in registers" if dropout else ", no dropout")
             + (", W_G x and W_U x stored" if save_base else "")
             + (", per-tile a_mix partials (no atomics)" if deterministic else
                ", a_mix atomics"),
    ) for dropout, save_base, deterministic in itertools.product((True, False), repeat=3)),
    KernelSpec(
    name="expert.a_mix_reduce",
    fn=_a_mix_reduce_kernel,
    types={"ws_ptr": "*fp32", "idx_ptr": "*i64", "a_mix_ptr": "*fp32", "M": "i32",
           "NUM_TILES": "i32"},
    constexprs={"RANK": _RANK, "NUM_EXPERTS": _NUM_EXPERTS, "TOP_K": _TOP_K},
    configs=[_REDUCE_GPU],
    aligned=("ws_ptr", "idx_ptr", "a_mix_ptr", "M"),
    tensor_cores=False,
    note="a_mix = Σ over D' tiles of the deterministic partials, fixed order",
    ),
]
