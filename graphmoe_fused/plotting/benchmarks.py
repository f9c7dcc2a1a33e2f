"""The round-latency sweep (T = 1..5) and the speed-up ratios of a benchmark JSON.

Two writers (see bench/):
- ``pytest bench/ --benchmark-json=F`` (pytest-benchmark): every benchmark's ``extra_info`` has
  ``kind``, ``impl``, ``mode``, ``rounds``; its time is ``stats.median`` (seconds). The sweep is
  ``kind == "rounds"`` (one benchmark per backend and T), its ratios to T = 1 are ratios of
  separate medians. The speed-ups: ``kind == "paired"`` holds ``extra_info.paired[impl]``
  (``speedup_vs_reference``, ``speedup_vs_mixlora``, ``vs_T_dense``: medians of per-round
  ratios of interleaved calls, fwd+bwd), and the ``kind == "layer"`` medians give the same
  ratios from separate benchmarks, fwd and fwd+bwd.
- ``python -m bench.gpu_check``: ``steps.benchmarks.checks.rounds_T1_to_T5["T=t"]`` =
  ``{median_ms, vs_T1}`` (triton, interleaved) and ``checks.layer[mode][impl]`` =
  ``{median_ms, speedup_vs_reference, speedup_vs_mixlora, vs_T_dense}`` (paired).

bench/report.py reads the pytest-benchmark JSON the same way (its ``Results``); the package
cannot import bench/, which is not installed, hence this small copy of that parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import PlotInput, number, read_input

BACKEND_ORDER = ("reference", "torch", "triton")
IMPL_ORDER = ("mixlora", "torch", "triton")


@dataclass(frozen=True)
class RoundLatency:
    """One backend's inference latency per number of rounds ``T``: ``median_s[T]`` and
    ``relative[T]`` (time at T / time at T = 1; ``paired`` when from interleaved calls)."""

    backend: str
    median_s: dict[int, float]
    relative: dict[int, float]
    paired: bool

    @property
    def per_extra_round(self) -> float | None:
        """Least-squares slope of the time over T in units of the T = 1 time: the cost of one
        more round (a fit: single differences of noisy medians jump around)."""
        points = sorted(self.median_s.items())
        first = self.median_s.get(1)
        if not first or len(points) < 2:
            return None
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        var = sum((t - mean_t) ** 2 for t, _ in points)
        return sum((t - mean_t) * (v - mean_v) for t, v in points) / var / first


@dataclass(frozen=True)
class SpeedupRow:
    """Ratios for ``impl`` in ``mode``: ``vs_reference`` and ``vs_mixlora`` are speed-ups
    (other time / this time, > 1 = faster), ``vs_t_dense`` a time ratio (this time / (T × the
    dense frozen MLP's), the floor being 1). ``source``: "paired" or "separate"."""

    impl: str
    mode: str
    vs_reference: float | None
    vs_mixlora: float | None
    vs_t_dense: float | None
    source: str


@dataclass(frozen=True)
class BenchmarkSummary:
    """What a benchmark JSON says about rounds and speed-ups; ``label`` names the run."""

    path: Path
    writer: str
    label: str
    num_rounds: int | None
    rounds: list[RoundLatency] = field(default_factory=list)
    speedups: list[SpeedupRow] = field(default_factory=list)


def _backend_order(backend: str) -> tuple[int, str]:
    return (BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else len(BACKEND_ORDER),
            backend)


def _obj(data: Any, *keys: str) -> dict[str, Any]:
    """``data[k0][k1]...``, or {} where a level is missing or not an object (a step that
    failed or was skipped records no figures)."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _optional(value: Any, where: str) -> float | None:
    return None if value is None else number(value, where)


def summarize_pytest_benchmark(data: dict[str, Any], path: Path) -> BenchmarkSummary:
    medians: dict[tuple[str, str, str, int], float] = {}
    paired: dict[str, Any] = {}
    shapes = set()
    for i, bench in enumerate(data["benchmarks"]):
        extra = bench.get("extra_info") if isinstance(bench, dict) else None
        if not isinstance(extra, dict) or "kind" not in extra:
            continue  # not one of bench/'s GraphMoE benchmarks
        where = f"{path}: benchmarks[{i}] ({bench.get('name', '?')})"
        try:
            key = (str(extra["kind"]), str(extra["impl"]), str(extra["mode"]),
                   int(extra["rounds"]))
            median = number(bench["stats"]["median"], f"{where}: stats.median")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed benchmark entry ({exc})") from None
        medians[key] = median
        shapes.add(str(extra.get("shape")))
        if key[0] == "paired" and isinstance(extra.get("paired"), dict):
            paired = extra["paired"]
    if len(shapes) > 1:
        raise ValueError(f"{path}: results mix shapes {sorted(shapes)}; plot one run at a time")
    info = _obj(data, "machine_info", "graphmoe_bench")
    shape = info.get("shape") or next(
        (b["extra_info"].get("shape_params", {}) for b in data["benchmarks"]
         if isinstance(b, dict) and isinstance(b.get("extra_info"), dict)
         and "kind" in b["extra_info"]), {})
    t_count = shape.get("num_rounds")
    device = info.get("gpu") or info.get("device") or "?"
    label = f"{shape.get('name', '?')} on {device}, {data.get('datetime', '?')[:10]}"

    rounds = []
    present = sorted({k[1] for k in medians if k[0] == "rounds"}, key=_backend_order)
    for backend in present:
        times = {k[3]: v for k, v in medians.items() if k[0] == "rounds" and k[1] == backend}
        times = dict(sorted(times.items()))
        rel = {t: v / times[1] for t, v in times.items()} if times.get(1) else {}
        rounds.append(RoundLatency(backend, times, rel, paired=False))

    speedups = []
    for impl in IMPL_ORDER:
        entry = paired.get(impl)
        if isinstance(entry, dict) and "speedup_vs_reference" in entry:
            at = f"{path}: paired.{impl}"
            speedups.append(SpeedupRow(
                impl, "fwd_bwd", _optional(entry.get("speedup_vs_reference"), at),
                _optional(entry.get("speedup_vs_mixlora"), at),
                _optional(entry.get("vs_T_dense"), at), "paired"))
    for mode in ("fwd", "fwd_bwd"):
        layer = {k[1]: v for k, v in medians.items() if k[0] == "layer" and k[2] == mode}
        dense = layer.get("dense")
        for impl in IMPL_ORDER:
            if impl in layer:
                time = layer[impl]
                speedups.append(SpeedupRow(
                    impl, mode, _ratio(layer.get("reference"), time),
                    _ratio(layer.get("mixlora"), time),
                    _ratio(time, t_count * dense if dense and t_count else None), "separate"))
    return BenchmarkSummary(path, "pytest-benchmark", label, t_count, rounds, speedups)


def summarize_gpu_check(data: dict[str, Any], path: Path) -> BenchmarkSummary:
    checks = _obj(data, "steps", "benchmarks", "checks")
    shape = _obj(checks, "config", "shape")
    gpu = _obj(data, "steps", "environment", "checks", "gpu").get("name")
    device = "dry run (CPU, Triton interpreter)" if data.get("dry_run") else gpu or "GPU"
    label = f"{shape.get('name', '?')} on {device}, {str(data.get('started', '?'))[:10]}"
    sweep = _obj(checks, "rounds_T1_to_T5")
    times, rel = {}, {}
    for name, entry in sweep.items():
        if not name.startswith("T="):
            continue
        at = f"{path}: rounds_T1_to_T5[{name!r}]"
        try:
            t = int(name[2:])
            times[t] = number(entry["median_ms"], f"{at}.median_ms") / 1e3
            rel[t] = number(entry["vs_T1"], f"{at}.vs_T1")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{at}: malformed entry ({exc})") from None
    rounds = [RoundLatency("triton", dict(sorted(times.items())), dict(sorted(rel.items())),
                           paired=True)] if times else []
    speedups = []
    for mode in ("fwd", "fwd_bwd"):
        for impl in IMPL_ORDER:
            entry = _obj(checks, "layer", mode, impl)
            if not entry:
                continue
            at = f"{path}: layer.{mode}.{impl}"
            row = SpeedupRow(impl, mode, _optional(entry.get("speedup_vs_reference"), at),
                             _optional(entry.get("speedup_vs_mixlora"), at),
                             _optional(entry.get("vs_T_dense"), at), "paired")
            if any(v is not None for v in (row.vs_reference, row.vs_mixlora, row.vs_t_dense)):
                speedups.append(row)
    return BenchmarkSummary(path, "gpu_check", label, shape.get("num_rounds"), rounds, speedups)


def benchmark_summary(source: PlotInput) -> BenchmarkSummary:
    """The summary of a pytest-benchmark or gpu_check JSON; ValueError when it has neither a
    round sweep nor a speed-up."""
    if source.kind == "pytest_benchmark":
        summary = summarize_pytest_benchmark(source.data, source.path)
    elif source.kind == "gpu_check":
        summary = summarize_gpu_check(source.data, source.path)
    else:
        raise ValueError(f"{source.path}: a {source.kind} file is not a benchmark JSON")
    if not summary.rounds and not summary.speedups:
        raise ValueError(f"{source.path}: no round-latency (T = 1..5) or speed-up benchmarks in "
                         "this benchmark JSON")
    for r in summary.rounds:
        bad = [t for t, v in r.median_s.items() if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"{source.path}: {r.backend} latency at T={bad[0]} is "
                             f"{r.median_s[bad[0]]!r}, not a time > 0")
    return summary


def load_benchmark(path: str | Path) -> BenchmarkSummary:
    """:func:`benchmark_summary` of the file at ``path``."""
    return benchmark_summary(read_input(path))
