"""GraphMoEMLP as a module: built from a LLaMA MLP, identity at init, bookkeeping, every error,
the default backend, and what layer.py may import.

The tests that run the layer run it on ``reference`` and on ``torch`` (what the default ``auto``
resolves to on a CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import graphmoe_fused as gm
import graphmoe_fused.backends as backends
from graphmoe_fused.backends import get_backend, resolve_backend

from .helpers import imported_modules, make_layer, randomize_
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)


def _llama_mlp(hidden=32, intermediate=48, seed=0, **overrides) -> LlamaMLP:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, **overrides))


BACKENDS = ["reference", "torch"]


def _cfg(**overrides):
    values = {"num_experts": 4, "top_k": 2, "lora_r": 4, "backend": "reference",
              "gru_hidden_ratio": 0.25}
    return gm.GraphMoEConfig(**{**values, **overrides})


def _load_balancing_loss(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Eq. 8 per round, written out: ``n · Σ_i f_i P_i``, ``f_i`` the share of tokens that chose
    expert ``i`` (summing to k) and ``P_i`` its mean router probability."""
    num_rounds, num_tokens, n = probs.shape
    losses = []
    for t in range(num_rounds):
        f = torch.stack([(index[t] == i).sum() for i in range(n)]).to(probs.dtype) / num_tokens
        losses.append(n * (f * probs[t].mean(0)).sum())
    return torch.stack(losses)


def test_from_mlp_shares_the_base_weights_and_freezes_them():
    mlp = _llama_mlp()
    layer = gm.GraphMoEMLP.from_mlp(mlp, _cfg())
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert getattr(layer, name) is getattr(mlp, name)
        assert getattr(layer, name).weight.data_ptr() == getattr(mlp, name).weight.data_ptr()
        assert not getattr(layer, name).weight.requires_grad


def test_parameter_names_and_shapes_are_the_contract():
    d, dff, n, r = 32, 48, 4, 4
    layer = gm.GraphMoEMLP.from_mlp(_llama_mlp(d, dff), _cfg())
    dh = int(0.25 * d)
    expected = {
        "gate_proj.weight": (dff, d), "up_proj.weight": (dff, d), "down_proj.weight": (d, dff),
        "router.weight": (n, d),
        "lora_A_gate": (n, r, d), "lora_B_gate": (n, dff, r), "lora_A_up": (n, r, d),
        "lora_B_up": (n, dff, r), "lora_A_down": (n, r, dff), "lora_B_down": (n, d, r),
        "gru.weight_z": (dh, dh + d), "gru.weight_r": (dh, dh + d), "gru.weight_o": (dh, dh + d),
        "gru.bias_o": (dh,), "gru.weight_g": (d, dh),
    }
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == expected
    assert "expert_counts" not in layer.state_dict()  # statistics are not checkpointed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rounds", [1, 3])
def test_fresh_layer_computes_the_base_mlp(rounds, backend):
    mlp = _llama_mlp()
    layer = gm.GraphMoEMLP.from_mlp(mlp, _cfg(num_rounds=rounds, backend=backend)).train()
    assert layer.config.lora_dropout > 0  # dropout on: B = 0 makes it irrelevant
    assert all(torch.count_nonzero(b) == 0 for b in (layer.lora_B_gate, layer.lora_B_up,
                                                     layer.lora_B_down))
    assert torch.count_nonzero(layer.gru.weight_g) == 0
    x = torch.randn(2, 5, 32)
    # w1·E + w2·E with w1 + w2 = 1 may round differently from E by an ulp or so.
    torch.testing.assert_close(layer(x), mlp(x), rtol=1.3e-6, atol=1e-6)


def test_init_distributions():
    torch.manual_seed(0)
    layer = gm.GraphMoEMLP(64, 96, _cfg(num_experts=8, lora_r=8))
    assert abs(layer.router.weight.std().item() - 0.02) < 0.004
    bound = 1 / 64 ** 0.5  # kaiming-uniform(a=√5) with fan_in = d, per expert
    assert layer.lora_A_gate.abs().max() <= bound
    assert layer.lora_A_gate.abs().max() > 0.9 * bound
    assert layer.lora_A_down.abs().max() <= 1 / 96 ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_counts_accumulate_and_reset(backend):
    layer = make_layer(backend=backend, num_experts=4, top_k=3, num_rounds=2)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(5, 32, generator=g), torch.randn(2, 3, 32, generator=g)]
    expected = torch.zeros(2, 4, dtype=torch.long)
    for x in inputs:
        layer(x)
        # What the backend chose, counted here: per round, the tokens that picked each expert.
        index = get_backend(backend)(x.reshape(-1, 32), layer.params(),
                                     layer.round_options()).expert_index
        expected += torch.stack([torch.bincount(index[t].reshape(-1), minlength=4)
                                 for t in range(2)])
    counts = layer.expert_counts
    assert counts.dtype == torch.long
    assert torch.equal(counts, expected)
    assert counts.sum(-1).tolist() == [3 * 11] * 2  # k selections per token per round
    assert (counts > 0).sum() > 4  # not all on one expert per round
    assert layer.last_aux_loss.shape == (2,)
    layer.reset_routing_stats()
    assert counts.sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_aux_loss(backend):
    layer = make_layer(backend=backend, num_rounds=2)
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    y, aux = layer(x, return_aux_loss=True)
    assert y.shape == x.shape and aux.shape == () and aux.requires_grad
    out = get_backend(backend)(x.reshape(-1, 32), layer.params(), layer.round_options())
    expected = _load_balancing_loss(out.router_probs, out.expert_index)
    torch.testing.assert_close(layer.last_aux_loss, expected.detach())
    torch.testing.assert_close(aux, expected.mean())
    torch.testing.assert_close(y, out.y.view(x.shape), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)  # the flag changes nothing else
    # the loss is differentiable through the router probabilities: it reaches the router
    (grad,) = torch.autograd.grad(aux, [layer.router.weight])
    assert torch.count_nonzero(grad) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    layer = make_layer(backend=backend)
    x = torch.randn(0, 32, requires_grad=True)
    y, aux = layer(x, return_aux_loss=True)
    assert y.shape == (0, 32) and aux.item() == 0.0
    (y.sum() + aux).backward()
    assert x.grad.shape == (0, 32)
    grad = layer.router.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    assert layer.expert_counts.sum() == 0


