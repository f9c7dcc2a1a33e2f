"""Backward of one MoE round of the LoRA-expert SwiGLU: ``∂L/∂x``, ``∂L/∂w`` and all six LoRA
gradients from ``dy = ∂L/∂y``, in four kinds of launch, none of which writes a per-slot
``D'``-wide tensor.

For token ``m``, slot ``j`` (expert ``e_j``, weight ``w_j``), ``c = lora_alpha / r``, the masks
of :mod:`..dropout` (``drop_x``: stream 0, ``drop_j``: stream ``1 + j``, each ``keep/(1 − p)``)::

    gate_j = G + B_G[e_j] a_g_j,  a_g_j = c A_G[e_j] drop_x(x)   (up likewise; G = W_G x)
    h_j    = silu(gate_j) up_j
    y      = W_D Σ_j w_j h_j + c Σ_j w_j B_D[e_j] A_D[e_j] drop_j(h_j)

Backward, with ``dh_base = W_D^T dy`` (one base GEMM for all slots) and ``b = c B_D^T dy``
(rank ``r``, every expert)::

    g_j      = dh_base + drop_j(A_D[e_j]^T b_{e_j})          (∂L/∂h_j = w_j g_j)
    ∂w_j     = <h_j, g_j>        (= <h_j, dh_base> + c <A_D drop_j(h_j), B_D^T dy>: no a_down)
    dgate_j  = w_j g_j up_j silu'(gate_j),  dup_j = w_j g_j silu(gate_j)
    dG, dU   = Σ_j dgate_j, Σ_j dup_j                         (summed before the base GEMMs)
    da_g_j   = c B_G[e_j]^T dgate_j, da_u_j likewise           (rank r, reduced over D')
    ∂x       = W_G^T dG + W_U^T dU + drop_x(Σ_j A_G[e_j]^T da_g_j + A_U[e_j]^T da_u_j)
    ∂B_G[e]  = Σ_{j: e_j = e} dgate_j ⊗ a_g_j          ∂A_G[e] = Σ da_g_j ⊗ drop_x(x)   (U alike)
    ∂A_D[e]  = Σ_{j: e_j = e} w_j b_{e} ⊗ drop_j(h_j)  ∂B_D = c · a_mix^T dy  (masked dense)

``a_mix`` is the forward's (:func:`..gate_up.expert_gate_up`): its block ``e`` already holds
``Σ_{j: e_j = e} w_j A_D[e] drop_j(h_j)``, so ``∂B_D`` needs no per-slot ``a_down``.

Launches:

1. the forward's ``lora_in`` kernel (:mod:`.gate_up`) twice: ``a_gu = c · drop_x(x) ·
   [A_G; A_U]^T`` for all experts (x's dtype, as the forward rounds it; the x mask evaluated in
   registers) and ``b = c · dy · B_D_cat^T`` (fp32, ``[M, n·r]``). Rank-``r`` dense GEMMs,
   < 1 % of a round.
2. ``_dh_base_kernel``: ``dh_base = dy · W_D`` (``[M, D']``, compute dtype), the down side's one
   base GEMM. It is written once and read by the gate/up backward; fusing it there as a third
   accumulator of the ``d``-loop would keep a third fp32 tile live through the slot epilogue.
3. ``_gate_up_backward_kernel``, over (token block, ``D'`` tile): recomputes ``G, U`` (a dual
   ``d``-loop, writing them rounded to the compute dtype to a workspace for 3b, or loads the
   saved ones), then per slot the masked-dense LoRA deltas (as the forward), ``h_j``, the
   masked-dense ``A_D^T b`` and the dropout mask, the SwiGLU backward in fp32, ``∂w_j`` reduced
   over the tile, ``dG, dU`` summed in registers and written once, and the rank-``r`` ``da_j``
   (``dgate_j @ B_cat^T``, block ``e_j`` kept). ``∂w`` and ``da`` are sums over ``D'`` tiles.
   3b. ``_gate_up_wgrad_kernel``, same tiles: the token reductions ``∂B_G, ∂B_U, ∂A_D`` as
   ``[n·R, BLOCK_N]`` masked-dense products ``operand^T @ tile`` chunk by chunk (sums over token
   blocks). It re-derives ``dgate_j, dup_j, drop_j(h_j)`` from ``G, U``, ``dh_base`` and the
   rank-``r`` inputs with the same jit helper as 3 (``_slot_backward``): the rank-``r`` products
   again, no ``d``-loop. Fused into 3, they kept it at sm_80's 255-register cap and spilled
   24-32 bytes in every config; apart, both compile spill-free (compile report). The cost: the
   ``[M, D']`` ``G, U`` workspace when recomputing (written once, read once) and 3 rank-``r``
   masked-dense products per slot done twice.
4. ``_dx_kernel``, over (token block, ``d`` tile): ``dG W_G + dU W_U`` (one K-loop over ``D'``,
   each weight tile once per operand), the LoRA path as masked-dense K-steps whose operand is
   gathered from the per-slot ``da`` (``Σ_j`` in block ``e_j``, so repeated experts add up), the x
   mask on the LoRA part only, and the token reductions ``∂A_G, ∂A_U`` (``da^T @ drop_x(x)``) and
   ``∂B_D`` (``c · a_mix^T @ dy``), whose ``[n·R, d]`` tiles this grid owns.

Token order: the token blocks of 3, 3b and 4 hold tokens in the forward's routing order
(:mod:`.token_order`, recomputed from the saved routing), so each slot's masked-dense loops run
only over the chunks of the block's experts, and 4's shared LoRA loops skip the chunks no slot
of the block chose: per-token results (``∂x``, ``∂w``) are the bits of the identity order, the
weight gradients equal to fp32 rounding (tokens sum in another order).

Reductions: by default fp32 ``tl.atomic_add`` into zeroed buffers (summation order varies run to
run: deterministic to fp32 rounding only). ``deterministic=True`` uses no float atomics: a sum
over ``D'`` tiles (``∂w``, ``da``) is stored as one partial per tile and summed by torch in a
fixed order; a sum over tokens (the weight gradients) goes to one of at most
``DETERMINISTIC_TOKEN_GROUPS`` slabs, each owned by one program per column tile that walks its
token blocks in order (read-add-write), and the slabs are summed by torch. That costs memory:
``D'/BLOCK_N · M · k · (2R + 1)`` and ``groups · n·R · (3 D' + 3 d)`` fp32 values.

Everything accumulates in fp32; tensor-core operands are rounded to the compute dtype once
(``cast_rne``). The router's top-k and softmax backward is not here: the caller turns ``∂w``
into router gradients.
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
    dot_k2,
    grouped_tile,
    interpreter_bf16,
    launch,
    load_tile,
    load_tile_t,
    mma,
    new_output,
    on_device_of,
    pinned_configs,
    prune_small_m,
    store_rounded,
    tile_grid,
    token_bucket,
    unit_stride_rows,
)
from .gate_up import _LORA_IN_GPU, _launch_lora_in, _lora_in_kernel, lora_delta
from .layout import ExpertLoRA, check_layout, check_routing, padded_rank
from .token_order import chunk_range, routing_order, slots_use_chunk, tile_tokens

__all__ = ["DETERMINISTIC_TOKEN_GROUPS", "ExpertBackward", "expert_round_backward"]

# Deterministic mode: how many token slabs the token reductions are split into. More slabs mean
# more programs in flight (grid = slabs × column tiles) but more fp32 memory (each slab is a
# full [n·R, D'] or [n·R, d] gradient); 8 slabs × 112 D' tiles is ~7 waves on an H100.
DETERMINISTIC_TOKEN_GROUPS = 8


def _token_groups(num_tokens: int, block_m: int, deterministic: bool) -> tuple[int, int]:
    """``(groups, token blocks per group)`` of the launches with token reductions."""
    blocks = triton.cdiv(num_tokens, block_m)
    if not deterministic:
        return blocks, 1
    per_group = triton.cdiv(blocks, min(blocks, DETERMINISTIC_TOKEN_GROUPS))
    return triton.cdiv(blocks, per_group), per_group


# ---------------------------------------------------------------------------------------------
# jit helpers of this file.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _add_tile(ptr, value, rows, row_ok, stride, cols, col_ok, DETERMINISTIC: tl.constexpr):
    """``ptr[rows, cols] += value`` for a fp32 reduction buffer: an atomic add, or, when
    ``DETERMINISTIC``, a read-add-write by the one program that owns this slab. The barrier
    orders it after the previous read-add-write of the same elements, which another thread of
    the block may have done (the layouts of two call sites need not agree)."""
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if DETERMINISTIC:
        tl.debug_barrier()
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)
    else:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")


@triton.jit
def _masked_rank_t(ptr, rows, row_ok, stride, lc, e, R_PAD: tl.constexpr, RANK: tl.constexpr,
                   UNPADDED: tl.constexpr):
    """``[CH, BLOCK_M]``: columns ``lc`` (padded masked-dense indices) of a rank-``r`` per-token
    operand, transposed, keeping only block ``e[m]`` of token ``m`` (zero elsewhere). With
    ``UNPADDED`` the operand is stored ``[M, n·r]`` (column ``e·r + i``), else ``[M, n·R]``."""
    l_exp = lc // R_PAD
    l_rank = lc % R_PAD
    if UNPADDED:
        src = l_exp * RANK + l_rank
    else:
        src = lc
    mask = (l_exp[:, None] == e[None, :]) & (l_rank < RANK)[:, None] & row_ok[None, :]
    return tl.load(ptr + rows[None, :] * stride + src[:, None], mask=mask, other=0.0)


# ---------------------------------------------------------------------------------------------
# 2. dh_base = dy · W_D: the down side's one base GEMM for all slots.
# ---------------------------------------------------------------------------------------------

# A plain GEMM with W_D [d, D'] read K-major (rows of W_D are the K slice): the down kernel's
# tile shapes.
_DH_BASE_GPU = [
    cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(128, 128, 32, 8, 4),
    cfg(64, 128, 32, 4, 4), cfg(64, 64, 64, 4, 4), cfg(32, 64, 64, 4, 4),
]
DH_BASE_CONFIGS = [INTERPRET_CONFIG] if INTERPRET else _DH_BASE_GPU


@triton.jit
def _dh_base_kernel(
    dy_ptr, wd_ptr, out_ptr,
    M, N, K,
    stride_dym, stride_wd, stride_om,
    M_BUCKET,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, row_ok, cols, col_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = load_tile(dy_ptr, rows, row_ok, stride_dym, k, K)
        w = load_tile(wd_ptr, k.to(tl.int64), k < K, stride_wd, cols, N)
        acc = mma(a, w, acc, INTERP_BF16)
    store_rounded(out_ptr, acc, rows, row_ok, stride_om, cols, col_ok, INTERP_BF16)


_dh_base_tuned = triton.autotune(
    configs=DH_BASE_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune_small_m},
)(_dh_base_kernel)


# ---------------------------------------------------------------------------------------------
# 3. The fused gate/up backward.
# ---------------------------------------------------------------------------------------------

_INTERPRET_LORA = triton.Config(
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "LORA_CHUNK": 16}, num_warps=4, num_stages=1
)


def _lora_cfg(block_m: int, block_n: int, block_k: int, warps: int, stages: int,
              chunk: int = 16) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          "LORA_CHUNK": chunk}, num_warps=warps, num_stages=stages)


# 3a. Live through the slot epilogue: gate, up, dG, dU (fp32), the slot's dgate, dup (compute
# dtype) and the rank-r da accumulators, next to one chunk of each masked-dense product. With
# the token reductions in 3b (below) the sm_80 compile keeps under its 255-register cap; it
# spilled 24-32 bytes there in every config while they were fused here (compile report).
# 16×128 spills in two of the switches' combinations (8 B: sm_80 without dropout, sm_90 reading
# the saved G, U with triton 3.6) and is left out.
_GATE_UP_BWD_GPU = [
    _lora_cfg(32, 64, 64, 8, 3), _lora_cfg(32, 64, 32, 8, 4), _lora_cfg(64, 32, 64, 8, 3),
    _lora_cfg(16, 64, 64, 8, 3),
]
# R_PAD > 16 (one expert per chunk or wider): [BM, R] da accumulators and [BM, R] chunk
# products; only the 16-row tiles stay spill-free on sm_80 and sm_90 (32-row tiles spill 8-40 B
# at r = 64).
_GATE_UP_BWD_WIDE_RANK = [c for c in _GATE_UP_BWD_GPU if c.kwargs["BLOCK_M"] <= 16]
GATE_UP_BWD_CONFIGS = [_INTERPRET_LORA] if INTERPRET else _GATE_UP_BWD_GPU


def _wide_rank_prune(configs, named_args, **kwargs):
    """``prune_small_m``, then the 16-row tiles only when ``R_PAD > 16`` (where wider ones
    spill)."""
    kept = prune_small_m(configs, named_args, **kwargs)
    if {**named_args, **kwargs}.get("R_PAD", 16) > 16:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 16] or kept
    return kept


@triton.jit
def _slot_backward(gate, up, e_j, e_prev, w_j, j, rows, row_ok, cols, col_ok, N,
                   dhb_ptr, stride_dhb, a_gu_ptr, b_ptr, bg_ptr, bu_ptr, ad_ptr, keys_ptr,
                   dropout_scale,
                   RANK: tl.constexpr, R_PAD: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr, CH: tl.constexpr):
    """Slot ``j`` of one (token block, ``D'`` tile), shared by 3a and 3b so both derive the same
    values: ``gate_j, up_j`` in place from slot ``j - 1``'s (expert ``e_prev``; the base
    ``G, U`` for the first slot) with :func:`.gate_up.lora_delta` as the forward, ``q = A_D[e_j]^T
    b_{e_j}`` (the down LoRA's share of ``∂L/∂h_j``), the mask, and the SwiGLU backward in fp32.
    Returns ``(gate_j, up_j, h_j, g_j, dgate_j, dup_j, drop_j(h_j))``."""
    DTYPE: tl.constexpr = dhb_ptr.dtype.element_ty
    NR: tl.constexpr = NUM_EXPERTS * R_PAD
    NRU: tl.constexpr = NUM_EXPERTS * RANK
    moved = e_prev != e_j
    gate, up = lora_delta(gate, up, tl.where(moved, e_prev, -1), -1.0, rows, cols, N,
                          a_gu_ptr, bg_ptr, bu_ptr, NUM_EXPERTS, R_PAD, CH, INTERP_BF16)
    gate, up = lora_delta(gate, up, tl.where(moved, e_j, -1), 1.0, rows, cols, N,
                          a_gu_ptr, bg_ptr, bu_ptr, NUM_EXPERTS, R_PAD, CH, INTERP_BF16)

    # The chunk loops here and below visit only the chunks of the tile's experts (the tokens
    # are in routing order: .token_order); the others would add zeros.
    start, end = chunk_range(e_j, NUM_EXPERTS, CH, R_PAD)
    q = tl.zeros(gate.shape, dtype=tl.float32)
    for c0 in tl.range(start, end, CH, num_stages=1):
        lc = c0 + tl.arange(0, CH)
        b_t = _masked_rank_t(b_ptr, rows, row_ok, NRU, lc, e_j, R_PAD, RANK, True)
        q = mma(tl.trans(cast_rne(b_t, DTYPE, INTERP_BF16)),
                load_tile(ad_ptr, lc.to(tl.int64), lc < NR, N, cols, N), q, INTERP_BF16)

    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    if HAS_DROPOUT:
        keep = keep_mask(tl.load(keys_ptr + 2 + j), rows, cols, tl.load(keys_ptr))
        q = tl.where(keep, q * dropout_scale, 0.0)
        h_drop = tl.where(keep, h * dropout_scale, 0.0)
    else:
        h_drop = h
    g = load_tile(dhb_ptr, rows, row_ok, stride_dhb, cols, N).to(tl.float32) + q
    dh = g * w_j[:, None]
    dup = dh * silu
    dgate = dh * up * (sig + silu * (1.0 - sig))
    return gate, up, h, g, dgate, dup, h_drop


@triton.jit
def _slot_expert(idx_ptr, w_ptr, rows, row_ok, j, NUM_EXPERTS: tl.constexpr,
                 TOP_K: tl.constexpr):
    """Slot ``j``'s expert (``-1`` for an id outside ``[0, n)``: no LoRA, the forward's rule)
    and weight."""
    e_j = tl.load(idx_ptr + rows * TOP_K + j, mask=row_ok, other=-1)
    e_j = tl.where((e_j >= 0) & (e_j < NUM_EXPERTS), e_j, -1).to(tl.int32)
    w_j = tl.load(w_ptr + rows * TOP_K + j, mask=row_ok, other=0.0)
    return e_j, w_j


@triton.jit
def _gate_up_backward_kernel(
    x_ptr, wg_ptr, wu_ptr, gs_ptr, us_ptr, dhb_ptr, a_gu_ptr, b_ptr,
    bg_ptr, bu_ptr, ad_ptr, w_ptr, idx_ptr, keys_ptr, order_ptr,
    dg_ptr, du_ptr, dw_ptr, da_ptr,
    M, N, K,
    stride_xm, stride_wg, stride_wu, stride_gs, stride_us, stride_dhb, stride_dg, stride_du,
    scaling, dropout_scale,
    M_BUCKET,
    RANK: tl.constexpr, R_PAD: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    RECOMPUTE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_CHUNK: tl.constexpr,
):
    DTYPE: tl.constexpr = dhb_ptr.dtype.element_ty
    NR: tl.constexpr = NUM_EXPERTS * R_PAD  # rows of the padded [n·R, ·] LoRA matrices
    # Chunks hold whole expert blocks (as the forward): max(LORA_CHUNK, R_PAD) columns.
    CH: tl.constexpr = LORA_CHUNK + (R_PAD - LORA_CHUNK) * (R_PAD > LORA_CHUNK)
    EPC: tl.constexpr = CH // R_PAD
    # One (token block, D' tile) per program: column tiles outermost, token blocks fastest, so
    # the programs sharing a W_G / W_U tile (the big operand) run side by side and find it in L2.
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m_blocks
    mb = pid % num_m_blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    cols = offs_n.to(tl.int64)
    # The block's tokens in routing order (.token_order), as the forward visits them.
    rows, row_ok = tile_tokens(order_ptr, mb * BLOCK_M + tl.arange(0, BLOCK_M), M)
    ri = tl.arange(0, R_PAD)
    # Deterministic partials: one [M, k] (∂w) / [M, k, 2, R] (da) slice per D' tile.
    if DETERMINISTIC:
        dw_base = dw_ptr + pid_n.to(tl.int64) * M * TOP_K
        da_base = da_ptr + pid_n.to(tl.int64) * M * (TOP_K * 2 * R_PAD)
    else:
        dw_base = dw_ptr
        da_base = da_ptr

    # ---- G, U: recomputed (x tile loaded once for both) or the forward's ----------------------
    if RECOMPUTE:
        gate, up = dot_k2(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                          x_ptr, rows, row_ok, stride_xm, wg_ptr, stride_wg, wu_ptr,
                          stride_wu, cols, col_ok, K, K, BLOCK_K, INTERP_BF16)
        # The workspace 3b reads (in the compute dtype, as the forward would have saved them).
        store_rounded(gs_ptr, gate, rows, row_ok, stride_gs, cols, col_ok, INTERP_BF16)
        store_rounded(us_ptr, up, rows, row_ok, stride_us, cols, col_ok, INTERP_BF16)
    else:
        gate = load_tile(gs_ptr, rows, row_ok, stride_gs, cols, N).to(tl.float32)
        up = load_tile(us_ptr, rows, row_ok, stride_us, cols, N).to(tl.float32)

    dG = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dU = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    e_prev = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    for j in tl.range(0, TOP_K, num_stages=1):
        e_j, w_j = _slot_expert(idx_ptr, w_ptr, rows, row_ok, j, NUM_EXPERTS, TOP_K)
        gate, up, h, g, dgate, dup, h_drop = _slot_backward(
            gate, up, e_j, e_prev, w_j, j, rows, row_ok, cols, col_ok, N, dhb_ptr, stride_dhb,
            a_gu_ptr, b_ptr, bg_ptr, bu_ptr, ad_ptr, keys_ptr, dropout_scale,
            RANK, R_PAD, NUM_EXPERTS, HAS_DROPOUT, INTERP_BF16, CH)
        e_prev = e_j
        # ∂w_j = <h_j, g_j>: this tile's share of the D' sum.
        dw_part = tl.sum(h * g, axis=1)
        if DETERMINISTIC:
            tl.store(dw_base + rows * TOP_K + j, dw_part, mask=row_ok)
        else:
            tl.atomic_add(dw_base + rows * TOP_K + j, dw_part, mask=row_ok, sem="relaxed")
        dG += dgate
        dU += dup
        dgate_c = cast_rne(dgate, DTYPE, INTERP_BF16)
        dup_c = cast_rne(dup, DTYPE, INTERP_BF16)

        # -- da_j = B^T dgate_j over this D' tile (block e_j kept, reshaped out of its chunk as
        #    the forward's a_mix).
        da_g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        da_u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        start, end = chunk_range(e_j, NUM_EXPERTS, CH, R_PAD)
        for c0 in tl.range(start, end, CH, num_stages=1):
            lc = c0 + tl.arange(0, CH)
            lc_ok = lc < NR
            lc64 = lc.to(tl.int64)
            chunk_exp = c0 // R_PAD + tl.arange(0, EPC)
            sel = chunk_exp[None, :, None] == e_j[:, None, None]
            part = mma(dgate_c, load_tile_t(bg_ptr, lc64, lc_ok, N, cols, N),
                       tl.zeros((BLOCK_M, CH), dtype=tl.float32), INTERP_BF16)
            part = tl.where(sel, tl.reshape(part, (BLOCK_M, EPC, R_PAD)), 0.0)
            da_g += tl.sum(part, axis=1)
            part = mma(dup_c, load_tile_t(bu_ptr, lc64, lc_ok, N, cols, N),
                       tl.zeros((BLOCK_M, CH), dtype=tl.float32), INTERP_BF16)
            part = tl.where(sel, tl.reshape(part, (BLOCK_M, EPC, R_PAD)), 0.0)
            da_u += tl.sum(part, axis=1)

        da_ptrs = da_base + rows[:, None] * (TOP_K * 2 * R_PAD) + j * 2 * R_PAD + ri[None, :]
        da_mask = row_ok[:, None] & (ri < R_PAD)[None, :]
        if DETERMINISTIC:
            tl.store(da_ptrs, da_g * scaling, mask=da_mask)
            tl.store(da_ptrs + R_PAD, da_u * scaling, mask=da_mask)
        else:
            tl.atomic_add(da_ptrs, da_g * scaling, mask=da_mask, sem="relaxed")
            tl.atomic_add(da_ptrs + R_PAD, da_u * scaling, mask=da_mask, sem="relaxed")

    store_rounded(dg_ptr, dG, rows, row_ok, stride_dg, cols, col_ok, INTERP_BF16)
    store_rounded(du_ptr, dU, rows, row_ok, stride_du, cols, col_ok, INTERP_BF16)


_gate_up_backward_tuned = triton.autotune(
    configs=GATE_UP_BWD_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "NUM_EXPERTS", "TOP_K", "RECOMPUTE", "HAS_DROPOUT",
         "DETERMINISTIC"],
    prune_configs_by={"early_config_prune": _wide_rank_prune},
    # Benchmarking relaunches: the reductions must start from zero each time.
    reset_to_zero=["dw_ptr", "da_ptr"],
)(_gate_up_backward_kernel)


# 3b. The token reductions ∂B_G, ∂B_U, ∂A_D. Per slot it re-derives dgate_j, dup_j, drop_j(h_j)
# from G, U (saved, or 3a's workspace), dh_base and the rank-r inputs (the rank-r products of
# 3a again, no d-loop), then adds operand_j^T @ tile into the [n·R, D'] gradients chunk by chunk.
def _wgrad_cfg(block_m: int, block_n: int, warps: int, stages: int,
               chunk: int = 16) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "LORA_CHUNK": chunk},
                         num_warps=warps, num_stages=stages)


# Every token tile adds a [LORA_CHUNK, BLOCK_N] block per chunk its slots visit, so the atomic
# adds per token fall with taller tiles: the 64-row tile sends 0.59× the 32-row tile's (1.0 vs
# 1.7 GB per round at llama3-8b, bench/roofline.py), for the autotuner to weigh on the GPU
# against its fewer programs; spill-free on sm_80 and sm_90 only with BLOCK_N = 32.
# Deterministic mode runs the first config the pruning keeps: 32×64 at r = 16, and 16×32 at
# r = 64, where 16×64 spills 24 B on sm_80 in deterministic mode (it is kept for atomic mode).
_WGRAD_GPU = [_wgrad_cfg(32, 64, 8, 2), _wgrad_cfg(16, 32, 8, 2), _wgrad_cfg(16, 64, 8, 2),
              _wgrad_cfg(64, 32, 8, 2)]
# R_PAD > 16: the 32-row tile spills 48 B on sm_80 at r = 64 (compile report).
_WGRAD_WIDE_RANK = [c for c in _WGRAD_GPU if c.kwargs["BLOCK_M"] <= 16]
_INTERPRET_WGRAD = _wgrad_cfg(16, 16, 4, 1)
WGRAD_CONFIGS = [_INTERPRET_WGRAD] if INTERPRET else _WGRAD_GPU


@triton.jit
def _gate_up_wgrad_kernel(
    gs_ptr, us_ptr, dhb_ptr, a_gu_ptr, b_ptr, bg_ptr, bu_ptr, ad_ptr, w_ptr, idx_ptr, keys_ptr,
    order_ptr, dbg_ptr, dbu_ptr, dad_ptr,
    M, N,
    stride_gs, stride_us, stride_dhb,
    dropout_scale,
    num_groups, blocks_per_group,
    M_BUCKET,
    RANK: tl.constexpr, R_PAD: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LORA_CHUNK: tl.constexpr,
):
    DTYPE: tl.constexpr = dhb_ptr.dtype.element_ty
    NR: tl.constexpr = NUM_EXPERTS * R_PAD
    NRU: tl.constexpr = NUM_EXPERTS * RANK
    CH: tl.constexpr = LORA_CHUNK + (R_PAD - LORA_CHUNK) * (R_PAD > LORA_CHUNK)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    # Atomic mode: one token block per program (autotuning may change BLOCK_M, so the kernel
    # derives the grouping); deterministic mode: the host's fixed number of token groups.
    if not DETERMINISTIC:
        num_groups = num_m_blocks
        blocks_per_group = 1
    pid = tl.program_id(0)
    pid_n = pid // num_groups
    pid_g = pid % num_groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    cols = offs_n.to(tl.int64)
    # Deterministic mode: one [n·R, D'] slab per token group.
    if DETERMINISTIC:
        slab = pid_g.to(tl.int64) * NR * N
    else:
        slab = 0
    first = pid_g * blocks_per_group
    last = tl.minimum(first + blocks_per_group, num_m_blocks)
    for mb in range(first, last):
        rows, row_ok = tile_tokens(order_ptr, mb * BLOCK_M + tl.arange(0, BLOCK_M), M)
        gate = load_tile(gs_ptr, rows, row_ok, stride_gs, cols, N).to(tl.float32)
        up = load_tile(us_ptr, rows, row_ok, stride_us, cols, N).to(tl.float32)
        e_prev = tl.full((BLOCK_M,), -1, dtype=tl.int32)
        for j in tl.range(0, TOP_K, num_stages=1):
            e_j, w_j = _slot_expert(idx_ptr, w_ptr, rows, row_ok, j, NUM_EXPERTS, TOP_K)
            gate, up, h, g, dgate, dup, h_drop = _slot_backward(
                gate, up, e_j, e_prev, w_j, j, rows, row_ok, cols, col_ok, N, dhb_ptr,
                stride_dhb, a_gu_ptr, b_ptr, bg_ptr, bu_ptr, ad_ptr, keys_ptr, dropout_scale,
                RANK, R_PAD, NUM_EXPERTS, HAS_DROPOUT, INTERP_BF16, CH)
            e_prev = e_j
            dgate_c = cast_rne(dgate, DTYPE, INTERP_BF16)
            dup_c = cast_rne(dup, DTYPE, INTERP_BF16)
            h_c = cast_rne(h_drop, DTYPE, INTERP_BF16)
            # operand_j^T @ tile for the n·R rows of this chunk, zero outside block e_j (the
            # chunks of the block's experts only: the others would add zeros).
            start, end = chunk_range(e_j, NUM_EXPERTS, CH, R_PAD)
            for c0 in tl.range(start, end, CH, num_stages=1):
                lc = c0 + tl.arange(0, CH)
                lc_ok = lc < NR
                lc64 = lc.to(tl.int64)
                a_t = _masked_rank_t(a_gu_ptr, rows, row_ok, 2 * NR, lc, e_j, R_PAD, R_PAD,
                                     False)
                _add_tile(dbg_ptr + slab, mma(a_t, dgate_c, tl.zeros((CH, BLOCK_N), tl.float32),
                                              INTERP_BF16),
                          lc64, lc_ok, N, cols, col_ok, DETERMINISTIC)
                a_t = _masked_rank_t(a_gu_ptr + NR, rows, row_ok, 2 * NR, lc, e_j, R_PAD, R_PAD,
                                     False)
                _add_tile(dbu_ptr + slab, mma(a_t, dup_c, tl.zeros((CH, BLOCK_N), tl.float32),
                                              INTERP_BF16),
                          lc64, lc_ok, N, cols, col_ok, DETERMINISTIC)
                b_t = _masked_rank_t(b_ptr, rows, row_ok, NRU, lc, e_j, R_PAD, RANK, True)
                b_t = cast_rne(b_t * w_j[None, :], DTYPE, INTERP_BF16)
                _add_tile(dad_ptr + slab, mma(b_t, h_c, tl.zeros((CH, BLOCK_N), tl.float32),
                                              INTERP_BF16),
                          lc64, lc_ok, N, cols, col_ok, DETERMINISTIC)


_gate_up_wgrad_tuned = triton.autotune(
    configs=WGRAD_CONFIGS,
    key=["M_BUCKET", "N", "R_PAD", "NUM_EXPERTS", "TOP_K", "HAS_DROPOUT", "DETERMINISTIC"],
    prune_configs_by={"early_config_prune": _wide_rank_prune},
    reset_to_zero=["dbg_ptr", "dbu_ptr", "dad_ptr"],
)(_gate_up_wgrad_kernel)


# ---------------------------------------------------------------------------------------------
# 4. dx = dG W_G + dU W_U + drop_x(LoRA), and ∂A_G, ∂A_U, ∂B_D.
# ---------------------------------------------------------------------------------------------

# Spill-free on sm_80 and sm_90 (compile report); 64×128 tiles spill on sm_80 and are left out,
# and 32×64×64 with 4 warps spills 8 B on sm_90 with triton 3.6 (the gathered rows of the
# routing order hold 64-bit addresses), so only its 32-wide K step is kept.
_DX_GPU = [
    _lora_cfg(64, 64, 64, 8, 3), _lora_cfg(32, 128, 64, 8, 3), _lora_cfg(32, 64, 32, 4, 4),
]
DX_CONFIGS = [_INTERPRET_LORA] if INTERPRET else _DX_GPU


@triton.jit
def _dx_kernel(
    dg_ptr, du_ptr, wg_ptr, wu_ptr, da_ptr, a_in_ptr, x_ptr, dy_ptr, a_mix_ptr, idx_ptr,
    keys_ptr, order_ptr,
    dx_ptr, dai_ptr, dbd_ptr,
    M, N, K,
    stride_dg, stride_du, stride_wg, stride_wu, stride_xm, stride_dym, stride_dxm,
    scaling, dropout_scale,
    num_groups, blocks_per_group,
    M_BUCKET,
    RANK: tl.constexpr, R_PAD: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_CHUNK: tl.constexpr,
):
    DTYPE: tl.constexpr = dg_ptr.dtype.element_ty
    NR: tl.constexpr = NUM_EXPERTS * R_PAD
    NRU: tl.constexpr = NUM_EXPERTS * RANK
    CH: tl.constexpr = LORA_CHUNK
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    # Atomic mode: one token block per program (autotuning may change BLOCK_M, so the kernel
    # derives the grouping); deterministic mode: the host's fixed number of token groups.
    if not DETERMINISTIC:
        num_groups = num_m_blocks
        blocks_per_group = 1
    pid = tl.program_id(0)
    pid_n = pid // num_groups
    pid_g = pid % num_groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    cols = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if DETERMINISTIC:
        slab_a = pid_g.to(tl.int64) * (2 * NR) * N
        slab_b = pid_g.to(tl.int64) * NRU * N
    else:
        slab_a = 0
        slab_b = 0
    if HAS_DROPOUT:
        keep_thr = tl.load(keys_ptr)
        key_x = tl.load(keys_ptr + 1)
    first = pid_g * blocks_per_group
    last = tl.minimum(first + blocks_per_group, num_m_blocks)
    for mb in range(first, last):
        rows, row_ok = tile_tokens(order_ptr, mb * BLOCK_M + tl.arange(0, BLOCK_M), M)

        # ---- base: dG W_G + dU W_U over D' (W_* are [D', d]: the K slice is rows) -------------
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k64 = k.to(tl.int64)
            a_g = load_tile(dg_ptr, rows, row_ok, stride_dg, k, K)
            a_u = load_tile(du_ptr, rows, row_ok, stride_du, k, K)
            w_g = load_tile(wg_ptr, k64, k < K, stride_wg, cols, N)
            w_u = load_tile(wu_ptr, k64, k < K, stride_wu, cols, N)
            acc = mma(a_g, w_g, acc, INTERP_BF16)
            acc = mma(a_u, w_u, acc, INTERP_BF16)

        # ---- LoRA: Σ_j A[e_j]^T da_j as masked-dense K-steps, and ∂A = da^T drop_x(x) ---------
        xd = load_tile(x_ptr, rows, row_ok, stride_xm, cols, N).to(tl.float32)
        if HAS_DROPOUT:
            keep = keep_mask(key_x, rows, cols, keep_thr)
            xd = tl.where(keep, xd * dropout_scale, 0.0)
        xd = cast_rne(xd, DTYPE, INTERP_BF16)
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for which in tl.static_range(2):
            for c0 in tl.range(0, NR, CH, num_stages=1):
                if slots_use_chunk(idx_ptr, rows, row_ok, c0, TOP_K, CH, R_PAD):
                    lc = c0 + tl.arange(0, CH)
                    lc_ok = lc < NR
                    lc64 = lc.to(tl.int64)
                    l_exp = lc // R_PAD
                    l_rank = lc % R_PAD
                    # The token's da in its experts' blocks: slots sharing an expert add up.
                    op = tl.zeros((BLOCK_M, CH), dtype=tl.float32)
                    for j in tl.static_range(TOP_K):
                        e_j = tl.load(idx_ptr + rows * TOP_K + j, mask=row_ok, other=-1)
                        e_j = tl.where((e_j >= 0) & (e_j < NUM_EXPERTS), e_j, -1).to(tl.int32)
                        op += tl.load(da_ptr + rows[:, None] * (TOP_K * 2 * R_PAD)
                                      + (j * 2 + which) * R_PAD + l_rank[None, :],
                                      mask=row_ok[:, None] & (l_exp[None, :] == e_j[:, None]),
                                      other=0.0)
                    op = cast_rne(op, DTYPE, INTERP_BF16)
                    lora = mma(op, load_tile(a_in_ptr + which * NR * N, lc64, lc_ok, N, cols, N),
                               lora, INTERP_BF16)
                    _add_tile(dai_ptr + slab_a + which * NR * N,
                              mma(tl.trans(op), xd, tl.zeros((CH, BLOCK_N), tl.float32),
                                  INTERP_BF16),
                              lc64, lc_ok, N, cols, col_ok, DETERMINISTIC)
        if HAS_DROPOUT:
            lora = tl.where(keep, lora * dropout_scale, 0.0)
        acc += lora
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])

        # ---- ∂B_D = c · a_mix^T dy over this token block (a_mix [M, n·r], unpadded) -----------
        dyc = load_tile(dy_ptr, rows, row_ok, stride_dym, cols, N)
        for c0 in tl.range(0, NRU, CH, num_stages=1):
            # a_mix is zero outside the token's experts' blocks (of RANK columns, unpadded).
            if slots_use_chunk(idx_ptr, rows, row_ok, c0, TOP_K, CH, RANK):
                lc = c0 + tl.arange(0, CH)
                lc_ok = lc < NRU
                am = tl.load(a_mix_ptr + rows[None, :] * NRU + lc[:, None],
                             mask=lc_ok[:, None] & row_ok[None, :], other=0.0)
                am = cast_rne(am * scaling, DTYPE, INTERP_BF16)
                _add_tile(dbd_ptr + slab_b, mma(am, dyc, tl.zeros((CH, BLOCK_N), tl.float32),
                                                INTERP_BF16),
                          lc.to(tl.int64), lc_ok, N, cols, col_ok, DETERMINISTIC)


_dx_tuned = triton.autotune(
    configs=DX_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "NUM_EXPERTS", "TOP_K", "HAS_DROPOUT", "DETERMINISTIC"],
    prune_configs_by={"early_config_prune": prune_small_m},
    reset_to_zero=["dai_ptr", "dbd_ptr"],
)(_dx_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------


def _launch_dh_base(dy, down_weight, out, config: triton.Config | None) -> None:
    num_tokens, hidden = dy.shape
    inter = down_weight.shape[1]
    launch(
        _dh_base_tuned, _dh_base_kernel, tile_grid(num_tokens, inter, "BLOCK_N"),
        (dy, down_weight, out, num_tokens, inter, hidden, dy.stride(0), down_weight.stride(0),
         out.stride(0), token_bucket(num_tokens)),
        {"INTERP_BF16": interpreter_bf16(dy.dtype)},
        config,
    )


def _grouped_grid(num_tokens: int, num_cols: int, deterministic: bool):
    """Grid of the two launches with token reductions: token groups × column tiles (one token
    block per group in atomic mode)."""

    def grid(meta):
        groups, _ = _token_groups(num_tokens, meta["BLOCK_M"], deterministic)
        return (groups * triton.cdiv(num_cols, meta["BLOCK_N"]),)

    return grid


def _fixed_config(tuned, config: triton.Config | None, bucket: int,
                  **constexprs: int) -> triton.Config:
    """The one config a deterministic launch runs with: the pinned one, else the first the
    autotuner would consider. Its reduction buffers are shaped by BLOCK_M / BLOCK_N (partials
    per D' tile, slabs per token group), so deterministic mode does not autotune."""
    if config is not None:
        return config
    return _wide_rank_prune(tuned.configs, {"M_BUCKET": bucket}, **constexprs)[0]


def _launch_reducing(tuned, kernel, num_tokens: int, num_cols: int, args: tuple, meta: dict,
                     config: triton.Config | None, deterministic: bool) -> None:
    """Launches the token-reducing 3b or dx kernel; the token grouping arguments are
    only read in deterministic mode (the kernels derive them otherwise)."""
    bucket = token_bucket(num_tokens)
    groups, per_group = (_token_groups(num_tokens, config.kwargs["BLOCK_M"], True)
                         if deterministic else (0, 1))
    launch(tuned, kernel, _grouped_grid(num_tokens, num_cols, deterministic),
           (*args, groups, per_group, bucket), meta, config)


# ---------------------------------------------------------------------------------------------
# The public function.
# ---------------------------------------------------------------------------------------------


class ExpertBackward(NamedTuple):
    """What :func:`expert_round_backward` returns: every gradient in fp32, the LoRA factors'
    in the parameter shapes of ``GraphMoEParams``."""

    grad_x: torch.Tensor  # [M, d]: the experts' part of ∂L/∂x (not the router's)
    grad_weights: torch.Tensor  # [M, k]: ∂L/∂w_j
    grad_lora_A_gate: torch.Tensor  # [n, r, d]
    grad_lora_B_gate: torch.Tensor  # [n, D', r]
    grad_lora_A_up: torch.Tensor  # [n, r, d]
    grad_lora_B_up: torch.Tensor  # [n, D', r]
    grad_lora_A_down: torch.Tensor  # [n, r, D']
    grad_lora_B_down: torch.Tensor  # [n, d, r]


_LAUNCHES = ("lora_in", "b_down", "dh_base", "gate_up", "gate_up_wgrad", "dx")


@on_device_of("x")
def expert_round_backward(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    lora: ExpertLoRA,
    expert_weights: torch.Tensor,
    expert_index: torch.Tensor,
    a_mix: torch.Tensor,
    scaling: float,
    *,
    saved_gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    round_index: int = 0,
    deterministic: bool = False,
    sort_tokens: bool = True,
    configs: dict[str, triton.Config] | None = None,
) -> ExpertBackward:
    """Backward of one round of the LoRA experts (everything but the router's softmax/top-k):
    ``∂L/∂x``, ``∂L/∂w`` and the six LoRA gradients from ``∂L/∂y``. Runs on ``x``'s device.

    The forward is ``y = Σ_j w_j (W_D h_j + c · B_D[e_j] A_D[e_j] drop_j(h_j))`` with
    ``h_j = silu(W_G x + c B_G[e_j] A_G[e_j] drop_x(x)) · (W_U x + c B_U[e_j] A_U[e_j]
    drop_x(x))`` (:func:`..gate_up.expert_gate_up` and :func:`..down.expert_down`); the masks
    are those of :mod:`..dropout` for (``dropout_seed``, ``round_index``), evaluated in
    registers. See the module docstring for the algebra and the launches.

    Args:
        x: ``[M, d]`` round input, fp16/bf16/fp32 (the compute dtype of every launch).
        grad_y: ``[M, d]`` ``∂L/∂y``, ``x``'s dtype.
        gate_weight, up_weight: ``[D', d]``; down_weight: ``[d, D']``; ``x``'s dtype.
        lora: the experts' factors from :func:`.layout.expert_lora_layout`, ``x``'s dtype.
        expert_weights: ``[M, k]`` routing weights (used as fp32).
        expert_index: ``[M, k]`` integer experts; an id outside ``[0, n)`` has no LoRA (as in
            the forward). Repeated ids within a token are fine.
        a_mix: ``[M, n·r]`` fp32, the forward's down-LoRA input (``GateUpOutput.a_mix``).
        scaling: ``c = lora_alpha / r``.
        saved_gate_up: the forward's base products ``(W_G x, W_U x)``, each ``[M, D']`` in
            ``x``'s dtype with unit column stride (``recompute_intermediates=False``); without
            them the kernel recomputes them from ``x``.
        dropout_p, dropout_seed, round_index: the forward's LoRA dropout (``0 ≤ p < 1``).
        deterministic: no float atomics: bit-identical results run to run (see the module
            docstring for the memory it costs).
        sort_tokens: visit the tokens in routing order (:mod:`.token_order`, as the forward),
            so that each token block multiplies and reduces only the LoRA blocks of the experts
            its rows chose; ``False`` visits them in order (for comparisons: the same bits of
            every per-token gradient, the weight gradients summed in another order).
        configs: pins launch block shapes instead of autotuning (tests): ``"lora_in"`` and
            ``"b_down"`` (``BLOCK_M/N/K``, ``GROUP_M``), ``"dh_base"`` (same keys),
            ``"gate_up"`` and ``"dx"`` (``BLOCK_M/N/K`` and ``LORA_CHUNK``, a power of two
            ≥ 16), ``"gate_up_wgrad"`` (``BLOCK_M/N`` and ``LORA_CHUNK``).
    Returns:
        :class:`ExpertBackward`, all fp32. ``grad_x`` is the experts' part only; the caller
        adds the router's (``∂L/∂logits · R``) and turns ``grad_weights`` into router
        gradients.
    Raises:
        TypeError / ValueError: on a dtype, shape or device mismatch, a bad dropout setting,
        or ``n·r`` past the masked-dense limit.
    """
    configs = pinned_configs(configs, _LAUNCHES)
    num_tokens, hidden = check_activation("x", x)
    dt = x.dtype
    check_like("grad_y", grad_y, (num_tokens, hidden), x, dt)
    inter, _ = check_ndim("gate_weight", gate_weight, 2, "[D', d]")
    check_like("gate_weight", gate_weight, (inter, hidden), x, dt)
    check_like("up_weight", up_weight, (inter, hidden), x, dt)
    check_ndim("down_weight", down_weight, 2, "[d, D']")
    check_like("down_weight", down_weight, (hidden, inter), x, dt)
    check_layout(lora, x, hidden, inter)
    n, rank = lora.num_experts, lora.rank
    r_pad = padded_rank(rank)
    top_k = check_routing(expert_weights, expert_index, x, n)
    check_like("a_mix", a_mix, (num_tokens, n * rank), x, torch.float32)
    if saved_gate_up is not None:
        if not isinstance(saved_gate_up, (tuple, list)) or len(saved_gate_up) != 2:
            raise TypeError("saved_gate_up must be a pair (W_G x, W_U x) or None")
        for name, t in zip(("saved_gate_up[0]", "saved_gate_up[1]"), saved_gate_up,
                           strict=True):
            check_like(name, t, (num_tokens, inter), x, dt)
            if inter > 1 and t.stride(1) != 1:
                raise ValueError(f"{name} must have unit column stride")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int) or not (
        0 <= dropout_seed < 1 << 64
    ):
        raise ValueError(f"dropout_seed={dropout_seed!r} must be an int in [0, 2^64)")
    has_dropout = dropout_p > 0.0
    dropout_scale = 1.0 / (1.0 - dropout_p)
    # [threshold, key of x_t, key of slot 0, ...]: the kernels evaluate the masks from these.
    keys = torch.tensor(
        [drop_threshold(dropout_p)]
        + [stream_key(dropout_seed, round_index, s) for s in range(1 + top_k)],
        dtype=torch.int64, device=x.device,
    )

    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.float32, device=x.device)

    if num_tokens == 0:
        return ExpertBackward(
            zeros(0, hidden), zeros(0, top_k), zeros(n, rank, hidden), zeros(n, inter, rank),
            zeros(n, rank, hidden), zeros(n, inter, rank), zeros(n, rank, inter),
            zeros(n, hidden, rank),
        )

    x = unit_stride_rows(x)
    grad_y = unit_stride_rows(grad_y)
    gate_weight = unit_stride_rows(gate_weight)
    up_weight = unit_stride_rows(up_weight)
    down_weight = unit_stride_rows(down_weight)
    weights = expert_weights.to(torch.float32).contiguous()
    index = expert_index.contiguous()
    a_mix = a_mix.contiguous()
    bucket = token_bucket(num_tokens)
    order = routing_order(index, sort_tokens)

    # 1. rank-r inputs: a_gu (as the forward computes it) and b = c · dy B_D^T.
    a_gu = new_output((num_tokens, 2 * n * r_pad), dt, x.device)
    _launch_lora_in(x, lora.a_in, a_gu, scaling, keys if has_dropout else None, dropout_scale,
                    configs.get("lora_in"))
    # b is the same rank-r projection, of dy through B_D, unmasked and kept in fp32.
    b = new_output((num_tokens, n * rank), torch.float32, x.device)
    _launch_lora_in(grad_y, lora.b_down, b, scaling, None, 1.0, configs.get("b_down"))

    # 2. dh_base = dy W_D.
    dh_base = new_output((num_tokens, inter), dt, x.device)
    _launch_dh_base(grad_y, down_weight, dh_base, configs.get("dh_base"))

    # 3a. the gate/up backward. Reduction buffers (∂w, da, sums over D' tiles): plain in atomic
    #     mode; per D' tile partials in deterministic mode, summed here in a fixed order. When
    #     recomputing, G and U go to a workspace that 3b reads.
    recompute = saved_gate_up is None
    if recompute:
        g_saved, u_saved = (new_output((num_tokens, inter), dt, x.device) for _ in range(2))
    else:
        g_saved, u_saved = saved_gate_up
    grad_gate = new_output((num_tokens, inter), dt, x.device)
    grad_up = new_output((num_tokens, inter), dt, x.device)
    gu_cfg = configs.get("gate_up")
    n_tiles = ()
    if deterministic:
        gu_cfg = _fixed_config(_gate_up_backward_tuned, gu_cfg, bucket, R_PAD=r_pad)
        n_tiles = (triton.cdiv(inter, gu_cfg.kwargs["BLOCK_N"]),)
    # Each deterministic partial is stored once, so it can be poisoned; atomics need zeros.
    def partials(*shape):
        return new_output(shape, torch.float32, x.device) if deterministic else zeros(*shape)

    dw = partials(*n_tiles, num_tokens, top_k)
    da = partials(*n_tiles, num_tokens, top_k, 2, r_pad)
    launch(
        _gate_up_backward_tuned, _gate_up_backward_kernel,
        tile_grid(num_tokens, inter, "BLOCK_N"),
        (
            x, gate_weight, up_weight, g_saved, u_saved, dh_base, a_gu, b,
            lora.b_gate, lora.b_up, lora.a_down, weights, index, keys, order,
            grad_gate, grad_up, dw, da,
            num_tokens, inter, hidden,
            x.stride(0), gate_weight.stride(0), up_weight.stride(0), g_saved.stride(0),
            u_saved.stride(0), dh_base.stride(0), grad_gate.stride(0), grad_up.stride(0),
            float(scaling), float(dropout_scale), bucket,
        ),
        {"RANK": rank, "R_PAD": r_pad, "NUM_EXPERTS": n, "TOP_K": top_k,
         "RECOMPUTE": recompute, "HAS_DROPOUT": has_dropout, "DETERMINISTIC": deterministic,
         "INTERP_BF16": interpreter_bf16(dt)},
        gu_cfg,
    )
    if deterministic:
        dw, da = dw.sum(0), da.sum(0)

    # 3b. ∂B_G, ∂B_U, ∂A_D (sums over tokens: per token group slabs in deterministic mode).
    wg_cfg = configs.get("gate_up_wgrad")
    slabs = ()
    if deterministic:
        wg_cfg = _fixed_config(_gate_up_wgrad_tuned, wg_cfg, bucket, R_PAD=r_pad)
        slabs = (_token_groups(num_tokens, wg_cfg.kwargs["BLOCK_M"], True)[0],)
    dbg, dbu, dad = (zeros(*slabs, n * r_pad, inter) for _ in range(3))
    _launch_reducing(
        _gate_up_wgrad_tuned, _gate_up_wgrad_kernel, num_tokens, inter,
        (
            g_saved, u_saved, dh_base, a_gu, b, lora.b_gate, lora.b_up, lora.a_down, weights,
            index, keys, order, dbg, dbu, dad,
            num_tokens, inter, g_saved.stride(0), u_saved.stride(0), dh_base.stride(0),
            float(dropout_scale),
        ),
        {"RANK": rank, "R_PAD": r_pad, "NUM_EXPERTS": n, "TOP_K": top_k,
         "HAS_DROPOUT": has_dropout, "DETERMINISTIC": deterministic,
         "INTERP_BF16": interpreter_bf16(dt)},
        wg_cfg, deterministic,
    )
    if deterministic:
        dbg, dbu, dad = dbg.sum(0), dbu.sum(0), dad.sum(0)

    # 4. dx, ∂A_G, ∂A_U, ∂B_D.
    dx = new_output((num_tokens, hidden), torch.float32, x.device)
    dx_cfg = configs.get("dx")
    slabs = ()
    if deterministic:
        # The first config whatever the token count: the only one that compiles spill-free in
        # deterministic mode (compile report: the others spill 8-56 B there).
        dx_cfg = dx_cfg or _dx_tuned.configs[0]
        slabs = (_token_groups(num_tokens, dx_cfg.kwargs["BLOCK_M"], True)[0],)
    dai = zeros(*slabs, 2, n * r_pad, hidden)
    dbd = zeros(*slabs, n * rank, hidden)
    _launch_reducing(
        _dx_tuned, _dx_kernel, num_tokens, hidden,
        (
            grad_gate, grad_up, gate_weight, up_weight, da, lora.a_in, x, grad_y, a_mix, index,
            keys, order, dx, dai, dbd,
            num_tokens, hidden, inter,
            grad_gate.stride(0), grad_up.stride(0), gate_weight.stride(0), up_weight.stride(0),
            x.stride(0), grad_y.stride(0), dx.stride(0),
            float(scaling), float(dropout_scale),
        ),
        {"RANK": rank, "R_PAD": r_pad, "NUM_EXPERTS": n, "TOP_K": top_k,
         "HAS_DROPOUT": has_dropout, "DETERMINISTIC": deterministic,
         "INTERP_BF16": interpreter_bf16(dt)},
        dx_cfg, deterministic,
    )
    if deterministic:
        dai, dbd = dai.sum(0), dbd.sum(0)

    dai = dai.view(2, n, r_pad, hidden)[:, :, :rank]
    return ExpertBackward(
        grad_x=dx,
        grad_weights=dw,
        grad_lora_A_gate=dai[0],
        grad_lora_B_gate=dbg.view(n, r_pad, inter)[:, :rank].transpose(1, 2),
        grad_lora_A_up=dai[1],
        grad_lora_B_up=dbu.view(n, r_pad, inter)[:, :rank].transpose(1, 2),
        grad_lora_A_down=dad.view(n, r_pad, inter)[:, :rank],
        grad_lora_B_down=dbd.view(n, rank, hidden).transpose(1, 2),
    )


