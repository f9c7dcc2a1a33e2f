"""The low-rank GRU cell of GraphMoE and the residual into the next round (Eqs. 6-7):

    z = σ(W_z [h, y]);  r = σ(W_r [h, y]);  ĥ = act(W_o [r ⊙ h, u] + b_o)
    h' = (1 − z) ⊙ h + z ⊙ ĥ;  x_next = x + W_g h'

with ``u`` = ``y`` (Eq. 6) or ``x`` (Algorithm 1) and ``act`` = sigmoid or tanh.

Three passes, because two reductions need a whole row of the previous one:

1. ``gates``: per (token block, dh block), one K loop over ``[h, y]`` feeds three accumulators:
   z and r (K = dh + d) and the ``u`` half of the candidate (K = d), sharing every loaded
   activation tile. r ⊙ h, z and the partial candidate go to a small workspace ([M, dh] each).
2. ``update``: the candidate's ``r ⊙ h`` half reduces over *all* dh columns of r ⊙ h, which pass 1
   spreads over several programs, so it waits for pass 1; it adds that half (K = dh), applies
   the activation and writes h'.
3. ``project``: ``x + h' W_g^T`` reduces over all of h'; a separate pass over (token block,
   d block) tiles keeps the d-wide part parallel and reads W_g once per token block.

Fusing 2 into 1 or 3 into 2 would need each program to own whole dh rows: three [BLOCK_M, 512]
fp32 accumulators at dh = 409 do not fit the register file at a useful BLOCK_M, and a grid over
tokens alone is one wave at 8192 tokens. The passes in between move only [M, dh] tensors (dh ≈
d/10), a few percent of the bytes of ``y`` and ``x``. In round 1 (``h`` = 0) r drops out and
pass 1 finishes the update itself: two passes.

Row layout: when dh or d is not a multiple of 16 (dh = 409 at d = 4096) the weights are
repacked per call into 16-element-aligned rows with zero padding (≈ 3·dh·(dh + d) elements, a
few microseconds), and h' is returned as a view of a buffer with aligned rows, so every tile
load vectorises; pass it back as the next round's ``h`` unchanged.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ..compile_spec import KernelSpec, variant_name
from ..utils import (
    ceil_to,
    check_activation,
    check_like,
    check_ndim,
    dot_k,
    dot_k2,
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

__all__ = ["CANDIDATE_ACTIVATIONS", "CANDIDATE_INPUTS", "fused_lowrank_gru", "gru_project"]

CANDIDATE_INPUTS = ("y", "x")
CANDIDATE_ACTIVATIONS = ("sigmoid", "tanh")
# 16 elements = 32 bytes for 16-bit types: aligned rows and masks that are uniform across a
# vectorised load.
_ALIGN = 16


@triton.jit
def _candidate_activation(pre, CAND_TANH: tl.constexpr):
    if CAND_TANH:
        # tanh through exp(-2|x|) ≤ 1: no overflow for large |x|, and no libdevice call (the
        # interpreter has none).
        t = tl.exp(-2.0 * tl.abs(pre))
        mag = (1.0 - t) / (1.0 + t)
        return tl.where(pre < 0, -mag, mag)
    else:
        return tl.sigmoid(pre)


@triton.jit
def gate_preactivations(
    h_ptr, y_ptr, x_ptr, wz_ptr, wr_ptr, wo_ptr, rows, row_ok, units64, unit_ok, D, DH, DH_PAD,
    U_OFF, stride_hm, stride_ym, stride_xm, stride_w, HAS_H: tl.constexpr, CAND_X: tl.constexpr,
    INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``W_z [h, y]``, ``W_r [h, y]`` and the candidate's ``u`` half ``W_o[:, dh:] u`` (fp32
    accumulators ``[BLOCK_M, BLOCK_H]``) of one (token block, dh block): the forward's gates
    pass and the backward's recompute of it."""
    acc_z = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)

    if HAS_H:
        # The h half of [h, y] for z and r (weight columns DH..DH_PAD are zero padding, so the
        # weight masks stay 16-aligned); the candidate's h half needs r first (pass 2).
        acc_z, acc_r = dot_k2(acc_z, acc_r, h_ptr, rows, row_ok, stride_hm, wz_ptr, stride_w,
                              wr_ptr, stride_w, units64, unit_ok, DH, DH_PAD, BLOCK_K, INTERP_BF16)

    # The y half (columns U_OFF.. of the packed weights): one K loop feeds all three
    # accumulators, so each activation tile is loaded once. It is written out rather than a
    # dot_k call: the three weights share one offset tensor (their packed rows have one
    # stride), added to each base pointer per K step; three weight pointer tensors
    # (load_tile_t) would stay live through the loop, and sm_80 spills.
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = units64[None, :] * stride_w + U_OFF
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        a = load_tile(y_ptr, rows, row_ok, stride_ym, k, D)
        w_off = w_rows + k[:, None]
        w_mask = (k < D)[:, None] & unit_ok[None, :]
        acc_z = mma(a, tl.load(wz_ptr + w_off, mask=w_mask, other=0.0), acc_z, INTERP_BF16)
        if HAS_H:
            acc_r = mma(a, tl.load(wr_ptr + w_off, mask=w_mask, other=0.0), acc_r, INTERP_BF16)
        wo = tl.load(wo_ptr + w_off, mask=w_mask, other=0.0)
        if CAND_X:
            a = load_tile(x_ptr, rows, row_ok, stride_xm, k, D)
        acc_o = mma(a, wo, acc_o, INTERP_BF16)

    return acc_z, acc_r, acc_o


