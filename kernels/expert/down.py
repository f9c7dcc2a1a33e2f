"""Down side of the LoRA-expert SwiGLU: one GEMM for the base product of all ``k`` experts.

Because ``W_D`` is shared and linear, ``Σ_j w_j W_D h_j = W_D h_mix``, and the experts' own parts
are rank ``r``::

    y = h_mix · W_D^T + c · a_mix · B_D_cat^T

with ``h_mix [M, D']`` and ``a_mix [M, n·r]`` from :func:`expert_gate_up`. ``a_mix`` already is the
masked-dense operand (each token's routing-weighted ``A_D[e_j] h_j`` in block ``e_j``, zeros for the
experts it did not choose), so the LoRA term is ``n·r`` more K-steps of the same GEMM: the loop runs
over ``[h_mix | c·a_mix]`` against ``[W_D | B_D_cat^T]``, one fp32 accumulator, on tensor cores.
"""

from __future__ import annotations

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
    grouped_tile,
    interpreter_bf16,
    launch,
    load_tile,
    mma,
    on_device_of,
    output_buffer,
    prune_small_m,
    store_rounded,
    tile_grid,
    token_bucket,
    unit_stride_rows,
)
from .layout import ExpertLoRA, check_layout

__all__ = ["expert_down"]

# A plain GEMM (the LoRA is a few more K-steps): the usual large tiles, every one spill-free on
# both sm_80 and sm_90 (compile report). Hopper takes 128×256 at 3 stages in its 227 KB of shared
# memory; BLOCK_K = 32 gives A100 (163 KB) its deeper pipelines; the 64- and 32-row tiles serve
# few tokens. (128×128 with 4 warps spills on sm_80 and is left out.)
_DOWN_GPU = [
    cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(128, 128, 64, 8, 3),
    cfg(128, 256, 32, 8, 3), cfg(128, 128, 32, 8, 4), cfg(64, 128, 32, 4, 4),
    cfg(64, 64, 128, 4, 3), cfg(64, 64, 64, 4, 4), cfg(32, 64, 64, 4, 4),
]
DOWN_CONFIGS = [INTERPRET_CONFIG] if INTERPRET else _DOWN_GPU


@triton.jit
def _expert_down_kernel(
    h_ptr, wd_ptr, a_mix_ptr, bd_ptr, y_ptr,
    M, N, K,
    stride_hm, stride_wd, stride_ym,
    scaling,
    M_BUCKET,
    NR: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    DTYPE: tl.constexpr = h_ptr.dtype.element_ty
    rows, row_ok, cols, col_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    cols = cols.to(tl.int64)

    # ---- base: h_mix · W_D^T over D' -----------------------------------------------------------
    acc = dot_k(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), h_ptr, rows, row_ok, stride_hm,
                wd_ptr, cols, col_ok, stride_wd, K, K, BLOCK_K, INTERP_BF16)

    # ---- LoRA: n·r more K-steps, c · a_mix against B_D^T [n·r, d] -----------------------------
    offs_k = tl.arange(0, BLOCK_K)
    for c0 in tl.static_range(0, NR, BLOCK_K):
        lc = c0 + offs_k
        z = load_tile(a_mix_ptr, rows, row_ok, NR, lc, NR)
        b = load_tile(bd_ptr, lc.to(tl.int64), lc < NR, N, cols, N)
        acc = mma(cast_rne(z * scaling, DTYPE, INTERP_BF16), b, acc, INTERP_BF16)

    store_rounded(y_ptr, acc, rows, row_ok, stride_ym, cols, col_ok, INTERP_BF16)


_expert_down_tuned = triton.autotune(
    configs=DOWN_CONFIGS,
    key=["M_BUCKET", "N", "K", "NR"],
    prune_configs_by={"early_config_prune": prune_small_m},
)(_expert_down_kernel)