# ---------------------------------------------------------------------------------------------
# What the compile report builds: the llama3-8b shape of design.md §4 (d=4096, D'=14336, n=8, k=2,
# r=16, 8192 tokens, bf16), training variants (dropout on; atomic reductions), plus fp16 and
# r = 64 variants (below). Every (spec, config, sm_80/sm_90) compiles without spills.
# ---------------------------------------------------------------------------------------------

_TOP_K = 2
_I32 = "i32"
# (name suffix, compute dtype, n, r): the benchmark shape in bf16; the same in fp16; r = 64 with
# n = 4 (n·r = 256, the masked-dense limit; R_PAD = 64 > LORA_CHUNK, one expert per chunk).
# project and dh_base take no rank constexpr (r only changes their runtime N), so they get no
# r = 64 variant.
_VARIANTS = (("", "bf16", 8, 16), ("[fp16]", "fp16", 8, 16), ("[r=64]", "bf16", 4, 64))


def _lora_constexprs(n: int, rank: int, **flags: bool) -> dict:
    return {"RANK": rank, "R_PAD": padded_rank(rank), "NUM_EXPERTS": n, "TOP_K": _TOP_K,
            **flags, "INTERP_BF16": False}


# The switches users flip, per variant: every combination for the benchmark shape in bf16
# (each path a user can take compiles: ptxas's register allocation does not follow from one
# combination to another), and for fp16 and r = 64 the training default (saved G, U, dropout,
# atomics) with recomputation and, at r = 64, deterministic mode beside it.
_SWITCHES = ("RECOMPUTE", "HAS_DROPOUT", "DETERMINISTIC")
_TAGS = {("RECOMPUTE", False): "saved", ("HAS_DROPOUT", False): "no dropout",
         ("DETERMINISTIC", True): "deterministic"}


