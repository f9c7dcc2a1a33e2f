"""The `torch` backend against the reference: forward, every gradient, dtypes, edge cases,
a given routing (``expert_index``, which the triton backend's backward relies on) against a
per-token computation, no host sync, saved-for-backward memory, named errors for bad input,
and the NaN poisoning of every buffer it allocates. (Timing lives in ``bench/``.)

The routing helpers (``routing_bound``, ``routing_margins``, ``same_experts``) and the
forced-routing expectation are shared with test_triton_backend.py.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import graphmoe_fused as gm
from graphmoe_fused.backends.contract import (
    POISON_ENV,
    GraphMoEParams,
    RoundOptions,
    RoutedOutput,
    new_empty,
    new_empty_like,
)
from graphmoe_fused.backends.dropout import lora_dropout_masks
from graphmoe_fused.backends.reference import graphmoe_reference
from graphmoe_fused.backends.torch import graphmoe_torch
from graphmoe_fused.backends.torch.expert import (
    CPU_MASKED_MAX_COLUMNS,
    choose_expert_plan,
    grouped_supported,
)
from tests.helpers import make_layer
from tests.single_thread import one_cpu_thread  # noqa: F401  (tiny shapes: one thread)

PLANS = ("masked", "grouped")
GRU_OPTIONS = [("y", "sigmoid"), ("x", "tanh"), ("y", "tanh"), ("x", "sigmoid")]


def run_with_grads(backend, layer: gm.GraphMoEMLP, x: torch.Tensor, opt: RoundOptions,
                   seed: int = 1, probs_grad: bool = True, autocast: torch.dtype | None = None,
                   **kw):
    """Forward, then backward of ``<y, gy> + <probs, gp>`` with seeded random upstream
    gradients; returns the output and ``{name: grad}`` for x and every trainable parameter."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = backend(x, layer.params(), opt, **kw)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(out.y.shape, generator=g, dtype=torch.float64)
    gp = torch.randn(out.router_probs.shape, generator=g, dtype=torch.float64)
    loss = (out.y.double() * gy).sum()
    if probs_grad:
        loss = loss + (out.router_probs.double() * gp).sum()
    loss.backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    return out, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b the reference)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_matches(got, want, tol: float) -> None:
    (out_a, grads_a), (out_b, grads_b) = got, want
    assert torch.equal(out_a.expert_index, out_b.expert_index)
    assert out_a.y.dtype == out_b.y.dtype and out_a.router_probs.dtype == out_b.router_probs.dtype
    assert rel_err(out_a.y, out_b.y) < tol
    assert rel_err(out_a.router_probs, out_b.router_probs) < tol
    assert set(grads_a) == set(grads_b)
    for name, g in grads_b.items():
        if g is None:  # unused by the reference (the GRU when T = 1): no gradient either
            assert grads_a[name] is None, name
            continue
        assert grads_a[name] is not None, name
        assert rel_err(grads_a[name], g) < tol, (name, rel_err(grads_a[name], g))
    assert sum(g is not None for g in grads_b.values()) >= 8  # x, router, six LoRA factors


def _compare(dtype=torch.float32, plan="masked", tokens=23, seed=0, opt_changes=None,
             probs_grad=True, **layer_kwargs):
    layer_kwargs.setdefault("num_experts", 6)
    layer_kwargs.setdefault("lora_r", 4)
    layer = make_layer(seed=seed, dtype=dtype, **layer_kwargs)
    opt = dataclasses.replace(layer.round_options(), **(opt_changes or {}))
    x = torch.randn(tokens, layer.hidden_size, generator=torch.Generator().manual_seed(seed),
                    dtype=dtype)
    want = run_with_grads(graphmoe_reference, layer, x, opt, probs_grad=probs_grad)
    got = run_with_grads(graphmoe_torch, layer, x, opt, probs_grad=probs_grad, expert_plan=plan)
    # fp32: a few ulps of the largest entry (measured ≤ 3e-6); fp64: the same in fp64.
    _assert_matches(got, want, 2e-5 if dtype == torch.float32 else 1e-12)
    return layer, got, want


# ---------------------------------------------------------------------------------------------
# Forward and every gradient against the reference.


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("gru", GRU_OPTIONS)
def test_matches_reference_fp32(plan, gru):
    _compare(plan=plan, gru_candidate_input=gru[0], gru_candidate_activation=gru[1])


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("gru", GRU_OPTIONS[:2])
def test_matches_reference_fp64(plan, gru):
    _compare(dtype=torch.float64, plan=plan, gru_candidate_input=gru[0],
             gru_candidate_activation=gru[1])


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
def test_rounds(plan, rounds):
    _compare(plan=plan, num_rounds=rounds, tokens=17)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("tokens", [1, 2, 7, 31])
def test_token_counts(plan, tokens):
    _compare(plan=plan, tokens=tokens)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("experts,top_k", [(4, 4), (4, 1), (8, 3)])
def test_top_k(plan, experts, top_k):
    _compare(plan=plan, num_experts=experts, top_k=top_k, lora_r=8)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_intermediates(plan, recompute):
    _compare(plan=plan, opt_changes={"recompute_intermediates": recompute})


