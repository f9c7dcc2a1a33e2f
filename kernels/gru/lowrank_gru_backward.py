"""Backward of the low-rank GRU cell (:mod:`.lowrank_gru`): from ``g = ∂L/∂h'`` the gradients of
``h``, ``y``, ``x`` (candidate input ``"x"``), ``W_z``, ``W_r``, ``W_o`` and ``b_o``. ``W_g`` and
the residual ``x_next = x + W_g h'`` stay outside (the caller's GEMMs).

With ``z, r, ĥ`` the gates, ``u`` the candidate input (``y`` or ``x``), ``act'`` the activation's
derivative expressed through ``ĥ`` (``ĥ(1 − ĥ)`` or ``1 − ĥ²``)::

    gz  = g ⊙ (ĥ − h) ⊙ z(1 − z)        (∂L/∂ of z's pre-activation)
    gp  = g ⊙ z ⊙ act'                   (∂L/∂ of the candidate's pre-activation)
    grh = gp W_o[:, :dh]                 (∂L/∂(r ⊙ h))
    gr  = grh ⊙ h ⊙ r(1 − r)
    ∂h  = g ⊙ (1 − z) + grh ⊙ r + [gz, gr] [W_z; W_r][:, :dh]
    ∂y  = [gz, gr] [W_z; W_r][:, dh:]  (+ gp W_o[:, dh:] for candidate y;  ∂x = that for x)
    ∂W_z, ∂W_r = [gz, gr]^T [h, y];  ∂W_o = gp^T [r ⊙ h, u];  ∂b_o = Σ_tokens gp

Five kinds of launch, each waiting for a reduction over a whole row of the one before:

1. ``gates`` (token block × dh block): recomputes z, r and the ``u`` half of the candidate in one
   K loop over ``[h, y]`` (the forward's pass 1, same anatomy); stores z, r, the partial candidate
   (fp32 workspace) and r ⊙ h (input dtype: a dot operand). In round 1 (``h`` = 0) the candidate
   is complete here, so this launch also does step 2's elementwise backward: two launches fewer.
2. ``candidate``: the ``r ⊙ h`` half of the candidate (K = dh), the activation, and the fused
   elementwise backward: gz and gp (stored in the input dtype, the later products' operands) and
   ``∂b_o`` reduced over the tile's tokens.
3. ``reset``: ``grh = gp W_o[:, :dh]`` (K = dh, over all of gp), fused with gr and the elementwise
   part of ``∂h`` (``g(1 − z) + grh ⊙ r``, fp32 workspace).
4. ``input`` (token block × column block), once per output: ``∂h`` (adds the workspace), ``∂y``,
   ``∂x``: one K loop over dh reading each gradient tile once for up to three weights.
5. ``weight`` (weight-row block × column block × token group): the token reductions, one launch
   per (gradient rows, operand) pair, e.g. ``[gz, gr]^T h`` or ``[gz, gr, gp]^T y`` (candidate y).

Reductions over tokens (``∂W``, ``∂b_o``) accumulate in fp32: by default ``tl.atomic_add`` into
zeroed buffers (the summation order varies run to run); ``deterministic=True`` stores one partial
per token group (weights; at most ``TOKEN_GROUPS``) or token block (bias) and sums them with torch
in a fixed order: no float atomics, bit-identical results run to run.

The gates are recomputed, never saved by the forward (three [M, dh] tensors per round). The
workspaces are [M, dh]-sized: ``3·dh`` gradient columns in the input dtype, ``3·dh`` fp32 and
``r ⊙ h``; their rows are padded to a 16-element multiple, zero-filled by the kernels that write
them, so every later dot loads them with uniform masks.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..compile_spec import KernelSpec, variant_name
from ..utils import (
    ceil_to,
    check_activation,
    check_float,
    check_like,
    check_ndim,
    dot_k,
    interpreter_bf16,
    is_interpreter,
    launch,
    load_tile,
    mma,
    new_output,
    on_device_of,
    pinned_configs,
    row_major_tile,
    store_rounded,
    tile_grid,
    token_bucket,
    unit_stride_rows,
)
from .lowrank_gru import (
    _ALIGN,
    CANDIDATE_ACTIVATIONS,
    CANDIDATE_INPUTS,
    GATES_GPU_CONFIGS,
    GATES_INTERPRETER_CONFIGS,
    UPDATE_GPU_CONFIGS,
    UPDATE_INTERPRETER_CONFIGS,
    _candidate_activation,
    _pack_gate_weights,
    gate_preactivations,
    gru_variant_tags,
)

__all__ = ["TOKEN_GROUPS", "GRUBackward", "lowrank_gru_backward"]

# Token groups of the weight-gradient launch: each program reduces one group's tokens for one
# output tile. Enough programs in flight at 8192 tokens (8 × ~750 tiles) without many atomics;
# in deterministic mode the number of fp32 partial slabs (3·dh·(dh + d) each, ~22 MB at
# llama3-8b).
TOKEN_GROUPS = 8


# ---------------------------------------------------------------------------------------------
# jit helpers of this file.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _elementwise_backward(g, z, cand, h, CAND_TANH: tl.constexpr):
    """``(gz, gp)``: the gradients of z's and the candidate's pre-activations."""
    gz = g * (cand - h) * z * (1.0 - z)
    if CAND_TANH:
        dact = 1.0 - cand * cand
    else:
        dact = cand * (1.0 - cand)
    return gz, g * z * dact


@triton.jit
def _store_padded(ptr, value, rows, row_ok, stride, units, unit_ok, DH_PAD,
                  INTERP_BF16: tl.constexpr):
    """Stores a [BLOCK_M, BLOCK_H] tile of a workspace with rows padded to ``DH_PAD`` columns,
    writing zeros in the padding (the dh blocks always cover it: BLOCK_H is a multiple of 16),
    so the dots that read the workspace back run their K loop to ``DH_PAD`` unmasked in K."""
    value = tl.where(unit_ok[None, :], value, 0.0)
    store_rounded(ptr, value, rows, row_ok, stride, units, units < DH_PAD, INTERP_BF16)


@triton.jit
def _bias_partial(bias_ptr, gp, row_ok, units, unit_ok, DH, BLOCK_H: tl.constexpr,
                  DETERMINISTIC: tl.constexpr):
    """``∂b_o += Σ_rows gp``: an atomic add, or (``DETERMINISTIC``) this token block's partial,
    stored in row ``token block`` of a zeroed ``[blocks, dh]`` buffer."""
    part = tl.sum(tl.where(row_ok[:, None], gp, 0.0), axis=0)
    if DETERMINISTIC:
        pid_m = tl.program_id(0) // tl.cdiv(DH, BLOCK_H)
        tl.store(bias_ptr + pid_m * DH + units, part, mask=unit_ok)
    else:
        tl.atomic_add(bias_ptr + units, part, mask=unit_ok, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gru_bwd_gates_kernel(
    h_ptr,
    y_ptr,
    x_ptr,
    wz_ptr,
    wr_ptr,
    wo_ptr,
    bo_ptr,
    gh_ptr,
    ws_ptr,
    rh_ptr,
    g_ptr,
    bias_ptr,
    M,
    D,
    DH,
    DH_PAD,
    U_OFF,
    stride_hm,
    stride_ym,
    stride_xm,
    stride_w,
    stride_gh,
    stride_ws,
    stride_wsk,
    stride_g,
    M_BUCKET,
    HAS_H: tl.constexpr,
    CAND_X: tl.constexpr,
    CAND_TANH: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, row_ok, units, unit_ok = row_major_tile(M, DH, BLOCK_M, BLOCK_H)
    units64 = units.to(tl.int64)
    # The forward's gates pass, recomputed.
    acc_z, acc_r, acc_o = gate_preactivations(
        h_ptr, y_ptr, x_ptr, wz_ptr, wr_ptr, wo_ptr, rows, row_ok, units64, unit_ok, D, DH,
        DH_PAD, U_OFF, stride_hm, stride_ym, stride_xm, stride_w, HAS_H, CAND_X, INTERP_BF16,
        BLOCK_M, BLOCK_H, BLOCK_K)

    z = tl.sigmoid(acc_z)
    acc_o += tl.load(bo_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_H:
        r = tl.sigmoid(acc_r)
        h_blk = load_tile(h_ptr, rows, row_ok, stride_hm, units, DH).to(tl.float32)
        _store_padded(rh_ptr, r * h_blk, rows, row_ok, stride_ws, units, unit_ok, DH_PAD,
                      INTERP_BF16)
        # fp32 workspace [3, M, DH_PAD]: z, r, the candidate's u half (+ b_o).
        ws_off = rows[:, None] * stride_ws + units[None, :]
        out_mask = row_ok[:, None] & unit_ok[None, :]
        tl.store(ws_ptr + ws_off, z, mask=out_mask)
        tl.store(ws_ptr + stride_wsk + ws_off, r, mask=out_mask)
        tl.store(ws_ptr + 2 * stride_wsk + ws_off, acc_o, mask=out_mask)
    else:
        # h = 0: the candidate is complete; do the candidate launch's elementwise backward.
        cand = _candidate_activation(acc_o, CAND_TANH)
        g = load_tile(gh_ptr, rows, row_ok, stride_gh, units, DH).to(tl.float32)
        gz, gp = _elementwise_backward(g, z, cand, 0.0, CAND_TANH)
        _store_padded(g_ptr, gz, rows, row_ok, stride_g, units, unit_ok, DH_PAD, INTERP_BF16)
        _store_padded(g_ptr + 2 * DH_PAD, gp, rows, row_ok, stride_g, units, unit_ok, DH_PAD,
                      INTERP_BF16)
        _bias_partial(bias_ptr, gp, row_ok, units, unit_ok, DH, BLOCK_H, DETERMINISTIC)


@triton.jit
def _gru_bwd_candidate_kernel(
    h_ptr,
    rh_ptr,
    ws_ptr,
    wo_ptr,
    gh_ptr,
    g_ptr,
    bias_ptr,
    M,
    DH,
    DH_PAD,
    stride_hm,
    stride_ws,
    stride_wsk,
    stride_w,
    stride_gh,
    stride_g,
    M_BUCKET,
    CAND_TANH: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, row_ok, units, unit_ok = row_major_tile(M, DH, BLOCK_M, BLOCK_H)
    # The candidate's r ⊙ h half (r ⊙ h rows are zero-padded: K_A = K_W = DH_PAD).
    acc = dot_k(tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), rh_ptr, rows, row_ok, stride_ws,
                wo_ptr, units.to(tl.int64), unit_ok, stride_w, DH_PAD, DH_PAD, BLOCK_K,
                INTERP_BF16)
    cand = _candidate_activation(acc + load_tile(ws_ptr + 2 * stride_wsk, rows, row_ok,
                                                 stride_ws, units, DH), CAND_TANH)
    z = load_tile(ws_ptr, rows, row_ok, stride_ws, units, DH)
    h = load_tile(h_ptr, rows, row_ok, stride_hm, units, DH).to(tl.float32)
    g = load_tile(gh_ptr, rows, row_ok, stride_gh, units, DH).to(tl.float32)
    gz, gp = _elementwise_backward(g, z, cand, h, CAND_TANH)
    _store_padded(g_ptr, gz, rows, row_ok, stride_g, units, unit_ok, DH_PAD, INTERP_BF16)
    _store_padded(g_ptr + 2 * DH_PAD, gp, rows, row_ok, stride_g, units, unit_ok, DH_PAD,
                  INTERP_BF16)
    _bias_partial(bias_ptr, gp, row_ok, units, unit_ok, DH, BLOCK_H, DETERMINISTIC)


@triton.jit
def _gru_bwd_reset_kernel(
    h_ptr,
    ws_ptr,
    wo_ptr,
    gh_ptr,
    g_ptr,
    M,
    DH,
    DH_PAD,
    stride_hm,
    stride_ws,
    stride_wsk,
    stride_w,
    stride_gh,
    stride_g,
    M_BUCKET,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, row_ok, units, unit_ok = row_major_tile(M, DH, BLOCK_M, BLOCK_H)
    # grh = gp W_o[:, :dh]: W_o used as stored (K = its rows), gp's rows zero-padded.
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, DH_PAD, BLOCK_K):
        k = k0 + offs_k
        a = load_tile(g_ptr + 2 * DH_PAD, rows, row_ok, stride_g, k, DH_PAD)
        w = load_tile(wo_ptr, k, k < DH, stride_w, units, DH)
        acc = mma(a, w, acc, INTERP_BF16)
    r = load_tile(ws_ptr + stride_wsk, rows, row_ok, stride_ws, units, DH)
    h = load_tile(h_ptr, rows, row_ok, stride_hm, units, DH).to(tl.float32)
    _store_padded(g_ptr + DH_PAD, acc * h * r * (1.0 - r), rows, row_ok, stride_g, units,
                  unit_ok, DH_PAD, INTERP_BF16)
    # The elementwise part of ∂h over the partial candidate (dead after the candidate launch).
    z = load_tile(ws_ptr, rows, row_ok, stride_ws, units, DH)
    g = load_tile(gh_ptr, rows, row_ok, stride_gh, units, DH).to(tl.float32)
    tl.store(ws_ptr + 2 * stride_wsk + rows[:, None] * stride_ws + units[None, :],
             g * (1.0 - z) + acc * r, mask=row_ok[:, None] & unit_ok[None, :])


@triton.jit
def _gru_bwd_input_kernel(
    g_ptr,
    wz_ptr,
    wr_ptr,
    wo_ptr,
    add_ptr,
    out_ptr,
    M,
    N,
    DH,
    DH_PAD,
    COL_OFF,
    stride_g,
    stride_w,
    stride_add,
    stride_out,
    M_BUCKET,
    USE_Z: tl.constexpr,
    USE_R: tl.constexpr,
    USE_O: tl.constexpr,
    HAS_ADD: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out = [gz, gr, gp] [W_z; W_r; W_o][:, COL_OFF + cols] (the terms USE_* names) + add.
    rows, row_ok, cols, col_ok = row_major_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = (COL_OFF + cols)[None, :]
    a_rows = rows[:, None] * stride_g
    for k0 in range(0, DH_PAD, BLOCK_K):
        k = k0 + offs_k
        # One offset tensor for the three weights (one row stride) and one for the three
        # gradient tiles (one row of the workspace).
        w_off = k[:, None] * stride_w + w_cols
        w_mask = (k < DH)[:, None] & col_ok[None, :]
        a_off = a_rows + k[None, :]
        a_mask = row_ok[:, None] & (k < DH_PAD)[None, :]
        if USE_Z:
            acc = mma(tl.load(g_ptr + a_off, mask=a_mask, other=0.0),
                      tl.load(wz_ptr + w_off, mask=w_mask, other=0.0), acc, INTERP_BF16)
        if USE_R:
            acc = mma(tl.load(g_ptr + DH_PAD + a_off, mask=a_mask, other=0.0),
                      tl.load(wr_ptr + w_off, mask=w_mask, other=0.0), acc, INTERP_BF16)
        if USE_O:
            acc = mma(tl.load(g_ptr + 2 * DH_PAD + a_off, mask=a_mask, other=0.0),
                      tl.load(wo_ptr + w_off, mask=w_mask, other=0.0), acc, INTERP_BF16)
    if HAS_ADD:
        acc += load_tile(add_ptr, rows, row_ok, stride_add, cols, N)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gru_bwd_weight_kernel(
    g_ptr,
    b_ptr,
    out_ptr,
    M,
    NR,
    NC,
    DH,
    DH_PAD,
    TOKENS_PER_GROUP,
    stride_g,
    stride_b,
    stride_out,
    stride_slab,
    M_BUCKET,
    DETERMINISTIC: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[rows, cols] (+)= G[tokens, j]^T @ B[tokens, cols] over one token group; j runs over
    # NR = segments·DH_PAD workspace columns (gz | gr | gp, each padded), output row
    # segment·DH + (j mod DH_PAD).
    pid = tl.program_id(0)
    num_r = tl.cdiv(NR, BLOCK_R)
    num_c = tl.cdiv(NC, BLOCK_N)
    tiles = num_r * num_c
    group = pid // tiles
    pid_r = (pid % tiles) // num_c
    pid_c = pid % num_c
    j = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    j_ok = j < NR
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NC
    start = group * TOKENS_PER_GROUP
    end = tl.minimum(M, start + TOKENS_PER_GROUP)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(start, end, BLOCK_K):
        t = (k0 + offs_k).to(tl.int64)
        t_ok = t < end
        a_t = tl.load(g_ptr + t[None, :] * stride_g + j[:, None],
                      mask=j_ok[:, None] & t_ok[None, :], other=0.0)
        b = tl.load(b_ptr + t[:, None] * stride_b + cols[None, :],
                    mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a_t, b, acc, INTERP_BF16)
    seg = j // DH_PAD
    within = j - seg * DH_PAD
    out_rows = seg * DH + within
    ptrs = out_ptr + group * stride_slab + out_rows[:, None] * stride_out + cols[None, :]
    mask = (j_ok & (within < DH))[:, None] & col_ok[None, :]
    if DETERMINISTIC:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Configs (sm_80 / sm_90) and autotuners.
# ---------------------------------------------------------------------------------------------

# gates: the forward's gates configs but 64 × 64 on 4 warps, which spills 112 B on sm_80 with h
# and candidate x (three accumulators and a second activation tile; compile report).
# candidate: the forward's update configs (its epilogue holds five fp32 tiles, ≤ 32 elements
# per thread each).
GATES_BWD_GPU_CONFIGS = [c for c in GATES_GPU_CONFIGS
                         if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_H"], c.num_warps) != (64, 64, 4)]
# input: up to three gradient and three weight tiles per K step, so BLOCK_K = 32 keeps
# 3·(BLOCK_M + BLOCK_N)·BLOCK_K·2 B per stage ≤ 48 KB; one fp32 accumulator.
# 64 × 128 on 8 warps: on 4 it spills 8-24 B on sm_80 with triton 3.6-3.8.
# 64×128×32 with 3 stages spills 16 B on sm_80 for candidate x's ∂y (z, r terms only): 2 stages.
INPUT_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# weight: K = tokens of one group; a transposed gradient tile and an operand tile per step. The
# atomic epilogue into the unaligned u-column block is scalar (one address per element): 64
# fp32 accumulator elements per thread or fewer, else sm_90 spills (64 × 128 on 4 warps and
# 128 × 128 on 8 warps: 8 B, compile report).
WEIGHT_GPU_CONFIGS = [
    triton.Config({"BLOCK_R": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
INPUT_INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)
]
# reset: with triton 3.6-3.7 the update configs spill 48-80 B here on sm_80 and sm_90 (compile
# report) where these do not: BLOCK_K = 32, and two stages for the 128-row tile.
RESET_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_H": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
WEIGHT_INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_R": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)
]

_INTERPRET = is_interpreter()
# Token groups of the weight launch start on multiples of this (a multiple of every BLOCK_K).
_GROUP_ALIGN = 16 if _INTERPRET else 128

_gates_tuned = triton.autotune(
    configs=GATES_INTERPRETER_CONFIGS if _INTERPRET else GATES_BWD_GPU_CONFIGS,
    key=["M_BUCKET", "D", "DH", "HAS_H", "CAND_X", "DETERMINISTIC"],
    reset_to_zero=["bias_ptr"],
)(_gru_bwd_gates_kernel)
_candidate_tuned = triton.autotune(
    configs=UPDATE_INTERPRETER_CONFIGS if _INTERPRET else UPDATE_GPU_CONFIGS,
    key=["M_BUCKET", "DH", "DETERMINISTIC"],
    reset_to_zero=["bias_ptr"],
)(_gru_bwd_candidate_kernel)
_reset_tuned = triton.autotune(
    configs=UPDATE_INTERPRETER_CONFIGS if _INTERPRET else RESET_GPU_CONFIGS,
    key=["M_BUCKET", "DH"],
)(_gru_bwd_reset_kernel)
_input_tuned = triton.autotune(
    configs=INPUT_INTERPRETER_CONFIGS if _INTERPRET else INPUT_GPU_CONFIGS,
    key=["M_BUCKET", "N", "DH", "USE_Z", "USE_R", "USE_O", "HAS_ADD"],
)(_gru_bwd_input_kernel)
# Every weight launch gets a view of exactly the output block it writes, so the reset before
# each tuning run clears only that block, not the other launches' results.
_weight_tuned = triton.autotune(
    configs=WEIGHT_INTERPRETER_CONFIGS if _INTERPRET else WEIGHT_GPU_CONFIGS,
    key=["M_BUCKET", "NR", "NC", "DH", "DETERMINISTIC"],
    reset_to_zero=["out_ptr"],
)(_gru_bwd_weight_kernel)

_LAUNCHES = ("gates", "candidate", "reset", "input", "weight")


def _token_groups(num_tokens: int) -> tuple[int, int]:
    """``(groups, tokens per group)`` of the weight launch: independent of the block shapes,
    so deterministic mode may autotune (its slabs do not depend on the config)."""
    per_group = ceil_to(max(triton.cdiv(num_tokens, TOKEN_GROUPS), 1), _GROUP_ALIGN)
    return triton.cdiv(num_tokens, per_group), per_group


def _min_block_m(tuned, config: triton.Config | None) -> int:
    """The smallest token block a launch can run with: sizes the deterministic bias partials."""
    configs = [config] if config is not None else tuned.configs
    return min(c.kwargs["BLOCK_M"] for c in configs)


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a 16-element row stride (a padded copy if needed), so its rows vectorise."""
    t = unit_stride_rows(t)
    if t.shape[0] <= 1 or t.stride(0) % _ALIGN == 0:
        return t
    buf = new_output((t.shape[0], ceil_to(t.shape[1], _ALIGN)), t.dtype, t.device)
    view = buf[:, :t.shape[1]]
    view.copy_(t)
    return view


