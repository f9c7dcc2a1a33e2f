"""Training works end to end: the loss falls on a fixed batch, and the demo runs from the command
line (``graphmoe-demo`` / ``python -m graphmoe_fused``)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from graphmoe_fused.cli import main as cli
from graphmoe_fused.cli.demo import BOS, PAD, SEP, DemoOptions, copy_batch, run_demo

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_loss_decreases_on_a_fixed_batch(arch):
    model = converted(arch, randomize=False, lora_dropout=0.05).train()
    ids, mask, labels = batch(batch_size=4, seq_len=8, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(10):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The base model (embeddings and head included) is frozen and random: the loss falls
    # steadily rather than fast.
    assert losses[-1] < losses[0] - 0.3, losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 8, losses
    for name, p in model.named_parameters():  # AdamW never touched the base model
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


def test_copy_batch_layout():
    ids, mask, labels = copy_batch(16, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ids.shape == mask.shape == labels.shape == (16, 8)
    for row, row_mask, row_labels in zip(ids, mask, labels, strict=True):
        n = int((row != PAD).sum() - 2) // 2
        assert row[0] == BOS and row[n + 1] == SEP
        assert torch.equal(row[1 : n + 1], row[n + 2 : 2 * n + 2])
        assert torch.equal(row_labels[n + 2 : 2 * n + 2], row[1 : n + 1])
        assert (row_labels[: n + 2] == -100).all() and (row_labels[2 * n + 2 :] == -100).all()
        assert row_mask.sum() == 2 * n + 2


def test_run_demo_learns_and_reports():
    lines = []
    result = run_demo(DemoOptions(steps=12, backend="reference", progress=False, experts=4,
                                  rounds=2), log=lines.append)
    assert len(result.losses) == len(result.aux_losses) == 12
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.3, result.losses
    assert all(0 < a <= 4 for a in result.aux_losses)  # n·Σ f_i P_i with f_i <= 1, Σ P_i = 1
    assert list(result.workload) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for fractions in result.workload.values():
        assert fractions.shape == (2, 4)
        torch.testing.assert_close(fractions.sum(-1), torch.ones(2, dtype=torch.float64))
    assert result.report.trainable > 0 and "trainable%" in "\n".join(lines)


def test_cli_main_prints_losses_workload_and_parameter_share(capsys):
    assert cli.main(["--steps", "3", "--backend", "reference", "--experts", "4", "--rounds", "2",
                     "--no-progress", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "step   3/3  loss" in out and "aux" in out
    assert "trainable%:" in out and "trainable parameters:" in out
    assert "expert workload" in out and "round 2:" in out and "model.layers.1.mlp" in out


def test_cli_rejects_top_k_above_experts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--experts", "2", "--top-k", "3"])
    assert exit_info.value.code == 2
    assert "--top-k 3 exceeds --experts 2" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "graphmoe_fused", "--steps", "2", "--backend", "reference",
         "--experts", "2", "--top-k", "1", "--rounds", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "expert workload" in result.stdout


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("graphmoe-demo") == "graphmoe_fused.cli.main:main"
