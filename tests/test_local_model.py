"""load_base_model (builtin tiny LLaMA or a local checkpoint, offline), save_builtin_model and
check_convertible."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTModel,
)

import graphmoe_fused as gm
from graphmoe_fused.data import BUILTIN_MODEL, builtin_task, collate, encode_example
from graphmoe_fused.hf.local_model import check_convertible, load_base_model, save_builtin_model

from .single_thread import one_cpu_thread  # noqa: F401


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_builtin_model(tmp_path_factory.mktemp("builtin") / "ckpt")


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_builtin_model_matches_its_config_and_tokenizer():
    model, tok = load_base_model(None)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (96, 2, 495)
    assert cfg.vocab_size == len(tok) == BUILTIN_MODEL["vocab_size"]
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert next(model.parameters()).device.type == "cpu"


def test_builtin_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load_base_model(None, seed=0)
    assert torch.equal(torch.rand(3), expected)
    b, _ = load_base_model(None, seed=0)
    c, _ = load_base_model(None, seed=1)
    assert _equal_weights(a, b)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_builtin_model_dtype():
    model, _ = load_base_model(None, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_local_checkpoint_round_trips(checkpoint):
    builtin, tok = load_base_model(None)
    model, loaded_tok = load_base_model(str(checkpoint))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert _equal_weights(model, builtin)
    text = "Please choose the correct answer to the question: Where does Ann live?"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.pad_token_id == 0


def test_builtin_model_converts_and_learns_a_step():
    model, tok = load_base_model(None)
    check_convertible(model, None)
    gm.apply_graphmoe(model, gm.GraphMoEConfig(num_experts=4, top_k=2, lora_r=4, lora_alpha=8,
                                               num_rounds=2, backend="torch", lora_dropout=0.0))
    batch = collate([encode_example(tok, ex, 64) for ex in builtin_task().train[:4]],
                    tok.pad_token_id)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.aux_loss is not None
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_missing_directory_and_file_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"model directory {re.escape(str(missing))} "
                                                "does not exist"):
        load_base_model(str(missing))
    file = tmp_path / "model.bin"
    file.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_base_model(str(file))


def test_directory_without_config(tmp_path):
    (tmp_path / "README").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no config.json")):
        load_base_model(str(tmp_path))


def test_not_a_causal_lm(tmp_path):
    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=8, image_size=4, patch_size=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: model type 'vit' is not a "
                                                   "causal language model")):
        load_base_model(str(tmp_path))


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: cannot read config.json")):
        load_base_model(str(tmp_path))


def test_no_tokenizer_or_no_weights(tmp_path, checkpoint):
    model, tok = load_base_model(None)
    model.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(FileNotFoundError, match="weights_only: no tokenizer"):
        load_base_model(str(tmp_path / "weights_only"))
    model.config.save_pretrained(tmp_path / "config_only")
    tok.save_pretrained(tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match="config_only: no model weights"):
        load_base_model(str(tmp_path / "config_only"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_are_one_line(tmp_path, damage):
    directory = save_builtin_model(tmp_path / damage)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(ValueError, match=re.escape(f"{directory}: cannot load the weights: ")) \
            as info:
        load_base_model(str(directory))
    assert "\n" not in str(info.value)


def test_missing_pad_token_becomes_eos(tmp_path):
    model, tok = load_base_model(None)
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>")
    assert no_pad.pad_token is None
    model.save_pretrained(tmp_path)
    no_pad.save_pretrained(tmp_path)
    _, loaded = load_base_model(str(tmp_path))
    assert (loaded.pad_token, loaded.pad_token_id) == ("</s>", 2)


def test_check_convertible_rejects_a_gpt2_mlp():
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32,
                                       n_positions=16))
    with pytest.raises(ValueError) as info:
        check_convertible(model, "models/gpt2")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("models/gpt2: cannot convert GPT2LMHeadModel to GraphMoE: ")
    assert "transformer.h.0.mlp (GPT2MLP) is not a LLaMA-style SwiGLU MLP" in message


def test_check_convertible_rejects_biased_mlp_attention_and_converted_models():
    llama = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, vocab_size=32)
    biased = LlamaForCausalLM(LlamaConfig(**llama, mlp_bias=True))
    with pytest.raises(ValueError, match=r"^m: cannot convert .*mlp\.gate_proj has a bias"):
        check_convertible(biased, "m")
    model = LlamaForCausalLM(LlamaConfig(**llama))
    model.model.layers[0].self_attn.q_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match="has no self_attn with nn.Linear"):
        check_convertible(model, "m")
    check_convertible(model, "m", gm.GraphMoEConfig(attention_lora=False))  # MLPs only: fine
    assert not any(isinstance(m, gm.GraphMoEMLP) for m in model.modules())  # nothing changed
    gm.apply_graphmoe(model, gm.GraphMoEConfig(attention_lora=False))
    with pytest.raises(ValueError, match="already converted"):
        check_convertible(model, None)
    with pytest.raises(ValueError, match=r"^\(builtin\): cannot convert"):
        check_convertible(model, None)
