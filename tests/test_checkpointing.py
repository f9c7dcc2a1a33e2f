"""HF activation checkpointing, reentrant and not: same loss, aux loss, gradients and routing
counts as without it.

Non-reentrant checkpointing runs each layer's forward twice and reentrant checkpointing runs the
first forward without autograd, so a loss or a count collected naively is doubled or loses its
gradient. ``router_aux_loss_coef=1.0`` makes the aux loss's share of the router gradient large
enough to notice if it were lost or doubled. Dropout is on: checkpointing restores the RNG state
for the recomputation and the GraphMoE layer draws its dropout seed from that RNG, so with the
same seed the masks are the same in all three runs and the results must agree exactly enough.
"""

from __future__ import annotations

import pytest
import torch

import graphmoe_fused as gm

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, enable_checkpointing, trainable_grads


def _train_step(checkpointing: str | None, dropout: float, early_stop: bool = True):
    model = converted("llama", router_aux_loss_coef=1.0, lora_dropout=dropout).train()
    if checkpointing is not None:
        enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
    ids, mask, labels = batch()
    torch.manual_seed(1234)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
    return out.loss.detach(), out.aux_loss, trainable_grads(model), gm.routing_statistics(model)


@pytest.mark.parametrize(
    ("mode", "dropout", "early_stop"),
    [
        ("reentrant", 0.0, True),
        ("reentrant", 0.1, True),
        # Non-reentrant recomputation stops, by default, once the last saved tensor it needs is
        # rebuilt, which can be before a layer counts its routing; without early stop the whole
        # layer runs again, which is the case that would double count.
        ("non-reentrant", 0.0, False),
        ("non-reentrant", 0.1, False),
        ("non-reentrant", 0.1, True),
    ],
)
def test_checkpointing_changes_nothing(mode, dropout, early_stop):
    loss, aux, grads, stats = _train_step(None, dropout)
    ck_loss, ck_aux, ck_grads, ck_stats = _train_step(mode, dropout, early_stop)
    torch.testing.assert_close(ck_loss, loss)
    torch.testing.assert_close(ck_aux, aux)
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(ck_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, counts in stats.items():
        assert counts.sum(-1).tolist() == [2 * int(batch()[1].sum())] * 3  # counted once
        assert torch.equal(ck_stats[name], counts), name


def test_dropout_really_is_on_in_these_runs():
    # Guards the test above: with dropout the step differs from the one without it.
    assert not torch.allclose(_train_step(None, 0.1)[0], _train_step(None, 0.0)[0])


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_aux_gradient_reaches_the_router_under_checkpointing(mode):
    # The router's gradient from the aux loss alone: the difference of two coefficients.
    def router_grad(coef: float) -> torch.Tensor:
        model = converted("llama", router_aux_loss_coef=coef).train()
        enable_checkpointing(model, use_reentrant=mode == "reentrant")
        ids, mask, labels = batch()
        model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        return model.get_parameter("model.layers.0.mlp.router.weight").grad.clone()

    aux_part = router_grad(1.0) - router_grad(0.0)
    assert aux_part.abs().max() > 1e-4
    # Linear in the coefficient: neither lost (0) nor doubled.
    torch.testing.assert_close(router_grad(0.5) - router_grad(0.0), 0.5 * aux_part,
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_a_scaled_loss_scales_every_gradient_under_checkpointing(mode):
    # Gradient accumulation divides the loss: the aux gradient, injected during the recompute,
    # must be divided too.
    _, _, grads, _ = _train_step(None, 0.0)
    model = converted("llama", router_aux_loss_coef=1.0).train()
    enable_checkpointing(model, use_reentrant=mode == "reentrant")
    ids, mask, labels = batch()
    (0.25 * model(ids, attention_mask=mask, labels=labels, use_cache=False).loss).backward()
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, 0.25 * grads[name], rtol=1e-5, atol=1e-8, msg=name)