def _flag_variants(suffix: str) -> list[dict[str, bool]]:
    if not suffix:
        return [dict(zip(_SWITCHES, values, strict=True))
                for values in itertools.product((True, False), (True, False), (False, True))]
    variants = [{"RECOMPUTE": r, "HAS_DROPOUT": True, "DETERMINISTIC": False}
                for r in (True, False)]
    if suffix == "[r=64]":
        variants.append({"RECOMPUTE": True, "HAS_DROPOUT": True, "DETERMINISTIC": True})
    return variants


def _fixed_or_all(configs: list[triton.Config], flags: dict[str, bool]) -> list[triton.Config]:
    """What a launch may run: in deterministic mode only the first config (``_fixed_config``,
    and dx's first whatever the token count), else every config the autotuner may pick."""
    return configs[:1] if flags["DETERMINISTIC"] else configs


def _flags_of(flags: dict[str, bool]) -> dict[str, bool]:
    return {k: v for k, v in flags.items() if k != "RECOMPUTE"}


def _tagged(name: str, variant: str, flags: dict[str, bool]) -> str:
    """The spec name of a variant (``variant``: ``""``, ``"fp16"``, ``"r=64"``) with these
    switches: ``"...gate_up[fp16,saved]"``; the defaults (recompute, dropout, atomics) add no
    tag."""
    tags = [t for (k, v), t in _TAGS.items() if flags.get(k, not v) == v]
    return variant_name(name, *[variant] * bool(variant), *tags)


