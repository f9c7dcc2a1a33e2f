"""GraphMoEConfig: the paper's defaults, and a ValueError naming the field for every bad value."""

from __future__ import annotations

import dataclasses
import json

import pytest

import graphmoe_fused as gm

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)


def test_defaults_are_the_papers():
    cfg = gm.GraphMoEConfig()
    # Table 2 and Section 4.4: n=8, k=2, r=16, alpha=32, dropout 0.05, T=3, dh = 0.1 d, λ=0.01.
    assert (cfg.num_experts, cfg.top_k, cfg.lora_r, cfg.lora_alpha) == (8, 2, 16, 32)
    assert cfg.lora_dropout == 0.05
    assert cfg.num_rounds == 3
    assert cfg.gru_hidden_ratio == 0.1
    assert cfg.router_aux_loss_coef == 0.01
    assert cfg.backend == "auto"
    assert (cfg.gru_candidate_input, cfg.gru_candidate_activation) == ("y", "sigmoid")
    assert cfg.attention_lora is True
    assert cfg.lora_scaling == 2.0
    assert cfg.gru_hidden_size(4096) == 409  # int(), as the paper's footnote 5 says
    # Every field's default, so that an added field or a changed default shows up here.
    assert cfg.to_dict() == {
        "num_experts": 8, "top_k": 2, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "num_rounds": 3, "gru_hidden_ratio": 0.1, "router_aux_loss_coef": 0.01,
        "backend": "auto", "gru_candidate_input": "y", "gru_candidate_activation": "sigmoid",
        "attention_lora": True, "attention_lora_r": None, "attention_lora_alpha": None,
        "router_init_std": 0.02, "recompute_intermediates": False, "deterministic": False,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 0),
        ("num_experts", 2.0),
        ("num_experts", True),
        ("top_k", 0),
        ("top_k", 1.5),
        ("lora_r", 0),
        ("lora_r", -3),
        ("lora_alpha", 0),
        ("lora_alpha", float("inf")),
        ("lora_alpha", True),
        ("lora_dropout", -0.1),
        ("lora_dropout", 1.0),
        ("lora_dropout", "0.1"),
        ("num_rounds", 0),
        ("num_rounds", 3.0),
        ("gru_hidden_ratio", 0),
        ("gru_hidden_ratio", -0.1),
        ("gru_hidden_ratio", float("nan")),
        ("router_aux_loss_coef", -0.01),
        ("router_aux_loss_coef", float("nan")),
        ("backend", "cuda"),
        ("backend", "Reference"),
        ("gru_candidate_input", "h"),
        ("gru_candidate_activation", "relu"),
        ("attention_lora_r", 0),
        ("attention_lora_alpha", -1.0),
        ("router_init_std", 0.0),
        ("attention_lora", "yes"),
        ("recompute_intermediates", 1),
        ("deterministic", "no"),
        ("router_init_std", float("nan")),
    ],
)
def test_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        gm.GraphMoEConfig(**{field: value})


def test_top_k_above_num_experts():
    with pytest.raises(ValueError, match=r"top_k=5 .*num_experts=4"):
        gm.GraphMoEConfig(num_experts=4, top_k=5)
    assert gm.GraphMoEConfig(num_experts=4, top_k=4).top_k == 4  # k = n is allowed


def test_ratio_giving_zero_gru_width():
    cfg = gm.GraphMoEConfig(gru_hidden_ratio=0.01)  # fine until a hidden size is known
    assert cfg.gru_hidden_size(100) == 1
    with pytest.raises(ValueError, match="gru_hidden_ratio"):
        cfg.gru_hidden_size(32)
    with pytest.raises(ValueError, match="gru_hidden_ratio"):
        gm.GraphMoEMLP(32, 48, cfg)


def test_dict_and_json_round_trip():
    # Every field off its default: a field that to_dict / to_json dropped, or from_dict ignored,
    # would come back as the default and break the equality.
    cfg = gm.GraphMoEConfig(
        num_experts=4, top_k=1, lora_r=8, lora_alpha=24.0, lora_dropout=0.2, num_rounds=2,
        gru_hidden_ratio=0.5, router_aux_loss_coef=0.5, backend="reference",
        gru_candidate_input="x", gru_candidate_activation="tanh", attention_lora=False,
        attention_lora_r=2, attention_lora_alpha=4.0, router_init_std=0.5,
        recompute_intermediates=True, deterministic=True,
    )
    default = gm.GraphMoEConfig()
    assert all(getattr(cfg, f.name) != getattr(default, f.name)
               for f in dataclasses.fields(cfg))
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(cfg)}
    assert gm.GraphMoEConfig.from_dict(cfg.to_dict()) == cfg
    assert gm.GraphMoEConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="num_expert"):
        gm.GraphMoEConfig.from_dict({"num_expert": 4})


def test_from_dict_validates():
    with pytest.raises(ValueError, match="lora_r"):
        gm.GraphMoEConfig.from_dict({"lora_r": 0})