# ---- the default backend ------------------------------------------------------------------------

@pytest.mark.parametrize("needs_grad", [False, True])
def test_auto_resolves_to_torch_on_cpu(needs_grad):
    assert gm.GraphMoEConfig().backend == "auto"
    assert resolve_backend("auto", torch.device("cpu"), needs_grad) == "torch"
    for name in ("reference", "torch", "triton"):
        assert resolve_backend(name, torch.device("cpu"), needs_grad) == name


def test_the_default_path_computes_what_the_torch_backend_does(monkeypatch):
    # The paper's defaults (n = 8, r = 16: the grouped expert plan on a CPU), dropout included.
    layers = {}
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        layer = gm.GraphMoEMLP(32, 48, gm.GraphMoEConfig(backend=backend))
        layers[backend] = randomize_(layer, seed=3).train()
    assert layers["auto"].config == gm.GraphMoEConfig()
    calls = []
    for name, fn in list(backends.BACKENDS.items()):
        def spy(*args, _name=name, _fn=fn, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setitem(backends.BACKENDS, name, spy)

    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for backend, layer in layers.items():
        calls.clear()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the dropout seed comes from the global generator
        y, aux = layer(xi, return_aux_loss=True)
        (y.square().sum() + aux).backward()
        assert calls == ["torch"], backend
        results[backend] = (y, aux, xi.grad, {n: p.grad for n, p in layer.named_parameters()
                                               if p.requires_grad}, layer.expert_counts.clone())
    (y, aux, gx, grads, counts), (y_t, aux_t, gx_t, grads_t, counts_t) = results.values()
    assert torch.equal(y, y_t) and torch.equal(aux, aux_t) and torch.equal(gx, gx_t)
    assert torch.equal(counts, counts_t)
    assert grads.keys() == grads_t.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_t[name]), name


# ---- architecture -------------------------------------------------------------------------------

def test_the_layer_imports_nothing_from_the_hf_package():
    # The layer is a plain module; the Hugging Face integration builds on it, not the reverse.
    imports = imported_modules("graphmoe_fused.layer", transitive=True)
    assert "graphmoe_fused.config" in imports  # the walk read layer.py
    assert not sorted(m for m in imports if _within(m, ["graphmoe_fused.hf"]))


def _within(module: str, packages: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# ---- errors -----------------------------------------------------------------------------------

def test_wrong_last_dimension():
    layer = make_layer(backend="reference")
    with pytest.raises(ValueError, match="hidden_size=32"):
        layer(torch.randn(4, 31))


def test_zero_dimensional_input():
    layer = make_layer(backend="reference")
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.tensor(1.0))


def test_dtype_mismatch_outside_autocast():
    layer = make_layer(backend="reference")
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, 32, dtype=torch.float64))


def test_non_floating_input():
    layer = make_layer(backend="reference")
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(4, 32, dtype=torch.long))


def test_non_tensor_input():
    layer = make_layer(backend="reference")
    with pytest.raises(TypeError, match="tensor"):
        layer([[0.0] * 32])


def test_wrong_device():
    layer = make_layer(backend="reference")
    with pytest.raises(ValueError, match="meta"):
        layer(torch.empty(4, 32, device="meta"))


def test_unknown_backend_is_refused_at_config_time():
    with pytest.raises(ValueError, match="backend"):
        _cfg(backend="cutlass")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("cutlass")


def test_from_mlp_needs_swiglu_projections():
    class GeluMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 48), nn.Linear(48, 32)

    with pytest.raises(TypeError, match="gate_proj"):
        gm.GraphMoEMLP.from_mlp(GeluMLP(), _cfg())


def test_from_mlp_needs_silu():
    with pytest.raises(ValueError, match="SiLU"):
        gm.GraphMoEMLP.from_mlp(_llama_mlp(hidden_act="gelu"), _cfg())


def test_from_mlp_refuses_biased_projections():
    with pytest.raises(ValueError, match="bias"):
        gm.GraphMoEMLP.from_mlp(_llama_mlp(mlp_bias=True), _cfg())


def test_lora_linear_keeps_the_base_keys_and_starts_as_identity():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=True)
    lora = gm.LoRALinear(base, r=4, alpha=8, dropout=0.1)
    assert isinstance(lora, nn.Linear)
    assert lora.weight is base.weight and lora.bias is base.bias
    assert list(lora.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    assert not lora.weight.requires_grad and lora.lora_A.requires_grad
    x = torch.randn(3, 16)
    lora.train()
    torch.testing.assert_close(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    lora.eval()
    expected = base(x) + 2.0 * x @ lora.lora_A.T @ lora.lora_B.T
    torch.testing.assert_close(lora(x), expected)
    with pytest.raises(ValueError, match="already"):
        gm.LoRALinear(lora, r=4, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        gm.LoRALinear(base, r=0, alpha=8)
