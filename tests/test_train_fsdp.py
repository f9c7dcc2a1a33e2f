"""``--fsdp`` on two gloo processes (torch's ``fully_shard`` on every decoder layer and the
root) trains the same steps as one unsharded process on the same global batch, writes the same
adapter once, and really shards the frozen base (each process holds about half of it)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from graphmoe_fused.training import TrainConfig

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .test_train_distributed import (
    LR,
    STEPS,
    _steps,
    assert_same_steps,
    one_and_two_processes,
)

JSON_KEYS = {"graphmoe_config", "graphmoe_base_model"}  # metadata values that are JSON


def test_fsdp_two_processes_match_one(tmp_path):
    single, two, stdout = one_and_two_processes(tmp_path, "--fsdp")
    one = tmp_path / "one"
    assert "fully_shard" in stdout

    steps_two, events_two = _steps(two)
    start = events_two[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["config"]["fsdp"]
    assert [e["event"] for e in events_two].count("start") == 1
    assert [e["event"] for e in events_two].count("end") == 1
    assert [e["step"] for e in steps_two] == [1, 2, 3]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # the frozen base is sharded: each process holds about half of its elements
    held, total = start["fsdp"]["base_elements_per_process"], start["fsdp"]["base_elements"]
    assert len(held) == 2 and sum(held) == total
    assert all(abs(n / total - 0.5) < 0.05 for n in held), (held, total)
    assert "fsdp" not in _steps(one)[1][0]

    assert_same_steps(steps_two, _steps(one)[0], single)

    # The adapter: full tensors (gathered), same names, shapes and metadata as unsharded.
    file_one = one / "adapter" / "graphmoe_adapter.safetensors"
    file_two = two / "adapter" / "graphmoe_adapter.safetensors"
    a, b = load_file(str(file_one)), load_file(str(file_two))
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 0.01 * STEPS * LR, worst  # the tolerance of test_train_distributed
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0.5 * LR
    # (the flags give lora_alpha as 8.0, Python as 8: compare the JSON values)
    with safe_open(str(file_one), "pt") as f1, safe_open(str(file_two), "pt") as f2:
        m1, m2 = ({k: json.loads(v) if k in JSON_KEYS else v
                   for k, v in f.metadata().items()} for f in (f1, f2))
    assert m1 == m2 and m1["graphmoe_base_model"]["fingerprint"] is not None
    assert json.loads((one / "adapter" / "graphmoe_config.json").read_text()) == \
        json.loads((two / "adapter" / "graphmoe_config.json").read_text())
    # the final multiple-choice eval ran on the sharded model too
    assert [e["event"] for e in events_two].count("eval") == \
        [e["event"] for e in _steps(one)[1]].count("eval") == 1


@pytest.mark.parametrize("extra", [{"save_every": 1}, {"resume": True}])
def test_fsdp_refuses_checkpoints(extra):
    with pytest.raises(ValueError, match="fsdp does not support resume or save_every"):
        TrainConfig(fsdp=True, output_dir="x", **extra)
