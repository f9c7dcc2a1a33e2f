"""pytest options and fixtures of the benchmark suite.

    pytest bench/                          # llama3-8b on CUDA, else cpu-small
    pytest bench/ --bench-shape tiny --benchmark-disable   # smoke run, seconds
    GRAPHMOE_BENCH_SHAPE=cpu-small pytest bench/           # same as --bench-shape
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

from bench import harness
from bench.harness import BenchContext
from bench.shapes import SHAPE_ENV, SHAPES, resolve_shape


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphmoe-bench", "graphmoe_fused benchmarks")
    group.addoption(
        "--bench-shape", choices=sorted(SHAPES), default=None,
        help=f"benchmark shape (default: ${SHAPE_ENV}, else llama3-8b on CUDA, cpu-small on CPU)",
    )
    group.addoption(
        "--bench-device", default=None,
        help="torch device (default: $GRAPHMOE_BENCH_DEVICE, else cuda when available, else cpu)",
    )
    group.addoption(
        "--bench-budget", type=float, default=None,
        help="timed seconds aimed at per benchmark; sets the round count (default: 2, or "
             "$GRAPHMOE_BENCH_BUDGET)",
    )
    group.addoption("--bench-min-rounds", type=int, default=3, help="timed rounds at least")
    group.addoption("--bench-max-rounds", type=int, default=50, help="timed rounds at most")
    group.addoption(
        "--bench-threads", type=int, default=None,
        help="torch CPU threads (default: $GRAPHMOE_BENCH_THREADS, else torch's default); on a "
             "shared machine fewer threads than cores gives steadier CPU timings",
    )
    group.addoption(
        "--bench-dropout", type=float, default=0.0,
        help="LoRA dropout of the benchmarked layers (default 0: every backend does the same "
             "work; the paper trains with 0.05)",
    )
    group.addoption(
        "--bench-rounds", type=int, default=None,
        help="self-rethinking rounds T of the benchmarked layers (default: the shape's)",
    )
    group.addoption(
        "--bench-recompute", action="store_true", default=None,
        help="build layers with recompute_intermediates=True (recompute the base gate/up "
             "products in backward instead of saving them: the memory lever, 2 more GEMMs per "
             "round; default: the config's default, False)",
    )


def _option(config: pytest.Config, name: str, env: str | None = None) -> Any:
    # getoption with a default: when pytest collects bench/ from a parent directory this
    # conftest is not an initial one and its options are not registered.
    value = config.getoption(name, default=None)
    if value is None and env is not None:
        value = os.environ.get(env) or None
    return value


def _context(config: pytest.Config) -> BenchContext:
    cached = getattr(config, "_graphmoe_bench_ctx", None)
    if cached is not None:
        return cached
    threads = _option(config, "--bench-threads", "GRAPHMOE_BENCH_THREADS")
    if threads is not None:
        torch.set_num_threads(int(threads))
    device_name = _option(config, "--bench-device", "GRAPHMOE_BENCH_DEVICE")
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape = resolve_shape(_option(config, "--bench-shape"), device)
    rounds = _option(config, "--bench-rounds")
    if rounds is not None:
        if int(rounds) < 1:
            raise pytest.UsageError(f"--bench-rounds {rounds}: need T >= 1")
        shape = dataclasses.replace(shape, num_rounds=int(rounds))
    ctx = BenchContext(
        shape=shape,
        device=device,
        budget_s=float(_option(config, "--bench-budget", "GRAPHMOE_BENCH_BUDGET") or 2.0),
        min_rounds=int(_option(config, "--bench-min-rounds") or 3),
        max_rounds=int(_option(config, "--bench-max-rounds") or 50),
        dropout=float(_option(config, "--bench-dropout") or 0.0),
        recompute_intermediates=bool(_option(config, "--bench-recompute")),
        loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    config._graphmoe_bench_ctx = ctx
    return ctx


@pytest.fixture(scope="session")
def ctx(pytestconfig: pytest.Config) -> BenchContext:
    return _context(pytestconfig)


def pytest_report_header(config: pytest.Config) -> str:
    c = _context(config)
    s = c.shape
    return (
        f"graphmoe bench: shape={s.name} (d={s.d}, D'={s.intermediate}, n={s.num_experts}, "
        f"k={s.top_k}, r={s.lora_r}, T={s.num_rounds}, dh={s.dh}, tokens={s.tokens}, "
        f"{str(s.dtype).removeprefix('torch.')}) device={c.device} budget={c.budget_s}s/bench "
        f"threads={torch.get_num_threads()}"
    )


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["graphmoe_bench"] = harness.machine_info(_context(config))