def _launch_down(h_mix, down_weight, a_mix, b_down, y, scaling,
                 config: triton.Config | None = None) -> None:
    num_tokens, inter = h_mix.shape
    hidden = down_weight.shape[0]
    launch(
        _expert_down_tuned, _expert_down_kernel, tile_grid(num_tokens, hidden, "BLOCK_N"),
        (
            h_mix, down_weight, a_mix, b_down, y,
            num_tokens, hidden, inter,
            h_mix.stride(0), down_weight.stride(0), y.stride(0),
            float(scaling),
            token_bucket(num_tokens),
        ),
        {"NR": a_mix.shape[1], "INTERP_BF16": interpreter_bf16(h_mix.dtype)},
        config,
    )


@on_device_of("h_mix")
def expert_down(
    h_mix: torch.Tensor,
    down_weight: torch.Tensor,
    lora: ExpertLoRA,
    a_mix: torch.Tensor,
    scaling: float,
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """The experts' weighted output ``y = W_D h_mix + c · Σ_e B_D[e] a_mix[:, e·r : e·r + r]``.

    With ``h_mix`` and ``a_mix`` from :func:`expert_gate_up` that is
    ``Σ_j w_j (W_D h_j + c · B_D[e_j] A_D[e_j] dropout(h_j))``, the experts' mixed output.
    Runs on ``h_mix``'s device.

    Args:
        h_mix: ``[M, D']`` mixed activation, fp16/bf16/fp32 (CUDA, or CPU under
            ``TRITON_INTERPRET=1``).
        down_weight: ``[d, D']`` frozen base projection, ``h_mix``'s dtype.
        lora: the experts' LoRA factors from :func:`expert_lora_layout` (``b_down`` is read).
        a_mix: ``[M, n·r]`` fp32, the routing-weighted down-LoRA inputs in their experts' blocks.
        scaling: ``c = lora_alpha / r``.
        out: optional ``[M, d]`` buffer of ``h_mix``'s dtype with unit column stride.
        config: pins the block shape (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``)
            instead of autotuning it, so tests reach shapes the single interpreter config does
            not.
    Returns:
        ``y [M, d]`` in ``h_mix``'s dtype, accumulated in fp32.
    Raises:
        TypeError / ValueError: on a dtype, shape or device mismatch, and ``ValueError`` when
        ``n·r`` is past the masked-dense limit ``MAX_MASKED_DENSE_COLS``.
    """
    num_tokens, inter = check_activation("h_mix", h_mix)
    dt = h_mix.dtype
    hidden, _ = check_ndim("down_weight", down_weight, 2, "[d, D']")
    check_like("down_weight", down_weight, (hidden, inter), h_mix, dt)
    check_layout(lora, h_mix, hidden, inter)
    check_like("a_mix", a_mix, (num_tokens, lora.num_experts * lora.rank), h_mix, torch.float32)
    out = output_buffer("out", out, (num_tokens, hidden), h_mix, dt)
    if num_tokens > 0:
        _launch_down(unit_stride_rows(h_mix), unit_stride_rows(down_weight),
                     a_mix.contiguous(), lora.b_down, out, scaling, config)
    return out


# What the compile report builds: the llama3-8b shape of design.md §4 (d=4096, D'=14336, n=8, k=2,
# r=16, 8192 tokens, bf16).
COMPILE_SPECS = [
    KernelSpec(
        name="expert.down",
        fn=_expert_down_kernel,
        types={"h_ptr": "*bf16", "wd_ptr": "*bf16", "a_mix_ptr": "*fp32", "bd_ptr": "*bf16",
               "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_hm": "i32",
               "stride_wd": "i32", "stride_ym": "i32", "scaling": "fp32", "M_BUCKET": "i32"},
        constexprs={"NR": 8 * 16, "INTERP_BF16": False},
        configs=_DOWN_GPU,
        aligned=("h_ptr", "wd_ptr", "a_mix_ptr", "bd_ptr", "y_ptr", "M", "N", "K", "stride_hm",
                 "stride_wd", "stride_ym", "M_BUCKET"),
        note="h_mix · W_D^T with the masked-dense LoRA as 128 more K-steps",
    ),
]
