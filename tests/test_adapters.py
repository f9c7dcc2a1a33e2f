"""save_adapter / load_adapter: only the GraphMoE tensors are written, a round trip reproduces the
model's outputs, and every mismatch is refused with a clear error."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import graphmoe_fused as gm
from graphmoe_fused.hf.adapters import (
    BASE_MODEL_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    base_model_fingerprint,
)

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, randomize_adapters_, tiny_model


def _logits(model):
    ids, mask, _ = batch()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_into_an_unconverted_model(tmp_path, arch):
    trained = converted(arch, seed=0)
    directory = gm.save_adapter(trained, tmp_path / "adapter")
    fresh = tiny_model(arch, seed=0)  # the same base weights, not converted
    gm.load_adapter(fresh, directory)
    assert fresh.graphmoe_config == trained.graphmoe_config
    torch.testing.assert_close(_logits(fresh), _logits(trained), rtol=0, atol=0)


def test_round_trip_into_a_converted_model(tmp_path):
    trained = converted("llama", seed=0)
    gm.save_adapter(trained, tmp_path)
    other = converted("llama", seed=0, randomize=False)
    assert not torch.equal(_logits(other), _logits(trained))
    params_before = {n: p for n, p in other.named_parameters()}
    gm.load_adapter(other, tmp_path)
    torch.testing.assert_close(_logits(other), _logits(trained), rtol=0, atol=0)
    # loaded in place: an optimizer built before the load still holds the model's parameters
    assert all(p is params_before[n] for n, p in other.named_parameters())


def test_only_adapter_tensors_and_the_config_are_written(tmp_path):
    model = converted("llama", num_experts=3, top_k=1)
    gm.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable == set(adapter_state_dict(model))
    assert not any(k.endswith(("gate_proj.weight", "q_proj.weight", "embed_tokens.weight"))
                   for k in tensors)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved == model.graphmoe_config.to_dict()
    assert gm.load_adapter_config(tmp_path) == model.graphmoe_config


def test_overrides_apply_when_converting(tmp_path):
    gm.save_adapter(converted("llama", backend="reference"), tmp_path)
    model = gm.load_adapter(tiny_model("llama"), tmp_path, router_aux_loss_coef=0.5)
    assert model.graphmoe_config.router_aux_loss_coef == 0.5
    with pytest.raises(ValueError, match="only when load_adapter converts"):
        gm.load_adapter(model, tmp_path, backend="reference")


def test_runtime_fields_may_differ(tmp_path):
    gm.save_adapter(converted("llama", lora_dropout=0.1), tmp_path)
    model = converted("llama", randomize=False, lora_dropout=0.0, router_aux_loss_coef=0.2)
    gm.load_adapter(model, tmp_path)  # dropout and aux coefficient do not shape the weights


def test_refuses_a_model_converted_differently(tmp_path):
    gm.save_adapter(converted("llama"), tmp_path)
    model = converted("llama", top_k=1, num_rounds=2)
    with pytest.raises(ValueError, match=r"num_rounds: model 2 vs adapter 3.*top_k: model 1"):
        gm.load_adapter(model, tmp_path)


def test_refuses_missing_and_unexpected_keys(tmp_path):
    model = converted("llama")
    gm.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    removed = tensors.pop("model.layers.1.mlp.router.weight")
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.router\.weight'\]"):
        gm.load_adapter(converted("llama"), tmp_path)
    tensors["model.layers.1.mlp.router.weight"] = removed
    tensors["model.layers.7.mlp.router.weight"] = removed.clone()
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"unexpected \['model\.layers\.7\.mlp\.router\.weight'\]"):
        gm.load_adapter(converted("llama"), tmp_path)


def test_refuses_a_shape_mismatch(tmp_path):
    gm.save_adapter(converted("llama"), tmp_path)
    wider = tiny_model("llama", intermediate_size=40)
    expected = r"lora_A_down has shape \(4, 4, 48\), the model expects \(4, 4, 40\)"
    with pytest.raises(ValueError, match=expected):
        gm.load_adapter(wider, tmp_path)


def test_refuses_to_save_an_unconverted_model(tmp_path):
    with pytest.raises(ValueError, match="apply_graphmoe"):
        gm.save_adapter(tiny_model("llama"), tmp_path)


def test_refuses_a_directory_without_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        gm.load_adapter(tiny_model("llama"), tmp_path)


# ----------------------------------------------------------------------- base model identity


def _named(model, name):
    model.config._name_or_path = name
    return model


def _rewrite_identity(directory, identity):
    """The adapter file with its recorded base identity replaced (``None``: removed, as in
    adapters saved before identities were recorded)."""
    path = str(directory / WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    metadata.pop(BASE_MODEL_KEY)
    if identity is not None:
        metadata[BASE_MODEL_KEY] = json.dumps(identity)
    save_file(tensors, path, metadata=metadata)


def test_the_adapter_records_its_base(tmp_path):
    model = _named(converted("llama"), "org/base-a")
    gm.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        identity = json.loads(f.metadata()[BASE_MODEL_KEY])
    assert identity["name_or_path"] == "org/base-a"
    fingerprint = identity["fingerprint"]
    base = tiny_model("llama")
    assert fingerprint["tensors"] == len(dict(base.named_parameters()))
    assert fingerprint["parameters"] == sum(p.numel() for p in base.parameters())
    assert fingerprint["structure"].startswith("sha256:") and fingerprint["dtypes"] == ["float32"]
    # the base's own fingerprint: GraphMoE's tensors are not part of it
    assert base_model_fingerprint(base) == fingerprint


def test_the_fingerprint_sees_base_weights_only():
    model = converted("llama", seed=0)
    before = base_model_fingerprint(model)
    randomize_adapters_(model, seed=5)
    assert base_model_fingerprint(model) == before
    other = converted("llama", seed=0)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[-1, -1] += 1.0  # a sampled position
    changed = base_model_fingerprint(other)
    assert changed["structure"] == before["structure"] and changed["values"] != before["values"]
    assert base_model_fingerprint(tiny_model("llama").to("meta")) is None


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # PEFT's call
def test_the_fingerprint_ignores_peft_wrapping():
    peft = pytest.importorskip("peft")
    model = converted("llama", attention_lora=True)
    before = base_model_fingerprint(model)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert base_model_fingerprint(peft.get_peft_model(model, config)) == before


def test_loading_onto_the_same_base_is_silent(tmp_path):
    gm.save_adapter(_named(converted("llama", seed=0), "org/base-a"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm.load_adapter(_named(tiny_model("llama", seed=0), "/elsewhere/copy-of-a"), tmp_path)
        # the same weights in another precision are the same base
        gm.load_adapter(tiny_model("llama", seed=0).to(torch.bfloat16), tmp_path)


def test_loading_onto_another_base_warns_naming_both(tmp_path):
    gm.save_adapter(_named(converted("llama", seed=0), "org/base-a"), tmp_path)
    expected = r"trained on base model org/base-a \(sha256:.*loaded onto org/base-b \(sha256:"
    with pytest.warns(UserWarning, match=expected):
        gm.load_adapter(_named(tiny_model("llama", seed=1), "org/base-b"), tmp_path)
    with pytest.warns(UserWarning, match="whose weights differ"):  # in another precision too
        gm.load_adapter(tiny_model("llama", seed=1).to(torch.bfloat16), tmp_path)


def test_old_adapters_without_an_identity_load_silently(tmp_path):
    trained = converted("llama", seed=0)
    gm.save_adapter(trained, tmp_path)
    _rewrite_identity(tmp_path, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = gm.load_adapter(tiny_model("llama", seed=1), tmp_path)
    assert all(torch.equal(p, adapter_state_dict(trained)[k])
               for k, p in adapter_state_dict(model).items())


def test_without_fingerprints_the_names_decide(tmp_path):
    gm.save_adapter(converted("llama"), tmp_path)
    _rewrite_identity(tmp_path, {"name_or_path": "org/base-a", "fingerprint": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm.load_adapter(_named(tiny_model("llama"), "org/base-a"), tmp_path)
    with pytest.warns(UserWarning, match="org/base-a .*org/base-b"):
        gm.load_adapter(_named(tiny_model("llama"), "org/base-b"), tmp_path)
