"""The reference backend against an independent formulation written here: one token at a time,
one chosen expert at a time, with the merged weights ``W + c·B·A`` of Algorithm 1 (lines 8-9,
Eq. 2) and the GRU of Eq. 6-7 spelled out, in fp64. Values and gradients must agree, of ``y``
and of the router probabilities (which the load-balancing loss differentiates), with and without
LoRA dropout. And the reference shares no code with the backends it judges.

Input shapes: ``GraphMoEMLP`` takes ``[..., d]`` with any number of leading dimensions, a 1-D
``[d]`` (one token) included, like ``LlamaMLP``; only a 0-d input is rejected.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import graphmoe_fused.backends.reference as reference
from graphmoe_fused.backends.dropout import lora_dropout_masks
from graphmoe_fused.backends.reference import graphmoe_reference

from .helpers import imported_modules, make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)


def per_token_graphmoe(layer, x: torch.Tensor, masks=None, routing: bool = False):
    """Algorithm 1 for each token separately. ``masks``: per round ``(keep_x, keep_h)`` to apply
    the LoRA-input dropout (then the deltas see dropped inputs and the weights are not merged).
    Returns ``y [M, d]``, and with ``routing`` also the router probabilities ``[T, M, n]`` and
    the chosen experts ``[T, M, k]``."""
    cfg = layer.config
    c, k, n = cfg.lora_scaling, cfg.top_k, cfg.num_experts
    p = 0.0 if masks is None else cfg.lora_dropout
    W_G, W_U, W_D = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    R, gru = layer.router.weight, layer.gru
    outputs, all_probs, all_chosen = [], [], []
    for m in range(x.shape[0]):
        x_t = x[m]
        h = x.new_zeros(gru.gru_hidden_size)
        probs, chosen_per_round = [], []
        for t in range(cfg.num_rounds):
            s = torch.softmax(R @ x_t, dim=0)
            chosen = sorted(range(n), key=lambda i: (-s[i].item(), i))[:k]
            probs.append(s)
            chosen_per_round.append(chosen)
            total = sum(s[i] for i in chosen)
            y = x.new_zeros(x.shape[-1])
            for slot, i in enumerate(chosen):
                if masks is None:
                    WG = W_G + c * layer.lora_B_gate[i] @ layer.lora_A_gate[i]
                    WU = W_U + c * layer.lora_B_up[i] @ layer.lora_A_up[i]
                    WD = W_D + c * layer.lora_B_down[i] @ layer.lora_A_down[i]
                    expert = WD @ (F.silu(WG @ x_t) * (WU @ x_t))
                else:
                    keep_x, keep_h = masks[t]
                    x_drop = x_t * keep_x[m] / (1 - p)
                    gate = W_G @ x_t + c * layer.lora_B_gate[i] @ (layer.lora_A_gate[i] @ x_drop)
                    up = W_U @ x_t + c * layer.lora_B_up[i] @ (layer.lora_A_up[i] @ x_drop)
                    act = F.silu(gate) * up
                    act_drop = act * keep_h[m, slot] / (1 - p)
                    expert = W_D @ act + c * layer.lora_B_down[i] @ (
                        layer.lora_A_down[i] @ act_drop)
                y = y + (s[i] / total) * expert
            if t == cfg.num_rounds - 1:
                break
            z = torch.sigmoid(gru.weight_z @ torch.cat([h, y]))
            r = torch.sigmoid(gru.weight_r @ torch.cat([h, y]))
            u = y if cfg.gru_candidate_input == "y" else x_t
            pre = gru.weight_o @ torch.cat([r * h, u]) + gru.bias_o
            h_cand = torch.sigmoid(pre) if cfg.gru_candidate_activation == "sigmoid" else (
                torch.tanh(pre))
            h = (1 - z) * h + z * h_cand
            x_t = x_t + gru.weight_g @ h
        outputs.append(y)
        all_probs.append(torch.stack(probs))
        all_chosen.append(chosen_per_round)
    y = torch.stack(outputs)
    if not routing:
        return y
    probs = torch.stack(all_probs, 1) if all_probs else x.new_zeros(cfg.num_rounds, 0, n)
    chosen = torch.tensor(all_chosen, dtype=torch.long).reshape(-1, cfg.num_rounds, k)
    return y, probs, chosen.transpose(0, 1)


def _layer(**cfg):
    cfg.setdefault("backend", "reference")
    return make_layer(hidden=16, intermediate=24, dtype=torch.float64, gru_hidden_ratio=0.25,
                      num_experts=4, lora_r=3, **cfg)


def _check_values_and_grads(layer, x, dropout_seed: int = 123):
    """The layer (and, for the router probabilities, the reference backend itself) against the
    per-token loop: values, chosen experts, and the gradients of ``x`` and every trainable
    parameter for random upstream gradients of both ``y`` and the router probabilities. In
    training mode with dropout, the same masks on both sides."""
    d = x.shape[-1]
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    torch.manual_seed(dropout_seed)  # the layer draws its dropout seed from the global generator
    y = layer(x1)
    torch.manual_seed(dropout_seed)
    opt = layer.round_options()
    out = graphmoe_reference(x1.reshape(-1, d), layer.params(), opt)
    masks = None
    if opt.dropout_p > 0:
        masks = [lora_dropout_masks(opt.dropout_seed, t, out.y.shape[0], d, opt.top_k,
                                    layer.intermediate_size, opt.dropout_p, x.device)
                 for t in range(opt.num_rounds)]
    assert y.shape == x.shape and y.dtype == x.dtype
    expected, probs, chosen = per_token_graphmoe(layer, x2.reshape(-1, d), masks, routing=True)
    expected = expected.reshape(x.shape)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.y.view(x.shape), y, rtol=0, atol=0)
    assert torch.equal(out.expert_index, chosen)
    torch.testing.assert_close(out.router_probs, probs, rtol=1e-10, atol=1e-14)

    g = torch.Generator().manual_seed(7)
    probe = torch.randn(x.shape, generator=g, dtype=x.dtype)
    probe_probs = torch.randn(probs.shape, generator=g, dtype=probs.dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for loss_got, loss_want, what in (
        ((y * probe).sum(), (expected * probe).sum(), "y"),
        ((out.router_probs * probe_probs).sum(), (probs * probe_probs).sum(), "router_probs"),
    ):
        got = torch.autograd.grad(loss_got, [x1, *params], allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(loss_want, [x2, *params], allow_unused=True,
                                   retain_graph=True)
        for name, g, w in zip(names, got, want, strict=True):
            if w is None:  # the GRU is unused with one round; the experts, by the probabilities
                assert g is None or torch.count_nonzero(g) == 0, f"{what}: {name}"
                continue
            assert g is not None, f"{what}: {name}"
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=f"{what}: {name}")


@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
@pytest.mark.parametrize("candidate_input", ["y", "x"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_matches_per_token_loop(rounds, candidate_input, activation):
    layer = _layer(num_rounds=rounds, gru_candidate_input=candidate_input,
                   gru_candidate_activation=activation)
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _check_values_and_grads(layer, x)


@pytest.mark.parametrize(
    "shape", [(16,), (1, 16), (5, 16), (1, 1, 16), (3, 1, 16), (2, 2, 1, 16)],
    ids=["1-D", "one-token", "odd-count", "B1S1", "B3S1", "4-D"],
)
def test_shapes(shape):
    layer = _layer(num_rounds=2)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _check_values_and_grads(layer, x)


def test_all_experts_chosen():
    layer = _layer(top_k=4, num_rounds=3)  # k = n: the weights are the full softmax
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _check_values_and_grads(layer, x)


def test_top1():
    layer = _layer(top_k=1, num_rounds=2)
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _check_values_and_grads(layer, x)


def test_every_trainable_parameter_gets_a_gradient():
    # Three rounds: the reset gate multiplies h, which is 0 until the first GRU step, so W_r
    # first matters in the second GRU step.
    layer = _layer(num_rounds=3)
    x = torch.randn(4, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y, aux = layer(x, return_aux_loss=True)
    (y.square().sum() + aux).backward()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name
    assert {n for n, p in layer.named_parameters() if not p.requires_grad} == {
        "gate_proj.weight", "up_proj.weight", "down_proj.weight"}


@pytest.mark.parametrize("candidate_input", ["y", "x"])
def test_dropout_matches_per_token_loop_with_the_same_masks(candidate_input):
    layer = _layer(num_rounds=3, lora_dropout=0.3, gru_candidate_input=candidate_input).train()
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _check_values_and_grads(layer, x)  # values and gradients with the masks of one seed
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)  # the layer draws its dropout seed from the global generator
    seed = layer.round_options().dropout_seed
    masks = [lora_dropout_masks(seed, t, 6, 16, layer.config.top_k, 24, 0.3, x.device)
             for t in range(3)]
    assert any(not keep.all() for pair in masks for keep in pair)  # some entries are dropped
    torch.testing.assert_close(y, per_token_graphmoe(layer, x, masks), rtol=1e-10, atol=1e-12)
    # and dropout does change the result (so the masks above were really applied)
    assert not torch.allclose(y, per_token_graphmoe(layer, x))


def test_eval_mode_has_no_dropout():
    layer = _layer(num_rounds=2, lora_dropout=0.5).eval()
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(layer(x), per_token_graphmoe(layer, x), rtol=1e-10, atol=1e-12)


# ---- the oracle is independent ------------------------------------------------------------------

# What the reference judges: it may share the contract and the dropout-mask definition, no maths.
JUDGED = ("graphmoe_fused.backends.torch", "graphmoe_fused.backends.triton",
          "graphmoe_fused.kernels", "kernels")


def _judged(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in JUDGED)


def test_the_reference_imports_nothing_from_the_backends_it_judges():
    # Its source and everything it imports from the package, followed transitively (the parent
    # package's __init__, which Python runs to reach any submodule, is not a dependency).
    imports = imported_modules("graphmoe_fused.backends.reference", transitive=True)
    assert "graphmoe_fused.backends.dropout" in imports  # the walk read reference.py
    assert not sorted(m for m in imports if _judged(m))
    # The detector does see such an import where there is one: the triton backend's backward
    # runs the torch backend's chain over rounds, and it launches the kernels.
    triton_imports = imported_modules("graphmoe_fused.backends.triton")
    assert any(m.startswith("graphmoe_fused.backends.torch") for m in triton_imports)
    assert any(m.startswith("graphmoe_fused.kernels") for m in triton_imports)


def test_nothing_in_the_reference_namespace_comes_from_the_backends_it_judges():
    # Catches a re-export too (a name taken from a package that got it from the torch backend).
    for name, value in vars(reference).items():
        module = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        assert not (isinstance(module, str) and _judged(module)), f"{name} from {module}"
    assert reference.route.__module__ == reference.__name__
    assert reference.lowrank_gru_step.__module__ == reference.__name__
