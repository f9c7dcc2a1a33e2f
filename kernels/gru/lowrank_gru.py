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

import torch
import triton
import triton.language as tl

from ..compile_spec import KernelSpec
from ..utils import (
    cast_rne,
    ceil_to,
    check_device,
    check_float,
    check_shape,
    interpreter_bf16,
    is_interpreter,
    mma,
    new_output,
    token_bucket,
    unit_stride_rows,
)

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
    # 1-D grid, dh blocks fastest: the few programs that share a token block (and its y tiles)
    # run side by side and hit L2, and no grid axis limit applies to the token count.
    pid = tl.program_id(0)
    num_h = tl.cdiv(DH, BLOCK_H)
    pid_m = pid // num_h
    pid_h = pid % num_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_ok = units < DH
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = units.to(tl.int64)[None, :] * stride_w

    acc_z = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)

    if HAS_H:
        # The h half of [h, y]; the candidate's h half needs r first (pass 2).
        for k0 in range(0, DH_PAD, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(
                h_ptr + rows64[:, None] * stride_hm + k[None, :],
                mask=row_ok[:, None] & (k < DH)[None, :],
                other=0.0,
            )
            # Weight columns DH..DH_PAD are zero padding: the mask stays 16-aligned.
            w_mask = (k < DH_PAD)[:, None] & unit_ok[None, :]
            wz = tl.load(wz_ptr + w_rows + k[:, None], mask=w_mask, other=0.0)
            wr = tl.load(wr_ptr + w_rows + k[:, None], mask=w_mask, other=0.0)
            acc_z = mma(a, wz, acc_z, INTERP_BF16)
            acc_r = mma(a, wr, acc_r, INTERP_BF16)

    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < D
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(y_ptr + rows64[:, None] * stride_ym + k[None, :], mask=a_mask, other=0.0)
        w_mask = k_ok[:, None] & unit_ok[None, :]
        w_off = w_rows + U_OFF + k[:, None]
        wz = tl.load(wz_ptr + w_off, mask=w_mask, other=0.0)
        acc_z = mma(a, wz, acc_z, INTERP_BF16)
        if HAS_H:
            wr = tl.load(wr_ptr + w_off, mask=w_mask, other=0.0)
            acc_r = mma(a, wr, acc_r, INTERP_BF16)
        wo = tl.load(wo_ptr + w_off, mask=w_mask, other=0.0)
        if CAND_X:
            ax = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :], mask=a_mask, other=0.0)
            acc_o = mma(ax, wo, acc_o, INTERP_BF16)
        else:
            acc_o = mma(a, wo, acc_o, INTERP_BF16)

    z = tl.sigmoid(acc_z)
    acc_o += tl.load(bo_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & unit_ok[None, :]
    if HAS_H:
        r = tl.sigmoid(acc_r)
        h_blk = tl.load(
            h_ptr + rows64[:, None] * stride_hm + units[None, :], mask=out_mask, other=0.0
        ).to(tl.float32)
        ws_off = rows64[:, None] * stride_ws + units[None, :]
        # r ⊙ h is pass 2's dot operand: stored in the input dtype so that dot stays on the
        # tensor cores; z and the partial candidate stay fp32 (epilogue-only values).
        tl.store(rh_ptr + ws_off, cast_rne(r * h_blk, rh_ptr.dtype.element_ty, INTERP_BF16),
                 mask=out_mask)
        tl.store(z_ptr + ws_off, z, mask=out_mask)
        tl.store(ou_ptr + ws_off, acc_o, mask=out_mask)
    else:
        # h = 0: h' = (1 − z)·0 + z ⊙ act(W_o [0, u] + b_o).
        h_new = z * _candidate_activation(acc_o, CAND_TANH)
        tl.store(
            hnew_ptr + rows64[:, None] * stride_hn + units[None, :],
            cast_rne(h_new, hnew_ptr.dtype.element_ty, INTERP_BF16),
            mask=out_mask,
        )


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
    pid = tl.program_id(0)
    num_h = tl.cdiv(DH, BLOCK_H)
    pid_m = pid // num_h
    pid_h = pid % num_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_ok = units < DH
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = units.to(tl.int64)[None, :] * stride_w

    # The candidate's r ⊙ h half: W_o[:, :dh] (r ⊙ h)^T.
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, DH_PAD, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(
            rh_ptr + rows64[:, None] * stride_ws + k[None, :],
            mask=row_ok[:, None] & (k < DH)[None, :],
            other=0.0,
        )
        w = tl.load(
            wo_ptr + w_rows + k[:, None], mask=(k < DH_PAD)[:, None] & unit_ok[None, :], other=0.0
        )
        acc = mma(a, w, acc, INTERP_BF16)

    out_mask = row_ok[:, None] & unit_ok[None, :]
    ws_off = rows64[:, None] * stride_ws + units[None, :]
    cand = _candidate_activation(acc + tl.load(ou_ptr + ws_off, mask=out_mask, other=0.0),
                                 CAND_TANH)
    z = tl.load(z_ptr + ws_off, mask=out_mask, other=0.0)
    h = tl.load(h_ptr + rows64[:, None] * stride_hm + units[None, :], mask=out_mask,
                other=0.0).to(tl.float32)
    h_new = (1.0 - z) * h + z * cand
    tl.store(
        hnew_ptr + rows64[:, None] * stride_hn + units[None, :],
        cast_rne(h_new, hnew_ptr.dtype.element_ty, INTERP_BF16),
        mask=out_mask,
    )


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
    # llama3-8b) run together out of L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = cols.to(tl.int64)[None, :] * stride_wg

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, DH_PAD, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(
            hn_ptr + rows64[:, None] * stride_hn + k[None, :],
            mask=row_ok[:, None] & (k < DH)[None, :],
            other=0.0,
        )
        w = tl.load(
            wg_ptr + w_rows + k[:, None], mask=(k < DH_PAD)[:, None] & col_ok[None, :], other=0.0
        )
        acc = mma(a, w, acc, INTERP_BF16)

    out_mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=out_mask, other=0.0)
    # One rounding of x + g (the reference rounds g first, then the sum).
    tl.store(
        out_ptr + rows64[:, None] * stride_om + cols[None, :],
        cast_rne(x.to(tl.float32) + acc, out_ptr.dtype.element_ty, INTERP_BF16),
        mask=out_mask,
    )


