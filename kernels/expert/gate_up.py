"""Gate/up side of the LoRA-expert SwiGLU: one pass over ``x`` for all ``k`` chosen experts.

For token ``m`` with chosen experts ``e_j`` and renormalised weights ``w_j`` (``j < k``)::

    gate_j = W_G x + c · B_G[e_j] (A_G[e_j] x_lora)       up_j likewise
    h_j    = silu(gate_j) · up_j
    h_mix  = Σ_j w_j h_j                                   (written: [M, D'], x's dtype)
    a_mix[m, e_j·r : e_j·r + r] += w_j · A_D[e_j] · dropout(h_j)   (written: [M, n·r], fp32)

``W_D`` is linear, so the down side needs only ``h_mix`` for the base product and the rank-``r``
``a_mix`` for the LoRA: the ``k`` separate ``D'``-wide ``h_j`` never reach memory. ``a_mix`` is laid
out as the down kernel's masked-dense operand (each token's row holds its experts' routing-weighted
down-LoRA inputs in their experts' blocks, zeros elsewhere), so there the LoRA is just extra
K-steps of the base GEMM.

Two launches:

1. ``_lora_in_kernel``: ``a_gu = c · x_lora · [A_G; A_U]^T`` for *all* ``n`` experts
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
   per-token choice on tensor cores without sorting tokens by expert. Slot ``j`` updates slot
   ``j-1``'s gate and up in place with ``(a_j - a_{j-1})`` (linearity), so the base accumulators
   are never copied. The down LoRA's input uses the same trick on the output side:
   ``dropout(h_j) [BLOCK_M, BLOCK_N] @ A_D_cat^T [BLOCK_N, n·R]``, of which block ``e_j`` is kept
   (a ``[BLOCK_M, R]`` tile), weighted by ``w_j`` and added with one ``tl.atomic_add`` into the
   zeroed fp32 ``a_mix``. A program holds only its ``BLOCK_N`` slice of ``D'``, so the
   ``D'/BLOCK_N`` partial products must meet somewhere: the atomics add ``k·r`` floats per token
   per tile in L2, where per-tile partials would need ``D'/BLOCK_N`` times the memory plus a
   reduction pass. The fp32 summation order then varies between runs: ``a_mix`` is deterministic
   only to fp32 rounding. Both masked-dense products walk the ``n·R`` columns in chunks of whole
   expert blocks (``LORA_CHUNK`` columns, or ``R`` if larger), so the epilogue's register
   footprint does not grow with ``n·r``.

The masked dense products cost ``n·r`` instead of ``r`` MACs per slot and output element: cheap
while ``n·r`` is small (9 % of the base gate/up work at n·r = 128, k = 2, d = 4096). Past
``MAX_MASKED_DENSE_COLS`` the public functions raise ``ValueError``; a grouped (token-sorted) path,
such as the torch backend, wins there.

Layouts: the LoRA factors come in the kernel layout of :mod:`.layout` (``expert_lora_layout``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..compile_spec import KernelSpec
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
    on_device_of,
    output_buffer,
    pinned_configs,
    prune_small_m,
    store_rounded,
    tile_grid,
    token_bucket,
    unit_stride_rows,
)
from .layout import ExpertLoRA, check_layout, check_routing, padded_rank

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
    x_ptr, a_ptr, out_ptr,
    M, N, K,
    stride_xm,
    scaling,
    M_BUCKET,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, row_ok, cols, col_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = dot_k(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, rows, row_ok, stride_xm,
                a_ptr, cols.to(tl.int64), col_ok, K, K, K, BLOCK_K, INTERP_BF16)
    store_rounded(out_ptr, acc * scaling, rows, row_ok, N, cols, col_ok, INTERP_BF16)


_lora_in_tuned = triton.autotune(
    configs=LORA_IN_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _lora_in_prune},
)(_lora_in_kernel)


# ---------------------------------------------------------------------------------------------
# 2. The fused dual GEMM + per-slot LoRA + SwiGLU + weighted mix + down-LoRA input.
# ---------------------------------------------------------------------------------------------

# Through the k-slot epilogue the gate and up accumulators stay live next to the mixed h, the
# slot's h and the chunk being multiplied. Measured with the compile report: 64×128 tiles with 8
# warps are the largest that stay spill-free on sm_80 (128×64 spills a few registers there, though
# not on sm_90). x is shared by W_G and W_U, so a 64×128 dual tile reads as little per FLOP as a
# 64×256 single GEMM. LORA_CHUNK is how many masked-dense columns are multiplied at once: 32
# spills on sm_80 at 64×128; 16 is one m16n8k16 / wgmma K-step.
_GATE_UP_GPU = [
    cfg(64, 128, 64, 8, 3, LORA_CHUNK=16), cfg(64, 128, 32, 8, 4, LORA_CHUNK=16),
    cfg(64, 128, 32, 8, 3, LORA_CHUNK=16), cfg(64, 64, 64, 8, 3, LORA_CHUNK=16),
    cfg(64, 64, 32, 8, 4, LORA_CHUNK=16), cfg(32, 64, 64, 4, 4, LORA_CHUNK=16),
    cfg(64, 32, 64, 4, 4, LORA_CHUNK=16),
]
GATE_UP_CONFIGS = (
    [triton.Config({**INTERPRET_CONFIG.kwargs, "LORA_CHUNK": 16}, num_warps=4, num_stages=1)]
    if INTERPRET else _GATE_UP_GPU
)


@triton.jit
def _expert_gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, a_gu_ptr, bg_ptr, bu_ptr, ad_ptr, w_ptr, idx_ptr, keep_ptr,
    hmix_ptr, a_mix_ptr,
    M, N, K,
    stride_xm, stride_wg, stride_wu, stride_hm,
    dropout_scale,
    M_BUCKET,
    RANK: tl.constexpr, R_PAD: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr,
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
    # Token-row offsets (int64 from grouped_tile) reach M·k·D' (the keep mask) and M·D': past
    # 2^31 at LLaMA sizes; the columns join them in 64-bit address arithmetic.
    rows, mask_m, offs_n, mask_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    cols = offs_n.to(tl.int64)

    # ---- base products: each x tile loaded once for both W_G and W_U -------------------------
    acc_g, acc_u = dot_k2(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                          x_ptr, rows, mask_m, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu,
                          cols, mask_n, K, K, BLOCK_K, INTERP_BF16)

    # ---- per slot: LoRA delta, SwiGLU, mix, and the down LoRA's input -----------------------
    # Masked-dense column c is row c of the [n·R, ·] LoRA matrices: expert c // R_PAD. The delta
    # is linear in the masked operand, so slot j turns slot j-1's gate into its own in place by
    # adding (a_j - a_{j-1}) @ B: the two blocks belong to different experts, so that operand is
    # exact (and zero when a slot repeats the previous expert), and the base accumulators need no
    # second copy: two fewer live fp32 tiles.
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
        moved = (e_prev != e_j)[:, None]
        for c0 in tl.range(0, NR, CH, num_stages=1):
            lc = c0 + tl.arange(0, CH)
            l_exp = (lc // R_PAD)[None, :]
            # Only block e_j (and e_{j-1}, negated) of the token's a_gu row is read: R contiguous
            # values each; the other experts' columns read as zero.
            new_blk = (l_exp == e_j[:, None]) & moved
            old_blk = (l_exp == e_prev[:, None]) & moved
            a_ptrs = a_gu_ptr + rows[:, None] * (2 * NR) + lc[None, :]
            # The sign flip goes through fp32 (exact both ways): the interpreter holds bf16 as
            # integers, which a direct negation would corrupt.
            sign = tl.where(old_blk, -1.0, 1.0)
            a_g = (tl.load(a_ptrs, mask=new_blk | old_blk, other=0.0) * sign).to(DTYPE)
            a_u = (tl.load(a_ptrs + NR, mask=new_blk | old_blk, other=0.0) * sign).to(DTYPE)
            lc64 = lc.to(tl.int64)
            gate = mma(a_g, load_tile(bg_ptr, lc64, lc < NR, N, cols, N), gate, INTERP_BF16)
            up = mma(a_u, load_tile(bu_ptr, lc64, lc < NR, N, cols, N), up, INTERP_BF16)
        e_prev = e_j
        h = gate * tl.sigmoid(gate) * up
        hmix += w_j[:, None] * h
        if HAS_DROPOUT:
            keep = load_tile(keep_ptr, rows * TOP_K + j, mask_m, N, cols, N)
            h = tl.where(keep != 0, h * dropout_scale, 0.0)
        h = cast_rne(h, DTYPE, INTERP_BF16)
        # A_D[e] · h_j over this program's D' slice for every expert e, chunk by chunk; only block
        # e_j is kept (reshaped out of its chunk), so one [BLOCK_M, R] atomic per slot sums the
        # D' slices: an atomic per masked-dense column would cost n times the instructions and
        # addresses (sm_80 has no vector fp32 atomics).
        a_j = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for c0 in tl.range(0, NR, CH, num_stages=1):
            lc = c0 + tl.arange(0, CH)
            ad = load_tile_t(ad_ptr, lc.to(tl.int64), lc < NR, N, cols, N)  # [BLOCK_N, CH]
            part = mma(h, ad, tl.zeros((BLOCK_M, CH), dtype=tl.float32), INTERP_BF16)
            part = tl.reshape(part, (BLOCK_M, EPC, R_PAD))
            chunk_exp = c0 // R_PAD + tl.arange(0, EPC)
            part = tl.where(chunk_exp[None, :, None] == e_j[:, None, None], part, 0.0)
            a_j += tl.sum(part, axis=1)
        tl.atomic_add(a_mix_ptr + rows[:, None] * (NUM_EXPERTS * RANK)
                      + (tl.maximum(e_j, 0) * RANK)[:, None] + ri[None, :],
                      a_j * w_j[:, None], mask=(e_j >= 0)[:, None] & (ri < RANK)[None, :],
                      sem="relaxed")

    store_rounded(hmix_ptr, hmix, rows, mask_m, stride_hm, cols, mask_n, INTERP_BF16)


_expert_gate_up_tuned = triton.autotune(
    configs=GATE_UP_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "NUM_EXPERTS", "TOP_K", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_small_m},
    # Benchmarking launches the kernel repeatedly; the atomics must start from zero each time.
    reset_to_zero=["a_mix_ptr"],
)(_expert_gate_up_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------


def _launch_lora_in(x_lora: torch.Tensor, a_in: torch.Tensor, out: torch.Tensor,
                    scaling: float, config: triton.Config | None = None) -> None:
    num_tokens, hidden = x_lora.shape
    width = out.shape[1]
    launch(
        _lora_in_tuned, _lora_in_kernel, tile_grid(num_tokens, width, "BLOCK_N"),
        (x_lora, a_in, out, num_tokens, width, hidden, x_lora.stride(0), float(scaling),
         token_bucket(num_tokens)),
        {"INTERP_BF16": interpreter_bf16(x_lora.dtype)},
        config,
    )


def _launch_gate_up(x, gate_weight, up_weight, a_gu, lora: ExpertLoRA, weights, index, keep,
                    h_mix, a_mix, dropout_scale, config: triton.Config | None = None) -> None:
    num_tokens, hidden = x.shape
    inter = gate_weight.shape[0]
    launch(
        _expert_gate_up_tuned, _expert_gate_up_kernel, tile_grid(num_tokens, inter, "BLOCK_N"),
        (
            x, gate_weight, up_weight, a_gu, lora.b_gate, lora.b_up, lora.a_down, weights, index,
            keep if keep is not None else a_gu,  # never read without HAS_DROPOUT
            h_mix, a_mix,
            num_tokens, inter, hidden,
            x.stride(0), gate_weight.stride(0), up_weight.stride(0), h_mix.stride(0),
            float(dropout_scale),
            token_bucket(num_tokens),
        ),
        {
            "RANK": lora.rank, "R_PAD": padded_rank(lora.rank), "NUM_EXPERTS": lora.num_experts,
            "TOP_K": index.shape[1], "HAS_DROPOUT": keep is not None,
            "INTERP_BF16": interpreter_bf16(x.dtype),
        },
        config,
    )


# ---------------------------------------------------------------------------------------------
# The public functions.
# ---------------------------------------------------------------------------------------------

@on_device_of("x_lora")
def expert_lora_in(x_lora: torch.Tensor, lora: ExpertLoRA, scaling: float, *,
                   out: torch.Tensor | None = None,
                   config: triton.Config | None = None) -> torch.Tensor:
    """Scaled rank-``r`` inputs of every expert's gate and up LoRA: ``c · x_lora · A^T``.
    Runs on ``x_lora``'s device.

    Args:
        x_lora: ``[M, d]`` the LoRA input (``dropout(x)`` in training, ``x`` otherwise),
            fp16/bf16/fp32.
        lora: the experts' factors from :func:`expert_lora_layout`, ``x_lora``'s dtype.
        scaling: ``c = lora_alpha / r``, folded in here so the gate/up kernel need not.
        out: optional contiguous ``[M, 2·n·R]`` buffer of ``x_lora``'s dtype (``R``: the rank
            rounded up to a power of two).
        config: pins the block shape (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``)
            instead of autotuning it, so tests reach shapes the single interpreter config does
            not.
    Returns:
        ``[M, 2·n·R]`` in ``x_lora``'s dtype (accumulated in fp32): column ``e·R + i`` is
        ``c · A_G[e, i] · x_lora``, column ``n·R + e·R + i`` the same for ``A_U``; padded ranks
        are zero.
    Raises:
        TypeError / ValueError: on a dtype, shape or device mismatch.
    """
    num_tokens, hidden = check_activation("x_lora", x_lora)
    if not isinstance(lora, ExpertLoRA):
        raise TypeError(f"lora must be an ExpertLoRA, got {type(lora).__name__}")
    n, padded = lora.num_experts, padded_rank(lora.rank)
    check_like("lora.a_in", lora.a_in, (2, n, padded, hidden), x_lora, x_lora.dtype)
    out = output_buffer("out", out, (num_tokens, 2 * n * padded), x_lora, x_lora.dtype,
                        contiguous=True)
    if num_tokens > 0:
        _launch_lora_in(unit_stride_rows(x_lora), lora.a_in.contiguous(), out, scaling, config)
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
    x_lora: torch.Tensor | None = None,
    keep_h: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    out: torch.Tensor | None = None,
    a_mix_out: torch.Tensor | None = None,
    configs: dict[str, triton.Config] | None = None,
) -> GateUpOutput:
    """Mixed SwiGLU activation of the chosen LoRA experts, and the down LoRA's rank-``r`` input.

    Per token ``m`` and slot ``j`` (expert ``e_j = expert_index[m, j]``, weight
    ``w_j = expert_weights[m, j]``)::

        gate_j = W_G x + c · B_G[e_j] A_G[e_j] x_lora,  up_j likewise,  h_j = silu(gate_j) · up_j
        h_mix[m] = Σ_j w_j h_j
        a_mix[m, e·r + i] = Σ_{j: e_j = e} w_j · (A_D[e] · dropout(h_j))[i]   (0 for other e)

    where ``dropout(h_j) = h_j ⊙ keep_h[m, j] / (1 − p)``, or ``h_j`` without ``keep_h``.
    Accumulation is fp32 throughout and the ``k`` separate ``h_j`` never reach memory. Two
    launches: :func:`expert_lora_in` for the rank-``r`` inputs, then the fused kernel. Runs on
    ``x``'s device.

    Args:
        x: ``[M, d]`` round input, fp16/bf16/fp32 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        gate_weight, up_weight: ``[D', d]`` frozen base projections, ``x``'s dtype.
        lora: the experts' LoRA factors from :func:`expert_lora_layout`, ``x``'s dtype.
        expert_weights: ``[M, k]`` renormalised routing weights (used as fp32).
        expert_index: ``[M, k]`` integer expert ids. They are not range-checked on the host
            (that would synchronise with the device): an id outside ``[0, n)`` adds no LoRA term.
            Repeated ids within a token are fine.
        scaling: ``c = lora_alpha / r``.
        x_lora: the gate/up LoRA input (``dropout(x)``, drawn by the caller); defaults to ``x``.
        keep_h: optional ``[M, k, D']`` bool/uint8 keep-mask of the down LoRA's input; requires
            ``0 < dropout_p < 1``.
        dropout_p: the probability ``keep_h`` was drawn with.
        out: optional ``[M, D']`` buffer (``x``'s dtype, unit column stride) for ``h_mix``.
        a_mix_out: optional contiguous ``[M, n·r]`` fp32 buffer for ``a_mix`` (zeroed here).
        configs: pins the block shapes of the two launches instead of autotuning them, so
            tests reach shapes the single interpreter config does not: ``"lora_in"`` (see
            :func:`expert_lora_in`) and ``"gate_up"`` (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
            ``GROUP_M`` and ``LORA_CHUNK``, the masked-dense columns multiplied at once: a
            power of two ≥ 16, raised to ``R`` when the padded rank is larger).
    Returns:
        ``GateUpOutput(h_mix, a_mix)``.
    Raises:
        TypeError / ValueError: on a dtype, shape or device mismatch, and ``ValueError`` when
        ``n·r`` is past the masked-dense limit ``MAX_MASKED_DENSE_COLS``.
    """
    configs = pinned_configs(configs, ("lora_in", "gate_up"))
    num_tokens, hidden = check_activation("x", x)
    dt = x.dtype
    inter, _ = check_ndim("gate_weight", gate_weight, 2, "[D', d]")
    check_like("gate_weight", gate_weight, (inter, hidden), x, dt)
    check_like("up_weight", up_weight, (inter, hidden), x, dt)
    check_layout(lora, x, hidden, inter)
    top_k = check_routing(expert_weights, expert_index, x, lora.num_experts)
    if x_lora is None:
        x_lora = x
    else:
        check_like("x_lora", x_lora, (num_tokens, hidden), x, dt)
    keep = None
    dropout_scale = 1.0
    if keep_h is not None:
        check_like("keep_h", keep_h, (num_tokens, top_k, inter), x)
        if keep_h.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"keep_h must be bool or uint8, got {keep_h.dtype}")
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"keep_h given with dropout_p={dropout_p}; need 0 < dropout_p < 1")
        # bool and uint8 share a byte layout; the view avoids Triton's i1 pointer handling.
        keep = keep_h.contiguous().view(torch.uint8)
        dropout_scale = 1.0 / (1.0 - dropout_p)
    elif dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p} given without keep_h")

    out = output_buffer("out", out, (num_tokens, inter), x, dt)
    # The atomics add into a_mix: it starts from zero, whoever allocated it.
    a_mix = output_buffer("a_mix_out", a_mix_out, (num_tokens, lora.num_experts * lora.rank),
                          x, torch.float32, contiguous=True).zero_()
    if num_tokens == 0:
        return GateUpOutput(out, a_mix)

    a_gu = expert_lora_in(x_lora, lora, scaling, config=configs.get("lora_in"))
    _launch_gate_up(
        unit_stride_rows(x), unit_stride_rows(gate_weight), unit_stride_rows(up_weight), a_gu,
        lora, expert_weights.to(torch.float32).contiguous(), expert_index.contiguous(), keep,
        out, a_mix, dropout_scale, configs.get("gate_up"),
    )
    return GateUpOutput(out, a_mix)


# ---------------------------------------------------------------------------------------------
# What the compile report builds: the llama3-8b shape of design.md §4 (d=4096, D'=14336, n=8, k=2,
# r=16, 8192 tokens, bf16).
# ---------------------------------------------------------------------------------------------

_NUM_EXPERTS, _RANK, _TOP_K = 8, 16, 2
COMPILE_SPECS = [
    KernelSpec(
        name="expert.lora_in",
        fn=_lora_in_kernel,
        types={"x_ptr": "*bf16", "a_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32",
               "K": "i32", "stride_xm": "i32", "scaling": "fp32", "M_BUCKET": "i32"},
        constexprs={"INTERP_BF16": False},
        configs=_LORA_IN_GPU,
        aligned=("x_ptr", "a_ptr", "out_ptr", "M", "N", "K", "stride_xm", "M_BUCKET"),
        note="c · x_lora · [A_G; A_U]^T for all 8 experts (256 columns)",
    ),
    KernelSpec(
        name="expert.gate_up",
        fn=_expert_gate_up_kernel,
        types={"x_ptr": "*bf16", "wg_ptr": "*bf16", "wu_ptr": "*bf16", "a_gu_ptr": "*bf16",
               "bg_ptr": "*bf16", "bu_ptr": "*bf16", "ad_ptr": "*bf16", "w_ptr": "*fp32",
               "idx_ptr": "*i64", "keep_ptr": "*u8", "hmix_ptr": "*bf16", "a_mix_ptr": "*fp32",
               "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wg": "i32",
               "stride_wu": "i32", "stride_hm": "i32", "dropout_scale": "fp32",
               "M_BUCKET": "i32"},
        constexprs={"RANK": _RANK, "R_PAD": padded_rank(_RANK), "NUM_EXPERTS": _NUM_EXPERTS,
                    "TOP_K": _TOP_K, "HAS_DROPOUT": True, "INTERP_BF16": False},
        configs=_GATE_UP_GPU,
        aligned=("x_ptr", "wg_ptr", "wu_ptr", "a_gu_ptr", "bg_ptr", "bu_ptr", "ad_ptr", "w_ptr",
                 "idx_ptr", "keep_ptr", "hmix_ptr", "a_mix_ptr", "M", "N", "K", "stride_xm",
                 "stride_wg", "stride_wu", "stride_hm", "M_BUCKET"),
        note="dual gate/up GEMM + per-slot masked-dense LoRA + SwiGLU + mix + A_D atomics "
             "(training variant, with the dropout mask)",
    ),
]
