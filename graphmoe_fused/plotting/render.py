"""Plots every input file into one folder: each file's kind decides its PNGs.

- train_log.jsonl -> ``aux_loss.png`` (when it has "step" events) and ``workload.png`` (from its
  last "routing" event, when it has one)
- routing_statistics.json -> ``workload.png``
- benchmark JSON (pytest-benchmark or gpu_check) -> ``round_latency.png`` (when it has the T
  sweep) and ``speedups.png`` (when it has speed-ups), plus the markdown tables

When several inputs give the same PNG, each is prefixed with its input's stem
(``run1-aux_loss.png``). Every input is read and checked, and every name chosen, before the
first PNG is written, so a bad file or an existing PNG leaves the folder as it was.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._figure import require_matplotlib
from .aux_loss import curves_from_input, plot_aux_loss
from .benchmarks import benchmark_summary
from .latency import plot_round_latency, plot_speedups, speedup_markdown
from .sources import PlotInput, read_input
from .workload import plot_workload, workload_from_input

Draw = Callable[[Path], Path]


@dataclass
class PlotReport:
    """What :func:`plot_files` wrote: the PNG paths, and the markdown of each benchmark."""

    written: list[Path] = field(default_factory=list)
    markdown: list[str] = field(default_factory=list)


def plans_for(source: PlotInput) -> tuple[list[tuple[str, Draw]], str | None]:
    """The PNGs one input gives, as (kind name, draw at a path), and its markdown (or None);
    raises the input's ValueError before anything is drawn."""
    title = f" — {source.path}"
    if source.kind == "routing_statistics":
        workload = workload_from_input(source)
        heading = "Expert workload per round (%)" + title
        return [("workload", lambda p: plot_workload(workload, p, heading))], None
    if source.kind == "train_log":
        kinds = {e["event"] for _, e in source.data}
        plans: list[tuple[str, Draw]] = []
        if "step" in kinds:
            curves = curves_from_input(source)
            plans.append(("aux_loss",
                          lambda p: plot_aux_loss(curves, p, "Training losses" + title)))
        if "routing" in kinds:
            workload = workload_from_input(source)
            plans.append(("workload", lambda p: plot_workload(
                workload, p, "Expert workload per round (%), last routing event" + title)))
        if not plans:
            raise ValueError(f"{source.path}: a train log with no \"step\" or \"routing\" events "
                             "(nothing to plot yet)")
        return plans, None
    summary = benchmark_summary(source)
    plans = []
    if summary.rounds:
        plans.append(("round_latency", lambda p: plot_round_latency(summary, p)))
    if summary.speedups:
        plans.append(("speedups", lambda p: plot_speedups(summary, p)))
    return plans, f"{source.path}:\n\n{speedup_markdown(summary)}"


def _prefixes(paths: list[Path]) -> list[str]:
    """A distinct prefix per input: its stem, or parent-stem where stems repeat (run1/ and
    run2/ both holding train_log.jsonl), or a number as the last resort."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    longer = [f"{p.parent.name}-{p.stem}" if p.parent.name else p.stem for p in paths]
    if len(set(longer)) == len(longer):
        return longer
    return [f"{i + 1}-{p.stem}" for i, p in enumerate(paths)]


def plot_files(inputs: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False
               ) -> PlotReport:
    """Reads ``inputs``, detects their kinds and writes their PNGs into ``out_dir`` (created
    when missing). FileExistsError when a PNG exists and not ``overwrite``."""
    if not inputs:
        raise ValueError("no input files given")
    paths = [Path(p) for p in inputs]
    repeated = [p for p, c in Counter(p.resolve() for p in paths).items() if c > 1]
    if repeated:
        raise ValueError(f"{repeated[0]}: given more than once")
    planned: list[tuple[Path, str, Draw]] = []
    markdown = []
    for path in paths:
        plans, text = plans_for(read_input(path))
        planned += [(path, kind, draw) for kind, draw in plans]
        if text:
            markdown.append(text)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    targets = []
    for kind in dict.fromkeys(k for _, k, _ in planned):
        group = [(path, draw) for path, k, draw in planned if k == kind]
        if len(group) == 1:
            targets.append((out / f"{kind}.png", group[0][1]))
        else:
            prefixes = _prefixes([path for path, _ in group])
            targets += [(out / f"{prefix}-{kind}.png", draw)
                        for prefix, (_, draw) in zip(prefixes, group, strict=True)]
    existing = [t for t, _ in targets if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]} exists{more}; --overwrite replaces it")
    require_matplotlib()  # before the folder exists: a missing extra leaves no trace
    out.mkdir(parents=True, exist_ok=True)
    report = PlotReport(markdown=markdown)
    for target, draw in targets:
        report.written.append(draw(target))
    return report
