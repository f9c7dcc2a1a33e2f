"""The reference backend against an independent formulation written here: one token at a time,
one chosen expert at a time, with the merged weights ``W + c·B·A`` of Algorithm 1 (lines 8-9,
Eq. 2) and the GRU of Eq. 6-7 spelled out, in fp64. Values and gradients must agree.

Input shapes: ``GraphMoEMLP`` takes ``[..., d]`` with any number of leading dimensions, a 1-D
``[d]`` (one token) included, like ``LlamaMLP``; only a 0-d input is rejected.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphmoe_fused.backends.dropout import lora_dropout_masks

from .helpers import make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)


def per_token_graphmoe(layer, x: torch.Tensor, masks=None) -> torch.Tensor:
    """Algorithm 1 for each token separately. ``masks``: per round ``(keep_x, keep_h)`` to apply
    the LoRA-input dropout (then the deltas see dropped inputs and the weights are not merged)."""
    cfg = layer.config
    c, k, n = cfg.lora_scaling, cfg.top_k, cfg.num_experts
    p = 0.0 if masks is None else cfg.lora_dropout
    W_G, W_U, W_D = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    R, gru = layer.router.weight, layer.gru
    outputs = []
    for m in range(x.shape[0]):
        x_t = x[m]
        h = x.new_zeros(gru.gru_hidden_size)
        for t in range(cfg.num_rounds):
            s = torch.softmax(R @ x_t, dim=0)
            chosen = sorted(range(n), key=lambda i: (-s[i].item(), i))[:k]
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
    return torch.stack(outputs)


def _layer(**cfg):
    cfg.setdefault("backend", "reference")
    return make_layer(hidden=16, intermediate=24, dtype=torch.float64, gru_hidden_ratio=0.25,
                      num_experts=4, lora_r=3, **cfg)


def _check_values_and_grads(layer, x):
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y = layer(x1)
    assert y.shape == x.shape and y.dtype == x.dtype
    expected = per_token_graphmoe(layer, x2.reshape(-1, x.shape[-1])).reshape(x.shape)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)

    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad((y * probe).sum(), [x1, *params], allow_unused=True)
    want = torch.autograd.grad((expected * probe).sum(), [x2, *params], allow_unused=True)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:  # the GRU is unused with one round
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


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


def test_dropout_matches_per_token_loop_with_the_same_masks():
    layer = _layer(num_rounds=3, lora_dropout=0.3).train()
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)  # the layer draws its dropout seed from the global generator
    seed = layer.round_options().dropout_seed
    masks = [lora_dropout_masks(seed, t, 6, 16, layer.config.top_k, 24, 0.3, x.device)
             for t in range(3)]
    torch.testing.assert_close(y, per_token_graphmoe(layer, x, masks), rtol=1e-10, atol=1e-12)
    # and dropout does change the result (so the masks above were really applied)
    assert not torch.allclose(y, per_token_graphmoe(layer, x))


def test_eval_mode_has_no_dropout():
    layer = _layer(num_rounds=2, lora_dropout=0.5).eval()
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(layer(x), per_token_graphmoe(layer, x), rtol=1e-10, atol=1e-12)
