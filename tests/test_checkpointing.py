"""HF activation checkpointing, reentrant and not: same loss, aux loss, gradients and routing
counts as without it, for the ``reference`` and ``torch`` backends.

Non-reentrant checkpointing runs each layer's forward twice and reentrant checkpointing runs the
first forward without autograd, so a loss or a count collected naively is doubled or loses its
gradient (reentrant checkpointing is what the aux loss's fallback path, injection during the
recomputation, exists for). ``router_aux_loss_coef=1.0`` makes the aux loss's share of the
router gradient large enough to notice if it were lost or doubled. Dropout is on: checkpointing
restores the RNG state for the recomputation and the GraphMoE layer draws its dropout seed from
that RNG, so with the same seed the masks are the same in all runs and the results must agree
exactly enough.
"""

from __future__ import annotations

import pytest
import torch

import graphmoe_fused as gm

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, enable_checkpointing, trainable_grads

BACKENDS = ["reference", "torch"]
ROUTER = "model.layers.0.mlp.router.weight"


def _checkpointed(model, mode: str | None, every_n_layers: int = 1):
    if mode is not None:
        enable_checkpointing(model, use_reentrant=mode == "reentrant",
                             every_n_layers=every_n_layers)
    return model


def _train_step(backend: str, checkpointing: str | None, dropout: float, early_stop: bool = True,
                every_n_layers: int = 1, scale: float | None = None):
    model = converted("llama", router_aux_loss_coef=1.0, lora_dropout=dropout,
                      backend=backend).train()
    _checkpointed(model, checkpointing, every_n_layers)
    ids, mask, labels = batch()
    torch.manual_seed(1234)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        loss = out.loss
        if scale is not None:
            loss *= scale  # in place, as HF Trainer does
        loss.backward()
    return out.loss.detach(), out.aux_loss, trainable_grads(model), gm.routing_statistics(model)


@pytest.mark.parametrize("backend", BACKENDS)
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
def test_checkpointing_changes_nothing(mode, dropout, early_stop, backend):
    loss, aux, grads, stats = _train_step(backend, None, dropout)
    ck_loss, ck_aux, ck_grads, ck_stats = _train_step(backend, mode, dropout, early_stop)
    torch.testing.assert_close(ck_loss, loss)
    torch.testing.assert_close(ck_aux, aux)
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(ck_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, counts in stats.items():
        assert counts.sum(-1).tolist() == [2 * int(batch()[1].sum())] * 3  # counted once
        assert torch.equal(ck_stats[name], counts), name


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointing_some_layers_changes_nothing(mode):
    # every_n_layers=2 checkpoints layer 0 only: under reentrant checkpointing one layer's aux
    # loss has a graph and the other's is filled in during the recomputation.
    _, _, grads, stats = _train_step("torch", None, 0.0)
    _, _, ck_grads, ck_stats = _train_step("torch", mode, 0.0, every_n_layers=2)
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, counts in stats.items():
        assert torch.equal(ck_stats[name], counts), name


def test_dropout_really_is_on_in_these_runs():
    # Guards the test above: with dropout the step differs from the one without it.
    assert not torch.allclose(_train_step("reference", None, 0.1)[0],
                              _train_step("reference", None, 0.0)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_aux_gradient_reaches_the_router_under_checkpointing(mode, backend):
    # The router's gradient from the aux loss alone: the difference of two coefficients.
    def router_grad(coef: float, checkpointing: bool = True) -> torch.Tensor:
        model = converted("llama", router_aux_loss_coef=coef, backend=backend).train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant=mode == "reentrant")
        ids, mask, labels = batch()
        model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        return model.get_parameter(ROUTER).grad.clone()

    aux_part = router_grad(1.0) - router_grad(0.0)
    assert aux_part.abs().max() > 1e-4
    # What it is without checkpointing: neither lost (0) nor doubled (the recomputed forward's
    # aux loss counted again).
    without = router_grad(1.0, checkpointing=False) - router_grad(0.0, checkpointing=False)
    torch.testing.assert_close(aux_part, without, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("scale", [0.25, 1024.0])
def test_a_scaled_loss_scales_every_gradient_under_checkpointing(mode, backend, scale):
    # Gradient accumulation divides the loss, AMP's loss scaler multiplies it, both may do it
    # in place: the aux gradient (injected during the recomputation, with reentrant
    # checkpointing) must be scaled too.
    _, _, grads, _ = _train_step(backend, None, 0.0)
    _, _, ck_grads, _ = _train_step(backend, mode, 0.0, scale=scale)
    for name, grad in ck_grads.items():
        torch.testing.assert_close(grad, scale * grads[name], rtol=1e-5, atol=1e-8 * scale,
                                   msg=name)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_the_triton_backend_under_checkpointing_trains_as_the_reference(mode):
    # A tiny HF model trained through the Triton kernels (forward and expert backward, under the
    # interpreter on a CPU), activation checkpointing on, against the reference without it:
    # same loss, aux loss, routing and gradients, the load-balancing part included.
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the tiny models of these tests live on the CPU")
    ids, mask, labels = batch(2, 5)
    results = {}
    for backend, checkpointing in (("reference", None), ("triton", mode)):
        model = converted("llama", router_aux_loss_coef=1.0, lora_dropout=0.1,
                          backend=backend).train()
        _checkpointed(model, checkpointing, 1)
        torch.manual_seed(1234)
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        (0.5 * out.loss).backward()
        results[backend] = (out.loss.detach(), out.aux_loss, trainable_grads(model),
                            gm.routing_statistics(model))
    (loss, aux, grads, stats), (t_loss, t_aux, t_grads, t_stats) = results.values()
    assert all(torch.equal(t_stats[n], stats[n]) for n in stats)
    torch.testing.assert_close(t_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(t_aux, aux, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        scale = grad.abs().max()
        assert scale > 0, name
        # fp32 through other summation orders (measured ≤ 1e-6 of the largest entry).
        torch.testing.assert_close(t_grads[name], grad, rtol=0, atol=3e-5 * scale, msg=name)
