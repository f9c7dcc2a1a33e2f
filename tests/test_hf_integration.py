"""apply_graphmoe on Hugging Face models: identity at init, sharing, freezing, hooks, statistics,
parameter counts (LLaMA-3-8B shapes on the meta device) and clear refusals.

Every test that runs the model runs it on the ``reference`` backend and on ``torch`` (what the
default ``auto`` resolves to on a CPU, and so the path a user gets); two small ones also on
``triton`` (under the Triton interpreter without a GPU: slow, so tiny batches). Counts are checked
against the model's own config: ``k`` selections per real token per round, ``T`` rounds.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import graphmoe_fused as gm

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import (
    ARCHITECTURES,
    SHAPES,
    batch,
    converted,
    graphmoe_config,
    tiny_model,
    trainable_grads,
)

ARCHS = sorted(ARCHITECTURES)
# The model-level tests run on both CPU backends; "torch" is what backend="auto" runs on a CPU.
MODEL_BACKENDS = ["reference", "torch"]
# Two small tests also run the kernels (under the interpreter on a CPU: seconds per forward).
NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
TRITON = pytest.param("triton", marks=NEEDS_TRITON)


def expected_counts(model: nn.Module, real_tokens: int) -> list[int]:
    """Per round, the selections a layer's counters must hold: ``k`` per real token, ``T``
    rounds (from the model's own config, not the test defaults)."""
    cfg = model.graphmoe_config
    return [cfg.top_k * real_tokens] * cfg.num_rounds


@pytest.mark.parametrize(
    ("arch", "train", "backend"),
    [(arch, train, backend) for arch in ARCHS for train in (False, True)
     for backend in MODEL_BACKENDS] + [pytest.param("llama", False, "triton", marks=NEEDS_TRITON)],
)
def test_fresh_conversion_computes_the_base_model(arch, train, backend):
    base = tiny_model(arch)
    model = converted(arch, randomize=False, lora_dropout=0.1, backend=backend)
    model.train(train)
    ids, mask, _ = batch(2, 4) if backend == "triton" else batch()
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    # The experts' weighted sum w1·E + w2·E (w1 + w2 = 1) may differ from E by about an ulp.
    torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5)
    for layer in gm.graphmoe_layers(model).values():
        assert torch.count_nonzero(layer.gru.weight_g) == 0
        for b in (layer.lora_B_gate, layer.lora_B_up, layer.lora_B_down):
            assert torch.count_nonzero(b) == 0
    for module in model.modules():
        if isinstance(module, gm.LoRALinear):
            assert torch.count_nonzero(module.lora_B) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_base_weights_are_shared_not_copied(arch):
    model = tiny_model(arch)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    gm.apply_graphmoe(model, graphmoe_config())
    after = {n: p.data_ptr() for n, p in model.named_parameters()}
    for name, ptr in before.items():
        assert after[name] == ptr, name  # every base tensor keeps its name and its storage


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_keeps_the_base_keys(arch):
    base_state = tiny_model(arch, seed=1).state_dict()
    model = converted(arch)
    added = set(model.state_dict()) - set(base_state)
    assert set(base_state) <= set(model.state_dict())
    assert added == set(gm.hf.adapters.adapter_state_dict(model))
    assert "model.layers.0.self_attn.q_proj.lora_A" in added
    assert "model.layers.1.mlp.gru.weight_g" in added
    result = model.load_state_dict(base_state, strict=False)  # a base checkpoint still loads
    assert set(result.missing_keys) == added and not result.unexpected_keys
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight,
                       base_state["model.layers.0.mlp.gate_proj.weight"])


def test_only_graphmoe_and_attention_lora_are_trainable():
    model = converted("qwen2")  # Qwen2's q/k/v projections have a bias: it stays frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for i in range(2):
        mlp = f"model.layers.{i}.mlp."
        expected |= {mlp + n for n in ("router.weight", "lora_A_gate", "lora_B_gate",
                                        "lora_A_up", "lora_B_up", "lora_A_down", "lora_B_down",
                                        "gru.weight_z", "gru.weight_r", "gru.weight_o",
                                        "gru.bias_o", "gru.weight_g")}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected |= {f"model.layers.{i}.self_attn.{proj}.lora_{ab}" for ab in "AB"}
    assert trainable == expected