@pytest.mark.parametrize("plan", PLANS)
def test_only_probs_or_only_y_get_gradient(plan):
    _compare(plan=plan, probs_grad=False)
    layer = make_layer(num_experts=6, lora_r=4)
    x = torch.randn(9, 32)
    grads = []
    for backend, kw in ((graphmoe_reference, {}), (graphmoe_torch, {"expert_plan": plan})):
        xr = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = backend(xr, layer.params(), layer.round_options(), **kw)
        (out.router_probs ** 2).sum().backward()  # y unused: its gradient never arrives
        grads.append({"x": xr.grad, **{n: p.grad for n, p in layer.named_parameters()
                                       if p.requires_grad}})
    want, got = grads
    # The probabilities reach the router directly and, through the later rounds' inputs, the
    # GRU; the LoRA factors have no path from them.
    assert want["gru.weight_z"].abs().max() > 0 and want["gru.weight_g"].abs().max() > 0
    for name, w in want.items():
        g = got[name]
        if w is None or not w.any():
            assert "lora" in name and (g is None or not g.any()), name
            continue
        assert rel_err(g, w) < 2e-5, name


@pytest.mark.parametrize("plan", PLANS)
def test_expanded_upstream_gradients(plan):
    """``.sum()`` sends stride-0 gradients; the backward must not assume contiguity."""
    layer = make_layer(num_experts=6, lora_r=4)
    x = torch.randn(11, 32)
    results = []
    for backend, kw in ((graphmoe_reference, {}), (graphmoe_torch, {"expert_plan": plan})):
        xr = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = backend(xr, layer.params(), layer.round_options(), **kw)
        (out.y.sum() + out.router_probs[:, :, 0].sum()).backward()
        results.append([xr.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) < 2e-5


@pytest.mark.parametrize("plan", PLANS)
def test_unchosen_expert_gets_exactly_zero_lora_grads(plan):
    layer = make_layer(num_experts=6, lora_r=4)
    dead = 3
    with torch.no_grad():
        # Every input has a large positive first coordinate and expert 3's router row points
        # the other way, so its logit is far below every other in every round.
        layer.router.weight[dead] = 0.0
        layer.router.weight[dead, 0] = -5.0
    x = torch.randn(19, 32)
    x[:, 0] += 10.0
    opt = layer.round_options()
    want = run_with_grads(graphmoe_reference, layer, x, opt)
    got = run_with_grads(graphmoe_torch, layer, x, opt, expert_plan=plan)
    assert not (got[0].expert_index == dead).any()
    _assert_matches(got, want, 2e-5)
    for name in ("lora_A_gate", "lora_B_gate", "lora_A_up", "lora_B_up", "lora_A_down",
                 "lora_B_down"):
        grad = got[1][name]
        assert torch.count_nonzero(grad[dead]) == 0, name
        assert torch.count_nonzero(grad) > 0, name


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("gru", GRU_OPTIONS[:2])
@pytest.mark.parametrize("recompute", [True, False])
def test_dropout_uses_the_reference_masks(plan, gru, recompute):
    # recompute: the backward draws the masks again; else it uses those the forward kept.
    changes = {"dropout_p": 0.3, "dropout_seed": 1234, "recompute_intermediates": recompute}
    _, got, _ = _compare(plan=plan, opt_changes=changes, gru_candidate_input=gru[0],
                         gru_candidate_activation=gru[1])
    # The seed matters: another one gives another result (so the match above is not vacuous).
    layer = make_layer(num_experts=6, lora_r=4, gru_candidate_input=gru[0],
                       gru_candidate_activation=gru[1])
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(0))
    opt = dataclasses.replace(layer.round_options(), dropout_p=0.3, dropout_seed=99)
    other = graphmoe_torch(x, layer.params(), opt, expert_plan=plan)
    assert rel_err(other.y, got[0].y) > 1e-3


# ---------------------------------------------------------------------------------------------
# A given routing (``expert_index``): what the triton backend's backward relies on.


