"""Training works end to end through a converted model, on every backend: the loss falls on a
fixed batch, and the demo's copy task is learnt. The command line is tested in test_cli.py.

The ``triton`` backend runs under the Triton interpreter on the CPU (``TRITON_INTERPRET=1``, set
by conftest), which is slow: its tests are tiny (d=32, a few steps).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import graphmoe_fused.backends as backends_module
from graphmoe_fused.cli.demo import BOS, PAD, SEP, DemoOptions, copy_batch, run_demo

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted

# Run everywhere; ``auto`` trains on torch on any device (and evaluates on torch off CUDA).
BACKENDS_ON_THIS_MACHINE = ["reference", "torch", "auto"]
CPU = torch.device("cpu")
# The triton test runs the real kernels on a GPU and the interpreter (conftest) elsewhere.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def backend_calls(monkeypatch) -> list[str]:
    """The name of every backend a GraphMoE layer called, in order."""
    calls: list[str] = []
    for name, function in list(backends_module.BACKENDS.items()):
        def spy(*args, _name=name, _function=function):
            calls.append(_name)
            return _function(*args)

        monkeypatch.setitem(backends_module.BACKENDS, name, spy)
    return calls


def _train_steps(model, ids, mask, labels, steps, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", BACKENDS_ON_THIS_MACHINE)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_loss_decreases_on_a_fixed_batch(arch, backend, backend_calls):
    model = converted(arch, randomize=False, lora_dropout=0.05, backend=backend).train()
    ids, mask, labels = batch(batch_size=4, seq_len=8, seed=3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train_steps(model, ids, mask, labels, steps=10)
    expected = backends_module.resolve_backend(backend, CPU, needs_grad=True)
    assert expected == ("torch" if backend == "auto" else backend)
    assert backend_calls and set(backend_calls) == {expected}, set(backend_calls)
    # The base model (embeddings and head included) is frozen and random: the loss falls
    # steadily rather than fast.
    assert losses[-1] < losses[0] - 0.3, losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 8, losses
    for name, p in model.named_parameters():  # AdamW never touched the base model
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


def test_copy_batch_layout():
    ids, mask, labels = copy_batch(16, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ids.shape == mask.shape == labels.shape == (16, 8)
    for row, row_mask, row_labels in zip(ids, mask, labels, strict=True):
        n = int((row != PAD).sum() - 2) // 2
        assert row[0] == BOS and row[n + 1] == SEP
        assert torch.equal(row[1 : n + 1], row[n + 2 : 2 * n + 2])
        assert torch.equal(row_labels[n + 2 : 2 * n + 2], row[1 : n + 1])
        assert (row_labels[: n + 2] == -100).all() and (row_labels[2 * n + 2 :] == -100).all()
        assert row_mask.sum() == 2 * n + 2


@pytest.mark.parametrize("backend", BACKENDS_ON_THIS_MACHINE)
def test_run_demo_learns_and_reports(backend, backend_calls):
    lines = []
    result = run_demo(DemoOptions(steps=12, backend=backend, progress=False, experts=4,
                                  rounds=2, device="cpu"), log=lines.append)
    assert result.backend == backend
    assert set(backend_calls) == {"torch" if backend == "auto" else backend}
    expected = "backend=auto (torch)" if backend == "auto" else f"backend={backend} "
    assert expected in lines[0], lines[0]
    assert len(result.losses) == len(result.aux_losses) == 12
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.3, result.losses
    assert all(0 < a <= 4 for a in result.aux_losses)  # n·Σ f_i P_i with f_i <= 1, Σ P_i = 1
    assert list(result.workload) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for fractions in result.workload.values():
        assert fractions.shape == (2, 4)
        torch.testing.assert_close(fractions.sum(-1), torch.ones(2, dtype=torch.float64))
    assert result.report.trainable > 0 and "trainable%" in "\n".join(lines)



@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (Linux only)")
def test_triton_backend_trains_like_torch(backend_calls):
    """Tiny (d=32, 2 steps): under the interpreter every kernel launch runs in numpy."""
    ids, mask, labels = (t.to(TRITON_DEVICE) for t in batch(batch_size=2, seq_len=6, seed=3))
    models = {name: converted("llama", backend=name).train().to(TRITON_DEVICE)
              for name in ("torch", "triton")}
    losses, grads = {}, {}
    for name, model in models.items():
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert "triton" in backend_calls  # the kernels ran, forward and backward
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4, abs=1e-5)
    assert grads["triton"].keys() == grads["torch"].keys()
    for n, g in grads["triton"].items():
        assert g is not None and torch.isfinite(g).all(), n
        # fp32 through different algebra: a few ulps of each tensor's largest entry (a fixed
        # atol would be wider than some whole gradients: W_r's are ~2e-5 here).
        want = grads["torch"][n]
        torch.testing.assert_close(g, want, rtol=0, atol=3e-5 * want.abs().max().item(),
                                   msg=n)

    model = models["triton"]
    model.zero_grad(set_to_none=True)
    losses = _train_steps(model, ids, mask, labels, steps=2)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], losses
