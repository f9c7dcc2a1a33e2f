"""Expert-batched LoRA products for the torch backend.

Every chosen (token, slot) *pair* needs a rank-``r`` product through its own expert's factor.
A loop over experts needs each expert's token count on the host: free on a CPU, a device sync
on CUDA. The masked plan needs none (static shapes, no sync, so a round can be CUDA-graph
captured); the grouped plan, which loops, runs on CPUs only.

Factors are passed in *rank-major* form ``F [n, r', w]`` (``A`` factors as stored, ``B`` factors
transposed once per call), so one layout serves both directions:

* ``project``: ``F[e_p] @ v_p``      (``w`` → ``r'``; a LoRA ``A``, or ``Bᵀ`` in backward)
* ``expand``:  ``F[e_p]ᵀ @ v_p``     (``r'`` → ``w``; a LoRA ``B``, or ``Aᵀ`` in backward)
* ``outer``:   ``Σ_{p: e_p = i} v_p ⊗ u_p`` (the factor gradients, ``[n, r', w]``)

Two plans implement them; :func:`choose_expert_plan` picks one.

``MaskedPlan`` (pairs slot-major, shape ``(k, M)``): one dense product against *all* experts'
factors, ``[M, n·r']`` against ``[n·r', w]``, with the blocks of unchosen experts zeroed. It does
``n`` times the rank-r FLOPs, but on a GPU with ``n·r ≤ ~256`` all experts' factors fit one
tensor-core tile (design.md §2), so the masked GEMM costs about what a single-expert one would; it
needs no sort, no gathers of ``D'``-wide rows, and the base add fuses into ``addmm``. A CPU has
no such tile and pays the n-fold FLOPs, so there it is kept for tiny ``n·r`` only.

``GroupedPlan`` (pairs sorted by expert, shape ``(P,)``, CPU only): one product per expert over
its contiguous segment of pairs, the segment bounds read on the host (free on a CPU; on CUDA a
device sync, hence the masked plan there). It does exactly the useful FLOPs but pays a sort and
gathers/scatters of ``D'``-wide rows; it wins from ``n·r ≈ 32`` on a CPU. A *gather* of
per-token factors (``[M, D', r]``) is never an option: it moves ``D'·r`` values per pair where
the products above move ``D'``.

Products that make a ``D'``-wide result accept ``out=``, a buffer the caller reuses (see
:mod:`.workspace`); a plan may ignore it, so callers use what is returned.
"""

from __future__ import annotations

import torch

from ..contract import new_empty, new_empty_like

# Largest n·r for which the masked plan is chosen. On a GPU all experts' rank-r columns fit one
# tensor-core tile up to ~256 (docs/design.md §2), so the n-fold FLOPs are nearly free. A CPU has no
# such tile: the masked products cost n·r·D' FLOPs per pair, compute-bound, while the grouped
# ones (r ≤ ~32) are memory-bound, about one pass over the D'-wide rows. Measured at the
# cpu-small shape (d=1024, D'=2816, k=2, 1024 tokens, fp32, forward+backward, one thread, CPU
# time): n·r = 32 a tie within noise (grouped 4% faster at n=2, r=16 and at n=4, r=8), so the
# simpler masked plan keeps it; 64: grouped 2-4% faster; 128: 20-25%; 256: 30% (measured when
# the grouped plan ran torch._grouped_mm; its per-expert loop is a little faster still).
GPU_MASKED_MAX_COLUMNS = 256
CPU_MASKED_MAX_COLUMNS = 32


