"""``python -m bench.profile_step`` sorts a training step's time by kind of work; its count of
base GEMMs is the backend's documented one (6 per round, 8 when recomputing)."""

from __future__ import annotations

import pytest
import torch

from bench.profile_step import BASE, main, measure
from bench.shapes import BenchShape

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)

# Every size distinct, so that only a base product has both d and D' among its dimensions.
SHAPE = BenchShape("distinct", 40, 72, 4, 2, 4, 2, 4, 24, torch.float32)


@pytest.mark.parametrize(("recompute", "per_round"), [(False, 6), (True, 8)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_base_gemms_per_round(recompute, per_round, dropout):
    m = measure(SHAPE, "torch", dropout=dropout, recompute=recompute, steps=1)
    assert m["base_gemm_calls"] == per_round * SHAPE.num_rounds
    assert m["categories"][BASE] > 0 and m["step_s"] > 0 and m["unit_s"] > 0
    assert ("dropout-mask hashing" in m["categories"]) == (dropout > 0)


def test_command_prints_the_table(capsys):
    assert main(["--shape", "tiny", "--rounds", "2", "--dropout", "0.1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| base GEMMs |" in out and "| LoRA products (rank r) |" in out