@triton.jit
def _gru_gates_kernel(
    h_ptr,
    y_ptr,
    x_ptr,
    wz_ptr,
    wr_ptr,
    wo_ptr,
    bo_ptr,
    z_ptr,
    rh_ptr,
    ou_ptr,
    hnew_ptr,
    M,
    D,
    DH,
    DH_PAD,
    U_OFF,
    stride_hm,
    stride_ym,
    stride_xm,
    stride_w,
    stride_ws,
    stride_hn,
    M_BUCKET,
    HAS_H: tl.constexpr,
    CAND_X: tl.constexpr,
    CAND_TANH: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, row_ok, units, unit_ok = row_major_tile(M, DH, BLOCK_M, BLOCK_H)
    units64 = units.to(tl.int64)  # weight row offsets
    acc_z, acc_r, acc_o = gate_preactivations(
        h_ptr, y_ptr, x_ptr, wz_ptr, wr_ptr, wo_ptr, rows, row_ok, units64, unit_ok, D, DH,
        DH_PAD, U_OFF, stride_hm, stride_ym, stride_xm, stride_w, HAS_H, CAND_X, INTERP_BF16,
        BLOCK_M, BLOCK_H, BLOCK_K)

    z = tl.sigmoid(acc_z)
    acc_o += tl.load(bo_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_H:
        r = tl.sigmoid(acc_r)
        h_blk = load_tile(h_ptr, rows, row_ok, stride_hm, units, DH).to(tl.float32)
        # r ⊙ h is pass 2's dot operand: stored in the input dtype so that dot stays on the
        # tensor cores; z and the partial candidate stay fp32 (epilogue-only values).
        store_rounded(rh_ptr, r * h_blk, rows, row_ok, stride_ws, units, unit_ok, INTERP_BF16)
        ws_off = rows[:, None] * stride_ws + units[None, :]
        out_mask = row_ok[:, None] & unit_ok[None, :]
        tl.store(z_ptr + ws_off, z, mask=out_mask)
        tl.store(ou_ptr + ws_off, acc_o, mask=out_mask)
    else:
        # h = 0: h' = (1 − z)·0 + z ⊙ act(W_o [0, u] + b_o).
        h_new = z * _candidate_activation(acc_o, CAND_TANH)
        store_rounded(hnew_ptr, h_new, rows, row_ok, stride_hn, units, unit_ok, INTERP_BF16)


@triton.jit
def _gru_update_kernel(
    h_ptr,
    rh_ptr,
    z_ptr,
    ou_ptr,
    wo_ptr,
    hnew_ptr,
    M,
    DH,
    DH_PAD,
    stride_hm,
    stride_ws,
    stride_w,
    stride_hn,
    M_BUCKET,
    CAND_TANH: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, row_ok, units, unit_ok = row_major_tile(M, DH, BLOCK_M, BLOCK_H)
    # The candidate's r ⊙ h half: W_o[:, :dh] (r ⊙ h)^T.
    acc = dot_k(tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), rh_ptr, rows, row_ok, stride_ws,
                wo_ptr, units.to(tl.int64), unit_ok, stride_w, DH, DH_PAD, BLOCK_K, INTERP_BF16)

    # The workspace rows are as wide as h' (stride_ws): the tiles read back what pass 1 wrote.
    pre = acc + load_tile(ou_ptr, rows, row_ok, stride_ws, units, DH)
    cand = _candidate_activation(pre, CAND_TANH)
    z = load_tile(z_ptr, rows, row_ok, stride_ws, units, DH)
    h = load_tile(h_ptr, rows, row_ok, stride_hm, units, DH).to(tl.float32)
    h_new = (1.0 - z) * h + z * cand
    store_rounded(hnew_ptr, h_new, rows, row_ok, stride_hn, units, unit_ok, INTERP_BF16)


@triton.jit
def _gru_project_kernel(
    hn_ptr,
    wg_ptr,
    x_ptr,
    out_ptr,
    M,
    D,
    DH,
    DH_PAD,
    stride_hn,
    stride_wg,
    stride_xm,
    stride_om,
    M_BUCKET,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # d blocks fastest: programs sharing a token block's h' rows (and all of W_g, ~3 MB at
    # llama3-8b) run together out of L2. Likewise dh blocks in the other two passes.
    rows, row_ok, cols, col_ok = row_major_tile(M, D, BLOCK_M, BLOCK_N)
    acc = dot_k(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), hn_ptr, rows, row_ok, stride_hn,
                wg_ptr, cols.to(tl.int64), col_ok, stride_wg, DH, DH_PAD, BLOCK_K, INTERP_BF16)
    x = load_tile(x_ptr, rows, row_ok, stride_xm, cols, D)
    # One rounding of x + g (the reference rounds g first, then the sum).
    store_rounded(out_ptr, x.to(tl.float32) + acc, rows, row_ok, stride_om, cols, col_ok,
                  INTERP_BF16)


# Configs for sm_80 / sm_90 (A100: 163 KB shared, H100: 227 KB; 64K registers per SM).
# gates: three [BLOCK_M, BLOCK_H] fp32 accumulators share each activation tile, so BLOCK_H is
# kept ≤ 64 and warps are added with BLOCK_M (≤ 96 accumulator registers per thread; 128 × 32
# on 4 warps spilled on sm_80), BLOCK_M large for weight reuse; shared memory per stage
# (BLOCK_M + 3·BLOCK_H)·BLOCK_K·2 B (+ an x tile for candidate "x") ≤ 44 KB.
# 64×64×64 on 4 warps spills 112 B on sm_80 with h given and candidate x (compile report): 8 warps.
GATES_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_H": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_H": 32, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_H": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
# update: one accumulator and K = dh only (≈ 400), but the epilogue holds four fp32 tiles
# (accumulator, partial candidate, z, h): ≤ 32 elements per thread per tile, or ptxas spills.
UPDATE_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_H": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_H": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# project: a GEMM with K = dh and a d-wide output; bound by reading x and writing x_next.
PROJECT_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
# One small config each under the interpreter (no tuning there; test shapes span blocks).
GATES_INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_H": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)
]
UPDATE_INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)
]
PROJECT_INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)
]

