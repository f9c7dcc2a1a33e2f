"""The rounds experiment: the arms differ in T only, and what it reports is what its adapters do."""

from __future__ import annotations

import json

import pytest

from graphmoe_fused.cli import app
from graphmoe_fused.data import builtin_task
from graphmoe_fused.evaluation import multiple_choice_accuracy
from graphmoe_fused.experiments import run_rounds_experiment
from graphmoe_fused.hf.adapters import load_adapter
from graphmoe_fused.hf.local_model import load_base_model
from graphmoe_fused.training import TrainConfig

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)

QUICK = {"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "num_experts": 4,
         "lora_r": 4, "lora_alpha": 8, "backend": "torch", "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "run"
    return out, run_rounds_experiment(TrainConfig(**QUICK, output_dir=str(out)), (1, 3),
                                      log=lambda _line: None, progress=False)


def test_the_arms_share_everything_but_the_rounds(arms):
    out, (one, three) = arms
    assert (one.num_rounds, three.num_rounds) == (1, 3)
    a, b = one.result.config.to_dict(), three.result.config.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"num_rounds", "output_dir"}
    assert one.result.steps == three.result.steps == 3
    assert len(one.routing_change) == 0 and len(three.routing_change) == 2
    assert all(0.0 <= c <= 1.0 for c in three.routing_change)


def test_the_reported_accuracy_is_the_saved_adapters(arms):
    out, (_, three) = arms
    model, tokenizer = load_base_model(None)
    load_adapter(model, out / "T3" / "adapter")
    for name, examples in builtin_task("chain").eval.items():
        scored = multiple_choice_accuracy(model, tokenizer, examples)
        assert three.accuracy[name] == scored.accuracy
    summary = json.loads((out / "experiment.json").read_text())
    assert [arm["num_rounds"] for arm in summary["arms"]] == [1, 3]
    assert summary["arms"][1]["accuracy"] == three.accuracy
    assert summary["arms"][1]["routing_change"] == three.routing_change


def test_the_adapter_loads_onto_the_base_it_was_trained_on(arms, recwarn):
    out, _ = arms
    model, _ = load_base_model(None)
    load_adapter(model, out / "T1" / "adapter")
    assert not [w for w in recwarn if "trained on base model" in str(w.message)]


def test_refuses_user_data_and_a_used_output_dir(tmp_path, arms):
    out, _ = arms
    with pytest.raises(ValueError, match="built-in task"):
        run_rounds_experiment(TrainConfig(**QUICK, data=[str(tmp_path / "x.jsonl")]))
    with pytest.raises(ValueError, match="exists and is not empty"):
        run_rounds_experiment(TrainConfig(**QUICK, output_dir=str(out)))
    with pytest.raises(ValueError, match="repeated"):
        run_rounds_experiment(TrainConfig(**QUICK, output_dir=str(tmp_path / "n")), (3, 3))
    with pytest.raises(ValueError, match="seeds"):
        run_rounds_experiment(TrainConfig(**QUICK, output_dir=str(tmp_path / "n")), seeds=[-1])
    assert not (tmp_path / "n").exists()


def test_command_line_prints_both_arms(tmp_path, capsys):
    argv = ["experiment", "--output-dir", str(tmp_path / "cli"), "--no-progress"]
    for key, value in QUICK.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert app.main(argv) == 0
    out = capsys.readouterr().out
    assert "T=1" in out and "T=3" in out and "1->2:" in out and "chain-2hop" in out
    assert (tmp_path / "cli" / "T1" / "adapter").is_dir()
    assert (tmp_path / "cli" / "T3" / "adapter").is_dir()


def test_the_rounds_come_from_compare_rounds(capsys):
    with pytest.raises(SystemExit):
        app.main(["experiment", "--compare-rounds", "0"])
    assert "--compare-rounds" in capsys.readouterr().err
    assert app.main(["experiment", "--num-rounds", "2"]) == 2
    assert "use --compare-rounds" in capsys.readouterr().err


def test_seed_and_seeds_together_are_refused(capsys):
    """``--seeds`` names every seed; a ``--seed`` beside it would be silently ignored."""
    assert app.main(["experiment", "--seed", "3", "--seeds", "0", "1"]) == 2
    assert "--seed 3 with --seeds" in capsys.readouterr().err


def test_several_seeds_report_the_mean_of_their_arms(tmp_path):
    arms = run_rounds_experiment(TrainConfig(**{**QUICK, "max_steps": 2},
                                             output_dir=str(tmp_path / "s")),
                                 (1, 2), log=lambda _line: None, progress=False, seeds=[0, 1])
    assert [(a.seed, a.num_rounds) for a in arms] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert (tmp_path / "s" / "seed1" / "T2" / "adapter").is_dir()
    summary = json.loads((tmp_path / "s" / "experiment.json").read_text())
    two = [a for a in arms if a.num_rounds == 2]
    for split in two[0].accuracy:
        assert summary["mean"]["T=2"]["accuracy"][split] == pytest.approx(
            (two[0].accuracy[split] + two[1].accuracy[split]) / 2)
    assert summary["mean"]["T=2"]["routing_change"] == pytest.approx(
        [(two[0].routing_change[0] + two[1].routing_change[0]) / 2])
    assert two[0].result.losses != two[1].result.losses  # the seeds trained different adapters


def test_an_arm_trained_with_triton_is_scored_with_the_backend_this_machine_runs(
        arms, monkeypatch):
    # An adapter trained on a GPU names the triton backend; scoring it where triton cannot run
    # must not fail (it did, after the first arm, leaving no experiment.json).
    from graphmoe_fused.experiments.rounds import _score

    out, (_, three) = arms
    adapter = out / "T3" / "adapter"
    config_file = adapter / "graphmoe_config.json"
    saved = config_file.read_text()
    config_file.write_text(saved.replace('"backend": "torch"', '"backend": "triton"'))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the session interprets; a user's CPU does not
    monkeypatch.setattr("graphmoe_fused.backends.triton.triton_available", lambda: False)
    try:
        accuracy, change = _score(three.result.config, adapter)
    finally:
        config_file.write_text(saved)
    assert accuracy == three.accuracy and change == three.routing_change