def _compile_specs(suffix: str, dt: str, n: int, rank: int) -> list[KernelSpec]:
    ptr = f"*{dt}"
    specs = []
    if rank == 16:
        specs += [
            KernelSpec(
                name=f"expert.backward.project{suffix}",
                fn=_lora_in_kernel,
                types={"x_ptr": ptr, "a_ptr": ptr, "out_ptr": ptr, "keys_ptr": "*i64",
                       "M": _I32, "N": _I32, "K": _I32, "stride_xm": _I32, "scaling": "fp32",
                       "dropout_scale": "fp32", "M_BUCKET": _I32},
                constexprs={"HAS_DROPOUT": True, "INTERP_BF16": False},
                configs=_LORA_IN_GPU,
                aligned=("x_ptr", "a_ptr", "out_ptr", "keys_ptr", "M", "N", "K", "stride_xm",
                         "M_BUCKET"),
                note="a_gu = c · drop_x(x) · [A_G; A_U]^T (256 columns; b = c · dy B_D^T is "
                     "the same kernel without the mask)",
            ),
            KernelSpec(
                name=f"expert.backward.dh_base{suffix}",
                fn=_dh_base_kernel,
                types={"dy_ptr": ptr, "wd_ptr": ptr, "out_ptr": ptr, "M": _I32, "N": _I32,
                       "K": _I32, "stride_dym": _I32, "stride_wd": _I32, "stride_om": _I32,
                       "M_BUCKET": _I32},
                constexprs={"INTERP_BF16": False},
                configs=_DH_BASE_GPU,
                aligned=("dy_ptr", "wd_ptr", "out_ptr", "M", "N", "K", "stride_dym",
                         "stride_wd", "stride_om", "M_BUCKET"),
                note="dh_base = dy · W_D, once for all slots",
            ),
        ]
    gu_ptrs = ("x_ptr", "wg_ptr", "wu_ptr", "gs_ptr", "us_ptr", "dhb_ptr", "a_gu_ptr", "bg_ptr",
               "bu_ptr", "ad_ptr", "dg_ptr", "du_ptr")
    gu_strides = ("stride_xm", "stride_wg", "stride_wu", "stride_gs", "stride_us", "stride_dhb",
                  "stride_dg", "stride_du")
    gu_f32 = ("b_ptr", "w_ptr", "dw_ptr", "da_ptr")
    wg_ptrs = ("gs_ptr", "us_ptr", "dhb_ptr", "a_gu_ptr", "bg_ptr", "bu_ptr", "ad_ptr")
    wg_f32 = ("b_ptr", "w_ptr", "dbg_ptr", "dbu_ptr", "dad_ptr")
    wg_ints = ("M", "N", "stride_gs", "stride_us", "stride_dhb", "num_groups",
               "blocks_per_group", "M_BUCKET")
    dx_ptrs = ("dg_ptr", "du_ptr", "wg_ptr", "wu_ptr", "a_in_ptr", "x_ptr", "dy_ptr")
    dx_f32 = ("da_ptr", "a_mix_ptr", "dx_ptr", "dai_ptr", "dbd_ptr")
    dx_ints = ("M", "N", "K", "stride_dg", "stride_du", "stride_wg", "stride_wu", "stride_xm",
               "stride_dym", "stride_dxm", "num_groups", "blocks_per_group", "M_BUCKET")
    shape = f"n={n}, r={rank}, {dt}"
    wide = rank > 16
    for flags in _flag_variants(suffix):
        recompute = flags["RECOMPUTE"]
        mode = (("dropout on" if flags["HAS_DROPOUT"] else "no dropout")
                + ("; deterministic" if flags["DETERMINISTIC"] else "; atomic reductions"))
        specs.append(KernelSpec(
            name=_tagged("expert.backward.gate_up", suffix[1:-1], flags),
            fn=_gate_up_backward_kernel,
            types={**dict.fromkeys(gu_ptrs, ptr), **dict.fromkeys(gu_f32, "*fp32"),
                   "idx_ptr": "*i64", "keys_ptr": "*i64", "order_ptr": "*i32",
                   **dict.fromkeys(("M", "N", "K", *gu_strides, "M_BUCKET"), _I32),
                   "scaling": "fp32", "dropout_scale": "fp32"},
            constexprs=_lora_constexprs(n, rank, RECOMPUTE=recompute, **_flags_of(flags)),
            configs=_fixed_or_all(_GATE_UP_BWD_WIDE_RANK if wide else _GATE_UP_BWD_GPU, flags),
            aligned=(*gu_ptrs, *gu_f32, "idx_ptr", "keys_ptr", "order_ptr", "M", "N", "K",
                     *gu_strides, "M_BUCKET"),
            note=(("recomputed dual gate/up GEMM (G, U to the workspace)" if recompute else
                   "the forward's saved G, U")
                  + f" + per-slot LoRA + SwiGLU backward + ∂w, da ({mode}; {shape})"),
        ))
        if not recompute:
            continue  # the other two kernels have no such switch
        specs += [
            KernelSpec(
                name=_tagged("expert.backward.gate_up_wgrad", suffix[1:-1], flags),
                fn=_gate_up_wgrad_kernel,
                types={**dict.fromkeys(wg_ptrs, ptr), **dict.fromkeys(wg_f32, "*fp32"),
                       "idx_ptr": "*i64", "keys_ptr": "*i64", "order_ptr": "*i32",
                       **dict.fromkeys(wg_ints, _I32),
                       "dropout_scale": "fp32"},
                constexprs=_lora_constexprs(n, rank, **_flags_of(flags)),
                configs=_fixed_or_all(_WGRAD_WIDE_RANK if wide else _WGRAD_GPU, flags),
                aligned=(*wg_ptrs, *wg_f32, "idx_ptr", "keys_ptr", "order_ptr", "M", "N",
                         "stride_gs", "stride_us", "stride_dhb", "M_BUCKET"),
                note=f"per-slot SwiGLU backward re-derived from G, U + ∂B_G/∂B_U/∂A_D "
                     f"({mode}; {shape})",
            ),
            KernelSpec(
                name=_tagged("expert.backward.dx", suffix[1:-1], flags),
                fn=_dx_kernel,
                types={**dict.fromkeys(dx_ptrs, ptr), **dict.fromkeys(dx_f32, "*fp32"),
                       "idx_ptr": "*i64", "keys_ptr": "*i64", "order_ptr": "*i32",
                       **dict.fromkeys(dx_ints, _I32),
                       "scaling": "fp32", "dropout_scale": "fp32"},
                constexprs=_lora_constexprs(n, rank, **_flags_of(flags)),
                configs=_fixed_or_all(_DX_GPU, flags),
                aligned=(*dx_ptrs, *dx_f32, "idx_ptr", "keys_ptr", "order_ptr", *dx_ints[:-3],
                         "M_BUCKET"),
                note=f"dG W_G + dU W_U + masked-dense LoRA K-steps + ∂A_G/∂A_U/∂B_D "
                     f"({mode}; {shape})",
            ),
        ]
    return specs


COMPILE_SPECS = [spec for variant in _VARIANTS for spec in _compile_specs(*variant)]