class GRUBackward(NamedTuple):
    """What :func:`lowrank_gru_backward` returns, every gradient in fp32."""

    grad_h: torch.Tensor | None  # [M, dh]; None for the zero state (h=None)
    grad_y: torch.Tensor  # [M, d]
    grad_x: torch.Tensor | None  # [M, d]; candidate input "x" only
    grad_weight_z: torch.Tensor  # [dh, dh + d]
    grad_weight_r: torch.Tensor  # [dh, dh + d]
    grad_weight_o: torch.Tensor  # [dh, dh + d]
    grad_bias_o: torch.Tensor  # [dh]


def _launch_backward(grad_h_new, h, y, x, weight_z, weight_r, weight_o, bias_o,
                     candidate_input: str, candidate_activation: str, deterministic: bool,
                     configs: dict[str, triton.Config]) -> GRUBackward:
    """All launches on validated inputs (``h`` may be None); returns the gradients."""
    num_tokens, d = y.shape
    dh = weight_z.shape[0]
    dh_pad = ceil_to(dh, _ALIGN)
    dev, cd = y.device, y.dtype
    has_h, cand_x = h is not None, candidate_input == "x"
    u = x if cand_x else y
    bucket = token_bucket(num_tokens)
    interp = interpreter_bf16(cd)
    wz, wr, wo, stride_w, u_off = _pack_gate_weights(weight_z, weight_r, weight_o, dh, d)

    grad_h = new_output((num_tokens, dh), torch.float32, dev) if has_h else None
    grad_y = new_output((num_tokens, d), torch.float32, dev)
    grad_x = new_output((num_tokens, d), torch.float32, dev) if cand_x else None
    groups, per_group = _token_groups(num_tokens)
    if deterministic:
        slabs = torch.zeros(groups, 3 * dh, dh + d, dtype=torch.float32, device=dev)
    else:
        slabs = torch.zeros(1, 3 * dh, dh + d, dtype=torch.float32, device=dev)
    tuned_bias = _gates_tuned if not has_h else _candidate_tuned
    bias_cfg = configs.get("gates" if not has_h else "candidate")
    bias_rows = triton.cdiv(num_tokens, _min_block_m(tuned_bias, bias_cfg)) if deterministic else 1
    bias_buf = torch.zeros(bias_rows, dh, dtype=torch.float32, device=dev)

    # Workspaces: [gz | gr | gp] in the input dtype (dot operands), rows padded; fp32 z, r and
    # the candidate's u half (then the elementwise part of ∂h); r ⊙ h.
    gbuf = new_output((num_tokens, 3 * dh_pad), cd, dev)
    if has_h:
        ws = new_output((3, num_tokens, dh_pad), torch.float32, dev)
        rh = new_output((num_tokens, dh_pad), cd, dev)
        h_arg, stride_hm = h, h.stride(0)
    else:
        ws, rh = gbuf, gbuf  # never dereferenced
        h_arg, stride_hm = y, 0
    stride_ws, stride_wsk = ws.stride(-2), ws.stride(0) if has_h else 0
    gh = grad_h_new
    flags = {"INTERP_BF16": interp}
    det = {"DETERMINISTIC": deterministic}
    dh_grid = tile_grid(num_tokens, dh, "BLOCK_H")

    launch(
        _gates_tuned, _gru_bwd_gates_kernel, dh_grid,
        (h_arg, y, x if cand_x else y, wz, wr, wo, bias_o, gh, ws, rh, gbuf, bias_buf,
         num_tokens, d, dh, dh_pad, u_off,
         stride_hm, y.stride(0), u.stride(0), stride_w, gh.stride(0), stride_ws, stride_wsk,
         gbuf.stride(0), bucket),
        {**flags, **det, "HAS_H": has_h, "CAND_X": cand_x,
         "CAND_TANH": candidate_activation == "tanh"},
        configs.get("gates"),
    )
    if has_h:
        launch(
            _candidate_tuned, _gru_bwd_candidate_kernel, dh_grid,
            (h, rh, ws, wo, gh, gbuf, bias_buf, num_tokens, dh, dh_pad,
             stride_hm, stride_ws, stride_wsk, stride_w, gh.stride(0), gbuf.stride(0), bucket),
            {**flags, **det, "CAND_TANH": candidate_activation == "tanh"},
            configs.get("candidate"),
        )
        launch(
            _reset_tuned, _gru_bwd_reset_kernel, dh_grid,
            (h, ws, wo, gh, gbuf, num_tokens, dh, dh_pad,
             stride_hm, stride_ws, stride_wsk, stride_w, gh.stride(0), gbuf.stride(0), bucket),
            flags,
            configs.get("reset"),
        )

    # Input gradients: (output, width, weight column offset, z, r, o terms, added workspace).
    inputs = []
    if has_h:
        inputs.append((grad_h, dh, 0, True, True, False, ws[2]))
    inputs.append((grad_y, d, u_off, True, has_h, not cand_x, None))
    if cand_x:
        inputs.append((grad_x, d, u_off, False, False, True, None))
    for out, width, col_off, use_z, use_r, use_o, add in inputs:
        launch(
            _input_tuned, _gru_bwd_input_kernel, tile_grid(num_tokens, width, "BLOCK_N"),
            (gbuf, wz, wr, wo, out if add is None else add, out, num_tokens, width, dh, dh_pad,
             col_off, gbuf.stride(0), stride_w, (out if add is None else add).stride(0),
             out.stride(0), bucket),
            {**flags, "USE_Z": use_z, "USE_R": use_r, "USE_O": use_o, "HAS_ADD": add is not None},
            configs.get("input"),
        )

    # Weight gradients: (first workspace segment, segments, operand, first output row, first
    # output column). Output rows: W_z, W_r, W_o stacked; columns [h, u] as the weights'.
    products = []
    if has_h:
        products += [(0, 2, h, 0, 0), (2, 1, rh, 2 * dh, 0)]
        products += [(0, 2, y, 0, dh), (2, 1, x, 2 * dh, dh)] if cand_x else [(0, 3, y, 0, dh)]
    else:
        products += [(0, 1, y, 0, dh), (2, 1, u, 2 * dh, dh)]
    for seg0, nseg, operand, row0, col0 in products:
        width = operand.shape[1] if operand is not rh else dh
        out = slabs[:, row0:row0 + nseg * dh, col0:col0 + width]
        if not deterministic:
            out = out[0]
        nr = nseg * dh_pad

        def grid(meta, nr=nr, width=width):
            tiles = triton.cdiv(nr, meta["BLOCK_R"]) * triton.cdiv(width, meta["BLOCK_N"])
            return (groups * tiles,)

        launch(
            _weight_tuned, _gru_bwd_weight_kernel, grid,
            (gbuf[:, seg0 * dh_pad:], operand, out, num_tokens, nr, width, dh, dh_pad, per_group,
             gbuf.stride(0), operand.stride(0), out.stride(-2),
             out.stride(0) if deterministic else 0, bucket),
            {**flags, **det},
            configs.get("weight"),
        )

    grad_w = slabs.sum(0) if deterministic and groups > 1 else slabs[0]
    grad_bias = bias_buf.sum(0) if bias_rows > 1 else bias_buf[0]
    return GRUBackward(grad_h, grad_y, grad_x, grad_w[:dh], grad_w[dh:2 * dh],
                       grad_w[2 * dh:], grad_bias)