def test_attention_lora_off_and_its_own_rank():
    model = converted("llama", attention_lora=False)
    assert not any(isinstance(m, gm.LoRALinear) for m in model.modules())
    model = converted("llama", attention_lora_r=2, attention_lora_alpha=6)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (2, 32) and q.lora_B.shape == (32, 2) and q.scaling == 3.0


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_only_trainable_parameters(arch, backend):
    model = converted(arch, backend=backend).train()
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_config_is_stored_on_the_model():
    model = converted("llama", num_experts=6)
    assert isinstance(model.graphmoe_config, gm.GraphMoEConfig)
    assert model.graphmoe_config.num_experts == 6
    assert model.config.graphmoe_config == model.graphmoe_config.to_dict()
    assert model.config.to_dict()["graphmoe_config"]["num_experts"] == 6


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_positional_and_keyword_arguments_agree(backend):
    model = converted("llama", lora_dropout=0.1, backend=backend).train()
    ids, mask, labels = batch()
    torch.manual_seed(0)
    by_name = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.manual_seed(0)
    positional = model(ids, mask, None, None, None, labels)
    torch.testing.assert_close(positional.loss, by_name.loss, rtol=0, atol=0)
    torch.testing.assert_close(positional.aux_loss, by_name.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_aux_loss_is_an_attribute_and_a_key_and_tuples_keep_the_loss(backend):
    model = converted("llama", backend=backend)
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.aux_loss is out["aux_loss"] and out.aux_loss.shape == ()
    as_tuple = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_the_decoder_stack_called_alone_reports_aux_loss_and_counts(backend):
    model = converted("llama", backend=backend)
    ids, mask, _ = batch()
    gm.reset_routing_statistics(model)
    out = model.model(ids, attention_mask=mask)
    assert out.aux_loss is out["aux_loss"]
    counts = gm.routing_statistics(model)
    assert all(c.sum(-1).tolist() == expected_counts(model, int(mask.sum()))
               for c in counts.values())


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_routing_statistics_count_real_tokens_and_reset(backend):
    # k = 3 and T = 2, not the defaults: the counts must follow the config.
    model = converted("mistral", top_k=3, num_rounds=2, backend=backend)
    ids, mask, labels = batch()
    with torch.no_grad():
        model(ids, attention_mask=mask, labels=labels)
        model(ids)  # no mask: every token counts
    stats = gm.routing_statistics(model)
    assert list(stats) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    real = int(mask.sum()) + ids.numel()
    cfg = model.graphmoe_config
    for counts in stats.values():
        assert counts.shape == (cfg.num_rounds, cfg.num_experts)
        assert counts.sum(-1).tolist() == expected_counts(model, real)
        fractions = gm.routing_fractions(counts)
        torch.testing.assert_close(fractions.sum(-1),
                                   torch.ones(cfg.num_rounds, dtype=torch.float64))
    stats["model.layers.0.mlp"].zero_()  # a copy: the model's counters are untouched
    assert gm.routing_statistics(model)["model.layers.0.mlp"].sum() > 0
    gm.reset_routing_statistics(model)
    assert all(c.sum() == 0 for c in gm.routing_statistics(model).values())


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_generation_with_a_cache_counts_each_real_token_once(backend):
    model = converted("llama", top_k=1, num_rounds=4, backend=backend)
    ids, mask, _ = batch(batch_size=2, seq_len=5)
    gm.reset_routing_statistics(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 8)
    # The prompt's real tokens, then one new token per sequence in each of 2 cached steps.
    real = int(mask.sum()) + 2 * 2
    for counts in gm.routing_statistics(model).values():
        assert counts.sum(-1).tolist() == expected_counts(model, real)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_a_cached_step_applies_the_last_columns_of_the_mask(backend):
    # With a cache the mask covers past and new tokens; the layers see only the new ones.
    model = converted("llama", backend=backend)
    ids, mask, _ = batch(batch_size=2, seq_len=5)
    with torch.no_grad():
        # The cache is named past_key_values in transformers 5.17 and cache in 5.24: go by
        # position (output: logits, cache; input: ids, mask, position ids, cache).
        cache = model(ids, attention_mask=mask, use_cache=True)[1]
        gm.reset_routing_statistics(model)
        new_ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        new_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
        model(new_ids, torch.cat([mask, new_mask], 1), None, cache)
    for counts in gm.routing_statistics(model).values():
        assert counts.sum(-1).tolist() == expected_counts(model, int(new_mask.sum()))


def test_token_mask_from_arguments():
    from graphmoe_fused.hf.hooks import token_mask_from

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    assert token_mask_from({"attention_mask": mask}).tolist() == (mask == 1).tolist()
    ids = torch.zeros(2, 2, dtype=torch.long)
    got = token_mask_from({"attention_mask": mask, "input_ids": ids})
    assert got.tolist() == [[True, True], [True, False]]
    embeds = torch.zeros(2, 3, 8)
    got = token_mask_from({"attention_mask": mask, "inputs_embeds": embeds})
    assert got.tolist() == [[True, True, True], [True, True, False]]
    assert token_mask_from({"attention_mask": torch.ones(2, 1, 4, 4)}) is None
    assert token_mask_from({}) is None


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_a_deep_copy_keeps_working_hooks(backend):
    model = converted("llama", backend=backend)
    twin = copy.deepcopy(model)
    gm.reset_routing_statistics(model)
    gm.reset_routing_statistics(twin)
    ids, mask, labels = batch()
    out = twin(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.aux_loss, model(ids, attention_mask=mask).aux_loss)
    for name, counts in gm.routing_statistics(twin).items():
        assert torch.equal(counts, gm.routing_statistics(model)[name]) and counts.sum() > 0


# ---- parameter counts --------------------------------------------------------------------------

def llama3_8b_on_meta() -> nn.Module:
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_parameter_report_at_llama3_8b_shapes_on_meta():
    model = gm.apply_graphmoe(llama3_8b_on_meta(), gm.GraphMoEConfig())
    report = gm.parameter_report(model)
    d, dff, n, r, L, dh, kv = 4096, 14336, 8, 16, 32, 409, 1024
    per_layer = (
        n * r * 3 * (d + dff)  # expert LoRA: gate, up, down
        + n * d  # router
        + 3 * dh * (dh + d) + dh + d * dh  # GRU: W_z, W_r, W_o, b_o, W_g
        + r * ((d + d) + (d + kv) + (d + kv) + (d + d))  # attention LoRA: q, k, v, o
    )
    assert report.trainable == report.added == L * per_layer == 471_678_336
    assert report.base == 8_030_261_248  # LLaMA-3-8B
    assert round(report.percent_of_base, 1) == 5.9  # the paper's Table 4 "Param" for GraphMoE
    assert round(report.percent_of_total, 2) == 5.55
    assert "5.87%" in str(report)
    assert gm.count_parameters(model) == report  # the README's name for it


def test_parameter_report_reproduces_mixloras_three_percent():
    # Without the GRU, the same counting gives MixLoRA's 3.0% of the paper's Table 4.
    model = gm.apply_graphmoe(llama3_8b_on_meta(), gm.GraphMoEConfig())
    for layer in gm.graphmoe_layers(model).values():
        layer.gru.requires_grad_(False)
    report = gm.parameter_report(model)
    assert round(report.percent_of_base, 1) == 3.0


def test_parameter_report_counts_tied_weights_once():
    model = tiny_model("llama", tie_word_embeddings=True)
    report = gm.parameter_report(model)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.trainable == report.total and report.added == 0


# ---- refusals --------------------------------------------------------------------------------

def test_refuses_a_model_without_decoder_layers():
    with pytest.raises(TypeError, match="no decoder layers"):
        gm.apply_graphmoe(nn.Sequential(nn.Linear(4, 4)), graphmoe_config())
    with pytest.raises(TypeError, match="nn.Module"):
        gm.apply_graphmoe("llama", graphmoe_config())


def test_refuses_a_non_swiglu_mlp_and_changes_nothing():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97))
    before = {n: p.requires_grad for n, p in gpt2.named_parameters()}
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.mlp .*gate_proj"):
        gm.apply_graphmoe(gpt2, graphmoe_config())
    assert {n: p.requires_grad for n, p in gpt2.named_parameters()} == before
    assert not gm.graphmoe_layers(gpt2) and not hasattr(gpt2, "graphmoe_config")


