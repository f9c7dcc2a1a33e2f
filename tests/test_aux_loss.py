"""The load-balancing loss (docs/design.md §3).

Layer level: the observer API (routing hooks, ``token_mask``, ``update_stats``) the HF glue
builds on. Model level: the value against a hand computation, padding excluded, added to the
loss only with labels, its gradient against autograd of a hand-built ``cross-entropy + coef ·
aux``, scaled losses (in place too), and gradient accumulation's ``num_items_in_batch``.
Run for the ``reference`` and ``torch`` backends.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphmoe_fused as gm
from graphmoe_fused.backends.reference import graphmoe_reference

from .helpers import make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, trainable_grads

BACKENDS = ["reference", "torch"]
ROUTER = "model.layers.0.mlp.router.weight"


# ---- layer: the observer API -------------------------------------------------------------------

def _small_layer(backend: str = "reference"):
    return make_layer(backend=backend, num_experts=4, lora_r=4, num_rounds=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_hook_sees_the_routing_and_may_replace_the_output(backend):
    layer = _small_layer(backend)
    x = torch.randn(2, 5, 32)
    seen = []

    def hook(mod, event, y):
        seen.append((mod, event, y))
        return 2 * y

    handle = layer.register_routing_hook(hook)
    y, aux = layer(x, return_aux_loss=True)
    (mod, event, y_seen), = seen
    assert mod is layer and y_seen.shape == (10, 32) and event.stats_updated
    assert event.routed.router_probs.shape == (3, 10, 4) and event.token_mask is None
    assert event.aux_loss.shape == (3,) and event.aux_loss.requires_grad
    torch.testing.assert_close(aux, event.aux_loss.mean())
    torch.testing.assert_close(y, 2 * y_seen.view(2, 5, 32))
    handle.remove()
    torch.testing.assert_close(layer(x), y_seen.view(2, 5, 32))
    assert len(seen) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_mask_leaves_padding_out_of_aux_loss_and_counts(backend):
    # Routing is per token, so the masked loss and counts are those of the real tokens alone.
    layer = _small_layer(backend)
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    _, aux = layer(x, return_aux_loss=True, token_mask=mask)
    masked_counts = layer.expert_counts.clone()
    layer.reset_routing_stats()
    _, real_aux = layer(x[mask], return_aux_loss=True)
    torch.testing.assert_close(aux, real_aux)
    assert torch.equal(masked_counts, layer.expert_counts)
    layer.reset_routing_stats()
    _, unmasked = layer(x, return_aux_loss=True)
    assert abs(unmasked.item() - aux.item()) > 1e-4  # the mask did matter
    with pytest.raises(ValueError, match="token_mask has 5 elements"):
        layer(x, token_mask=torch.ones(5, dtype=torch.bool))


def test_update_stats_false_leaves_the_statistics_alone():
    layer = _small_layer()
    x = torch.randn(6, 32)
    layer(x)
    counts, last = layer.expert_counts.clone(), layer.last_aux_loss
    seen = []
    layer.register_routing_hook(lambda mod, event, y: seen.append(event.stats_updated))
    layer(torch.randn(4, 32), update_stats=False)
    assert torch.equal(layer.expert_counts, counts) and layer.last_aux_loss is last
    assert seen == [False]


# ---- model: value ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_uniform_routing_gives_k(top_k, backend):
    model = converted("llama", top_k=top_k, backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", [True, False])
def test_value_matches_a_hand_computation_and_excludes_padding(pad, backend):
    model = converted("llama", backend=backend)
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


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_added_to_the_loss_only_with_labels(backend):
    model = converted("llama", router_aux_loss_coef=0.5, backend=backend)
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, _cross_entropy(out.logits, labels) + 0.5 * out.aux_loss)
    assert not out.aux_loss.requires_grad  # a value to log; the loss carries the gradient
    no_labels = model(ids, attention_mask=mask)
    assert no_labels.loss is None
    torch.testing.assert_close(no_labels.aux_loss, out.aux_loss)
    with torch.no_grad():  # no graph, the same value
        torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels).loss, out.loss)


def test_coefficient_zero_leaves_the_loss_alone():
    model = converted("llama", router_aux_loss_coef=0.0)
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, _cross_entropy(out.logits, labels))
    assert out.aux_loss > 0


# ---- model: gradient ---------------------------------------------------------------------------

def _grads_by_hand(model, ids, mask, labels):
    """Gradients of ``cross-entropy + coef · mean(aux)`` built here: the cross-entropy from the
    logits, the aux losses from each layer's own ``return_aux_loss`` (with the token mask the
    hooks pass); the model's ``loss`` is not used."""
    coef = model.graphmoe_config.router_aux_loss_coef
    collected = []
    layers = list(gm.graphmoe_layers(model).values())
    for layer in layers:
        def forward(x, _layer=layer, **kwargs):
            y, aux = type(_layer).forward(_layer, x, return_aux_loss=True, **kwargs)
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
    (_cross_entropy(out.logits, labels) + coef * aux).backward()
    grads = trainable_grads(model)
    model.zero_grad()
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_model_gradient_equals_autograd_of_the_hand_built_loss(train, backend):
    model = converted("llama", router_aux_loss_coef=1.0, backend=backend).train(train)
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    got = trainable_grads(model)
    model.zero_grad()
    expected = _grads_by_hand(model, ids, mask, labels)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    # The aux loss really contributes: without it the router gradient differs (and the
    # coefficient is read at each forward, so a schedule can change it).
    model.graphmoe_config.router_aux_loss_coef = 0.0
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert not torch.allclose(model.get_parameter(ROUTER).grad, got[ROUTER], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["multiply", "in place"])
def test_a_scaled_loss_scales_every_gradient(backend, how):
    # Gradient accumulation divides the loss, AMP multiplies it, HF Trainer does `loss *= s`
    # in place: every gradient, the aux loss's included, must follow.
    model = converted("llama", router_aux_loss_coef=1.0, backend=backend).train()
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    full = trainable_grads(model)
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    if how == "in place":
        loss /= 4
    else:
        loss = 0.25 * loss
    loss.backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, 0.25 * full[name], rtol=1e-5, atol=1e-8, msg=name)


def test_num_items_in_batch_weights_the_aux_loss_by_the_label_share():
    # HF Trainer's gradient accumulation: loss = Σ cross-entropy / num_items_in_batch, with the
    # label tokens of all micro-batches counted; the aux loss gets this micro-batch's share.
    model = converted("llama", router_aux_loss_coef=0.5)
    ids, mask, labels = batch()
    n = int((labels[:, 1:] != -100).sum())
    total = torch.tensor(3 * n)
    out = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=total)
    expected = _cross_entropy(out.logits, labels) * n / total + 0.5 * (n / total) * out.aux_loss
    torch.testing.assert_close(out.loss, expected)
    # Without accumulation the share is exactly 1.
    alone = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(n))
    torch.testing.assert_close(alone.loss, model(ids, attention_mask=mask, labels=labels).loss)


def test_no_labels_no_aux_gradient():
    ids, mask, _ = batch()
    grads = []
    for coef in (1.0, 0.0):
        model = converted("llama", router_aux_loss_coef=coef).train()
        model(ids, attention_mask=mask).logits.square().mean().backward()
        grads.append(trainable_grads(model))
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=0, atol=0, msg=name)