def per_token_with_routing(x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions,
                           expert_index: torch.Tensor) -> RoutedOutput:
    """The layer with the experts given, one token at a time, written from design.md §1 on vectors.

    The reference cannot be told which experts to use (it routes itself), so this is the
    expectation for a forced routing: no batching, no plan, no shared code with the backends
    beyond the dropout-mask definition (which every backend must share). Differentiable.
    """
    c, k = opt.lora_scaling, opt.top_k
    num_tokens, hidden = x.shape
    inter = p.gate_weight.shape[0]
    drop = opt.dropout_p
    masks = [lora_dropout_masks(opt.dropout_seed, t, num_tokens, hidden, k, inter, drop,
                                x.device) if drop > 0 else None
             for t in range(opt.num_rounds)]
    ys, probs = [], [[] for _ in range(opt.num_rounds)]
    for m in range(num_tokens):
        x_t = x[m]
        h = x.new_zeros(p.gru_weight_g.shape[1])
        for t in range(opt.num_rounds):
            prob = torch.softmax(p.router_weight @ x_t, dim=0)
            probs[t].append(prob)
            experts = expert_index[t, m]
            weights = prob[experts] / prob[experts].sum()
            x_lora = x_t if masks[t] is None else x_t * masks[t][0][m] / (1 - drop)
            y = torch.zeros_like(x_t)
            for j in range(k):
                e = int(experts[j])
                gate = p.gate_weight @ x_t + c * p.lora_B_gate[e] @ (p.lora_A_gate[e] @ x_lora)
                up = p.up_weight @ x_t + c * p.lora_B_up[e] @ (p.lora_A_up[e] @ x_lora)
                act = F.silu(gate) * up
                act_lora = act if masks[t] is None else act * masks[t][1][m, j] / (1 - drop)
                out = p.down_weight @ act + c * p.lora_B_down[e] @ (p.lora_A_down[e] @ act_lora)
                y = y + weights[j] * out
            if t == opt.num_rounds - 1:
                ys.append(y)
                break
            hy = torch.cat([h, y])
            z = torch.sigmoid(p.gru_weight_z @ hy)
            r = torch.sigmoid(p.gru_weight_r @ hy)
            u = y if opt.gru_candidate_input == "y" else x_t
            pre = p.gru_weight_o @ torch.cat([r * h, u]) + p.gru_bias_o
            cand = torch.sigmoid(pre) if opt.gru_candidate_activation == "sigmoid" else pre.tanh()
            h = (1 - z) * h + z * cand
            x_t = x_t + p.gru_weight_g @ h
    return RoutedOutput(torch.stack(ys), torch.stack([torch.stack(pt) for pt in probs]),
                        expert_index)


def other_routing(layer: gm.GraphMoEMLP, x: torch.Tensor, opt: RoundOptions,
                  seed: int = 0) -> torch.Tensor:
    """A valid routing ``[T, M, k]`` that is not the router's: round 1 takes every token's k
    *least* probable experts, least first (disjoint from its top-k when 2k ≤ n, and in the
    opposite slot order), later rounds k random distinct experts."""
    n = layer.config.num_experts
    assert 2 * opt.top_k <= n, "round 1's choice must be disjoint from the top-k"
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(n, generator=g)[:opt.top_k]
                         for _ in range(opt.num_rounds * x.shape[0])])
    index = index.view(opt.num_rounds, x.shape[0], opt.top_k)
    with torch.no_grad():
        probs = torch.softmax(x.double() @ layer.router.weight.double().t(), dim=-1)
    index[0] = probs.argsort(-1)[:, :opt.top_k]
    return index


def assert_follows_routing(got, layer: gm.GraphMoEMLP, x: torch.Tensor, opt: RoundOptions,
                           index: torch.Tensor, tol: float) -> None:
    """``got`` (``run_with_grads``' result) is the layer routed by ``index``: output,
    probabilities and every gradient against :func:`per_token_with_routing` in fp64."""
    want = run_with_grads(per_token_with_routing, copy.deepcopy(layer).double(), x.double(),
                          opt, expert_index=index)
    out, grads = got
    assert torch.equal(out.expert_index, index)
    assert rel_err(out.y, want[0].y) < tol
    assert rel_err(out.router_probs, want[0].router_probs) < tol
    assert set(grads) == set(want[1])
    for name, g in want[1].items():
        assert grads[name] is not None, name
        assert rel_err(grads[name], g) < tol, (name, rel_err(grads[name], g))


@pytest.mark.parametrize(
    "dtype,plan,dropout",
    [(torch.float64, "masked", 0.0), (torch.float32, "masked", 0.0),
     (torch.float32, "grouped", 0.0), (torch.float32, "masked", 0.3),
     (torch.float32, "grouped", 0.3)],
)
def test_given_routing_is_followed(dtype, plan, dropout):
    layer = make_layer(num_experts=6, lora_r=4, num_rounds=3, dtype=dtype,
                       gru_candidate_input="x", gru_candidate_activation="tanh")
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(5), dtype=dtype)
    opt = dataclasses.replace(layer.round_options(), dropout_p=dropout, dropout_seed=77)
    index = other_routing(layer, x, opt)
    got = run_with_grads(graphmoe_torch, layer, x, opt, expert_plan=plan, expert_index=index)
    # fp64: the same formulas in another order, ~1e-15; fp32 against the fp64 expectation: a
    # few fp32 ulps of the largest entry (as _compare, measured ≤ 3e-6).
    assert_follows_routing(got, layer, x, opt, index, 1e-12 if dtype == torch.float64 else 2e-5)
    # The check can fail: the router's own choice is another one, with another result.
    own = run_with_grads(graphmoe_torch, layer, x, opt, expert_plan=plan)
    assert not same_experts(own[0].expert_index[0], index[0]).any()
    assert rel_err(own[0].y, got[0].y) > 0.1


def test_given_routing_equal_to_the_routers_changes_nothing():
    layer = make_layer(num_experts=6, lora_r=4, num_rounds=3)
    x = torch.randn(11, 32, generator=torch.Generator().manual_seed(6))
    opt = layer.round_options()
    own = run_with_grads(graphmoe_torch, layer, x, opt)
    given = run_with_grads(graphmoe_torch, layer, x, opt,
                           expert_index=own[0].expert_index.clone())
    # The weights are rebuilt from the probabilities at the given experts exactly as the
    # top-k path builds them, so this is bit-for-bit the same computation.
    assert torch.equal(given[0].y, own[0].y)
    for name, g in own[1].items():
        assert torch.equal(given[1][name], g), name