def test_refuses_a_biased_mlp():
    model = tiny_model("llama", mlp_bias=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj has a bias"):
        gm.apply_graphmoe(model, graphmoe_config())
    assert not gm.graphmoe_layers(model)


def test_refuses_a_non_silu_activation():
    with pytest.raises(ValueError, match="SiLU"):
        gm.apply_graphmoe(tiny_model("llama", hidden_act="gelu"), graphmoe_config())


def test_refuses_to_convert_twice():
    model = converted("llama")
    with pytest.raises(ValueError, match="already converted"):
        gm.apply_graphmoe(model, graphmoe_config())


def test_refuses_a_ratio_giving_no_gru_width_before_changing_anything():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="gru_hidden_ratio"):
        gm.apply_graphmoe(model, graphmoe_config(gru_hidden_ratio=0.01))
    assert not gm.graphmoe_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_refuses_a_bad_config_object():
    with pytest.raises(TypeError, match="GraphMoEConfig"):
        gm.apply_graphmoe(tiny_model("llama"), {"num_experts": 4})


def test_trainable_grads_helper_sees_every_trainable_parameter():
    model = converted("llama")
    # Per decoder layer: 12 GraphMoE tensors (router, 6 LoRA, 5 GRU) and 8 attention LoRA.
    assert len(trainable_grads(model)) == SHAPES["num_hidden_layers"] * (12 + 8)