@on_device_of("y")
def lowrank_gru_backward(
    grad_h_new: torch.Tensor,
    h: torch.Tensor | None,
    y: torch.Tensor,
    x: torch.Tensor | None,
    weight_z: torch.Tensor,
    weight_r: torch.Tensor,
    weight_o: torch.Tensor,
    bias_o: torch.Tensor,
    candidate_input: str = "y",
    candidate_activation: str = "sigmoid",
    *,
    deterministic: bool = False,
    configs: dict[str, triton.Config] | None = None,
) -> GRUBackward:
    """Backward of one low-rank GRU step ``h' = GRU(h, y[, x])`` (:func:`.fused_lowrank_gru`
    without the ``W_g`` projection), the gates recomputed from ``(h, y, x)``.

    Computes what ``graphmoe_fused.backends.torch.gru.gru_step_backward`` does, accumulating in
    fp32; the products' operands are in the inputs' dtype (the gradients of the
    pre-activations and ``r ⊙ h`` rounded to it once, like the forward rounds ``r ⊙ h``).

    Args:
        grad_h_new: ``[M, dh]`` gradient of ``h'`` (any float dtype; read as fp32).
        h: ``[M, dh]`` state, or ``None`` for the zero state of round 1 (cheaper: r, the ``h``
            halves and ``∂h`` drop out).
        y: ``[M, d]`` expert output of this round.
        x: ``[M, d]`` round input; used (and required) for candidate input ``"x"`` only.
        weight_z, weight_r, weight_o: ``[dh, dh + d]``, columns ordered ``[h, y]``.
        bias_o: ``[dh]``.
        candidate_input: ``"y"`` (Eq. 6) or ``"x"`` (Algorithm 1).
        candidate_activation: ``"sigmoid"`` or ``"tanh"``.
        deterministic: no float atomics: the token reductions are stored per token group /
            block and summed in a fixed order, so results are bit-identical run to run.
        configs: pins the block shapes of launches ``"gates"``, ``"candidate"``, ``"reset"``
            (``BLOCK_M``, ``BLOCK_H``, ``BLOCK_K``), ``"input"`` (``BLOCK_M``, ``BLOCK_N``,
            ``BLOCK_K``) and ``"weight"`` (``BLOCK_R``, ``BLOCK_N``, ``BLOCK_K``) instead of
            autotuning them.

    ``h``, ``y``, ``x``, the weights and ``bias_o`` share ``y``'s dtype (fp16, bf16 or fp32) and
    device (CUDA; CPU under ``TRITON_INTERPRET=1``). Any row stride; unit column stride.

    Returns:
        :class:`GRUBackward`: ``grad_h [M, dh]`` (``None`` when ``h`` is ``None``),
        ``grad_y [M, d]``, ``grad_x [M, d]`` (``None`` for candidate ``"y"``, whose ``u`` path is
        in ``grad_y``), ``grad_weight_z``, ``grad_weight_r``, ``grad_weight_o`` ``[dh, dh + d]``
        (three views of one buffer) and ``grad_bias_o [dh]``, all fp32.

    Raises:
        ValueError: a shape, a device or an option is wrong.
        TypeError: an unsupported or mismatched dtype.
    """
    configs = pinned_configs(configs, _LAUNCHES)
    if candidate_input not in CANDIDATE_INPUTS:
        raise ValueError(f"candidate_input={candidate_input!r} not in {CANDIDATE_INPUTS}")
    if candidate_activation not in CANDIDATE_ACTIVATIONS:
        raise ValueError(
            f"candidate_activation={candidate_activation!r} not in {CANDIDATE_ACTIVATIONS}"
        )
    num_tokens, d = check_activation("y", y, "[M, d]")
    dh, _ = check_ndim("weight_z", weight_z, 2, "[dh, dh + d]")
    if d < 1 or dh < 1:
        raise ValueError(f"need d ≥ 1 and dh ≥ 1, got d={d}, dh={dh}")
    if candidate_input == "x" and x is None:
        raise ValueError("candidate_input='x' needs x")
    expected = {
        "h": (h, (num_tokens, dh)), "x": (x, (num_tokens, d)),
        "weight_z": (weight_z, (dh, dh + d)), "weight_r": (weight_r, (dh, dh + d)),
        "weight_o": (weight_o, (dh, dh + d)), "bias_o": (bias_o, (dh,)),
    }
    for name, (t, shape) in expected.items():
        if t is not None:
            check_like(name, t, shape, y, y.dtype)
    check_like("grad_h_new", grad_h_new, (num_tokens, dh), y)
    check_float("grad_h_new", grad_h_new)

    if num_tokens == 0:
        zeros = torch.zeros(3, dh, dh + d, dtype=torch.float32, device=y.device)
        empty = torch.zeros(0, d, dtype=torch.float32, device=y.device)
        return GRUBackward(
            None if h is None else torch.zeros(0, dh, dtype=torch.float32, device=y.device),
            empty, empty.clone() if candidate_input == "x" else None,
            zeros[0], zeros[1], zeros[2], torch.zeros(dh, dtype=torch.float32, device=y.device),
        )
    return _launch_backward(
        unit_stride_rows(grad_h_new), None if h is None else _aligned_rows(h),
        unit_stride_rows(y), None if x is None else unit_stride_rows(x),
        unit_stride_rows(weight_z), unit_stride_rows(weight_r), unit_stride_rows(weight_o),
        bias_o.contiguous(), candidate_input, candidate_activation, deterministic, configs,
    )