# ---------------------------------------------------------------------------------------------
# bf16 / autocast.


def routing_bound(dtype: torch.dtype, logit_scale: torch.Tensor, num_rounds: int) -> torch.Tensor:
    """``[T, M]``: how far rounding in ``dtype`` can move any gap between two logits of a token
    in round ``t``, between two computations of the layer (two backends, or one against exact
    arithmetic). ``logit_scale [M]`` is the token's largest round-1 logit magnitude.

    Round 1: both see the same input, and each logit is rounded to ``dtype`` from sums that
    differ only in fp32 summation order, so each logit moves by at most one ulp,
    ``≤ eps·|l|``, and a gap by at most two: ``2·eps·S``. Every later round adds the
    computations' different roundings of ``y_t``, the GRU and ``x_{t+1}`` to the round input;
    measured between the triton and the reference backend (fp16 and bf16, 6 seeds, 2 configs,
    64 tokens) a pairwise gap moved ≤ 2.7·eps·S after one round and ≤ 5.1·eps·S after two, so
    ``2·eps·S`` more per round (4 and 6) bounds it. ``S`` is floored at 1 because the round
    input's error has a floor of its own that does not shrink with small logits.
    """
    eps = torch.finfo(dtype).eps
    rounds = torch.arange(num_rounds, dtype=torch.float64)[:, None]
    return 2.0 * (1.0 + rounds) * eps * logit_scale.double().clamp_min(1.0)[None, :]


def routing_margins(router_probs: torch.Tensor, top_k: int, ordered: bool = False
                    ) -> torch.Tensor:
    """``[T, M]``: ``log p_(k) − log p_(k+1)``, the logit gap a token's top-k choice hinges on
    (a logit gap, because rounding acts on the logits; ``inf`` when ``k = n``: no choice).
    ``ordered``: the smallest gap between neighbours among the first ``k + 1`` (all ``n`` when
    ``k = n``), on which the order of the slots hinges too: the dropout masks follow slots."""
    top = router_probs.double().log().sort(-1, descending=True).values
    if ordered:
        first = top[..., :top_k + 1]
        return (first[..., :-1] - first[..., 1:]).amin(-1)
    if top_k == router_probs.shape[-1]:
        return torch.full(router_probs.shape[:-1], float("inf"), dtype=torch.float64)
    return top[..., top_k - 1] - top[..., top_k]


def same_experts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[T, M]``: whether two routings chose the same set of experts. Within the top-k, slot
    order follows the probabilities, and a near tie there may swap two slots with no effect on
    ``y`` (only dropout masks follow slots; these comparisons run without dropout)."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


