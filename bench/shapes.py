"""Benchmark shapes (docs/design.md §4) and how a run picks one."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

SHAPE_ENV = "GRAPHMOE_BENCH_SHAPE"


@dataclass(frozen=True)
class BenchShape:
    """One layer at one batch size: ``tokens`` rows of width ``d`` through ``T`` rounds."""

    name: str
    d: int
    intermediate: int  # D'
    num_experts: int  # n
    top_k: int  # k
    lora_r: int  # r
    num_rounds: int  # T
    dh: int
    tokens: int
    dtype: torch.dtype

    @property
    def gru_hidden_ratio(self) -> float:
        # GraphMoEConfig derives dh = int(ratio * d). Every table shape uses the paper's 0.1; a
        # custom dh gets a ratio a hair above dh / d, which floors back to dh exactly.
        return 0.1 if int(0.1 * self.d) == self.dh else (self.dh + 0.5) / self.d

    def as_info(self) -> dict[str, Any]:
        info = asdict(self)
        info["dtype"] = str(self.dtype).removeprefix("torch.")
        return info


SHAPES: dict[str, BenchShape] = {
    shape.name: shape
    for shape in (
        BenchShape("llama3-8b", 4096, 14336, 8, 2, 16, 3, 409, 8192, torch.bfloat16),
        BenchShape("cpu-small", 1024, 2816, 8, 2, 16, 3, 102, 1024, torch.float32),
        # For smoke runs (`--benchmark-disable`): every code path, a fraction of a second each.
        BenchShape("tiny", 64, 176, 8, 2, 16, 3, 6, 64, torch.float32),
    )
}


def default_shape_name(device: torch.device) -> str:
    """The headline shape of the device: the LLaMA-3-8B layer on a GPU, the small one on a CPU."""
    return "llama3-8b" if device.type == "cuda" else "cpu-small"


def resolve_shape(requested: str | None, device: torch.device) -> BenchShape:
    """``requested`` (command line), else ``$GRAPHMOE_BENCH_SHAPE``, else the device default."""
    name = requested or os.environ.get(SHAPE_ENV) or default_shape_name(device)
    if name not in SHAPES:
        raise ValueError(f"unknown benchmark shape {name!r}; choose from {sorted(SHAPES)}")
    return SHAPES[name]


def print_shape_report(prog: str, description: str | None, report: Callable[[str], str],
                       argv: Sequence[str] | None = None) -> int:
    """The command line of a report that takes one ``--shape`` (``bench.roofline``,
    ``bench.op_count``): prints ``report(shape)``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    print(report(parser.parse_args(argv).shape))
    return 0
