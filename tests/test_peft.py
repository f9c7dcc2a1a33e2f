"""PEFT and GraphMoE in both orders: both sides train, both are saved, and a save → load round trip
gives back the same model bit for bit (``PeftModel.from_pretrained`` on a freshly converted base,
and ``gm.from_pretrained``)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import graphmoe_fused as gm
from graphmoe_fused.hf.adapters import CONFIG_NAME, adapter_state_dict

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, graphmoe_config, randomize_adapters_, tiny_model

peft = pytest.importorskip("peft")
# PEFT (0.21) calls a transformers 5.24 API that transformers itself deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

ORDERS = ["graphmoe_then_peft", "peft_then_graphmoe"]
# PEFT's own LoRA tensors, and GraphMoE's (expert factors, router, GRU, attention LoRA whether or
# not PEFT wraps the projection), by state-dict name: written out here, not taken from the library.
PEFT_PARAM = re.compile(r"\.lora_[AB]\.default\.weight$")
GRAPHMOE_PARAM = re.compile(
    r"\.mlp\.(router\.weight|lora_[AB]_(gate|up|down)|gru\.(weight_[zrog]|bias_o))$"
    r"|_proj(\.base_layer)?\.lora_[AB]$"
)


def lora_config(targets=("q_proj", "v_proj"), **overrides):
    # init_lora_weights=False: a non-zero B, so that a bug dropping PEFT's delta shows in logits
    values = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": list(targets),
              "init_lora_weights": False}
    return peft.LoraConfig(**{**values, **overrides})


def build(order: str, attention_lora: bool = False, seed: int = 0):
    """A PeftModel with GraphMoE layers, every adapter tensor of both sides non-zero."""
    if order == "graphmoe_then_peft":
        model = converted("llama", seed=seed, attention_lora=attention_lora)
        return gm.get_peft_model(model, lora_config())
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_model("llama", seed=seed), lora_config())
    gm.apply_graphmoe(model, graphmoe_config(attention_lora=attention_lora))
    randomize_adapters_(model, seed)
    return model


def fresh_converted_base(attention_lora: bool = False, seed: int = 0):
    """What a user rebuilds before PeftModel.from_pretrained: the same base, converted with the
    same config, GraphMoE tensors at their (different) init."""
    return gm.apply_graphmoe(tiny_model("llama", seed=seed),
                             graphmoe_config(attention_lora=attention_lora))


def logits(model):
    ids, mask, _ = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected_trainable(model):
    """PEFT's LoRA and GraphMoE's tensors: what must train, whatever the library says."""
    names = (n for n, _ in model.named_parameters())
    return {n for n in names if PEFT_PARAM.search(n) or GRAPHMOE_PARAM.search(n)}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differing, differing[:5]


# (peft_then_graphmoe with attention_lora is refused: PEFT already adapts q/v_proj, test_refusals)
@pytest.mark.parametrize("order, attention_lora", [(ORDERS[0], False), (ORDERS[0], True),
                                                   (ORDERS[1], False)])
def test_both_sides_are_trainable_and_nothing_else(order, attention_lora):
    model = build(order, attention_lora)
    expected = expected_trainable(model)
    assert trainable(model) == expected
    assert any(PEFT_PARAM.search(n) for n in expected)
    # per layer: router, 6 expert factors, 5 GRU tensors (+ A and B of q/k/v/o)
    assert sum(bool(GRAPHMOE_PARAM.search(n)) for n in expected) == 2 * (12 + 8 * attention_lora)


@pytest.mark.parametrize("order", ORDERS)
def test_a_training_step_changes_both_sides_and_nothing_else(order):
    model = build(order).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable(model)
    assert any(PEFT_PARAM.search(n) for n in changed)
    assert any(".mlp.router." in n for n in changed) and any(".mlp.gru." in n for n in changed)


@pytest.mark.parametrize("order", ORDERS)
def test_peft_save_load_round_trip_is_bit_exact(tmp_path, order):
    model = build(order).eval()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.mlp.gru.weight_g" in keys
    assert "base_model.model.model.layers.0.mlp.lora_B_down" in keys
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == model.graphmoe_config.to_dict()

    base = fresh_converted_base()
    assert not torch.equal(logits(base), logits(model))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


def test_nested_lora_round_trip(tmp_path):
    """GraphMoE's attention LoRA under PEFT's LoRA on the same projections."""
    model = build("graphmoe_then_peft", attention_lora=True).eval()
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh_converted_base(attention_lora=True), tmp_path)
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("order", ORDERS)
def test_one_call_load_of_a_peft_adapter(tmp_path, order):
    tiny_model("llama", seed=0).save_pretrained(tmp_path / "base")
    model = build(order).eval()
    model.save_pretrained(tmp_path / "adapter")
    loaded = gm.from_pretrained(tmp_path / "base", tmp_path / "adapter")
    assert isinstance(loaded, peft.PeftModel)
    assert torch.equal(logits(loaded), logits(model))
    assert_same_state(loaded, model)
    assert trainable(loaded) == set()
    again = gm.from_pretrained(tmp_path / "base", tmp_path / "adapter", is_trainable=True)
    assert trainable(again) == expected_trainable(again)


def test_plain_peft_freezes_graphmoe_until_prepared():
    model = converted("llama", attention_lora=False)
    wrapped = peft.get_peft_model(model, lora_config())
    assert not any(GRAPHMOE_PARAM.search(n) for n in trainable(wrapped))  # PEFT's doing
    assert gm.prepare_peft_model(wrapped) is wrapped
    assert trainable(wrapped) == expected_trainable(wrapped)
    gm.prepare_peft_model(wrapped)  # idempotent


def test_loaded_then_prepared_model_trains_and_saves_again(tmp_path):
    model = build("graphmoe_then_peft").eval()
    model.save_pretrained(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(fresh_converted_base(), tmp_path / "a",
                                            is_trainable=True)
    gm.prepare_peft_model(loaded)
    assert trainable(loaded) == expected_trainable(loaded)
    loaded.save_pretrained(tmp_path / "b")
    again = peft.PeftModel.from_pretrained(fresh_converted_base(), tmp_path / "b")
    assert torch.equal(logits(again), logits(model))


def test_inference_mode_freezes_graphmoe_too(tmp_path):
    build("graphmoe_then_peft").save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh_converted_base(), tmp_path)
    gm.prepare_peft_model(loaded)
    assert trainable(loaded) == set()


def test_trainer_style_save_takes_the_given_state_dict(tmp_path):
    model = build("graphmoe_then_peft").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "base_model.model.model.layers.0.mlp.router.weight"
    state[key] += 1.0
    model.save_pretrained(tmp_path, state_dict=state)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor(key), state[key])


def test_bin_format_and_extra_adapters(tmp_path):
    model = build("graphmoe_then_peft").eval()
    model.add_adapter("other", lora_config())
    model.save_pretrained(tmp_path, safe_serialization=False)
    for directory in (tmp_path, tmp_path / "other"):
        state = torch.load(directory / "adapter_model.bin", weights_only=True)
        assert "base_model.model.model.layers.1.mlp.gru.weight_g" in state
        assert (directory / CONFIG_NAME).is_file()
    loaded = peft.PeftModel.from_pretrained(fresh_converted_base(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_adapter_saved_from_a_peft_model_loads_into_a_plain_model(tmp_path):
    """save_adapter names tensors as the unwrapped model does (no base_model.model., no
    base_layer), so the GraphMoE adapter is independent of how PEFT wrapped the model."""
    model = build("graphmoe_then_peft", attention_lora=True).eval()
    gm.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "graphmoe_adapter.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.lora_A" in keys
    assert not any("base_model" in k or "base_layer" in k for k in keys)
    plain = gm.load_adapter(tiny_model("llama"), tmp_path)
    merged = model.get_base_model()
    for name, tensor in adapter_state_dict(plain).items():
        assert torch.equal(tensor, adapter_state_dict(merged)[name])


def test_refusals():
    with pytest.raises(TypeError, match=r"mlp\.gate_proj is wrapped by PEFT"):
        gm.apply_graphmoe(peft.get_peft_model(tiny_model("llama"), lora_config(["gate_proj"])),
                          graphmoe_config())
    with pytest.raises(TypeError, match="attention_lora=False"):
        gm.apply_graphmoe(peft.get_peft_model(tiny_model("llama"), lora_config()),
                          graphmoe_config(attention_lora=True))
    # Refused before PEFT wraps anything: the model is as it was, and a corrected config works.
    model = converted("llama")
    before = {n: (type(m), [p.requires_grad for p in m.parameters(recurse=False)])
              for n, m in model.named_modules()}
    for config in (lora_config(["up_proj", "q_proj"]), lora_config(target_modules="all-linear")):
        with pytest.raises(ValueError, match="Leave gate_proj/up_proj/down_proj out"):
            gm.get_peft_model(model, config)
        assert {n: (type(m), [p.requires_grad for p in m.parameters(recurse=False)])
                for n, m in model.named_modules()} == before
    assert gm.count_parameters(gm.get_peft_model(model, lora_config())).trainable > 0
    with pytest.raises(TypeError, match="expects a peft.PeftModel"):
        gm.prepare_peft_model(converted("llama"))
    with pytest.raises(ValueError, match="holds no GraphMoE layers"):
        gm.prepare_peft_model(peft.get_peft_model(tiny_model("llama"), lora_config()))


def test_loading_onto_another_base_warns(tmp_path):
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "other_base")
    build("graphmoe_then_peft").save_pretrained(tmp_path / "adapter")
    with pytest.warns(UserWarning, match="trained on base model .* loaded onto .*other_base"):
        gm.from_pretrained(tmp_path / "other_base", tmp_path / "adapter")