def decided_tokens(layer: gm.GraphMoEMLP, count: int, seed: int,
                    rounding: torch.dtype) -> torch.Tensor:
    """``count`` tokens (in the layer's dtype) whose top-k choice (with LoRA dropout, the order
    of the slots too) is decided beyond rounding in ``rounding`` in every round: the exact
    (fp64) margin exceeds :func:`routing_bound`.

    Tokens are independent, so filtering them changes no other token's result; a token whose
    choice rounding can flip would measure the router's tie-breaking, not the arithmetic (a
    flip changes its output by O(1)).
    """
    opt = layer.round_options()
    x = torch.randn(20 * count, layer.hidden_size, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(layer.router.weight.dtype).double()
    exact = copy.deepcopy(layer).double()
    out = graphmoe_reference(x, exact.params(), opt)
    scale = (x @ exact.router.weight.t()).abs().amax(-1)
    bound = routing_bound(rounding, scale, opt.num_rounds)
    keep = (routing_margins(out.router_probs, opt.top_k, ordered=opt.dropout_p > 0)
            > bound).all(0)
    # At T = 3, n = 8 and bf16 about half the tokens qualify: 20× leaves ample room.
    assert keep.sum() >= count, f"only {int(keep.sum())} decided tokens"
    return x[keep][:count].to(layer.router.weight.dtype)


LOW_PRECISION_VARIANTS = {
    "40-tokens": (40, {}),
    "41-tokens-dropout": (41, {"lora_dropout": 0.1}),
    "41-tokens-k=n": (41, {"top_k": 8}),
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("mode", ["autocast", "pure", "pure-fp16"])
@pytest.mark.parametrize("variant", LOW_PRECISION_VARIANTS)
def test_low_precision_error_within_reference_error(plan, recompute, mode, variant):
    """bf16 under autocast (fp32 layer and input), pure bf16 or pure fp16 (layer and input in
    that dtype): the torch backend's error against exact arithmetic on the same values is no
    worse than the reference's own error in that dtype; also with LoRA dropout, an odd token
    count and k = n."""
    tokens, changes = LOW_PRECISION_VARIANTS[variant]
    low = torch.float16 if mode == "pure-fp16" else torch.bfloat16
    dtype = torch.float32 if mode == "autocast" else low
    autocast = torch.bfloat16 if mode == "autocast" else None
    # GRU width 8 (ratio 0.25 of d = 32): at the default 0.1 it is 3, and the error of the
    # 3-element bias gradient is the luck of one or two roundings.
    layer = make_layer(num_experts=8, lora_r=8, num_rounds=3, recompute_intermediates=recompute,
                       dtype=dtype, gru_hidden_ratio=0.25, **changes)
    x = decided_tokens(layer, tokens, seed=3, rounding=low)
    opt = layer.round_options()
    exact = run_with_grads(graphmoe_reference, copy.deepcopy(layer).double(), x.double(), opt)
    ref = run_with_grads(graphmoe_reference, layer, x, opt, autocast=autocast)
    got = run_with_grads(graphmoe_torch, layer, x, opt, autocast=autocast, expert_plan=plan)
    # The same experts everywhere: every token's choice is decided beyond bf16 rounding (the
    # order of two slots with near-equal probabilities may differ, see same_experts).
    assert same_experts(got[0].expert_index, exact[0].expert_index).all()
    assert same_experts(ref[0].expert_index, exact[0].expert_index).all()
    if opt.dropout_p > 0:  # the slots in the same order: each slot draws its own mask
        assert torch.equal(got[0].expert_index, exact[0].expert_index)
        assert torch.equal(ref[0].expert_index, exact[0].expert_index)
    # The reference's dtypes: y in x's dtype (fp32 under autocast), probabilities fp32.
    assert got[0].y.dtype == ref[0].y.dtype == dtype
    assert got[0].router_probs.dtype == ref[0].router_probs.dtype == torch.float32
    for name, g in got[1].items():
        assert g.dtype == dtype, name

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    pairs = [(got[0].y, ref[0].y, exact[0].y),
             (got[0].router_probs, ref[0].router_probs, exact[0].router_probs)]
    pairs += [(got[1][n], ref[1][n], exact[1][n]) for n in exact[1]]
    eps = torch.finfo(low).eps
    for fast, slow, truth in pairs:
        # Both round every GEMM operand and output to the dtype, so both land near 1-2 eps
        # relative (norm) error here; the torch path keeps a little more in fp32 (rank-r
        # activations, the GRU gates), and measures 0.5-1.6× the reference's own error across
        # the output, probabilities and all 15 gradients, in all three modes (1.6× on the
        # 8-element GRU bias gradient in bf16, at 1.3e-2 against 8e-3). 1.5× plus a quarter ulp
        # covers that rounding-order luck; a real bug (a wrong term or scale) shows up as O(1).
        assert err(fast, truth) <= 1.5 * err(slow, truth) + eps / 4
        assert err(fast, truth) < 6.4 * eps


# ---------------------------------------------------------------------------------------------
# The layer end to end, checkpointing, the frozen base.


@pytest.mark.parametrize("train", [False, True])
def test_layer_end_to_end(train):
    """GraphMoEMLP(backend="torch") forward + backward (aux loss included) vs "reference";
    in training with dropout, the same global seed gives both backends the same masks."""
    results = []
    for backend in ("reference", "torch"):
        layer = make_layer(num_experts=8, top_k=2, lora_r=8, backend=backend,
                           lora_dropout=0.2 if train else 0.0)
        layer.train(train)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
        torch.manual_seed(7)
        y, aux = layer(x, return_aux_loss=True)
        (y.pow(2).sum() + 0.5 * aux).backward()
        results.append((y, aux, x.grad, {n: p.grad for n, p in layer.named_parameters()
                                         if p.requires_grad}, layer.expert_counts.clone()))
    (y_r, aux_r, gx_r, g_r, c_r), (y_t, aux_t, gx_t, g_t, c_t) = results
    assert y_t.shape == y_r.shape == (2, 5, 32)
    assert rel_err(y_t, y_r) < 2e-5 and rel_err(aux_t, aux_r) < 2e-5
    assert torch.equal(c_t, c_r)
    assert rel_err(gx_t, gx_r) < 2e-5
    for name, g in g_r.items():
        assert rel_err(g_t[name], g) < 2e-5, name


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing(dropout):
    """A pure function of its inputs and seed: non-reentrant checkpointing (which re-runs
    forward in backward, RNG state restored) gives the same gradients as no checkpointing."""
    grads = []
    for checkpoint in (False, True):
        layer = make_layer(num_experts=8, lora_r=8, backend="torch", lora_dropout=dropout)
        layer.train()
        x = torch.randn(21, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
        torch.manual_seed(11)
        if checkpoint:
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            y = layer(x)
        y.pow(2).sum().backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_frozen_base_weight_requiring_grad_is_rejected():
    layer = make_layer()
    layer.up_proj.weight.requires_grad_(True)
    x = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="frozen"):
        graphmoe_torch(x, layer.params(), layer.round_options())
    with torch.no_grad():  # inference never needs the gradient, so the flag does not matter
        graphmoe_torch(x, layer.params(), layer.round_options())


def test_base_weights_get_no_gradient():
    layer = make_layer(backend="torch")
    layer(torch.randn(6, 32, requires_grad=True)).sum().backward()
    for proj in (layer.gate_proj, layer.up_proj, layer.down_proj):
        assert proj.weight.grad is None
    assert layer.lora_A_gate.grad is not None


# ---------------------------------------------------------------------------------------------
# Expert-plan choice, host syncs, memory.


def test_plan_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_expert_plan(cpu, 2, 16) == "masked"
    assert choose_expert_plan(cpu, 8, 16) == "grouped"
    assert CPU_MASKED_MAX_COLUMNS < 8 * 16
    # On a GPU the masked product stays within one tensor-core tile up to n·r = 256, and the
    # grouped plan (a host read of its segment bounds: a device sync there) is not offered.
    assert choose_expert_plan(cuda, 8, 16) == "masked"
    assert choose_expert_plan(cuda, 8, 64) == "masked"
    assert grouped_supported(cpu) and not grouped_supported(cuda)
    layer = make_layer(lora_r=4)
    with pytest.raises(ValueError, match="expert_plan"):
        graphmoe_torch(torch.randn(3, 32), layer.float().params(), layer.round_options(),
                       expert_plan="sorted")


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that reads a tensor's value on the host or has a data-dependent
    output shape (each is a device→host sync on a GPU and breaks CUDA-graph capture)."""

    FORBIDDEN = {
        "_local_scalar_dense", "item", "nonzero", "masked_select", "bincount", "unique_dim",
        "_unique", "_unique2", "unique_consecutive", "repeat_interleave", "equal", "is_nonzero",
    }

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN:
            raise AssertionError(f"host sync: aten.{name}")
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_forward_or_backward():
    # The masked plan, what runs on CUDA (the grouped plan runs on CPUs only, where reading its
    # segment bounds on the host is free).
    layer = make_layer(num_experts=8, lora_r=8)
    opt = dataclasses.replace(layer.round_options(), dropout_p=0.1, dropout_seed=5)
    x = torch.randn(15, 32, requires_grad=True)
    mode = _NoHostSync()
    with mode:
        out = graphmoe_torch(x, layer.params(), opt, expert_plan="masked")
        (out.y.sum() + out.router_probs.pow(2).sum()).backward()
    assert mode.ops > 100 and x.grad is not None
    # The check can fail: the reference's per-expert loop syncs.
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        graphmoe_reference(x, layer.params(), opt)


def saved_bytes(backend, layer: gm.GraphMoEMLP, x: torch.Tensor, opt: RoundOptions,
                **kw) -> int:
    """Bytes autograd keeps for backward: distinct storages, parameters (which exist anyway)
    not counted."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend(x, layer.params(), opt, **kw)
    return sum(seen.values())


@pytest.mark.parametrize("plan", PLANS)
def test_saved_for_backward_is_small(plan):
    # d : D' as at cpu-small (1024 : 2816); n, k, r, T as the defaults.
    layer = make_layer(hidden=64, intermediate=176, num_experts=8, top_k=2, lora_r=8,
                       num_rounds=3)
    x = torch.randn(64, 64)
    opt = dataclasses.replace(layer.round_options(), recompute_intermediates=True)
    ref = saved_bytes(graphmoe_reference, layer, x, opt)
    rec = saved_bytes(graphmoe_torch, layer, x, opt, expert_plan=plan)
    keep = saved_bytes(graphmoe_torch, layer, x,
                       dataclasses.replace(opt, recompute_intermediates=False), expert_plan=plan)
    # Structural, so robust at any shape: recomputation keeps nothing D'-wide (measured 0.06×
    # here, 0.036× at cpu-small); keeping (G, U) adds 2·D' per token and round (0.22× here,
    # 0.20× at cpu-small).
    assert rec <= 0.1 * ref
    assert rec < keep <= 0.35 * ref
    # With dropout the kept masks add k·D' bytes per token and round (bool), the reference
    # its dropped copies of every LoRA input.
    drop = dataclasses.replace(opt, dropout_p=0.1, dropout_seed=3)
    ref_drop = saved_bytes(graphmoe_reference, layer, x, drop)
    rec_drop = saved_bytes(graphmoe_torch, layer, x, drop, expert_plan=plan)
    keep_drop = saved_bytes(graphmoe_torch, layer, x,
                            dataclasses.replace(drop, recompute_intermediates=False),
                            expert_plan=plan)
    assert rec_drop == rec  # the masks are drawn again in backward
    assert keep < keep_drop <= 0.35 * ref_drop


# ---------------------------------------------------------------------------------------------
# The kept CPU workspace.


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_workspace_shared_by_interleaved_layers_and_growing_batches(plan, dropout_p):
    """Two layers, forward A, forward B (more tokens: the buffers grow), backward B, backward A,
    then A again with fewer tokens: every result equals the reference's, so no call's scratch
    outlives it and no output or saved tensor is a workspace buffer."""
    layers = [make_layer(num_experts=8, lora_r=8, seed=s) for s in (0, 1)]
    xs = [torch.randn(n, 32, generator=torch.Generator().manual_seed(n)) for n in (13, 29, 5)]
    opt = dataclasses.replace(layers[0].round_options(), dropout_p=dropout_p, dropout_seed=4)
    want = [run_with_grads(graphmoe_reference, layers[i], x, opt)
            for i, x in ((0, xs[0]), (1, xs[1]), (0, xs[2]))]

    def forward(layer, x):
        x = x.clone().requires_grad_()
        out = graphmoe_torch(x, layer.params(), opt, expert_plan=plan)
        return x, out

    for layer in layers:
        layer.zero_grad(set_to_none=True)
    (xa, out_a), (xb, out_b) = forward(layers[0], xs[0]), forward(layers[1], xs[1])
    ys = [out_a.y.detach().clone(), out_b.y.detach().clone()]
    results = []
    for layer, x, out, i in ((layers[1], xb, out_b, 1), (layers[0], xa, out_a, 0)):
        g = torch.Generator().manual_seed(1)
        gy = torch.randn(out.y.shape, generator=g, dtype=torch.float64)
        gp = torch.randn(out.router_probs.shape, generator=g, dtype=torch.float64)
        ((out.y.double() * gy).sum() + (out.router_probs.double() * gp).sum()).backward()
        grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()
                                 if p.requires_grad}}
        results.append((i, out, grads))
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    results.append((2, *run_with_grads(graphmoe_torch, layers[0], xs[2], opt, expert_plan=plan)))
    for i, out, grads in results:
        _assert_matches((out, grads), want[i], 2e-5)
    # The outputs read before the other calls ran were not overwritten by them.
    assert torch.equal(ys[0], out_a.y) and torch.equal(ys[1], out_b.y)


