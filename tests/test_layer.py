"""GraphMoEMLP as a module: built from a LLaMA MLP, identity at init, bookkeeping, every error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import graphmoe_fused as gm
from graphmoe_fused.backends import get_backend

from .helpers import make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)


def _llama_mlp(hidden=32, intermediate=48, seed=0, **overrides) -> LlamaMLP:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, **overrides))


def _cfg(**overrides):
    values = {"num_experts": 4, "top_k": 2, "lora_r": 4, "backend": "reference",
              "gru_hidden_ratio": 0.25}
    return gm.GraphMoEConfig(**{**values, **overrides})


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


@pytest.mark.parametrize("rounds", [1, 3])
def test_fresh_layer_computes_the_base_mlp(rounds):
    mlp = _llama_mlp()
    layer = gm.GraphMoEMLP.from_mlp(mlp, _cfg(num_rounds=rounds)).train()  # dropout on: B = 0
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


def test_expert_counts_accumulate_and_reset():
    layer = make_layer(backend="reference", num_experts=4, top_k=2, num_rounds=3)
    layer(torch.randn(5, 32))
    layer(torch.randn(2, 3, 32))
    counts = layer.expert_counts
    assert counts.shape == (3, 4) and counts.dtype == torch.long
    assert counts.sum(-1).tolist() == [2 * 11] * 3  # k selections per token per round
    assert layer.last_aux_loss.shape == (3,)
    layer.reset_routing_stats()
    assert counts.sum() == 0


def test_return_aux_loss():
    layer = make_layer(backend="reference", num_rounds=2)
    x = torch.randn(3, 4, 32)
    y, aux = layer(x, return_aux_loss=True)
    assert y.shape == x.shape and aux.shape == () and aux.requires_grad
    torch.testing.assert_close(aux.detach(), layer.last_aux_loss.mean())
    torch.testing.assert_close(y, layer(x))


def test_zero_tokens():
    layer = make_layer(backend="reference")
    y, aux = layer(torch.randn(0, 32), return_aux_loss=True)
    assert y.shape == (0, 32) and aux.item() == 0.0


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
