"""The `torch` backend: the GraphMoE layer in plain PyTorch, the fast way, on any device.

Same function as :func:`..reference.graphmoe_reference` (within rounding), with:

* **3 base GEMMs per token per round whatever k is.** Gate and up are computed once and shared by
  the chosen experts; the down projection runs once on the mixed activation, because ``W_D`` is
  linear and shared: ``Σ_j w_j W_D h_j = W_D Σ_j w_j h_j`` (design.md §2). Only the rank-r deltas
  are per slot; they go through :mod:`.expert` (masked dense over all
  experts, or grouped by expert: a loop over the experts, on a CPU only).
* **No host sync** (no ``.item()``, ``nonzero``, data-dependent shape) in forward or backward
  with the masked expert plan, the one CUDA runs; the grouped plan (CPU only) reads its
  segment bounds on the host, which costs nothing there.
* **A hand-written backward** (:class:`_GraphMoEFunction`) that saves little: the input, the
  router probabilities and chosen experts (outputs anyway), the rank-r LoRA activations (fp32),
  per round boundary the GRU state and the experts' output ``y_t``, and (the default,
  ``recompute_intermediates=False``) the shared ``G`` and ``U`` of every round, what a dense
  SwiGLU MLP keeps, with LoRA dropout also the keep masks (bool). Only the rank-r deltas and the
  per-slot ``gate_j``, ``up_j``, ``h_j`` are recomputed; the round inputs ``x_t`` are rebuilt
  from ``x`` and the GRU states. With ``recompute_intermediates=True`` nothing ``D'``-wide is
  saved: ``G`` and ``U`` are recomputed (two more base GEMMs per round) and the masks drawn
  again. (Saving the per-slot ``gate_j`` and ``up_j`` instead would cost ``2·k·D'`` to also
  skip the rank-r deltas, which are cheap.)
* **Scratch kept on a CPU** (:mod:`.workspace`): the ``D'``-wide temporaries of a round are
  written into buffers that every round, call and layer of a thread reuses, because there a
  fresh tensor of that size costs more in page faults than the pass that fills it.
* **Dtypes.** The compute dtype of the GEMMs is the autocast dtype when autocast is on for x's
  device (fp64 inputs excepted, as autocast itself leaves fp64 alone), else x's dtype. Softmax,
  rank-r intermediates, the GRU state and ``y``'s accumulation stay in fp32 (fp64 for fp64
  input). Autocast is switched off inside the Function and the casts are explicit, so forward
  and backward compute the same thing whatever autocast state backward runs under. Outputs
  match the reference: ``y`` in x's dtype, ``router_probs`` fp32 (or wider).
* **Frozen base.** The base projections get no gradient by design; a base weight that
  requires grad while grad mode is on is rejected with an error rather than silently ignored.
* **Dropout** draws the masks of :func:`..dropout.lora_dropout_masks` (the counter-based hash
  of the options' seed, the round, the token and the column), so the masks equal the
  reference's; the slot masks are drawn directly in the plan's pair layout. The backward uses
  the forward's (kept as bool, ``k·D'`` bytes per token and round) or, recomputing, draws them
  again. Where one kernel draws them (a CUDA GPU with triton: :mod:`.masks`) they are drawn
  again in backward whatever the option: one pass writing the bytes keeping them would hold.
* **A given routing** (``expert_index``, ``[T, M, k]``) replaces each round's top-k; the
  probabilities are still computed and differentiated, and the weights are the probabilities at
  the given experts, renormalised. The triton backend's backward uses it to recompute with the
  experts its kernels chose (at a near tie the two routers can round apart).
* **Bad input** (shapes, devices, dtypes, options, a malformed ``expert_index``) is rejected with
  an error naming it before anything runs (:func:`..contract.check_inputs`).

Double backward is not supported (``once_differentiable``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...eager import eager_under_compile
from ..contract import (
    GraphMoEParams,
    RoundOptions,
    RoutedOutput,
    autocast_off,
    check_frozen_base,
    check_inputs,
    compute_dtype,
    new_empty,
)
from ..dropout import slot_row_bits, stream_key, token_row_bits
from . import masks as mask_draw
from .expert import PLANS, ExpertPlan, choose_expert_plan, grouped_supported, make_plan
from .gru import GRUGrads, gru_step, gru_step_backward, prepare_gru, rounded_mm
from .routing import router_probabilities, select_experts
from .workspace import Workspace, workspace_for


class _Static(NamedTuple):
    """Non-tensor inputs of the Function."""

    opt: RoundOptions
    compute_dtype: torch.dtype
    plan: str


def _rank_major(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A LoRA ``B`` factor ``[n, w, r]`` as ``[n, r, w]`` (see torch_expert), contiguous."""
    out = new_empty((b.shape[0], b.shape[2], b.shape[1]), dtype, b.device)
    return out.copy_(b.transpose(1, 2))