@pytest.mark.parametrize("plan", PLANS)
def test_workspace_made_under_inference_mode_serves_training(plan):
    """The first call under ``inference_mode`` makes the kept buffers; a training step after it
    writes into them in place, which an inference tensor would refuse."""
    from graphmoe_fused.backends.torch import release_workspace

    release_workspace()
    layer = make_layer(num_experts=8, lora_r=8)
    x = torch.randn(13, 32)
    with torch.inference_mode():
        graphmoe_torch(x, layer.params(), layer.round_options(), expert_plan=plan)
    want = run_with_grads(graphmoe_reference, layer, x, layer.round_options())
    got = run_with_grads(graphmoe_torch, layer, x, layer.round_options(), expert_plan=plan)
    _assert_matches(got, want, 2e-5)


def test_workspace_is_kept_on_cpu_and_released_on_request(monkeypatch):
    from graphmoe_fused.backends.torch import release_workspace
    from graphmoe_fused.backends.torch.workspace import Workspace, workspace_for

    release_workspace()
    cpu = torch.device("cpu")
    layer = make_layer(num_experts=8, lora_r=8)
    run_with_grads(graphmoe_torch, layer, torch.randn(17, 32), layer.round_options(),
                   expert_plan="grouped")
    ws = workspace_for(cpu)
    assert ws.reuse and ws.nbytes > 0
    pointers = {k: b.data_ptr() for k, b in ws._buffers.items()}
    run_with_grads(graphmoe_torch, layer, torch.randn(11, 32), layer.round_options(),
                   expert_plan="grouped")
    assert {k: b.data_ptr() for k, b in ws._buffers.items()} == pointers  # reused, not grown
    assert release_workspace() == ws.nbytes and workspace_for(cpu) is not ws
    assert not workspace_for(torch.device("meta")).reuse  # CUDA likewise: its allocator caches
    # A reused buffer is poisoned again when outputs are.
    monkeypatch.setenv(POISON_ENV, "1")
    buf = Workspace(reuse=True)
    buf.get("a", (4,), torch.float32, cpu).fill_(1.0)
    assert buf.get("a", (2, 2), torch.float32, cpu).isnan().all()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem.