_INTERPRET = is_interpreter()
_gates_tuned = triton.autotune(
    configs=GATES_INTERPRETER_CONFIGS if _INTERPRET else GATES_GPU_CONFIGS,
    key=["M_BUCKET", "D", "DH", "HAS_H", "CAND_X"],
)(_gru_gates_kernel)
_update_tuned = triton.autotune(
    configs=UPDATE_INTERPRETER_CONFIGS if _INTERPRET else UPDATE_GPU_CONFIGS,
    key=["M_BUCKET", "DH"],
)(_gru_update_kernel)
_project_tuned = triton.autotune(
    configs=PROJECT_INTERPRETER_CONFIGS if _INTERPRET else PROJECT_GPU_CONFIGS,
    key=["M_BUCKET", "D", "DH"],
)(_gru_project_kernel)


def _pack_gate_weights(
    weight_z: torch.Tensor, weight_r: torch.Tensor, weight_o: torch.Tensor, dh: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """``(wz, wr, wo, row_stride, u_offset)`` with the ``[h, u]`` halves split at an aligned
    column: the weights as given when they already are, else a zero-padded copy."""
    dh_pad = ceil_to(dh, _ALIGN)
    weights = (weight_z, weight_r, weight_o)
    if dh_pad == dh and d % _ALIGN == 0 and all(w.is_contiguous() for w in weights):
        return weight_z, weight_r, weight_o, dh + d, dh
    width = ceil_to(dh_pad + d, _ALIGN)
    packed = torch.zeros(3, dh, width, dtype=weight_z.dtype, device=weight_z.device)
    for i, w in enumerate(weights):
        packed[i, :, :dh] = w[:, :dh]
        packed[i, :, dh_pad:dh_pad + d] = w[:, dh:]
    return packed[0], packed[1], packed[2], width, dh_pad


def _pack_projection(weight_g: torch.Tensor, dh: int) -> torch.Tensor:
    """``W_g`` with rows padded to an aligned width (zeros past dh)."""
    dh_pad = ceil_to(dh, _ALIGN)
    if dh_pad == dh and weight_g.is_contiguous():
        return weight_g
    packed = torch.zeros(weight_g.shape[0], dh_pad, dtype=weight_g.dtype, device=weight_g.device)
    packed[:, :dh] = weight_g
    return packed


def _launch_lowrank_gru(
    h: torch.Tensor | None,
    y: torch.Tensor,
    x: torch.Tensor,
    weight_z: torch.Tensor,
    weight_r: torch.Tensor,
    weight_o: torch.Tensor,
    bias_o: torch.Tensor,
    weight_g: torch.Tensor,
    h_new: torch.Tensor,
    x_next: torch.Tensor,
    candidate_input: str,
    candidate_activation: str,
    configs: dict[str, triton.Config] | None = None,
) -> None:
    """Runs the passes on validated inputs, writing ``h_new`` and ``x_next`` (unit column
    stride, any row stride); ``configs``: see :func:`fused_lowrank_gru`."""
    configs = configs or {}
    num_tokens, d = y.shape
    dh = weight_z.shape[0]
    dh_pad = ceil_to(dh, _ALIGN)
    bucket = token_bucket(num_tokens)
    flags = {
        "CAND_TANH": candidate_activation == "tanh",
        "INTERP_BF16": interpreter_bf16(x.dtype),
    }
    wz, wr, wo, stride_w, u_off = _pack_gate_weights(weight_z, weight_r, weight_o, dh, d)

    has_h = h is not None
    if has_h:
        # Workspace for pass 2, rows aligned like h'.
        ws = new_output((2, num_tokens, dh_pad), torch.float32, x.device)
        z_buf, ou_buf = ws[0], ws[1]
        rh_buf = new_output((num_tokens, dh_pad), x.dtype, x.device)
        h_arg, stride_hm = h, h.stride(0)
    else:
        # Pass 1 writes h' itself; the workspace pointers are never dereferenced.
        z_buf = ou_buf = rh_buf = h_new
        h_arg, stride_hm = y, 0
    launch(
        _gates_tuned, _gru_gates_kernel, tile_grid(num_tokens, dh, "BLOCK_H"),
        (
            h_arg, y, x, wz, wr, wo, bias_o, z_buf, rh_buf, ou_buf, h_new,
            num_tokens, d, dh, dh_pad, u_off,
            stride_hm, y.stride(0), x.stride(0), stride_w, z_buf.stride(0), h_new.stride(0),
            bucket,
        ),
        {**flags, "HAS_H": has_h, "CAND_X": candidate_input == "x"},
        configs.get("gates"),
    )
    if has_h:
        launch(
            _update_tuned, _gru_update_kernel, tile_grid(num_tokens, dh, "BLOCK_H"),
            (
                h, rh_buf, z_buf, ou_buf, wo, h_new,
                num_tokens, dh, dh_pad,
                h.stride(0), z_buf.stride(0), stride_w, h_new.stride(0),
                bucket,
            ),
            flags,
            configs.get("update"),
        )
    _launch_project(h_new, weight_g, x, x_next, configs.get("project"))


def _launch_project(h_new: torch.Tensor, weight_g: torch.Tensor, x: torch.Tensor,
                    x_next: torch.Tensor, config: triton.Config | None) -> None:
    """Pass 3, ``x_next = x + h_new @ weight_g^T``: the forward's, and :func:`gru_project`'s
    (the same launch, so the same bits)."""
    num_tokens, d = x.shape
    dh = weight_g.shape[1]
    wg = _pack_projection(weight_g, dh)
    launch(
        _project_tuned, _gru_project_kernel, tile_grid(num_tokens, d, "BLOCK_N"),
        (
            h_new, wg, x, x_next,
            num_tokens, d, dh, ceil_to(dh, _ALIGN),
            h_new.stride(0), wg.stride(0), x.stride(0), x_next.stride(0),
            token_bucket(num_tokens),
        ),
        {"INTERP_BF16": interpreter_bf16(x.dtype)},
        config,
    )


@on_device_of("x")
def fused_lowrank_gru(
    h: torch.Tensor | None,
    y: torch.Tensor,
    x: torch.Tensor,
    weight_z: torch.Tensor,
    weight_r: torch.Tensor,
    weight_o: torch.Tensor,
    bias_o: torch.Tensor,
    weight_g: torch.Tensor,
    candidate_input: str = "y",
    candidate_activation: str = "sigmoid",
    *,
    configs: dict[str, triton.Config] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One low-rank GRU step and the residual into the next round, fused (forward only).

    Computes ``h' = GRU(h, y)`` as ``graphmoe_fused.gru.lowrank_gru_reference`` does and
    ``x_next = x + h' @ weight_g^T``, accumulating in fp32 and rounding each output once.
    Runs on ``x``'s device.

    Args:
        h: ``[M, dh]`` state, or ``None`` for the zero state of round 1 (cheaper: r and the
            ``h`` halves of the gates drop out). Any row stride; unit column stride.
        y: ``[M, d]`` expert output of this round.
        x: ``[M, d]`` input of this round.
        weight_z, weight_r, weight_o: ``[dh, dh + d]``, columns ordered ``[h, y]``.
        bias_o: ``[dh]``.
        weight_g: ``[d, dh]``.
        candidate_input: ``"y"`` (Eq. 6) or ``"x"`` (Algorithm 1, line 19).
        candidate_activation: ``"sigmoid"`` (as printed) or ``"tanh"``.
        configs: pins the block shapes of passes ``"gates"``, ``"update"`` (``BLOCK_M``,
            ``BLOCK_H``, ``BLOCK_K``) and ``"project"`` (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``)
            instead of autotuning them, so tests reach shapes the single interpreter config
            does not; a pass not named is autotuned.

    All tensors share ``x``'s dtype (fp16, bf16 or fp32) and device (CUDA; CPU under
    ``TRITON_INTERPRET=1``).

    Returns:
        ``h_new [M, dh]`` and ``x_next [M, d]`` in ``x``'s dtype. When dh is not a multiple of
        16, ``h_new`` is a view with 16-element-aligned rows (row stride ``ceil(dh/16)·16``)
        so the next round's loads vectorise: pass it back as ``h`` as it is.

    Raises:
        ValueError: a shape, a device or an option is wrong.
        TypeError: an unsupported or mismatched dtype.
    """
    configs = pinned_configs(configs, ("gates", "update", "project"))
    if candidate_input not in CANDIDATE_INPUTS:
        raise ValueError(f"candidate_input={candidate_input!r} not in {CANDIDATE_INPUTS}")
    if candidate_activation not in CANDIDATE_ACTIVATIONS:
        raise ValueError(
            f"candidate_activation={candidate_activation!r} not in {CANDIDATE_ACTIVATIONS}"
        )
    num_tokens, d = check_activation("x", x, "[M, d]")
    dh, _ = check_ndim("weight_z", weight_z, 2, "[dh, dh + d]")
    if d < 1 or dh < 1:
        raise ValueError(f"need d ≥ 1 and dh ≥ 1, got d={d}, dh={dh}")
    expected = {
        "y": (y, (num_tokens, d)), "h": (h, (num_tokens, dh)),
        "weight_z": (weight_z, (dh, dh + d)), "weight_r": (weight_r, (dh, dh + d)),
        "weight_o": (weight_o, (dh, dh + d)), "bias_o": (bias_o, (dh,)),
        "weight_g": (weight_g, (d, dh)),
    }
    if h is None:
        del expected["h"]  # round 1's zero state
    for name, (t, shape) in expected.items():
        check_like(name, t, shape, x, x.dtype)

    dh_pad = ceil_to(dh, _ALIGN)
    h_buf = new_output((num_tokens, dh_pad), x.dtype, x.device)
    h_new = h_buf[:, :dh]
    x_next = new_output((num_tokens, d), x.dtype, x.device)
    if num_tokens > 0:
        _launch_lowrank_gru(
            None if h is None else unit_stride_rows(h),
            unit_stride_rows(y), unit_stride_rows(x),
            unit_stride_rows(weight_z), unit_stride_rows(weight_r), unit_stride_rows(weight_o),
            bias_o.contiguous(), unit_stride_rows(weight_g),
            h_new, x_next, candidate_input, candidate_activation, configs,
        )
    return h_new, x_next


@on_device_of("x")
def gru_project(h_new: torch.Tensor, x: torch.Tensor, weight_g: torch.Tensor, *,
                config: triton.Config | None = None) -> torch.Tensor:
    """``x + h_new @ weight_g^T``, the residual into the next round, alone: the bits
    :func:`fused_lowrank_gru` returned as ``x_next`` for the same ``h_new`` (its third pass,
    launched the same way), so a backward can rebuild the round inputs instead of keeping them.

    Args:
        h_new: ``[M, dh]`` (any row stride, unit column stride), as the step returned it.
        x: ``[M, d]`` the round's input.
        weight_g: ``[d, dh]``.
        config: pins the block shape (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``) instead of
            autotuning; pin the forward's too, or the bits may differ.

    All share ``x``'s dtype and device. Returns ``[M, d]`` in ``x``'s dtype.
    """
    num_tokens, d = check_activation("x", x, "[M, d]")
    dh = check_ndim("weight_g", weight_g, 2, "[d, dh]")[1]
    check_like("weight_g", weight_g, (d, dh), x, x.dtype)
    check_like("h_new", h_new, (num_tokens, dh), x, x.dtype)
    x_next = new_output((num_tokens, d), x.dtype, x.device)
    if num_tokens > 0:
        if h_new.stride(-1) != 1:
            h_new = h_new.contiguous()
        _launch_project(h_new, unit_stride_rows(weight_g), unit_stride_rows(x), x_next, config)
    return x_next


def gru_variant_tags(has_h: bool, cand_x: bool, tanh: bool) -> list[str]:
    """The spec-name tags of a GRU variant: none for rounds ≥ 2 with candidate y and sigmoid."""
    return ["h=0"] * (not has_h) + ["cand=x"] * cand_x + ["tanh"] * tanh


# llama3-8b (design.md §4): d=4096, dh=409 (rows packed to dh_pad=416, gate row stride 4512), bf16.
# The sizes are runtime arguments, so only the dtypes, flags and alignment shape the code.
_D, _DH = 4096, 409
_GATES_TYPES = {
    **{p: "*bf16" for p in ("h_ptr", "y_ptr", "x_ptr", "wz_ptr", "wr_ptr", "wo_ptr", "bo_ptr",
                            "rh_ptr", "hnew_ptr")},
    "z_ptr": "*fp32", "ou_ptr": "*fp32",
    **{a: "i32" for a in ("M", "D", "DH", "DH_PAD", "U_OFF", "stride_hm", "stride_ym",
                          "stride_xm", "stride_w", "stride_ws", "stride_hn", "M_BUCKET")},
}
_GATES_ALIGNED = ("h_ptr", "y_ptr", "x_ptr", "wz_ptr", "wr_ptr", "wo_ptr", "bo_ptr", "z_ptr",
                  "rh_ptr", "ou_ptr", "hnew_ptr", "M", "D", "DH_PAD", "U_OFF", "stride_hm",
                  "stride_ym", "stride_xm", "stride_w", "stride_ws", "stride_hn", "M_BUCKET")
_SHAPE_NOTE = f"d={_D} dh={_DH} bf16"

COMPILE_SPECS = [
    # Pass 1 at every combination of its switches (ptxas's allocation does not carry from one
    # to another): h given (rounds ≥ 2: three accumulators) or zero (round 1), candidate input y
    # or x (a second activation tile per K step), sigmoid or tanh.
    *(
        KernelSpec(
            name=variant_name("gru.gates", *gru_variant_tags(has_h, cand_x, tanh)),
            fn=_gru_gates_kernel,
            types=_GATES_TYPES,
            constexprs={"HAS_H": has_h, "CAND_X": cand_x, "CAND_TANH": tanh,
                        "INTERP_BF16": False},
            configs=GATES_GPU_CONFIGS,
            aligned=_GATES_ALIGNED,
            note=_SHAPE_NOTE + (", rounds ≥ 2" if has_h else ", round 1")
            + f", candidate {'x' if cand_x else 'y'}, {'tanh' if tanh else 'sigmoid'}",
        )
        for has_h, cand_x, tanh in itertools.product((True, False), (False, True), (False, True))
    ),
    *(KernelSpec(
        name=variant_name("gru.update", *gru_variant_tags(True, False, tanh)),
        fn=_gru_update_kernel,
        types={
            **{p: "*bf16" for p in ("h_ptr", "rh_ptr", "wo_ptr", "hnew_ptr")},
            "z_ptr": "*fp32", "ou_ptr": "*fp32",
            **{a: "i32" for a in ("M", "DH", "DH_PAD", "stride_hm", "stride_ws", "stride_w",
                                  "stride_hn", "M_BUCKET")},
        },
        constexprs={"CAND_TANH": tanh, "INTERP_BF16": False},
        configs=UPDATE_GPU_CONFIGS,
        aligned=("h_ptr", "rh_ptr", "z_ptr", "ou_ptr", "wo_ptr", "hnew_ptr", "M", "DH_PAD",
                 "stride_hm", "stride_ws", "stride_w", "stride_hn", "M_BUCKET"),
        note=_SHAPE_NOTE + (", tanh" if tanh else ", sigmoid"),
    ) for tanh in (False, True)),
    KernelSpec(
        name="gru.project",
        fn=_gru_project_kernel,
        types={
            **{p: "*bf16" for p in ("hn_ptr", "wg_ptr", "x_ptr", "out_ptr")},
            **{a: "i32" for a in ("M", "D", "DH", "DH_PAD", "stride_hn", "stride_wg",
                                  "stride_xm", "stride_om", "M_BUCKET")},
        },
        constexprs={"INTERP_BF16": False},
        configs=PROJECT_GPU_CONFIGS,
        aligned=("hn_ptr", "wg_ptr", "x_ptr", "out_ptr", "M", "D", "DH_PAD", "stride_hn",
                 "stride_wg", "stride_xm", "stride_om", "M_BUCKET"),
        note=_SHAPE_NOTE,
    ),
]
