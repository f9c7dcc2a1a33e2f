"""``save_pretrained`` of a converted model → ``gm.from_pretrained`` gives back the same model:
every state-dict tensor (docs/design.md §3 names, ``gru.weight_g`` included although transformers
renames it on load) and the logits, bit for bit; and the one-call loader of base + adapter."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import graphmoe_fused as gm
from graphmoe_fused.hf.adapters import adapter_state_dict, copy_into
from graphmoe_fused.hf.convert import is_converted

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, tiny_model

# docs/design.md §3: the names of a GraphMoE layer's tensors, as save_pretrained must write them.
LAYER_TENSORS = [
    "gate_proj.weight", "up_proj.weight", "down_proj.weight", "router.weight",
    "lora_A_gate", "lora_B_gate", "lora_A_up", "lora_B_up", "lora_A_down", "lora_B_down",
    "gru.weight_z", "gru.weight_r", "gru.weight_o", "gru.bias_o", "gru.weight_g",
]


def logits(model):
    ids, mask, _ = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_identical(loaded, original):
    a, b = loaded.state_dict(), original.state_dict()
    assert a.keys() == b.keys()
    differing = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
    assert torch.equal(logits(loaded), logits(original))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_save_pretrained_round_trip_is_bit_exact(tmp_path, arch):
    model = converted(arch)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert {f"model.layers.1.mlp.{t}" for t in LAYER_TENSORS} <= saved
    assert json.loads((tmp_path / "config.json").read_text())["graphmoe_config"] == (
        model.graphmoe_config.to_dict()
    )

    loaded = gm.from_pretrained(tmp_path)
    assert gm.graphmoe_layers(loaded).keys() == gm.graphmoe_layers(model).keys()
    assert loaded.graphmoe_config == model.graphmoe_config
    assert loaded.model.layers[0].mlp.gru.weight_g.abs().sum() > 0  # not left at its zero init
    assert_identical(loaded, model)


def test_plain_transformers_cannot_do_it(tmp_path):
    """Why gm.from_pretrained exists: transformers drops the GraphMoE tensors, renaming weight_g
    on the way (if this starts passing, transformers learnt to load GraphMoE by itself)."""
    converted("llama").save_pretrained(tmp_path)
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not is_converted(plain)
    assert "model.layers.0.mlp.router.weight" in info["unexpected_keys"]


def test_bfloat16_sharded_checkpoint(tmp_path):
    converted("llama").save_pretrained(tmp_path / "fp32")
    # loaded, not .to(bfloat16): transformers keeps the rotary inv_freq buffer in fp32 on load
    model = gm.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.lora_B_up.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    loaded = gm.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    assert_identical(loaded, model)


def test_saving_the_loaded_model_again_writes_the_same_file(tmp_path):
    converted("llama").save_pretrained(tmp_path / "a")
    gm.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_weight_g_renamed_in_the_file_still_loads(tmp_path):
    """Should a transformers version apply its weight-norm rename on save too."""
    model = converted("llama")
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    for key in [k for k in tensors if k.endswith("gru.weight_g")]:
        tensors[key.replace("weight_g", "parametrizations.weight.original0")] = tensors.pop(key)
    save_file(tensors, path, metadata={"format": "pt"})
    assert_identical(gm.from_pretrained(tmp_path), model)


def test_a_missing_graphmoe_tensor_is_an_error(tmp_path):
    converted("llama").save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.gru.bias_o"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.gru\.bias_o'\]"):
        gm.from_pretrained(tmp_path)


def test_trainability(tmp_path):
    model = converted("llama")
    model.save_pretrained(tmp_path)
    frozen = gm.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = gm.from_pretrained(tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(
        adapter_state_dict(model)
    )


def test_base_plus_graphmoe_adapter_in_one_call(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    gm.apply_graphmoe(base, converted("llama").graphmoe_config)
    trained = converted("llama")
    copy_into(adapter_state_dict(base), adapter_state_dict(trained), "test")
    gm.save_adapter(base, tmp_path / "adapter")  # records the base's path and fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = gm.from_pretrained(tmp_path / "base", tmp_path / "adapter")
        alone = gm.from_pretrained(tmp_path / "adapter")  # the base it recorded
    assert_identical(loaded, base)
    assert_identical(alone, base)


def test_refusals(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="not a GraphMoE checkpoint"):
        gm.from_pretrained(tmp_path / "base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither graphmoe_config.json"):
        gm.from_pretrained(tmp_path / "base", tmp_path / "empty")
    gm.save_adapter(converted("llama"), tmp_path / "unnamed")  # a base built in memory
    with pytest.raises(ValueError, match="records no base model"):
        gm.from_pretrained(tmp_path / "unnamed")
