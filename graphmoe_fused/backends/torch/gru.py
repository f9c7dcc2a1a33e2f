"""The low-rank GRU step of the torch backend, forward and hand-written backward.

Same maths as :func:`graphmoe_fused.gru.lowrank_gru_reference` (reset-before, ``[h, y]`` order).
The forward products run in the compute dtype like every other GEMM of the layer; the gates, the
state ``h`` and the backward's elementwise work run in the accumulation dtype (fp32, or fp64 for
fp64 inputs). The backward's products with a ``d``-wide side (``y``, ``x``, ``W_·y``: ``d·dh``
MACs per token each) take their operands in the compute dtype and accumulate in the
accumulation dtype (:func:`rounded_mm`), as the Triton kernels do: in fp32 they ran without
tensor cores on a GPU, 6 ms of the backend's 46.7 ms H100 floor at llama3-8b
(``bench.op_count``). The ``dh``-wide ones stay in the accumulation dtype. Backward
recomputes the gates from ``(h, y, x)`` instead of keeping them: three ``[M, dh]`` tensors per
round not saved, for four products of ``dh`` columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class GRUWeights(NamedTuple):
    """GRU weights prepared once per call: ``W_z`` and ``W_r`` stacked into one product, each
    weight split by input (``[h, ·]`` columns, then the ``d`` wide ones) so that no ``[M, dh+d]``
    concatenation of the inputs is ever built."""

    zr_h: torch.Tensor  # [2·dh, dh]
    zr_y: torch.Tensor  # [2·dh, d]
    o_h: torch.Tensor  # [dh, dh]
    o_u: torch.Tensor  # [dh, d]
    bias_o: torch.Tensor  # [dh], accumulation dtype
    g: torch.Tensor  # [d, dh]


def prepare_gru(
    weight_z: torch.Tensor, weight_r: torch.Tensor, weight_o: torch.Tensor,
    bias_o: torch.Tensor, weight_g: torch.Tensor, dtype: torch.dtype, acc_dtype: torch.dtype,
) -> GRUWeights:
    dh = weight_z.shape[0]
    zr = torch.cat([weight_z, weight_r], 0).to(dtype)
    o = weight_o.to(dtype)
    return GRUWeights(zr[:, :dh], zr[:, dh:], o[:, :dh], o[:, dh:], bias_o.to(acc_dtype),
                      weight_g.to(dtype))


def rounded_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
               acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` in the accumulation dtype ``acc`` with both operands rounded to the compute
    dtype ``dtype`` first, as a tensor-core GEMM computes it. On CUDA (and ``meta``) it is one
    bf16/fp16 GEMM with an fp32 result; elsewhere the rounded operands are multiplied in
    ``acc``: the same numbers up to the order of summation, so the CPU tests check the GPU's
    numerics."""
    a, b = a.to(dtype), b.to(dtype)
    if dtype == acc:
        return a @ b
    if a.device.type in ("cuda", "meta") and acc == torch.float32:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


class _Gates(NamedTuple):
    z: torch.Tensor
    r: torch.Tensor
    cand: torch.Tensor
    rh: torch.Tensor  # r ⊙ h
    u: torch.Tensor  # the candidate's second input (y or x)


def _gates(
    h: torch.Tensor, y: torch.Tensor, x: torch.Tensor, w: GRUWeights,
    candidate_input: str, candidate_activation: str,
) -> _Gates:
    cd, acc = w.zr_h.dtype, h.dtype
    dh = h.shape[-1]
    zr = torch.addmm(h.to(cd) @ w.zr_h.t(), y.to(cd), w.zr_y.t())
    zr = torch.sigmoid(zr.to(acc))
    z, r = zr[:, :dh], zr[:, dh:]
    u = y if candidate_input == "y" else x
    rh = r * h
    pre = torch.addmm(rh.to(cd) @ w.o_h.t(), u.to(cd), w.o_u.t()).to(acc).add_(w.bias_o)
    cand = torch.sigmoid(pre) if candidate_activation == "sigmoid" else torch.tanh(pre)
    return _Gates(z, r, cand, rh, u)


def gru_step(
    h: torch.Tensor, y: torch.Tensor, x: torch.Tensor, w: GRUWeights,
    candidate_input: str, candidate_activation: str,
) -> torch.Tensor:
    """``h' = (1 − z) ⊙ h + z ⊙ ĥ``; ``h`` (and ``h'``) in the accumulation dtype."""
    g = _gates(h, y, x, w, candidate_input, candidate_activation)
    return torch.lerp(h, g.cand, g.z)


class GRUGrads(NamedTuple):
    h: torch.Tensor  # ∂/∂h_{t-1}
    y: torch.Tensor  # ∂/∂y_t
    x: torch.Tensor | None  # ∂/∂x_t (candidate input "x" only)
    zr: torch.Tensor  # ∂/∂[W_z; W_r]  [2·dh, dh + d]
    o: torch.Tensor  # ∂/∂W_o  [dh, dh + d]
    bias_o: torch.Tensor


def gru_step_backward(
    grad_h_new: torch.Tensor, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
    w: GRUWeights, w_acc: GRUWeights, candidate_input: str, candidate_activation: str,
) -> GRUGrads:
    """Backward of :func:`gru_step`; ``w`` as in forward (to recompute the same gates, and for
    the ``d``-wide gradient products), ``w_acc`` the same weights in the accumulation dtype
    (for the ``dh``-wide ones)."""
    acc, cd = h.dtype, w.zr_h.dtype
    g = _gates(h, y, x, w, candidate_input, candidate_activation)
    grad_z = grad_h_new * (g.cand - h)
    grad_cand = grad_h_new * g.z
    grad_h = grad_h_new * (1 - g.z)
    if candidate_activation == "sigmoid":
        grad_pre = grad_cand * g.cand * (1 - g.cand)
    else:
        grad_pre = grad_cand * (1 - g.cand * g.cand)
    grad_o = torch.cat([grad_pre.t() @ g.rh, rounded_mm(grad_pre.t(), g.u, cd, acc)], 1)
    grad_rh = grad_pre @ w_acc.o_h
    grad_u = rounded_mm(grad_pre, w.o_u, cd, acc)
    grad_h += grad_rh * g.r
    grad_zr_pre = torch.cat([grad_z * g.z * (1 - g.z), grad_rh * h * g.r * (1 - g.r)], -1)
    grad_zr = torch.cat([grad_zr_pre.t() @ h, rounded_mm(grad_zr_pre.t(), y, cd, acc)], 1)
    grad_h.addmm_(grad_zr_pre, w_acc.zr_h)
    grad_y = rounded_mm(grad_zr_pre, w.zr_y, cd, acc)
    grad_x = None
    if candidate_input == "y":
        grad_y += grad_u
    else:
        grad_x = grad_u
    return GRUGrads(grad_h, grad_y, grad_x, grad_zr, grad_o, grad_pre.sum(0))
