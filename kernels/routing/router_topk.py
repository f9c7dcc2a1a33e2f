"""Fused router: logits ``x R^T``, fp32 softmax, top-k with lowest-index tie-breaking and
renormalised weights, in one pass over ``x``.

The router is a GEMV-like product (``n`` ≤ 64 experts): the kernel is bound by reading ``x``
once, so everything after the logits happens in registers of the program that owns the tokens
and nothing but the three small outputs goes back to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..compile_spec import KernelSpec
from ..utils import (
    cast_rne,
    check_activation,
    check_like,
    check_ndim,
    dot_k,
    interpreter_bf16,
    is_interpreter,
    launch,
    new_output,
    on_device_of,
    tile_grid,
    tile_offsets,
    token_bucket,
    unit_stride_rows,
)

__all__ = ["MAX_EXPERTS", "fused_router_topk"]

MAX_EXPERTS = 64
# tl.dot needs every dimension ≥ 16: the expert axis is padded to at least this.
_MIN_DOT = 16


@triton.jit
def _router_topk_kernel(
    x_ptr,
    w_ptr,
    probs_ptr,
    weights_ptr,
    index_ptr,
    M,
    D,
    N,
    stride_xm,
    stride_wn,
    M_BUCKET,
    TOP_K: tl.constexpr,
    N_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token block; all experts (padded to N_PAD) are its one column block.
    rows64, row_ok, experts, expert_ok = tile_offsets(tl.program_id(0), 0, M, N, BLOCK_M, N_PAD)
    # Padded experts read zeros and are masked out below.
    acc = dot_k(tl.zeros((BLOCK_M, N_PAD), dtype=tl.float32), x_ptr, rows64, row_ok, stride_xm,
                w_ptr, experts, expert_ok, stride_wn, D, D, BLOCK_D, INTERP_BF16)

    # The reference takes the softmax of F.linear's output, which is rounded to the input
    # dtype: rounding here too keeps the routing decisions of the backends identical.
    logits = cast_rne(acc, x_ptr.dtype.element_ty, INTERP_BF16).to(tl.float32)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    e = tl.exp(logits - row_max[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    tl.store(
        probs_ptr + rows64[:, None] * N + experts[None, :],
        probs,
        mask=row_ok[:, None] & expert_ok[None, :],
    )

    # Top-k as k rounds of "take the maximum, lowest index among equals" (the choice of a
    # stable descending sort), written out rather than tl.argmax, whose tie rule is not
    # documented. Probabilities are ≥ 0, so -1 marks padding and experts already taken.
    work = tl.where(expert_ok[None, :], probs, -1.0)
    slots = tl.arange(0, K_PAD)
    top_w = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_M, K_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(work, axis=1)
        pick = tl.min(tl.where(work == best[:, None], experts[None, :], N_PAD), axis=1)
        # A NaN row matches nothing; keep its index in range so later gathers stay in bounds.
        pick = tl.minimum(pick, N - 1)
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, pick[:, None], top_i)
        work = tl.where(experts[None, :] == pick[:, None], -1.0, work)
    top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out_offs = rows64[:, None] * TOP_K + slots[None, :]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offs, top_w, mask=out_mask)
    tl.store(index_ptr + out_offs, top_i.to(tl.int64), mask=out_mask)


# Bandwidth-bound on x: tiles wide in d keep many loads in flight, and 16-64 tokens per program
# give a grid of a few waves at 8192 tokens on 108 (A100) or 132 (H100) SMs. Shared memory per
# stage ≤ (32 + 16)·256·2 B = 24 KB, within both architectures at 3-4 stages. (16, 256) at 4
# stages made sm_90's ptxas spill 8 bytes; 3 stages do not.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_D": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
]
# The interpreter gains nothing from tuning and each config costs a full run: one small tile,
# so test shapes still span several blocks.
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]

_router_topk_tuned = triton.autotune(
    configs=INTERPRETER_CONFIGS if is_interpreter() else GPU_CONFIGS,
    key=["M_BUCKET", "D", "N", "TOP_K"],
)(_router_topk_kernel)


def _launch_router_topk(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    probs: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    top_k: int,
    config: triton.Config | None = None,
) -> None:
    """Fills ``probs``, ``weights``, ``index`` (contiguous) for validated inputs (``config``:
    see :func:`fused_router_topk`)."""
    num_tokens, hidden = x.shape
    num_experts = router_weight.shape[0]
    args = (
        x, router_weight, probs, weights, index,
        num_tokens, hidden, num_experts, x.stride(0), router_weight.stride(0),
        token_bucket(num_tokens),
    )
    meta = {
        "TOP_K": top_k,
        "N_PAD": max(triton.next_power_of_2(num_experts), _MIN_DOT),
        "K_PAD": triton.next_power_of_2(top_k),
        "INTERP_BF16": interpreter_bf16(x.dtype),
    }
    launch(_router_topk_tuned, _router_topk_kernel, tile_grid(num_tokens), args, meta, config)


@on_device_of("x")
def fused_router_topk(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, *,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router probabilities and the top-k experts of every token, in one kernel.

    Computes ``probs = softmax(x @ router_weight^T)`` in fp32 (the logits rounded to ``x``'s
    dtype first, as ``F.linear`` returns them), then the ``top_k`` most probable experts with
    ties going to the lowest expert index (``graphmoe_fused.routing.select_experts``' rule) and
    their probabilities renormalised to sum to one. Runs on ``x``'s device.

    Args:
        x: ``[M, d]`` tokens, fp16/bf16/fp32, CUDA (CPU under ``TRITON_INTERPRET=1``).
        router_weight: ``[n, d]``, ``x``'s dtype and device, ``n`` ≤ 64.
        top_k: ``1 ≤ top_k ≤ n``.
        config: pins one block shape (``BLOCK_M``, ``BLOCK_D``) instead of autotuning, so tests
            reach shapes the single interpreter config does not.

    Returns:
        ``probs`` fp32 ``[M, n]``, ``weights`` fp32 ``[M, top_k]`` (renormalised, in descending
        order), ``index`` int64 ``[M, top_k]``.

    Raises:
        ValueError: a shape, a device, ``n`` or ``top_k`` out of range.
        TypeError: an unsupported or mismatched dtype.
    """
    num_tokens, hidden = check_activation("x", x, "[M, d]")
    num_experts, _ = check_ndim("router_weight", router_weight, 2, "[n, d]")
    check_like("router_weight", router_weight, (num_experts, hidden), x, x.dtype)
    if hidden < 1 or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(
            f"need d ≥ 1 and 1 ≤ n ≤ {MAX_EXPERTS} experts, got d={hidden}, n={num_experts}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}], got {top_k!r}")

    probs = new_output((num_tokens, num_experts), torch.float32, x.device)
    weights = new_output((num_tokens, top_k), torch.float32, x.device)
    index = new_output((num_tokens, top_k), torch.int64, x.device)
    if num_tokens > 0:
        _launch_router_topk(unit_stride_rows(x), unit_stride_rows(router_weight), probs,
                            weights, index, top_k, config)
    return probs, weights, index


# llama3-8b (docs/design.md §4): d=4096, n=8, k=2, bf16.
COMPILE_SPECS = [
    KernelSpec(
        name="routing.router_topk",
        fn=_router_topk_kernel,
        types={
            "x_ptr": "*bf16", "w_ptr": "*bf16", "probs_ptr": "*fp32", "weights_ptr": "*fp32",
            "index_ptr": "*i64", "M": "i32", "D": "i32", "N": "i32", "stride_xm": "i32",
            "stride_wn": "i32", "M_BUCKET": "i32",
        },
        constexprs={"TOP_K": 2, "N_PAD": 16, "K_PAD": 2, "INTERP_BF16": False},
        configs=GPU_CONFIGS,
        aligned=("x_ptr", "w_ptr", "probs_ptr", "weights_ptr", "index_ptr", "M", "D",
                 "stride_xm", "stride_wn", "M_BUCKET"),
        # tl.dot on bf16 maps to mma even at n=8 (padded to 16 columns); the kernel is
        # bandwidth-bound, so the check guards against a silent scalar fallback, not for speed.
        tensor_cores=True,
        note="d=4096 n=8 k=2 bf16",
    ),
]
