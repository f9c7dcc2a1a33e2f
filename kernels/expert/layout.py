"""The experts' LoRA factors as the expert kernels read them, the masked-dense limit, and the
checks every expert kernel applies to them.

The kernels read every LoRA factor as a row-major ``[n·R, ·]`` matrix whose long dimension is
contiguous (``B`` transposed), with the rank padded to a power of two ``R`` (zero rows; no padding
for the usual power-of-two ranks), so each weight tile is a vectorised 2-D load and a masked-dense
chunk holds whole expert blocks. :func:`expert_lora_layout` builds them (a few MB of copies; the
triton backend builds them once per forward for all rounds).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ..utils import check_float, check_like, check_ndim, on_device_of

__all__ = [
    "MAX_MASKED_DENSE_COLS",
    "ExpertLoRA",
    "expert_lora_layout",
    "masked_dense_supported",
    "padded_rank",
]

# The masked-dense products cost n·r MACs per slot and output element where a grouped product
# would cost r: at n·r = 256, k = 2 that is ~19 % of the base gate/up work at d = 4096, past
# which a grouped product wins (docs/design.md §2).
MAX_MASKED_DENSE_COLS = 256


def masked_dense_supported(num_experts: int, rank: int) -> bool:
    """Whether the masked-dense LoRA path takes ``n`` experts of rank ``r``."""
    return num_experts * rank <= MAX_MASKED_DENSE_COLS


def check_masked_dense(num_experts: int, rank: int) -> None:
    """Raises ``ValueError`` when ``n·r`` is past the masked-dense limit."""
    if not masked_dense_supported(num_experts, rank):
        raise ValueError(
            f"n·r = {num_experts}·{rank} = {num_experts * rank} is over the masked-dense LoRA "
            f"limit of {MAX_MASKED_DENSE_COLS} columns; use a grouped LoRA path (the torch "
            "backend) for this many experts or this rank"
        )


def padded_rank(rank: int) -> int:
    """``r`` rounded up to a power of two: the width of one expert's block in the gate/up
    kernel, so a masked-dense chunk always holds whole expert blocks."""
    return triton.next_power_of_2(rank)


class ExpertLoRA(NamedTuple):
    """All experts' LoRA factors as the kernels read them (see :func:`expert_lora_layout`).

    Each factor is a contiguous ``[n, R, ·]`` tensor, i.e. a row-major ``[n·R, ·]`` matrix
    whose row ``e·R + i`` is rank ``i`` of expert ``e``; ``R`` is ``rank`` rounded up to a power
    of two for the gate/up kernel's factors (padded ranks are zero rows; no padding, and no
    copy beyond the transposes, for the usual power-of-two ranks).
    """

    a_in: torch.Tensor  # [2, n, R, d]: A_G then A_U
    b_gate: torch.Tensor  # [n, R, D']: B_G transposed
    b_up: torch.Tensor  # [n, R, D']: B_U transposed
    a_down: torch.Tensor  # [n, R, D']: A_D
    b_down: torch.Tensor  # [n, r, d]: B_D transposed (unpadded: a_mix is [M, n·r])
    rank: int  # r

    @property
    def num_experts(self) -> int:
        return self.a_down.shape[0]


def _rank_major(t: torch.Tensor, padded: int) -> torch.Tensor:
    """A ``[n, r, ·]`` view as a contiguous ``[n, padded, ·]`` tensor, zero-padded ranks."""
    if t.shape[1] == padded:
        return t.contiguous()
    out = t.new_zeros(t.shape[0], padded, t.shape[2])
    out[:, : t.shape[1]] = t
    return out


@on_device_of("lora_A_gate")
def expert_lora_layout(
    lora_A_gate: torch.Tensor,
    lora_B_gate: torch.Tensor,
    lora_A_up: torch.Tensor,
    lora_B_up: torch.Tensor,
    lora_A_down: torch.Tensor,
    lora_B_down: torch.Tensor,
) -> ExpertLoRA:
    """Copies the experts' LoRA factors into the layouts of the expert kernels, on their device.

    Args (shapes as in ``GraphMoEParams``; one floating dtype and one device for all):
        lora_A_gate, lora_A_up: ``[n, r, d]``; lora_B_gate, lora_B_up: ``[n, D', r]``;
        lora_A_down: ``[n, r, D']``; lora_B_down: ``[n, d, r]``.
    Returns:
        An :class:`ExpertLoRA`, detached from autograd. The transposed (and any padded) factors
        are copies, about ``n·r·(3d + 2D')`` elements; ``a_down`` shares ``lora_A_down``'s
        storage when no padding is needed. Build it again whenever the factors change (every
        forward, in training).
    Raises:
        TypeError / ValueError: on inconsistent shapes, dtypes or devices, or when ``n·r`` is
        past the masked-dense limit.
    """
    num_experts, rank, hidden = check_ndim("lora_A_gate", lora_A_gate, 3, "[n, r, d]")
    check_float("lora_A_gate", lora_A_gate)
    inter = check_ndim("lora_A_down", lora_A_down, 3, "[n, r, D']")[2]
    for name, t, shape in (
        ("lora_A_up", lora_A_up, (num_experts, rank, hidden)),
        ("lora_B_gate", lora_B_gate, (num_experts, inter, rank)),
        ("lora_B_up", lora_B_up, (num_experts, inter, rank)),
        ("lora_A_down", lora_A_down, (num_experts, rank, inter)),
        ("lora_B_down", lora_B_down, (num_experts, hidden, rank)),
    ):
        check_like(name, t, shape, lora_A_gate, lora_A_gate.dtype)
    check_masked_dense(num_experts, rank)
    padded = padded_rank(rank)
    with torch.no_grad():
        return ExpertLoRA(
            a_in=torch.stack([_rank_major(lora_A_gate.detach(), padded),
                              _rank_major(lora_A_up.detach(), padded)]),
            b_gate=_rank_major(lora_B_gate.detach().transpose(1, 2), padded),
            b_up=_rank_major(lora_B_up.detach().transpose(1, 2), padded),
            a_down=_rank_major(lora_A_down.detach(), padded),
            b_down=lora_B_down.detach().transpose(1, 2).contiguous(),
            rank=rank,
        )


def check_layout(lora: ExpertLoRA, ref: torch.Tensor, hidden: int, inter: int) -> None:
    """Validates an :class:`ExpertLoRA` against ``ref``'s dtype and device and the sizes."""
    if not isinstance(lora, ExpertLoRA):
        raise TypeError(
            f"lora must be an ExpertLoRA (from expert_lora_layout), got {type(lora).__name__}"
        )
    n, r = lora.num_experts, lora.rank
    padded = padded_rank(r)
    for name, t, shape in (
        ("lora.a_in", lora.a_in, (2, n, padded, hidden)),
        ("lora.b_gate", lora.b_gate, (n, padded, inter)),
        ("lora.b_up", lora.b_up, (n, padded, inter)),
        ("lora.a_down", lora.a_down, (n, padded, inter)),
        ("lora.b_down", lora.b_down, (n, r, hidden)),
    ):
        check_like(name, t, shape, ref, ref.dtype)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (build it with expert_lora_layout)")
    check_masked_dense(n, r)


def check_routing(expert_weights: torch.Tensor, expert_index: torch.Tensor, ref: torch.Tensor,
                  num_experts: int) -> int:
    """Validates ``[M, k]`` routing tensors against ``ref [M, ...]``; returns ``k``."""
    top_k = check_ndim("expert_index", expert_index, 2, "[tokens, k]")[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"expert_index has k={top_k} slots; need 1 <= k <= n={num_experts}")
    check_like("expert_index", expert_index, (ref.shape[0], top_k), ref)
    if expert_index.is_floating_point() or expert_index.is_complex() or (
        expert_index.dtype == torch.bool
    ):
        raise TypeError(f"expert_index must be an integer tensor, got {expert_index.dtype}")
    check_like("expert_weights", expert_weights, (ref.shape[0], top_k), ref)
    if not expert_weights.is_floating_point():
        raise TypeError(f"expert_weights must be floating point, got {expert_weights.dtype}")
    return top_k
