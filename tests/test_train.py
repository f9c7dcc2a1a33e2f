"""``graphmoe_fused.training``: one-process training on the built-in tiny model, the log and
statistics it writes, bit-exact resume, and every refusal made before anything is written."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import modeling_utils

from graphmoe_fused.cli import train_command
from graphmoe_fused.data import BUILTIN_PRESET, DataError
from graphmoe_fused.hf.local_model import save_builtin_model
from graphmoe_fused.training import TrainConfig, train
from graphmoe_fused.training.outputs import read_events
from graphmoe_fused.training.recipe import read_config_file

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)

# Small and fast: 4 experts, 2 rounds, short sequences, 3-4 steps; dropout stays on so resume
# must reproduce the masks too.
TINY = dict(num_experts=4, top_k=2, lora_r=4, lora_alpha=8, num_rounds=2, cutoff_len=64,
            batch_size=8, micro_batch_size=4, backend="torch", log_every=1, learning_rate=3e-3)
WEIGHTS = "graphmoe_adapter.safetensors"


def _config(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(out), "max_steps": 3, **overrides})


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS))


def _quiet(_line: str) -> None:
    pass


# --- a run and what it writes -------------------------------------------------------------------


def test_train_writes_adapter_log_and_routing_statistics(tmp_path):
    out = tmp_path / "run"
    result = train(_config(out), log=_quiet, progress=False)
    assert result.steps == 3 and len(result.losses) == 3 and result.world_size == 1
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.adapter_path == out / "adapter" and (out / "adapter" / WEIGHTS).is_file()
    assert set(result.eval_accuracy) == {"chain-2hop", "chain-1hop"}

    events = _events(out)
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end"
    start = events[0]
    assert (start["num_experts"], start["num_rounds"], start["top_k"]) == (4, 2, 2)
    assert start["world_size"] == 1 and start["num_layers"] == 2
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert [e["loss"] for e in steps] == result.losses
    for e in steps:
        assert len(e["aux_loss_per_round"]) == 2
        assert e["aux_loss"] == pytest.approx(sum(e["aux_loss_per_round"]) / 2)
        assert e["lr"] == 3e-3 and e["grad_norm"] > 0 and e["tokens_per_s"] > 0
    assert steps[0]["tokens"] < steps[1]["tokens"] < steps[2]["tokens"]
    assert any(e["event"] == "eval" for e in events)

    routing = json.loads((out / "routing_statistics.json").read_text())
    assert routing["phase"] == "train" and routing["num_experts"] == 4
    layers = routing["layers"]
    assert sorted(layers) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    # top-2 of every non-pad token, every round: counts add up to 2 × the tokens trained on
    for counts in layers.values():
        assert len(counts) == 2 and all(len(row) == 4 for row in counts)
        assert all(sum(row) == 2 * routing["tokens"] for row in counts)
    last_routing = [e for e in events if e["event"] == "routing"][-1]
    assert last_routing["layers"] == layers
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 3 and saved["num_experts"] == 4


def test_lm_loss_is_the_token_weighted_mean_without_the_aux_term(tmp_path):
    # coefficient 0 vs the default: the logged LM loss of step 1 (same weights) must agree.
    with_aux = train(_config(tmp_path / "a", max_steps=1), log=_quiet, progress=False)
    without = train(_config(tmp_path / "b", max_steps=1, router_aux_loss_coef=0.0),
                    log=_quiet, progress=False)
    assert with_aux.losses[0] == pytest.approx(without.losses[0], rel=1e-6)
    assert with_aux.aux_losses[0] == pytest.approx(without.aux_losses[0], rel=1e-6)


def test_builtin_preset_fills_only_fields_the_user_did_not_set(tmp_path):
    lines: list[str] = []
    result = train(_config(tmp_path / "run", max_steps=1), log=lines.append, progress=False)
    # epochs came from the preset; the learning rate and the batch sizes were set here
    assert any("preset" in line and f"epochs={BUILTIN_PRESET['epochs']}" in line
               for line in lines)
    assert result.config.epochs == BUILTIN_PRESET["epochs"]
    assert result.config.learning_rate == 3e-3 and result.config.batch_size == 8
    assert TrainConfig().epochs == 2  # the paper's recipe when a --model is given


def test_examples_cut_by_the_cutoff_are_counted(tmp_path):
    """The built-in examples are 36-38 tokens: at 37 the 38-token ones are cut (the 37-token
    ones fill it exactly and are not); at 64 none is, and nothing is said."""
    lines: list[str] = []
    train(_config(tmp_path / "cut", max_steps=1, cutoff_len=37), log=lines.append,
          progress=False)
    warned = [line for line in lines if "cutoff_len" in line]
    assert warned == ["warning: 24 of 72 training examples are longer than cutoff_len=37 "
                      "tokens: cut there, their ends are not learnt (raise --cutoff-len to keep "
                      "them)"]
    lines.clear()
    train(_config(tmp_path / "whole", max_steps=1), log=lines.append, progress=False)
    assert not any("cutoff_len" in line for line in lines)


# --- resume -----------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_resume_is_bit_exact(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    settings = dict(max_steps=4, save_every=2)
    reference = train(_config(full, **settings), log=_quiet, progress=False)

    def stop_at_2(record):
        if record["step"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(_config(cut, **settings), log=_quiet, progress=False, on_step=stop_at_2)
    assert not (cut / "adapter").exists() and (cut / "checkpoints" / "step-2").is_dir()
    resumed = train(TrainConfig(output_dir=str(cut), resume=True), log=_quiet, progress=False)

    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert resumed.losses == reference.losses
    assert resumed.aux_losses == reference.aux_losses
    a, b = _adapter(full / "adapter"), _adapter(cut / "adapter")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    logged = [e["loss"] for e in _events(cut) if e["event"] == "step"]
    assert logged == reference.losses
    assert json.loads((cut / "routing_statistics.json").read_text()) == \
        json.loads((full / "routing_statistics.json").read_text())


def test_resume_refuses_changed_settings(tmp_path):
    out = tmp_path / "run"
    train(_config(out, max_steps=2, save_every=2), log=_quiet, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        train(TrainConfig(output_dir=str(out), resume=True, learning_rate=1e-3), log=_quiet,
              progress=False)
    # max_steps may grow on resume, but not stop at or before the checkpoint: nothing would
    # train, and the run's files would claim a shorter run.
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for steps in (1, 2):
        with pytest.raises(ValueError, match=r"step-2 is at step 2 and the run ends at step "
                                             rf"{steps}: nothing is left to train"):
            train(TrainConfig(output_dir=str(out), resume=True, max_steps=steps), log=_quiet,
                  progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


# --- refusals: one line, nothing written --------------------------------------------------------


def _refused(tmp_path, exc_type, match, **overrides):
    out = tmp_path / "never"
    with pytest.raises(exc_type, match=match) as info:
        train(_config(out, **overrides), log=_quiet, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()
    return info.value


def test_missing_model_path_is_refused(tmp_path):
    _refused(tmp_path, FileNotFoundError, "does not exist", model=str(tmp_path / "nothing"))


def test_unconvertible_model_is_refused(tmp_path):
    model_dir = save_builtin_model(tmp_path / "gelu-model")
    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_act"] = "gelu"  # not SwiGLU any more
    (model_dir / "config.json").write_text(json.dumps(config))
    _refused(tmp_path, ValueError, "cannot convert", model=str(model_dir))


def test_a_model_missing_weights_or_already_converted_is_refused(tmp_path):
    # transformers would initialise missing weights at random and only log a table.
    model_dir = save_builtin_model(tmp_path / "partial")
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, str(weights),
              metadata={"format": "pt"})
    _refused(tmp_path, ValueError, r"partial: the weights do not fit its config.json: \d+ "
             r"missing \['model.layers.1.", model=str(model_dir))
    converted_dir = save_builtin_model(tmp_path / "converted")
    config = json.loads((converted_dir / "config.json").read_text())
    (converted_dir / "config.json").write_text(json.dumps({**config, "graphmoe_config": {}}))
    _refused(tmp_path, ValueError, "converted GraphMoE checkpoint .* pass it as --adapter",
             model=str(converted_dir))


def test_empty_and_malformed_data_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _refused(tmp_path, DataError, "no examples", data=[str(empty)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "say hi", "output": "hi"}\n{"instruction": \n')
    _refused(tmp_path, DataError, "bad.jsonl:2", data=[str(bad)])


def test_existing_output_dir_is_refused_and_overwrite_keeps_user_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        train(_config(out), log=_quiet, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    train(_config(out, max_steps=1, overwrite=True), log=_quiet, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter" / WEIGHTS).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocasts on a CUDA device")
def test_fp16_on_a_cpu_is_refused(tmp_path):
    # accelerate accepts fp16 on a CPU but never autocasts there.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # one process, one mixed precision: let this run set its own
    try:
        _refused(tmp_path, ValueError, "mixed_precision='fp16' has no autocast on cpu",
                 mixed_precision="fp16")
    finally:
        AcceleratorState._reset_state()


def test_resume_without_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    train(_config(out, max_steps=1), log=_quiet, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(output_dir=str(out), resume=True), log=_quiet, progress=False)


def test_a_run_that_diverges_stops_before_writing_nan(tmp_path):
    # A typo'd learning rate: the loss or gradient norm goes non-finite within a few steps.
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"training diverged at step \d+: .*learning_rate 20000"):
        train(_config(out, learning_rate=2e4, max_steps=5), log=_quiet, progress=False)
    assert not (out / "adapter").exists()
    steps = [e for e in _events(out) if e["event"] == "step"]
    assert steps and all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"])
                         for e in steps)


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    out = tmp_path / "run"
    train(_config(out, max_steps=2, save_every=1), log=_quiet, progress=False)
    state = out / "checkpoints" / "step-2" / "trainer_state.json"
    state.write_text(json.dumps({"step": 2}))
    settings = (out / "train_config.json").read_text()
    with pytest.raises(ValueError, match=r"step-2/trainer_state.json lacks \['tokens'"):
        train(TrainConfig(output_dir=str(out), resume=True, max_steps=3), log=_quiet,
              progress=False)
    assert (out / "train_config.json").read_text() == settings  # max_steps still 2
    shutil.rmtree(out / "checkpoints" / "step-2")
    weights = out / "checkpoints" / "step-1" / "adapter" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(ValueError, match=rf"{WEIGHTS}: not a readable .safetensors file"):
        train(TrainConfig(output_dir=str(out), resume=True, max_steps=3), log=_quiet,
              progress=False)


def test_a_log_cut_short_by_a_kill_still_resumes(tmp_path):
    out = tmp_path / "run"
    train(_config(out, max_steps=2, save_every=1), log=_quiet, progress=False)
    log = out / "train_log.jsonl"
    log.write_text(log.read_text() + '{"event": "step", "st')  # killed mid-line
    resumed = train(TrainConfig(output_dir=str(out), resume=True, max_steps=3), log=_quiet,
                    progress=False)
    assert resumed.steps == 3 and [e["step"] for e in _events(out) if e["event"] == "step"] \
        == [1, 2, 3]
    log.write_text('{"event": "start"}\nnot json\n{"event": "end"}\n')
    with pytest.raises(ValueError, match=r"train_log.jsonl:2: not a JSON event"):
        list(read_events(log))


def test_an_output_dir_inside_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(ValueError, match=r"notes/run: .*notes is not a directory"):
        train(_config(tmp_path / "notes" / "run"), log=_quiet, progress=False)
    assert (tmp_path / "notes").read_text() == "mine"


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(batch_size=16, micro_batch_size=5)
    with pytest.raises(ValueError, match="top_k"):
        TrainConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


# --- config files and the command line ----------------------------------------------------------


def test_config_file_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 0.001\nepochs: 3\nnum_experts: 4\n")
    cfg = TrainConfig.from_sources(yaml_file, {"epochs": 5})
    assert (cfg.learning_rate, cfg.epochs, cfg.num_experts) == (1e-3, 5, 4)
    assert {"learning_rate", "epochs", "num_experts"} <= cfg.user_set
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"lerning_rate": 1e-3}))
    with pytest.raises(ValueError, match=r"run\.json: unknown key 'lerning_rate'"):
        TrainConfig.from_file(json_file)
    assert read_config_file(json_file) == {"lerning_rate": 1e-3}


def test_config_file_values_and_errors(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; the settings take it as YAML 1.2 does.
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 1e-3\nwarmup_steps: 10\nmax_grad_norm: 2.5E+0\n")
    cfg = TrainConfig.from_file(yaml_file)
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.max_grad_norm) == (1e-3, 10, 2.5)
    # A bad value names the file, unless a flag replaces it (flags win over the file).
    yaml_file.write_text("learning_rate: -1\nepochs: 3\n")
    with pytest.raises(ValueError, match=r"run\.yaml: learning_rate=-1 must be"):
        TrainConfig.from_sources(yaml_file, {})
    assert TrainConfig.from_sources(yaml_file, {"learning_rate": 5e-4}).learning_rate == 5e-4
    # A combination the file alone gets wrong that a flag puts right is taken as well.
    yaml_file.write_text("top_k: 9\n")
    with pytest.raises(ValueError, match=r"run\.yaml: .*top_k"):
        TrainConfig.from_sources(yaml_file, {})
    assert TrainConfig.from_sources(yaml_file, {"num_experts": 16}).top_k == 9
    # A data file the file names but that is not there names the file, and where paths start.
    yaml_file.write_text("data: [train.jsonl]\n")
    with pytest.raises(ValueError, match=r"run\.yaml: data file 'train\.jsonl' does not exist "
                                         r"\(a relative path in a config file is taken from"):
        TrainConfig.from_sources(yaml_file, {})
    assert TrainConfig.from_sources(yaml_file, {"data": []}).data == []
    # A key given twice would keep its last value, silently.
    yaml_file.write_text("epochs: 3\nlearning_rate: 1e-3\nepochs: 4\n")
    with pytest.raises(ValueError, match=r"run\.yaml: not valid YAML: key 'epochs' is given "
                                         r"twice at line 3, column 1"):
        read_config_file(yaml_file)
    json_file = tmp_path / "run.json"
    json_file.write_text('{"epochs": 3, "epochs": 4}')
    with pytest.raises(ValueError, match=r"run\.json: not valid JSON: key 'epochs' is given "
                                         "twice"):
        read_config_file(json_file)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\nepochs: 3\n")
    with pytest.raises(DataError, match=r"latin\.yaml: not UTF-8 text \(byte 5\)"):
        read_config_file(latin)
    with pytest.raises(DataError, match="is a directory, not a config file"):
        read_config_file(tmp_path)


def test_cli_bad_setting_is_a_bad_flag(tmp_path, capsys):
    """A value the settings refuse is a bad command line, as one argparse refuses: status 2."""
    for argv, message in ((["--lr", "-1"], "learning_rate=-1.0 must be a finite number > 0"),
                          (["--experts", "2", "--top-k", "3"], "top_k=3 must not exceed"),
                          (["--builtin-task", "chian"],
                           "builtin_task='chian' is not a built-in task; choose from chain")):
        assert train_command.main([*argv, "--output-dir", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "never").exists()


def test_cli_trains_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--max-steps", "2", "--experts", "4", "--lora-r", "4",
            "--rounds", "2", "--cutoff-len", "64", "--batch-size", "8",
            "--micro-batch-size", "4", "--backend", "torch", "--no-progress"]
    assert train_command.main(argv) == 0
    printed = capsys.readouterr().out
    assert "steps: 2" in printed and "last loss:" in printed and "eval chain-2hop" in printed
    assert f"adapter: {out / 'adapter'}" in printed
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["num_experts"] == 4 and saved["num_rounds"] == 2

    assert train_command.main(argv) == 1  # the directory is not empty now
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graphmoe-fused train: error:")
    assert "not empty" in err[0]


def test_triton_backend_where_it_cannot_run_is_refused(tmp_path, monkeypatch):
    # A machine without the triton package (macOS, Windows): refused before anything is written.
    monkeypatch.setattr("graphmoe_fused.backends.triton.triton_available", lambda: False)
    _refused(tmp_path, ValueError, "backend='triton': .* needs the triton package",
             backend="triton")


# --- dtypes, host syncs, --overwrite, placement -------------------------------------------------


def _bf16_checkpoint(directory: Path) -> Path:
    from transformers import AutoModelForCausalLM

    save_builtin_model(directory)
    AutoModelForCausalLM.from_pretrained(directory).to(torch.bfloat16).save_pretrained(directory)
    return directory


def test_bf16_checkpoint_trains_float32_adapter(tmp_path):
    model_dir = _bf16_checkpoint(tmp_path / "bf16")
    # without autocast (the CPU default) the layers need one dtype: all of it in float32
    lines: list[str] = []
    train(_config(tmp_path / "plain", model=str(model_dir), max_steps=1), log=lines.append,
          progress=False)
    start = _events(tmp_path / "plain")[0]
    assert (start["adapter_dtype"], start["base_dtype"]) == ("float32", "float32")
    assert any("adapter float32, base float32" in line for line in lines)
    assert {t.dtype for t in _adapter(tmp_path / "plain" / "adapter").values()} == {torch.float32}
    # under bf16 autocast the base stays in bf16; the trained tensors are float32 all the same
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # one process, one mixed precision: let this run set its own
    try:
        result = train(_config(tmp_path / "mixed", model=str(model_dir), max_steps=2,
                               mixed_precision="bf16"), log=_quiet, progress=False)
    finally:
        AcceleratorState._reset_state()
    start = _events(tmp_path / "mixed")[0]
    assert (start["adapter_dtype"], start["base_dtype"]) == ("float32", "bfloat16")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    trained = _adapter(tmp_path / "mixed" / "adapter")
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert max(t.abs().max().item() for k, t in trained.items() if "lora_B" in k) > 0


def test_one_host_copy_per_step(tmp_path, monkeypatch):
    # The micro-batch loop keeps its sums on the device: train() itself copies to the host once
    # per step (the step's totals), not per layer and micro-batch.
    from graphmoe_fused.training import loop

    calls = []
    original = torch.Tensor.cpu

    def counting(self, *args, **kwargs):
        import sys

        frame = sys._getframe(1)
        if frame.f_code.co_filename == loop.__file__ and frame.f_code.co_name == "train":
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting)
    result = train(_config(tmp_path / "run", max_steps=2), log=_quiet, progress=False)
    assert len(calls) == 2 and len(result.losses) == 2


def test_overwrite_removes_the_previous_results_first(tmp_path):
    out = tmp_path / "run"
    train(_config(out, max_steps=2, save_every=1), log=_quiet, progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "keep-me").mkdir()
    assert (out / "adapter").is_dir() and (out / "routing_statistics.json").is_file()

    def crash(_record):
        raise _Stop

    with pytest.raises(_Stop):  # the new run dies in its first step
        train(_config(out, max_steps=2, overwrite=True), log=_quiet, progress=False,
              on_step=crash)
    assert not (out / "adapter").exists() and not (out / "routing_statistics.json").exists()
    assert not list((out / "checkpoints").glob("step-*"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "keep-me").is_dir()
    assert _events(out)[0]["config"]["overwrite"] is True  # the new run's log, alone


def test_evaluate_leaves_the_mode_to_multiple_choice_accuracy(monkeypatch):
    from graphmoe_fused.evaluation import multiple_choice
    from graphmoe_fused.training import loop

    model = torch.nn.Linear(2, 2)
    modes = []

    def fake(m, tokenizer, examples, **_kwargs):
        modes.append(m.training)

        class Result:
            accuracy = 0.5
        return Result()

    monkeypatch.setattr(multiple_choice, "multiple_choice_accuracy", fake)
    prep = loop._Prepared(TrainConfig(), Path("."), model, None, [], {"a": [1], "b": [2]}, None)
    toggled = []
    monkeypatch.setattr(torch.nn.Module, "train",
                        lambda self, mode=True: toggled.append(mode) or self)
    assert loop._evaluate(model, prep, TrainConfig(), _quiet) == {"a": 0.5, "b": 0.5}
    assert toggled == [] and modes == [True, True]


def test_own_fsdp_shards_from_the_cpu(monkeypatch):
    # shard_model gets the model still on the CPU (fully_shard moves each process's shards to
    # the device itself): the whole base never lands on the device first.
    from graphmoe_fused.hf.local_model import builtin_model
    from graphmoe_fused.training import loop, sharding

    seen = []
    monkeypatch.setattr(loop, "shard_model", lambda model, device, world: seen.append(
        ({p.device.type for p in model.parameters()}, device.type, world)))
    model = builtin_model()
    loop._shard_from_cpu(model, torch.device("meta"), 2)
    assert seen == [({"cpu"}, "meta", 2)]
    # what fully_shard does not manage is moved afterwards (here: all of it, nothing is sharded)
    sharding.move_remaining(model, torch.device("meta"))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_gradient_checkpointing_trains_the_same(tmp_path, monkeypatch):
    plain = train(_config(tmp_path / "plain"), log=_quiet, progress=False)
    calls = []
    checkpoint = modeling_utils.checkpoint  # what HF binds into each layer when enabling

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the renamed HF method's warning
        checkpointed = train(_config(tmp_path / "ckpt", gradient_checkpointing=True),
                             log=_quiet, progress=False)
    # Every decoder layer, every micro-batch, non-reentrant; the same run as without.
    assert calls and set(calls) == {False}
    assert checkpointed.losses == plain.losses
    assert checkpointed.aux_losses == plain.aux_losses