class MaskedPlan:
    """Dense products over all experts, unchosen experts' rank-r blocks zeroed.

    Pair tensors have leading shape ``(k, M)``: slot ``j`` of every token is one contiguous
    ``[M, ...]`` block, so the per-slot base add is a plain ``addmm`` on the shared ``[M, w]``
    base (no copy of the base per slot).
    """

    kind = "masked"

    def __init__(self, experts: torch.Tensor, num_experts: int) -> None:
        self.num_tokens, self.top_k = experts.shape
        self.num_experts = num_experts
        self.experts = experts  # [M, k]
        self.pair_experts = experts.t()  # [k, M]
        self.pshape = (self.top_k, self.num_tokens)

    def to_pairs(self, t: torch.Tensor) -> torch.Tensor:
        """``[M, k, ...]`` (token-major, as routing returns) → pair layout ``[k, M, ...]``."""
        return t.transpose(0, 1)

    def from_pairs(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1)

    def broadcast_tokens(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[M, w]`` → something that broadcasts against pair tensors ``[k, M, w]`` (a view
        here: ``out``, a buffer the grouped plan would fill, is not needed)."""
        return t.unsqueeze(0)

    def sum_to_tokens(
        self, t: torch.Tensor, weight: torch.Tensor | None, consume: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Σ_j weight_j · t_j`` over each token's slots: ``[k, M, w]`` → ``[M, w]``
        (``consume``: ``t`` is not needed afterwards and may be overwritten; ``out``: a
        ``[M, w]`` buffer for the result)."""
        if weight is None:
            return torch.sum(t, 0, out=out)
        out = torch.mul(t[0], weight[0, :, None], out=out)
        for j in range(1, self.top_k):
            out.addcmul_(t[j], weight[j, :, None])
        return out

    def _scatter(self, v: torch.Tensor) -> torch.Tensor:
        """``[k, M, r']`` → ``[k, M, n·r']`` with ``v`` in its expert's block, zeros elsewhere."""
        k, m, r = v.shape
        out = v.new_zeros(k, m, self.num_experts, r)
        index = self.pair_experts[:, :, None, None].expand(k, m, 1, r)
        return out.scatter_(2, index, v.unsqueeze(2)).view(k, m, self.num_experts * r)

    def project_tokens(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``F[e_p] @ x[tok_p]`` for a token-level ``x [M, w]`` (shared by the k slots, so the
        dense product runs once for all of them)."""
        n, r, w = factor.shape
        full = (x @ factor.reshape(n * r, w).t()).view(-1, n, r)
        index = self.experts[:, :, None].expand(-1, -1, r)
        return torch.gather(full, 1, index).transpose(0, 1)

    def project_pairs(self, h: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``F[e_p] @ h_p`` for pair rows ``h [k, M, w]`` → ``[k, M, r']``."""
        n, r, w = factor.shape
        k, m = self.pshape
        full = (h.reshape(k * m, w) @ factor.reshape(n * r, w).t()).view(k, m, n, r)
        index = self.pair_experts[:, :, None, None].expand(k, m, 1, r)
        return torch.gather(full, 2, index).squeeze(2)

    def expand_pairs(
        self, v: torch.Tensor, factor: torch.Tensor, base: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``base[tok_p] + F[e_p]ᵀ @ v_p`` → ``[k, M, w]`` (into ``out`` when given)."""
        n, r, w = factor.shape
        k, m = self.pshape
        masked = self._scatter(v)
        flat = factor.reshape(n * r, w)
        if out is None:
            out = new_empty((k, m, w), v.dtype, v.device)
        out = out.view(k, m, w)
        if base is None:
            return torch.mm(masked.view(k * m, n * r), flat, out=out.view(k * m, w)).view(k, m, w)
        for j in range(k):
            torch.addmm(base, masked[j], flat, out=out[j])
        return out

    def expand_tokens(self, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``Σ_{p of token m} F[e_p]ᵀ @ v_p`` → ``[M, w]`` (one product: a token's slots
        occupy different expert blocks of the same row)."""
        n, r, w = factor.shape
        return self._scatter(v).sum(0) @ factor.reshape(n * r, w)

    def outer_pairs(self, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``Σ_{p: e_p = i} v_p ⊗ u_p`` for pair rows ``u [k, M, w]`` → ``[n, r', w]``."""
        k, m = self.pshape
        r, w = v.shape[-1], u.shape[-1]
        masked = self._scatter(v).view(k * m, self.num_experts * r)
        return (masked.t() @ u.reshape(k * m, w)).view(self.num_experts, r, w)

    def outer_tokens(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``Σ_{p: e_p = i} v_p ⊗ x[tok_p]`` for a token-level ``x [M, w]`` → ``[n, r', w]``."""
        r, w = v.shape[-1], x.shape[-1]
        return (self._scatter(v).sum(0).t() @ x).view(self.num_experts, r, w)


class GroupedPlan:
    """Pairs sorted by expert; one product per expert over its contiguous segment (CPU only).

    Pair tensors have leading shape ``(P,)``, ``P = M·k``, ordered by (expert, token, slot).
    The segment bounds are read on the host once per plan: free on a CPU, and the reason this
    plan is not offered on CUDA, where that read would be a device sync (there the masked plan
    runs, within one tensor-core tile). A Python loop over the experts costs a few microseconds
    per product; in exchange every product can write into a given buffer (``torch.mm(out=)``)
    and the base add of ``expand_pairs`` fuses into ``addmm_``.
    """

    kind = "grouped"

    def __init__(self, experts: torch.Tensor, num_experts: int) -> None:
        self.num_tokens, self.top_k = experts.shape
        self.num_experts = num_experts
        flat = experts.reshape(-1)  # canonical pair id q = token * k + slot
        self.pair_id = torch.argsort(flat, stable=True)
        self.token = torch.div(self.pair_id, self.top_k, rounding_mode="floor")
        bounds = [0, *torch.bincount(flat, minlength=num_experts).cumsum(0).tolist()]
        # (expert, first pair, end) of every chosen expert: an unchosen one has no segment.
        self.segments = [(e, bounds[e], bounds[e + 1]) for e in range(num_experts)
                         if bounds[e + 1] > bounds[e]]
        self.pshape = (flat.numel(),)

    def to_pairs(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:]).index_select(0, self.pair_id)

    def from_pairs(self, t: torch.Tensor) -> torch.Tensor:
        out = new_empty_like(t)
        out.index_copy_(0, self.pair_id, t)
        return out.view(self.num_tokens, self.top_k, *t.shape[1:])

    def broadcast_tokens(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.index_select(t, 0, self.token, out=out)

    def sum_to_tokens(
        self, t: torch.Tensor, weight: torch.Tensor | None, consume: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if weight is None:
            src = t
        else:
            src = t.mul_(weight[:, None]) if consume else t * weight[:, None]
        out = t.new_zeros(self.num_tokens, t.shape[-1]) if out is None else out.zero_()
        return out.index_add_(0, self.token, src)

    def project_tokens(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return self.project_pairs(x.index_select(0, self.token), factor)

    def project_pairs(self, h: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        out = new_empty((h.shape[0], factor.shape[1]), h.dtype, h.device)
        for e, a, b in self.segments:
            torch.mm(h[a:b], factor[e].t(), out=out[a:b])
        return out

    def expand_pairs(
        self, v: torch.Tensor, factor: torch.Tensor, base: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is None:
            out = new_empty((v.shape[0], factor.shape[-1]), v.dtype, v.device)
        if base is None:
            for e, a, b in self.segments:
                torch.mm(v[a:b], factor[e], out=out[a:b])
            return out
        torch.index_select(base, 0, self.token, out=out)
        for e, a, b in self.segments:
            out[a:b].addmm_(v[a:b], factor[e])
        return out

    def expand_tokens(self, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        out = v.new_zeros(self.num_tokens, factor.shape[-1])
        return out.index_add_(0, self.token, self.expand_pairs(v, factor))

    def outer_pairs(self, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        out = v.new_zeros(self.num_experts, v.shape[-1], u.shape[-1])
        for e, a, b in self.segments:
            torch.mm(v[a:b].t(), u[a:b], out=out[e])
        return out

    def outer_tokens(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.outer_pairs(v, x.index_select(0, self.token))


ExpertPlan = MaskedPlan | GroupedPlan
PLANS = {"masked": MaskedPlan, "grouped": GroupedPlan}


def grouped_supported(device: torch.device) -> bool:
    """The grouped plan runs on a CPU, where its per-plan host read of the segment bounds costs
    nothing."""
    return device.type == "cpu"


def choose_expert_plan(device: torch.device, num_experts: int, rank: int) -> str:
    """``"masked"`` while all experts' rank-r columns are cheap to carry along (see
    ``*_MASKED_MAX_COLUMNS``), else ``"grouped"`` where it runs (a CPU).

    Under ``torch.compile`` the masked plan is taken: the grouped plan's segment bounds are
    data-dependent shapes, a graph break per expert.
    """
    if torch.compiler.is_compiling():
        return "masked"
    limit = CPU_MASKED_MAX_COLUMNS if device.type == "cpu" else GPU_MASKED_MAX_COLUMNS
    if num_experts * rank <= limit:
        return "masked"
    return "grouped" if grouped_supported(device) else "masked"


def make_plan(kind: str, experts: torch.Tensor, num_experts: int) -> ExpertPlan:
    return PLANS[kind](experts, num_experts)