# llama3-8b (design.md §4): d=4096, dh=409 (rows padded to dh_pad=416, packed gate row stride
# 4512). The sizes are runtime arguments; the dtypes, flags and alignment shape the code.
_D, _DH = 4096, 409
_INTS = ("M", "D", "DH", "DH_PAD", "U_OFF", "N", "NR", "NC", "COL_OFF", "TOKENS_PER_GROUP",
         "M_BUCKET")
# What the runtime specialises as 16-divisible at this shape (DH = 409, N = dh, NC = dh are not).
_ALIGNED_INTS = ("M", "D", "DH_PAD", "U_OFF", "COL_OFF", "TOKENS_PER_GROUP", "M_BUCKET")


def _spec(name, fn, dtype, fp32_ptrs, constexprs, configs, note, unaligned=()):
    """A KernelSpec at the llama3-8b shape: every pointer ``dtype`` but ``fp32_ptrs``; every
    pointer, stride and the sizes of ``_ALIGNED_INTS`` 16-aligned but ``unaligned`` and
    ``stride_gh`` (``∂h'`` arrives as a dense [M, 409] fp32 tensor)."""
    unaligned = (*unaligned, "stride_gh")
    params = [p for p in fn.arg_names if p.endswith("_ptr") or p.startswith("stride")
              or p in _INTS]
    types = {p: ("*fp32" if p in fp32_ptrs else f"*{dtype}") if p.endswith("_ptr") else "i32"
             for p in params}
    aligned = tuple(p for p in params if p not in unaligned
                    and (p.endswith("_ptr") or p.startswith("stride") or p in _ALIGNED_INTS))
    return KernelSpec(name=name, fn=fn, types=types,
                      constexprs={**constexprs, "INTERP_BF16": False}, configs=configs,
                      aligned=aligned, note=f"d={_D} dh={_DH} {dtype}" + note)