# ---- the backends agree on a whole model ------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_a_backend_trains_the_model_as_the_reference_does(backend):
    # Same weights (seeded), training mode with LoRA dropout: the layers draw their dropout
    # seeds from the global generator, so one manual_seed gives both models the same masks.
    ids, mask, labels = batch(2, 4) if backend == "triton" else batch()
    results = {}
    for name in ("reference", backend):
        model = converted("llama", lora_dropout=0.1, backend=name).train()
        gm.reset_routing_statistics(model)
        torch.manual_seed(0)
        out = model(ids, attention_mask=mask, labels=labels)
        (out.loss + out.aux_loss).backward()
        results[name] = (out, trainable_grads(model), gm.routing_statistics(model))
    (want, want_grads, want_counts), (got, got_grads, got_counts) = results.values()
    # Tokens route identically (these seeds have no near-tie), so only rounding differs: fp32
    # sums of at most D' = 48 terms through two layers and three rounds.
    assert all(torch.equal(got_counts[n], want_counts[n]) for n in want_counts)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=0)
    assert set(got_grads) == set(want_grads)
    for name, want_grad in want_grads.items():
        scale = want_grad.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got_grads[name], want_grad, rtol=0, atol=3e-5 * scale,
                                   msg=name)


def test_the_output_survives_what_ddp_does_to_it():
    # DDP flattens the output as a pytree and rebuilds it from its class's fields: an
    # ``aux_loss`` key the class does not declare used to make that rebuild raise.
    import torch.utils._pytree as pytree

    model = converted("llama")
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    leaves, spec = pytree.tree_flatten(out)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, type(out)) and isinstance(out, CausalLMOutputWithPast)
    assert torch.equal(rebuilt.aux_loss, out.aux_loss) and torch.equal(rebuilt.loss, out.loss)
    assert out.aux_loss is out["aux_loss"]
    assert type(model(input_ids=ids).aux_loss) is torch.Tensor  # the same class next time