def _params_with(layer: gm.GraphMoEMLP, **changes: torch.Tensor) -> GraphMoEParams:
    return layer.params()._replace(**changes)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda layer, x: (x.unsqueeze(0), layer.params()), ValueError, "flattened"),
        (lambda layer, x: (x[:, :31], layer.params()), ValueError, "x has 31 features"),
        (lambda layer, x: (x.long(), layer.params()), TypeError, "floating-point x"),
        (lambda layer, x: (x, _params_with(layer, lora_B_down=layer.lora_B_down[:, :, :3])),
         ValueError, "lora_B_down"),
        (lambda layer, x: (x, _params_with(layer, gru_weight_z=layer.gru.weight_z[:, 1:])),
         ValueError, "gru_weight_z"),
        (lambda layer, x: (x, _params_with(layer, router_weight=layer.router.weight.to("meta"))),
         ValueError, "router_weight is on meta"),
        (lambda layer, x: (x, _params_with(layer, lora_A_up=layer.lora_A_up[0])),
         ValueError, "lora_A_up must be 3-D"),
        (lambda layer, x: (x, tuple(layer.params())), TypeError, "GraphMoEParams"),
        (lambda layer, x: (x, _params_with(layer, gru_bias_o=None)), TypeError, "gru_bias_o"),
    ],
    ids=["3-D x", "wrong hidden", "integer x", "lora_B_down shape", "gru_weight_z shape",
         "device", "1-D LoRA factor", "not GraphMoEParams", "None weight"],
)
def test_bad_input_is_named(change, error, match):
    layer = make_layer(num_experts=4, lora_r=4)
    x, params = change(layer, torch.randn(5, 32))
    with pytest.raises(error, match=match):
        graphmoe_torch(x, params, layer.round_options())


def test_options_of_the_wrong_type_are_named():
    layer = make_layer(num_experts=4, lora_r=4)
    with pytest.raises(TypeError, match="takes a RoundOptions, got dict"):
        graphmoe_torch(torch.randn(3, 32), layer.params(), {"top_k": 2})