class _Weights:
    """The layer's weights in the compute dtype and the layouts the products want, built once
    per forward (and once per backward) rather than once per round."""

    def __init__(self, p: GraphMoEParams, cd: torch.dtype, acc: torch.dtype) -> None:
        self.gate = p.gate_weight.to(cd)
        self.up = p.up_weight.to(cd)
        self.down = p.down_weight.to(cd)
        self.router = p.router_weight.to(cd)
        self.rank = p.lora_A_gate.shape[1]
        # Gate and up share their input, so their A factors run as one product.
        self.a_gate_up = torch.cat([p.lora_A_gate, p.lora_A_up], 1).to(cd)  # [n, 2r, d]
        self.bt_gate = _rank_major(p.lora_B_gate, cd)  # [n, r, D']
        self.bt_up = _rank_major(p.lora_B_up, cd)  # [n, r, D']
        self.a_down = p.lora_A_down.to(cd).contiguous()  # [n, r, D']
        self.bt_down = _rank_major(p.lora_B_down, cd)  # [n, r, d]
        self.gru = prepare_gru(p.gru_weight_z, p.gru_weight_r, p.gru_weight_o, p.gru_bias_o,
                               p.gru_weight_g, cd, acc)


def renormalised_weights(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The top-k weights of :func:`select_experts`, rebuilt from the saved probabilities."""
    chosen = torch.gather(probs, -1, experts)
    return chosen / chosen.sum(-1, keepdim=True)


class _Masks(NamedTuple):
    x: torch.Tensor  # [M, d] bool
    h: torch.Tensor  # pair layout [..., D'] bool


def _dropout_masks(
    opt: RoundOptions, t: int, x: torch.Tensor, intermediate: int, plan: ExpertPlan
) -> _Masks | None:
    if opt.dropout_p <= 0:
        return None
    x_rows = token_row_bits(stream_key(opt.dropout_seed, t, 0), x.shape[0], x.device)
    keep_x = mask_draw.device_keep_rows(x_rows, x.shape[1], opt.dropout_p)
    # The slot masks are drawn straight in the plan's pair layout (the rows' hashes rearranged,
    # [M, k] values, instead of the [M, k, D'] masks): no stacked mask and no strided or
    # gathered copy of it; bit for bit lora_dropout_masks' keep_h, rearranged.
    rows = slot_row_bits(opt.dropout_seed, t, x.shape[0], opt.top_k, x.device)
    keep_h = mask_draw.device_keep_rows(plan.to_pairs(rows), intermediate, opt.dropout_p)
    return _Masks(keep_x, keep_h)


def _dropped(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout, ``t ⊙ keep / (1-p)``: bit for bit what the reference computes. A bool
    operand makes an unvectorised mixed-dtype loop (5 ms for 6M elements on the development
    CPU); the same bytes read as uint8 take half that, copied into a float buffer a quarter."""
    return t.mul(keep.view(torch.uint8)).mul_(1.0 / (1.0 - p))


def _masked_into(out: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``out = t ⊙ keep``, without the ``1/(1-p)`` (the callers put it on rank-r tensors)."""
    return out.view_as(t).copy_(keep.view(torch.uint8)).mul_(t)


def _lora_input(x_t: torch.Tensor, xc: torch.Tensor, masks: _Masks | None, p: float,
                cd: torch.dtype) -> torch.Tensor:
    """The gate/up LoRA input (dropout, as the reference, applied in x's own dtype)."""
    return xc if masks is None else _dropped(x_t, masks.x, p).to(cd)


def _base_gate_up(xc: torch.Tensor, w: _Weights) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = W_G x`` and ``U = W_U x``: once per token, shared by all its chosen experts."""
    return xc @ w.gate.t(), xc @ w.up.t()


def _gate_up(
    base: tuple[torch.Tensor, torch.Tensor], a_gate_up: torch.Tensor, plan: ExpertPlan,
    w: _Weights, scaling: float, ws: Workspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair ``gate = G + c·B_G[e] a_g`` and ``up = U + c·B_U[e] a_u``, in the workspace's
    ``gate`` and ``up`` buffers."""
    r = w.rank
    g = base[0]
    scaled = (a_gate_up * scaling).to(g.dtype)
    shape = (*plan.pshape, g.shape[-1])
    gate = plan.expand_pairs(scaled[..., :r].contiguous(), w.bt_gate, g,
                             out=ws.get("gate", shape, g.dtype, g.device))
    up = plan.expand_pairs(scaled[..., r:].contiguous(), w.bt_up, base[1],
                           out=ws.get("up", shape, g.dtype, g.device))
    return gate, up


class _RoundOut(NamedTuple):
    y: torch.Tensor  # [M, d], x's dtype
    probs: torch.Tensor  # [M, n], accumulation dtype
    experts: torch.Tensor  # [M, k]
    a_gate_up: torch.Tensor  # pair layout [..., 2r], accumulation dtype
    a_down: torch.Tensor  # pair layout [..., r], accumulation dtype
    # Without recomputation: (G, U) [M, D'], and with dropout the keep masks (x's, then the
    # slots' in pair layout) unless a kernel draws them; else empty.
    kept: tuple[torch.Tensor, ...]


def _round_forward(x_t: torch.Tensor, w: _Weights, st: _Static, t: int,
                   forced: torch.Tensor | None, ws: Workspace) -> _RoundOut:
    """One round; ``forced`` (``[M, k]``) fixes the experts instead of the top-k."""
    opt, cd = st.opt, st.compute_dtype
    acc = torch.promote_types(cd, torch.float32)
    c = opt.lora_scaling
    xc = x_t.to(cd)
    probs = router_probabilities(xc @ w.router.t())
    if forced is None:
        weights, experts = select_experts(probs, opt.top_k)
    else:
        # The probabilities are still this round's (and differentiated); only the choice is
        # given. The weights are the probabilities at the given experts, renormalised, which is
        # what the backward differentiates for either kind of choice.
        experts = forced
        weights = renormalised_weights(probs, experts)
    plan = make_plan(st.plan, experts, w.router.shape[0])
    masks = _dropout_masks(opt, t, x_t, w.gate.shape[0], plan)

    x_lora = _lora_input(x_t, xc, masks, opt.dropout_p, cd)
    a_gate_up = plan.project_tokens(x_lora, w.a_gate_up).to(acc)
    base = _base_gate_up(xc, w)
    gate, up = _gate_up(base, a_gate_up, plan, w, c, ws)
    h = F.silu(gate, inplace=True).mul_(up)  # in gate's buffer; up's is free from here
    if masks is None:
        a_down = plan.project_pairs(h, w.a_down).to(acc)
    else:
        a_down = plan.project_pairs(_masked_into(up, h, masks.h), w.a_down).to(acc)
        a_down.mul_(1.0 / (1.0 - opt.dropout_p))

    pair_weights = plan.to_pairs(weights)
    # The shared down projection runs once, on the mixed activation (the W_D identity above).
    mix = plan.sum_to_tokens(h, pair_weights.to(cd), consume=True,
                             out=ws.get("mix", xc.shape[:1] + h.shape[-1:], cd, h.device))
    y = mix @ w.down.t()
    lora_down_in = (c * pair_weights.unsqueeze(-1) * a_down).to(cd)
    y = y.to(acc).add_(plan.expand_tokens(lora_down_in, w.bt_down))
    keep_masks = masks is not None and not mask_draw.draws_masks_in_one_pass(x_t.device)
    kept = () if opt.recompute_intermediates else (*base, *(masks if keep_masks else ()))
    return _RoundOut(y.to(x_t.dtype), probs, experts, a_gate_up, a_down, kept)


class _Grads:
    """Parameter-gradient accumulators over rounds, in the accumulation dtype."""

    def __init__(self, p: GraphMoEParams, w: _Weights, acc: torch.dtype) -> None:
        def zeros(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros(t.shape, dtype=acc, device=t.device)

        self.router = zeros(p.router_weight)
        self.a_gate_up = zeros(w.a_gate_up)
        self.bt_gate = zeros(w.bt_gate)
        self.bt_up = zeros(w.bt_up)
        self.a_down = zeros(w.a_down)
        self.bt_down = zeros(w.bt_down)
        wz = p.gru_weight_z
        self.gru_zr = torch.zeros(2 * wz.shape[0], wz.shape[1], dtype=acc, device=wz.device)
        self.gru_o = zeros(p.gru_weight_o)
        self.gru_bias_o = zeros(w.gru.bias_o)
        self.gru_g = zeros(w.gru.g)


def _round_backward(
    x_t: torch.Tensor, grad_y: torch.Tensor, grad_probs: torch.Tensor | None,
    probs: torch.Tensor, experts: torch.Tensor, a_gate_up: torch.Tensor,
    a_down: torch.Tensor, kept: tuple[torch.Tensor, ...] | None, w: _Weights,
    router_acc: torch.Tensor, st: _Static, t: int, grads: _Grads, need_grad_x: bool,
    ws: Workspace,
) -> torch.Tensor | None:
    """Backward of one MoE round given ``∂L/∂y_t`` (and ``∂L/∂probs_t``); accumulates the
    parameter gradients into ``grads`` and returns ``∂L/∂x_t`` from this round's MoE part.
    ``kept`` is what the forward kept without recomputation (``(G, U)``, plus the keep masks
    with dropout), or ``None`` to recompute (and redraw) it; ``a_gate_up`` / ``a_down`` the
    forward's rank-r LoRA activations. ``ws`` holds the ``D'``-wide scratch, reused across
    rounds."""
    opt, cd = st.opt, st.compute_dtype
    acc = probs.dtype
    c, r, p = opt.lora_scaling, w.rank, opt.dropout_p
    weights = renormalised_weights(probs, experts)
    plan = make_plan(st.plan, experts, w.router.shape[0])
    if kept and len(kept) == 4:
        base, masks = kept[:2], _Masks(*kept[2:])
    else:
        base = kept or None
        masks = _dropout_masks(opt, t, x_t, w.gate.shape[0], plan)
    xc = x_t.to(cd)
    x_lora = _lora_input(x_t, xc, masks, p, cd)
    # Only the rank-r deltas are recomputed when (G, U) was kept. Five D'-wide pair buffers
    # from here on, each reused once its value is dead: gate, up, silu, h (later ∂h) and
    # scratch (h ⊙ mask, then ∂y's broadcast W_Dᵀ ∂y); with dropout a sixth, the mask as
    # floats for ∂h.
    gate, up = _gate_up(base or _base_gate_up(xc, w), a_gate_up, plan, w, c, ws)
    del base
    pair_weights = plan.to_pairs(weights)
    grad_yc = grad_y.to(cd)

    def buffer(role: str) -> torch.Tensor:
        return ws.get(role, gate.shape, cd, gate.device)

    silu = torch.ops.aten.silu.out(gate, out=buffer("silu"))
    h = torch.mul(silu, up, out=buffer("h"))
    h_lora = h if masks is None else _masked_into(buffer("scratch"), h, masks.h)

    # y = W_D Σ_j w_j h_j + c Σ_j w_j B_D[e_j] a_down_j, with a_down_j = A_D[e_j] (h_j ⊙ m_j)/(1-p)
    grad_b_in = plan.project_tokens(grad_yc, w.bt_down).to(acc)  # B_D[e]ᵀ ∂y
    cw = (c * pair_weights).unsqueeze(-1)
    grads.bt_down += plan.outer_tokens((cw * a_down).to(cd), grad_yc)
    # ∂a_down, with the dropout scale 1/(1-p) of both its uses (A_D's gradient, ∂h) folded in.
    grad_a_down = cw * grad_b_in
    if masks is not None:
        grad_a_down.mul_(1.0 / (1.0 - p))
    grad_a_down_c = grad_a_down.to(cd)
    grads.a_down += plan.outer_pairs(grad_a_down_c, h_lora)
    del h_lora
    # The masked plan broadcasts a view: only the grouped one fills a pair-layout buffer.
    grad_mix = plan.broadcast_tokens(torch.mm(grad_yc, w.down),
                                     out=buffer("scratch") if plan.kind == "grouped" else None)
    # ∂w_j = <h_j, W_Dᵀ ∂y> + c <a_down_j, B_D[e_j]ᵀ ∂y>; h is consumed in place.
    grad_pair_w = h.mul_(grad_mix).sum(-1, dtype=acc)
    grad_pair_w += c * (a_down * grad_b_in).sum(-1)
    grad_h = plan.expand_pairs(grad_a_down_c, w.a_down, out=h)  # A_D[e]ᵀ ∂a_down
    if masks is not None:
        # Through a float copy of the mask in a kept buffer: a uint8 operand would make mul_
        # promote into a fresh [k·M, D'] tensor (page faults: ~5 ms a round at cpu-small).
        grad_h.mul_(buffer("mask").view_as(grad_h).copy_(masks.h.view(torch.uint8)))
    grad_h.addcmul_(grad_mix, pair_weights.unsqueeze(-1).to(cd))
    del grad_mix

    # h = silu(gate)·up, with aten's fused silu backward; in place on the buffers.
    grad_up = silu.mul_(grad_h)
    grad_gate = torch.ops.aten.silu_backward.grad_input(up.mul_(grad_h), gate, grad_input=gate)
    del grad_h, up

    # gate = G + c B_G[e] a_g, up likewise.
    a_g, a_u = a_gate_up[..., :r], a_gate_up[..., r:]
    grads.bt_gate += plan.outer_pairs((c * a_g).to(cd).contiguous(), grad_gate)
    grads.bt_up += plan.outer_pairs((c * a_u).to(cd).contiguous(), grad_up)
    grad_a_gate_up = torch.cat(
        [plan.project_pairs(grad_gate, w.bt_gate), plan.project_pairs(grad_up, w.bt_up)], -1
    ).to(acc).mul_(c)
    grad_a_gate_up_c = grad_a_gate_up.to(cd)
    grads.a_gate_up += plan.outer_tokens(grad_a_gate_up_c, x_lora)

    grad_logits = routing_backward(plan.from_pairs(grad_pair_w), probs, experts, weights,
                                   grad_probs, xc, grads)
    if not need_grad_x:
        return None

    tokens = (x_t.shape[0], gate.shape[-1])
    grad_x = plan.sum_to_tokens(grad_gate, None, out=ws.get("dG", tokens, cd, gate.device)) @ w.gate
    grad_x.addmm_(plan.sum_to_tokens(grad_up, None, out=ws.get("dU", tokens, cd, gate.device)),
                  w.up)
    grad_x_lora = plan.expand_tokens(grad_a_gate_up_c, w.a_gate_up)
    if masks is not None:
        grad_x_lora = _dropped(grad_x_lora, masks.x, p)
    grad_x = grad_x.to(acc).add_(grad_x_lora)
    return grad_x.addmm_(grad_logits, router_acc)


def routing_backward(
    grad_w: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
    grad_probs: torch.Tensor | None, xc: torch.Tensor, grads: _Grads,
) -> torch.Tensor:
    """From ``∂L/∂w`` (``[M, k]``) and ``∂L/∂probs`` to the router logits' gradient (returned)
    and the router weight's (accumulated into ``grads``): ``w_j = p_{e_j} / Σ_l p_{e_l}`` (top-k
    itself is piecewise constant), then the softmax."""
    acc = probs.dtype
    chosen_sum = torch.gather(probs, -1, experts).sum(-1, keepdim=True)
    grad_chosen = (grad_w - (grad_w * weights).sum(-1, keepdim=True)) / chosen_sum
    grad_p = torch.zeros_like(probs) if grad_probs is None else grad_probs.to(acc).clone()
    grad_p.scatter_add_(-1, experts, grad_chosen)
    grad_logits = probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True))
    grads.router += grad_logits.t() @ xc.to(acc)
    return grad_logits


class _GraphMoEFunction(torch.autograd.Function):
    """``(x, static, forced_index, *params) -> (y, router_probs, expert_index)`` with a
    hand-written backward; ``forced_index`` (``[T, M, k]`` or ``None``) fixes the routing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, st: _Static, forced_index: torch.Tensor | None,
                *params: torch.Tensor):
        p = GraphMoEParams(*params)
        opt, cd = st.opt, st.compute_dtype
        acc = torch.promote_types(cd, torch.float32)
        with autocast_off(x.device.type):
            w = _Weights(p, cd, acc)
            ws = workspace_for(x.device)
            h = torch.zeros(x.shape[0], p.gru_weight_g.shape[1], dtype=acc, device=x.device)
            x_t = x
            rounds: list[_RoundOut] = []
            states, outputs = [], []
            for t in range(opt.num_rounds):
                rnd = _round_forward(x_t, w, st, t,
                                     None if forced_index is None else forced_index[t], ws)
                rounds.append(rnd)
                if t == opt.num_rounds - 1:
                    break
                h = gru_step(h, rnd.y, x_t, w.gru, opt.gru_candidate_input,
                             opt.gru_candidate_activation)
                states.append(h)
                outputs.append(rnd.y)
                x_t = x_t + (h.to(cd) @ w.gru.g.t()).to(x.dtype)

        probs = torch.stack([rnd.probs for rnd in rounds])
        index = torch.stack([rnd.experts for rnd in rounds])
        ctx.mark_non_differentiable(index)
        ctx.st = st
        kept = [t for rnd in rounds for t in rnd.kept]
        ctx.save_for_backward(
            x, *params, probs, index,
            torch.stack([rnd.a_gate_up for rnd in rounds]),
            torch.stack([rnd.a_down for rnd in rounds]),
            *states, *outputs, *kept,
        )
        y = rounds[-1].y
        if torch.compiler.is_compiling():
            # y is an intermediate updated in place (add_). Dynamo in torch 2.11 also returns
            # such intermediates from the traced forward, and autograd then routes y's gradient
            # to that alias: every gradient came out zero (pytorch/pytorch#180642, fixed in
            # 2.12). A copy of [M, d] is not an alias.
            y = y.clone()
        return y, probs, index

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor | None, grad_probs: torch.Tensor | None, _):
        st: _Static = ctx.st
        num_rounds = st.opt.num_rounds
        saved = ctx.saved_tensors
        x, p = saved[0], GraphMoEParams(*saved[1:16])
        probs, index, a_gate_up, a_down = saved[16:20]
        states = saved[20:20 + num_rounds - 1]
        outputs = saved[19 + num_rounds:18 + 2 * num_rounds]
        kept = saved[18 + 2 * num_rounds:]  # each round's _RoundOut.kept, all of one length
        per_round = len(kept) // num_rounds
        grads = rounds_backward(
            x, p, st, probs, index, states, outputs, grad_y, grad_probs,
            ctx.needs_input_grad[0], rank_r=(a_gate_up, a_down),
            kept=[kept[t * per_round:(t + 1) * per_round] for t in range(num_rounds)],
        )
        # (x, static, forced_index, gate, up, down, router, six LoRA factors, five GRU tensors)
        grads_out = (grads[0], None, None, None, None, None, *grads[1:])
        return tuple(g if need else None
                     for g, need in zip(grads_out, ctx.needs_input_grad, strict=True))


def rounds_backward(
    x: torch.Tensor, p: GraphMoEParams, st: _Static, probs: torch.Tensor, index: torch.Tensor,
    states: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
    grad_y: torch.Tensor | None, grad_probs: torch.Tensor | None, need_grad_x: bool, *,
    rank_r: tuple[torch.Tensor, torch.Tensor] | None = None,
    kept: Sequence[Sequence[torch.Tensor]] = (), inputs: Sequence[torch.Tensor] | None = None,
    round_backward: Callable[..., torch.Tensor | None] | None = None,
    gru_backward: Callable[..., GRUGrads] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """The backward of T rounds from what a forward kept: the routing (``probs``, ``index``),
    the GRU states ``h_1..h_{T-1}`` and the non-final outputs ``y_1..y_{T-1}``; for this
    module's round backward the rank-r LoRA activations (``rank_r``, per round in the plan's
    pair layout); optionally the base gate/up products and dropout masks (``kept``: per round
    ``_RoundOut.kept``) and the round inputs (``inputs``: ``x_1..x_T``), each recomputed when
    absent. Shared by this backend's Function and the triton backend,
    whose kernel forward keeps the same things.

    ``round_backward`` replaces the backward of one round's MoE part (the signature of this
    module's ``_round_backward``; the triton backend passes its kernels'). ``gru_backward``
    likewise replaces one GRU step's backward (:func:`.gru.gru_step_backward`): called as
    ``gru_backward(grad_h_new, h, y_t, x_t, w, st)`` with ``h`` the accumulation-dtype state
    ``h_t``, or ``None`` for round 1's zero state (whose gradient ``GRUGrads.h`` may then be
    ``None``), ``w`` the ``_Weights``; returns a :class:`.gru.GRUGrads`.

    Returns the gradients of ``(x, router, A_G, B_G, A_U, B_U, A_D, B_D, W_z, W_r, W_o, b_o,
    W_g)`` in their parameters' dtypes (``x``'s only when ``need_grad_x``; the GRU's ``None``
    with one round, as the reference, where they are unused).
    """
    opt, cd = st.opt, st.compute_dtype
    acc = torch.promote_types(cd, torch.float32)
    num_rounds = opt.num_rounds
    # Gradients may arrive expanded (stride 0) or as other views.
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
    if grad_probs is not None:
        grad_probs = grad_probs.contiguous()
    states = [s.to(acc) for s in states]

    if round_backward is None:
        if rank_r is None:
            raise ValueError("rounds_backward: this module's round backward needs rank_r")
        round_backward = functools.partial(_round_backward, ws=workspace_for(x.device))
    with autocast_off(x.device.type):
        w = _Weights(p, cd, acc)
        gru_acc = prepare_gru(p.gru_weight_z, p.gru_weight_r, p.gru_weight_o,
                              p.gru_bias_o, p.gru_weight_g, acc, acc)
        router_acc = p.router_weight.to(acc)
        grads = _Grads(p, w, acc)
        if inputs is None:  # round inputs, rebuilt exactly as this backend's forward built them
            xs = [x]
            for state in states:
                xs.append(xs[-1] + (state.to(cd) @ w.gru.g.t()).to(x.dtype))
        else:
            xs = list(inputs)

        grad_x: torch.Tensor | None = None  # ∂L/∂x_{t+1} while processing round t
        grad_h: torch.Tensor | None = None  # ∂L/∂h_{t+1} from the GRU step t+1
        grad_y_t: torch.Tensor = grad_y
        for t in reversed(range(num_rounds)):
            grad_x_t = None
            if t < num_rounds - 1:
                # x_{t+1} = x_t + W_g h_{t+1};  h_{t+1} = GRU(h_t, y_t, x_t)
                grads.gru_g += rounded_mm(grad_x.t(), states[t], cd, acc)
                grad_state = rounded_mm(grad_x, w.gru.g, cd, acc)
                if grad_h is not None:
                    grad_state += grad_h
                if gru_backward is None:
                    h_prev = states[t - 1] if t > 0 else torch.zeros_like(states[t])
                    g = gru_step_backward(grad_state, h_prev, outputs[t], xs[t], w.gru, gru_acc,
                                          opt.gru_candidate_input, opt.gru_candidate_activation)
                else:
                    g = gru_backward(grad_state, states[t - 1] if t > 0 else None, outputs[t],
                                     xs[t], w, st)
                grads.gru_zr += g.zr
                grads.gru_o += g.o
                grads.gru_bias_o += g.bias_o
                grad_h = g.h
                grad_y_t = g.y
                grad_x_t = grad_x if g.x is None else grad_x + g.x
            grad_moe = round_backward(
                xs[t], grad_y_t, None if grad_probs is None else grad_probs[t],
                probs[t], index[t],
                None if rank_r is None else rank_r[0][t],
                None if rank_r is None else rank_r[1][t],
                tuple(kept[t]) if kept else None,
                w, router_acc, st, t, grads, t > 0 or need_grad_x,
            )
            if grad_moe is not None:
                grad_x_t = grad_moe if grad_x_t is None else grad_x_t.add_(grad_moe)
            grad_x = grad_x_t

    r = w.rank
    dh = p.gru_weight_g.shape[1]

    def cast(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return g.to(like.dtype).contiguous()

    # With one round the GRU never runs: no gradient, as the reference (unused parameters).
    gru = num_rounds > 1
    return (
        cast(grad_x, x) if need_grad_x else None,
        cast(grads.router, p.router_weight),
        cast(grads.a_gate_up[:, :r], p.lora_A_gate),
        cast(grads.bt_gate.transpose(1, 2), p.lora_B_gate),
        cast(grads.a_gate_up[:, r:], p.lora_A_up),
        cast(grads.bt_up.transpose(1, 2), p.lora_B_up),
        cast(grads.a_down, p.lora_A_down),
        cast(grads.bt_down.transpose(1, 2), p.lora_B_down),
        cast(grads.gru_zr[:dh], p.gru_weight_z) if gru else None,
        cast(grads.gru_zr[dh:], p.gru_weight_r) if gru else None,
        cast(grads.gru_o, p.gru_weight_o) if gru else None,
        cast(grads.gru_bias_o, p.gru_bias_o) if gru else None,
        cast(grads.gru_g, p.gru_weight_g) if gru else None,
    )


def check_expert_index(index: object, x: torch.Tensor, opt: RoundOptions, num_experts: int,
                       values: bool = True) -> torch.Tensor:
    """A given routing ``[T, M, k]`` as int64, or a ``ValueError`` / ``TypeError`` naming what
    is wrong with it. ``values`` also checks every entry is an expert (``0 <= e < n``) and no
    token takes one expert twice in a round: that reads the tensor on the host (one device
    sync), so a caller whose index a router made (the triton backend's backward) skips it."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"expert_index must be a torch.Tensor, got {type(index).__name__}")
    shape = (opt.num_rounds, x.shape[0], opt.top_k)
    if tuple(index.shape) != shape:
        raise ValueError(
            f"expert_index has shape {tuple(index.shape)}; expected [rounds, tokens, top_k] = "
            f"{list(shape)}"
        )
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"expert_index has dtype {index.dtype}; expected an integer dtype")
    if index.device != x.device:
        raise ValueError(f"expert_index is on {index.device} but x is on {x.device}")
    index = index.to(torch.int64)
    if values and index.numel():
        if bool(((index < 0) | (index >= num_experts)).any()):
            raise ValueError(
                f"expert_index has entries outside [0, {num_experts}), the layer's experts"
            )
        ordered = index.sort(-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("expert_index chooses one expert twice for a token in a round")
    return index


def _plan_for(x: torch.Tensor, p: GraphMoEParams, expert_plan: str | None) -> str:
    n, r, _ = p.lora_A_gate.shape
    if expert_plan is None:
        return choose_expert_plan(x.device, n, r)
    if not isinstance(expert_plan, str) or expert_plan not in PLANS:
        raise ValueError(f"expert_plan={expert_plan!r} must be one of {sorted(PLANS)} or None")
    if expert_plan == "grouped" and not grouped_supported(x.device):
        raise ValueError(
            f"expert_plan='grouped' runs on a CPU only (it reads its segment bounds on the "
            f"host); x is on {x.device}: use 'masked'"
        )
    return expert_plan


def backward_static(x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions,
                    cd: torch.dtype) -> _Static:
    """The non-tensor inputs :func:`rounds_backward` needs, for a forward computed elsewhere
    (the triton backend's kernels) in compute dtype ``cd``."""
    return _Static(opt, cd, _plan_for(x, p, None))


def graphmoe_torch(
    x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions, *, expert_plan: str | None = None,
    expert_index: torch.Tensor | None = None,
) -> RoutedOutput:
    """The backend contract of :mod:`graphmoe_fused.backends.contract`, in plain PyTorch.

    Args:
        x: ``[M, d]`` round-1 input.
        p: the layer's weights; the base projections must not require grad.
        opt: rounds, top-k, scaling, GRU options, dropout and recomputation.
        expert_plan: ``"masked"`` or ``"grouped"`` to force how the per-expert LoRA products
            are batched (see :mod:`.expert`); ``None`` chooses by shape.
        expert_index: ``[T, M, k]`` integer experts to use instead of each round's top-k
            (slot ``j`` of a token draws slot ``j``'s dropout mask). The router
            probabilities are still computed, returned and differentiated; the mixing
            weights are the probabilities at the given experts, renormalised. For a caller
            that must reproduce a routing made elsewhere: the triton backend's backward
            recomputes with the experts its kernels chose, which at a near tie can differ
            from this backend's own choice. Checking its values costs one device sync.
    Returns:
        ``y_T`` in x's dtype, the ``[T, M, n]`` router probabilities (fp32 or wider, and
        differentiable) and the ``[T, M, k]`` chosen experts (``expert_index`` if given).
    Raises:
        ValueError / TypeError: inputs that do not fit together (each named), an unknown or
            unsupported ``expert_plan``, a malformed ``expert_index``.
        RuntimeError: a base weight that requires grad while grad mode is on.
    """
    check_inputs(x, p, opt, "torch")
    if expert_index is not None:
        expert_index = check_expert_index(expert_index, x, opt, p.router_weight.shape[0])
    return graphmoe_torch_unchecked(x, p, opt, expert_plan=expert_plan, expert_index=expert_index)


def graphmoe_torch_unchecked(
    x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions, *, expert_plan: str | None = None,
    expert_index: torch.Tensor | None = None,
) -> RoutedOutput:
    """:func:`graphmoe_torch` for a caller that has checked its inputs already: the shapes
    by :func:`..contract.check_inputs` and ``expert_index`` (int64, right shape and device)
    without the device sync of its value check (see :func:`check_expert_index`)."""
    check_frozen_base(p, "torch")
    cd = compute_dtype(x)
    plan = _plan_for(x, p, expert_plan)
    apply = _apply_with_dropout if opt.dropout_p > 0 else _GraphMoEFunction.apply
    y, probs, index = apply(x, _Static(opt, cd, plan), expert_index, *p)
    return RoutedOutput(y, probs, index)


# With dropout, each call has a new seed, which the masks' keys hash on the host. Traced by
# Dynamo, the seed is a constant to recompile for at every step, then a symbolic integer whose
# 32-bit hash Inductor's symbolic maths does not finish simplifying. The Function then runs
# eagerly inside a compiled model (a graph break around it); without dropout it is traced.
_apply_with_dropout = eager_under_compile(_GraphMoEFunction.apply)