# Configs for sm_80 / sm_90 (A100: 163 KB shared, H100: 227 KB; 64K registers per SM).
# gates: three [BLOCK_M, BLOCK_H] fp32 accumulators share each activation tile, so BLOCK_H is
# kept ≤ 64 and warps are added with BLOCK_M (≤ 96 accumulator registers per thread; 128 × 32
# on 4 warps spilled on sm_80), BLOCK_M large for weight reuse; shared memory per stage
# (BLOCK_M + 3·BLOCK_H)·BLOCK_K·2 B (+ an x tile for candidate "x") ≤ 44 KB.
GATES_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_H": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
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


def _run(tuned, raw, num_tokens: int, cols: int, col_block: str, args: tuple, meta: dict,
         config: triton.Config | None) -> None:
    """Launches ``tuned`` (autotuned) or ``raw`` with one pinned ``config``, on the 1-D grid of
    (token blocks × column blocks) every kernel here uses."""

    def grid(META: dict) -> tuple[int]:
        return (triton.cdiv(num_tokens, META["BLOCK_M"]) * triton.cdiv(cols, META[col_block]),)

    if config is None:
        tuned[grid](*args, **meta)
    else:
        raw[grid(config.kwargs)](
            *args, **meta, **config.kwargs,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )


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
    stride, any row stride).

    ``configs`` pins block shapes per pass (``"gates"``, ``"update"``, ``"project"``) instead
    of autotuning; the tests use it to cover shapes the interpreter config does not.
    """
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
        ws = torch.empty(2, num_tokens, dh_pad, dtype=torch.float32, device=x.device)
        z_buf, ou_buf = ws[0], ws[1]
        rh_buf = torch.empty(num_tokens, dh_pad, dtype=x.dtype, device=x.device)
        h_arg, stride_hm = h, h.stride(0)
    else:
        # Pass 1 writes h' itself; the workspace pointers are never dereferenced.
        z_buf = ou_buf = rh_buf = h_new
        h_arg, stride_hm = y, 0
    _run(
        _gates_tuned, _gru_gates_kernel, num_tokens, dh, "BLOCK_H",
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
        _run(
            _update_tuned, _gru_update_kernel, num_tokens, dh, "BLOCK_H",
            (
                h, rh_buf, z_buf, ou_buf, wo, h_new,
                num_tokens, dh, dh_pad,
                h.stride(0), z_buf.stride(0), stride_w, h_new.stride(0),
                bucket,
            ),
            flags,
            configs.get("update"),
        )
    wg = _pack_projection(weight_g, dh)
    _run(
        _project_tuned, _gru_project_kernel, num_tokens, d, "BLOCK_N",
        (
            h_new, wg, x, x_next,
            num_tokens, d, dh, dh_pad,
            h_new.stride(0), wg.stride(0), x.stride(0), x_next.stride(0),
            bucket,
        ),
        {"INTERP_BF16": flags["INTERP_BF16"]},
        configs.get("project"),
    )


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One low-rank GRU step and the residual into the next round, fused (forward only).

    Computes ``h' = GRU(h, y)`` as ``graphmoe_fused.gru.lowrank_gru_reference`` does and
    ``x_next = x + h' @ weight_g^T``, accumulating in fp32 and rounding each output once.

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
    if candidate_input not in CANDIDATE_INPUTS:
        raise ValueError(f"candidate_input={candidate_input!r} not in {CANDIDATE_INPUTS}")
    if candidate_activation not in CANDIDATE_ACTIVATIONS:
        raise ValueError(
            f"candidate_activation={candidate_activation!r} not in {CANDIDATE_ACTIVATIONS}"
        )
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, d], got shape {tuple(x.shape)}")
    num_tokens, d = x.shape
    if weight_z.dim() != 2:
        raise ValueError(f"weight_z must be 2-D [dh, dh + d], got {tuple(weight_z.shape)}")
    dh = weight_z.shape[0]
    if d < 1 or dh < 1:
        raise ValueError(f"need d ≥ 1 and dh ≥ 1, got d={d}, dh={dh}")
    check_shape("y", y, (num_tokens, d))
    if h is not None:
        check_shape("h", h, (num_tokens, dh))
    for name, w in (("weight_z", weight_z), ("weight_r", weight_r), ("weight_o", weight_o)):
        check_shape(name, w, (dh, dh + d))
    check_shape("bias_o", bias_o, (dh,))
    check_shape("weight_g", weight_g, (d, dh))

    check_float("x", x)
    named = [("y", y), ("weight_z", weight_z), ("weight_r", weight_r), ("weight_o", weight_o),
             ("bias_o", bias_o), ("weight_g", weight_g)]
    if h is not None:
        named.append(("h", h))
    check_device("x", x)
    for name, t in named:
        check_float(name, t, x.dtype)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")

    dh_pad = ceil_to(dh, _ALIGN)
    h_buf = new_output((num_tokens, dh_pad), x.dtype, x.device)
    h_new = h_buf[:, :dh]
    x_next = new_output((num_tokens, d), x.dtype, x.device)
    if num_tokens == 0:
        return h_new, x_next
    _launch_lowrank_gru(
        None if h is None else unit_stride_rows(h),
        unit_stride_rows(y), unit_stride_rows(x),
        unit_stride_rows(weight_z), unit_stride_rows(weight_r), unit_stride_rows(weight_o),
        bias_o.contiguous(), unit_stride_rows(weight_g),
        h_new, x_next, candidate_input, candidate_activation,
    )
    return h_new, x_next


# llama3-8b (DESIGN §4): d=4096, dh=409 (rows packed to dh_pad=416, gate row stride 4512), bf16.
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
    KernelSpec(
        name="gru.gates",
        fn=_gru_gates_kernel,
        types=_GATES_TYPES,
        constexprs={"HAS_H": True, "CAND_X": False, "CAND_TANH": False, "INTERP_BF16": False},
        configs=GATES_GPU_CONFIGS,
        aligned=_GATES_ALIGNED,
        note=_SHAPE_NOTE + ", rounds ≥ 2, candidate y",
    ),
    KernelSpec(
        name="gru.gates[h=0,cand=x,tanh]",
        fn=_gru_gates_kernel,
        types=_GATES_TYPES,
        constexprs={"HAS_H": False, "CAND_X": True, "CAND_TANH": True, "INTERP_BF16": False},
        configs=GATES_GPU_CONFIGS,
        aligned=_GATES_ALIGNED,
        note=_SHAPE_NOTE + ", round 1, candidate x, tanh",
    ),
    KernelSpec(
        name="gru.update",
        fn=_gru_update_kernel,
        types={
            **{p: "*bf16" for p in ("h_ptr", "rh_ptr", "wo_ptr", "hnew_ptr")},
            "z_ptr": "*fp32", "ou_ptr": "*fp32",
            **{a: "i32" for a in ("M", "DH", "DH_PAD", "stride_hm", "stride_ws", "stride_w",
                                  "stride_hn", "M_BUCKET")},
        },
        constexprs={"CAND_TANH": False, "INTERP_BF16": False},
        configs=UPDATE_GPU_CONFIGS,
        aligned=("h_ptr", "rh_ptr", "z_ptr", "ou_ptr", "wo_ptr", "hnew_ptr", "M", "DH_PAD",
                 "stride_hm", "stride_ws", "stride_w", "stride_hn", "M_BUCKET"),
        note=_SHAPE_NOTE,
    ),
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