def test_top_k_above_the_experts_is_rejected():
    layer = make_layer(num_experts=4, lora_r=4)
    opt = dataclasses.replace(layer.round_options(), top_k=5)
    with pytest.raises(ValueError, match="top_k=5 must not exceed the 4 experts"):
        graphmoe_torch(torch.randn(3, 32), layer.params(), opt)


@pytest.mark.parametrize(
    "field,value,match",
    [("top_k", 0, "top_k"), ("num_rounds", 1.5, "num_rounds"), ("dropout_p", 1.0, "dropout_p"),
     ("gru_candidate_input", "h", "gru_candidate_input"),
     ("gru_candidate_activation", "relu", "gru_candidate_activation"),
     ("lora_scaling", float("nan"), "lora_scaling"), ("dropout_seed", None, "dropout_seed")],
)
def test_bad_round_options_are_named(field, value, match):
    opt = make_layer(num_experts=4, lora_r=4).round_options()
    with pytest.raises(ValueError, match=f"RoundOptions.{match}"):
        dataclasses.replace(opt, **{field: value})


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda idx: idx[:, :, :1], ValueError, r"shape \(3, 5, 1\); expected"),
        (lambda idx: idx[:2], ValueError, "expected .rounds, tokens, top_k"),
        (lambda idx: idx.float(), TypeError, "integer dtype"),
        (lambda idx: idx.bool(), TypeError, "integer dtype"),
        (lambda idx: idx.to("meta"), ValueError, "expert_index is on meta"),
        (lambda idx: idx.tolist(), TypeError, "must be a torch.Tensor"),
        (lambda idx: idx.index_fill(2, torch.tensor([0]), 4), ValueError, r"outside \[0, 4\)"),
        (lambda idx: idx.index_fill(2, torch.tensor([0]), -1), ValueError, "outside"),
        (lambda idx: idx[:, :, :1].expand(-1, -1, 2), ValueError, "one expert twice"),
    ],
    ids=["too few slots", "too few rounds", "float", "bool", "device", "list",
         "past n", "negative", "duplicate"],
)
def test_bad_expert_index_is_named(make, error, match):
    layer = make_layer(num_experts=4, lora_r=4, num_rounds=3)
    x = torch.randn(5, 32)
    index = graphmoe_torch(x, layer.params(), layer.round_options()).expert_index
    with pytest.raises(error, match=match):
        graphmoe_torch(x, layer.params(), layer.round_options(), expert_index=make(index))
    # An int32 index is as good as int64 (converted); the values are what matter.
    out = graphmoe_torch(x, layer.params(), layer.round_options(), expert_index=index.int())
    assert torch.equal(out.expert_index, index)


# ---------------------------------------------------------------------------------------------
# Poisoned buffers: every buffer the fast paths allocate starts as NaN in the tests.


def test_new_empty_poisons_when_asked(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")
    assert new_empty((2, 3), torch.float32, torch.device("cpu")).isnan().all()
    assert (new_empty((4,), torch.int64, torch.device("cpu")) == -1).all()
    assert new_empty_like(torch.zeros(2, dtype=torch.bfloat16)).isnan().all()
    monkeypatch.setenv(POISON_ENV, "0")
    out = new_empty((2, 3), torch.float32, torch.device("cpu"))
    assert out.shape == (2, 3) and out.dtype == torch.float32


def test_tests_run_poisoned():
    """conftest turns poisoning on for the session (unless the environment says otherwise),
    so every test above ran with it."""
    assert POISON_ENV in os.environ, "conftest.py no longer sets " + POISON_ENV
    if os.environ[POISON_ENV].strip().lower() in ("0", "false", "off", "no", "n", ""):
        pytest.skip(f"{POISON_ENV} switched off in the environment")
    assert new_empty((1,), torch.float32, torch.device("cpu")).isnan().all()


def _allowed_lines(source: str) -> set[int]:
    """Lines where an uninitialised allocation is right: the poisoning helpers themselves, and
    functions registered with ``register_fake`` (they make shapes, not data)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and (
            node.name in ("new_empty", "new_output")
            or any(isinstance(d, ast.Attribute) and d.attr == "register_fake"
                   for d in node.decorator_list)
        ):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def test_fast_paths_allocate_only_through_the_poisoning_helper():
    """A bare ``torch.empty`` in a fast path or a kernel launcher would escape the NaN
    poisoning above."""
    import graphmoe_fused.kernels as kernels

    backends = pathlib.Path(gm.__file__).parent / "backends"
    kernel_root = pathlib.Path(kernels.__file__).parent
    files = [*sorted((backends / "torch").glob("*.py")),
             *(backends / name for name in ("triton.py", "triton_ops.py", "dropout.py")),
             *sorted(kernel_root.rglob("*.py"))]
    assert (kernel_root / "expert" / "backward.py") in files
    bare = re.compile(r"torch\.empty(_like|_strided)?\(|\.new_empty\(|\bempty_like\(")
    offenders = []
    for f in files:
        source = f.read_text()
        allowed = _allowed_lines(source)
        offenders += [f"{f.parent.name}/{f.name}:{i}"
                      for i, line in enumerate(source.splitlines(), 1)
                      if bare.search(line.split("#")[0]) and i not in allowed]
    assert not offenders, offenders