COMPILE_SPECS = [
    # gates at every combination of its switches in bf16 (rounds ≥ 2: three accumulators; round
    # 1: the fused elementwise backward and the ∂b_o reduction in the epilogue; candidate x: a
    # second activation tile per K step), and rounds ≥ 2 with candidate x in fp16.
    *(
        _spec(variant_name("gru_bwd.gates", *gru_variant_tags(has_h, cand_x, tanh),
                           *["deterministic"] * det),
              _gru_bwd_gates_kernel, "bf16", ("gh_ptr", "ws_ptr", "bias_ptr"),
              {"HAS_H": has_h, "CAND_X": cand_x, "CAND_TANH": tanh, "DETERMINISTIC": det},
              GATES_BWD_GPU_CONFIGS, (", rounds ≥ 2" if has_h else ", round 1")
              + f", candidate {'x' if cand_x else 'y'}" + (", deterministic" if det else ""))
        for has_h, cand_x, tanh, det in itertools.product((True, False), (False, True),
                                                          (False, True), (False, True))
    ),
    _spec("gru_bwd.gates[fp16]", _gru_bwd_gates_kernel, "fp16",
          ("gh_ptr", "ws_ptr", "bias_ptr"),
          {"HAS_H": True, "CAND_X": True, "CAND_TANH": False, "DETERMINISTIC": False},
          GATES_BWD_GPU_CONFIGS, ", rounds ≥ 2, candidate x"),
    *(
        _spec(f"gru_bwd.candidate{suffix}", _gru_bwd_candidate_kernel, dtype,
              ("gh_ptr", "ws_ptr", "bias_ptr"), {"CAND_TANH": tanh, "DETERMINISTIC": det},
              UPDATE_GPU_CONFIGS, note)
        for suffix, dtype, tanh, det, note in (
            ("", "bf16", False, False, ", ∂b_o atomics"),
            ("[tanh]", "bf16", True, False, ", tanh, ∂b_o atomics"),
            ("[deterministic]", "bf16", False, True, ", ∂b_o partials"),
            ("[tanh,deterministic]", "bf16", True, True, ", tanh, ∂b_o partials"),
            ("[fp16,tanh,deterministic]", "fp16", True, True, ", tanh, ∂b_o partials"),
        )
    ),
    _spec("gru_bwd.reset", _gru_bwd_reset_kernel, "bf16", ("gh_ptr", "ws_ptr"), {},
          RESET_GPU_CONFIGS, ""),
    # input, as the launcher runs it: ∂h (z, r terms + the workspace), ∂y (z; r from round 2; o
    # for candidate y) and for candidate x ∂x (o term only).
    *(
        _spec(f"gru_bwd.input[{which}]", _gru_bwd_input_kernel, dtype, ("add_ptr", "out_ptr"),
              {"USE_Z": z, "USE_R": r, "USE_O": o, "HAS_ADD": add}, INPUT_GPU_CONFIGS,
              note, unaligned=unaligned)
        for which, dtype, z, r, o, add, unaligned, note in (
            ("h", "bf16", True, True, False, True, ("stride_out",),
             ", ∂h = [gz, gr] [W_z; W_r][:, :dh] + workspace"),
            ("y,cand=y", "bf16", True, True, True, False, (),
             ", ∂y = [gz, gr, gp] [W_z; W_r; W_o][:, dh:]"),
            ("x,cand=x", "fp16", False, False, True, False, (), ", ∂x = gp W_o[:, dh:]"),
            ("y,cand=x", "bf16", True, True, False, False, (),
             ", ∂y = [gz, gr] [W_z; W_r][:, dh:]"),
            # round 1 (h = 0): no reset gradient
            ("y,h=0,cand=y", "bf16", True, False, True, False, (),
             ", ∂y = [gz, gp] [W_z; W_o][:, dh:]"),
            ("y,h=0,cand=x", "bf16", True, False, False, False, (), ", ∂y = gz W_z[:, dh:]"),
        )
    ),
    *(
        _spec(f"gru_bwd.weight{suffix}", _gru_bwd_weight_kernel, dtype, ("out_ptr",),
              {"DETERMINISTIC": det}, WEIGHT_GPU_CONFIGS, note,
              # the u-column block starts at column dh of a [3·dh, dh + d] fp32 buffer
              unaligned=("out_ptr", "stride_out", "stride_slab"))
        for suffix, dtype, det, note in (
            ("", "bf16", False, ", [gz, gr, gp]^T y, fp32 atomics"),
            ("[deterministic]", "bf16", True, ", per-group partial slabs"),
            ("[fp16,deterministic]", "fp16", True, ", per-group partial slabs"),
        )
    ),
]
