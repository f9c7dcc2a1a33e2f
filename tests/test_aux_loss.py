"""The load-balancing loss at model level (DESIGN.md §3): its value against a hand computation,
padding excluded, added to the loss only with labels, and its gradient (injected in backward)
against plain autograd of ``loss + coef · aux``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphmoe_fused as gm
from graphmoe_fused.backends.reference import graphmoe_reference
from graphmoe_fused.hf.aux_loss import RoutingRecorder

from .helpers import make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, trainable_grads


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_uniform_routing_gives_k(top_k):
    model = converted("llama", top_k=top_k)
    with torch.no_grad():
        for layer in gm.graphmoe_layers(model).values():
            layer.router.weight.zero_()
    ids, mask, labels = batch()
    assert model(ids, attention_mask=mask).aux_loss.item() == pytest.approx(top_k, abs=1e-6)


def _hand_aux(probs: torch.Tensor, index: torch.Tensor, real: torch.Tensor) -> list[float]:
    """``n · Σ_i f_i P_i`` per round with explicit loops; ``real`` marks non-padding tokens."""
    rounds, tokens, n = probs.shape
    kept = [m for m in range(tokens) if real[m]]
    values = []
    for t in range(rounds):
        total = 0.0
        for i in range(n):
            f = sum(1 for m in kept if i in index[t, m].tolist()) / len(kept)
            p = sum(probs[t, m, i].item() for m in kept) / len(kept)
            total += f * p
        values.append(n * total)
    return values


def _layer_inputs(model, run):
    inputs = {}
    handles = [layer.register_forward_pre_hook(
        lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, layer in gm.graphmoe_layers(model).items()]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return inputs, out


@pytest.mark.parametrize("pad", [True, False])
def test_value_matches_a_hand_computation_and_excludes_padding(pad):
    model = converted("llama")
    ids, mask, labels = batch(pad=pad)
    inputs, out = _layer_inputs(model, lambda: model(ids, attention_mask=mask, labels=labels))
    per_round, with_padding = [], []
    for name, layer in gm.graphmoe_layers(model).items():
        x = inputs[name].reshape(-1, layer.hidden_size)
        routed = graphmoe_reference(x, layer.params(), layer.round_options())
        per_round += _hand_aux(routed.router_probs, routed.expert_index, mask.reshape(-1) > 0)
        with_padding += _hand_aux(routed.router_probs, routed.expert_index,
                                  torch.ones(x.shape[0], dtype=torch.bool))
    assert len(per_round) == 2 * 3  # layers x rounds
    expected = sum(per_round) / len(per_round)
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    if pad:  # the check above would pass with padding counted only if padding did not matter
        assert abs(sum(with_padding) / len(with_padding) - expected) > 1e-3


def test_added_to_the_loss_only_with_labels():
    model = converted("llama", router_aux_loss_coef=0.5)
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ce = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce + 0.5 * out.aux_loss)
    no_labels = model(ids, attention_mask=mask)
    assert no_labels.loss is None
    torch.testing.assert_close(no_labels.aux_loss, out.aux_loss)
    with torch.no_grad():  # no gradient to inject, but the value is the same
        torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels).loss, out.loss)


def test_coefficient_zero_leaves_the_loss_alone():
    model = converted("llama", router_aux_loss_coef=0.0)
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ce = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce)
    assert out.aux_loss > 0


@pytest.mark.parametrize("masked", [False, True])
def test_layer_injected_gradient_equals_autograd_of_return_aux_loss(masked):
    layer = make_layer(backend="reference", num_rounds=3)
    x = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(1))
    token_mask = (torch.arange(20) % 3 != 0) if masked else None
    scale = 0.7

    layer.recorder = RoutingRecorder()
    layer.recorder.start(token_mask, scale)
    (layer(x) * probe).sum().backward()
    injected = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()

    # scale is the gradient of each round's loss: of T · mean over rounds.
    y, aux = layer(x, return_aux_loss=True)
    ((y * probe).sum() + scale * 3 * aux).backward()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(injected[name], p.grad, msg=name)
    layer.zero_grad()
    (layer(x, return_aux_loss=True)[0] * probe).sum().backward()
    assert not torch.allclose(layer.router.weight.grad, injected["router.weight"])


def _grads_with_differentiable_aux(model, ids, mask, labels):
    """Gradients of ``loss + coef · aux`` by plain autograd: each layer's differentiable
    ``return_aux_loss`` value is collected and added (value-neutral) to the model's loss."""
    coef = model.graphmoe_config.router_aux_loss_coef
    collected = []
    layers = list(gm.graphmoe_layers(model).values())
    for layer in layers:
        def forward(x, _layer=layer):
            y, aux = type(_layer).forward(_layer, x, return_aux_loss=True)
            collected.append(aux)
            return y
        layer.forward = forward
    try:
        out = model(ids, attention_mask=mask, labels=labels)
    finally:
        for layer in layers:
            del layer.forward
    aux = torch.stack(collected).mean()
    torch.testing.assert_close(aux.detach(), out.aux_loss)
    (out.loss + coef * (aux - aux.detach())).backward()
    grads = trainable_grads(model)
    model.zero_grad()
    return grads


@pytest.mark.parametrize("train", [True, False])
def test_model_injected_gradient_equals_autograd(train):
    model = converted("llama", router_aux_loss_coef=1.0).train(train)
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    injected = trainable_grads(model)
    model.zero_grad()
    expected = _grads_with_differentiable_aux(model, ids, mask, labels)
    for name, grad in expected.items():
        torch.testing.assert_close(injected[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    # The aux loss really contributes: without it the router gradient differs (and the
    # coefficient is read at each forward, so a schedule can change it).
    model.graphmoe_config.router_aux_loss_coef = 0.0
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    name = "model.layers.0.mlp.router.weight"
    assert not torch.allclose(model.get_parameter(name).grad, injected[name], atol=1e-6)


def test_aux_gradient_follows_a_scaled_loss():
    # Gradient accumulation divides the loss and AMP multiplies it: the injected aux gradient
    # must scale with it like every other gradient.
    model = converted("llama", router_aux_loss_coef=1.0).train()
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    full = trainable_grads(model)
    model.zero_grad()
    (0.25 * model(ids, attention_mask=mask, labels=labels).loss).backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, 0.25 * full[name], rtol=1e-5, atol=1e-8, msg=name)


def test_no_labels_no_injected_gradient():
    model = converted("llama", router_aux_loss_coef=1.0).train()
    ids, mask, _ = batch()
    model(ids, attention_mask=mask).logits.square().mean().backward()
    with_hooks = trainable_grads(model)
    model.zero_grad()
    layers = list(gm.graphmoe_layers(model).values())
    for layer in layers:  # plain layers: no recorder, nothing injected
        layer.recorder = None
    model(ids, attention_mask=mask).logits.square().mean().backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(with_hooks[name], grad, msg=name)
