"""The expert workload per layer and round (the paper's Fig. 4): the share of the routing
selections each expert received, and how unevenly they are spread across experts.

A share is ``count / sum(counts of that round)``: the share of the top-k selections, so each
round's shares sum to 1 (as :func:`graphmoe_fused.routing_fractions` computes; with top-k > 1
the share of *tokens* reaching an expert is ``k`` times this). The spread per round is the
population standard deviation of the shares (0 = perfectly balanced) and max/min (1 = balanced,
∞ = an expert that got nothing).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._figure import new_figure, save_png
from .sources import PlotInput, count_grid, read_input


@dataclass(frozen=True)
class LayerWorkload:
    """One layer's routing counts ``[T][n]``, shares and per-round spread.

    ``std`` and ``max_over_min`` are NaN for a round with no selections (its shares are 0)."""

    name: str
    counts: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[float, ...], ...]
    std: tuple[float, ...]
    max_over_min: tuple[float, ...]

    @property
    def num_rounds(self) -> int:
        return len(self.counts)

    @property
    def num_experts(self) -> int:
        return len(self.counts[0])


def layer_workload(name: str, counts: Sequence[Sequence[int]]) -> LayerWorkload:
    """Shares and spread of one layer's ``[T][n]`` counts."""
    grid = count_grid([list(r) for r in counts], f"layer {name!r}")
    shares, stds, ratios = [], [], []
    for row in grid:
        total = sum(row)
        if total == 0:
            shares.append(tuple(0.0 for _ in row))
            stds.append(math.nan)
            ratios.append(math.nan)
            continue
        share = tuple(c / total for c in row)
        shares.append(share)
        stds.append(statistics.pstdev(share))
        ratios.append(max(row) / min(row) if min(row) else math.inf)
    return LayerWorkload(name, grid, tuple(shares), tuple(stds), tuple(ratios))


def expert_workload(layers: Mapping[str, Sequence[Sequence[int]]]) -> list[LayerWorkload]:
    """:func:`layer_workload` of every layer, in the mapping's order (the model's order as
    written); ValueError when layers disagree on the number of rounds or experts."""
    if not layers:
        raise ValueError("no layers in the routing statistics")
    result = [layer_workload(name, counts) for name, counts in layers.items()]
    shapes = {(w.num_rounds, w.num_experts) for w in result}
    if len(shapes) > 1:
        raise ValueError(f"layers have different [rounds, experts] shapes: {sorted(shapes)}")
    return result


def workload_from_input(source: PlotInput) -> list[LayerWorkload]:
    """The workload of a routing_statistics.json, or of a train log's last "routing" event."""
    if source.kind == "routing_statistics":
        data, where = source.data, str(source.path)
    elif source.kind == "train_log":
        routing = [(n, e) for n, e in source.data if e["event"] == "routing"]
        if not routing:
            raise ValueError(f"{source.path}: no \"routing\" event to plot the workload from")
        line, data = routing[-1]
        where = f"{source.path}:{line}"
    else:
        raise ValueError(f"{source.path}: a {source.kind} file has no routing statistics")
    layers = data.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: 'layers' must be an object {{layer name: [[counts]]}}")
    try:
        workload = expert_workload(layers)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for field, got in (("num_rounds", workload[0].num_rounds),
                       ("num_experts", workload[0].num_experts)):
        if field in data and data[field] != got:
            raise ValueError(f"{where}: '{field}' is {data[field]!r} but the counts have {got}")
    return workload


def load_workload(path: str | Path) -> list[LayerWorkload]:
    """:func:`workload_from_input` of the file at ``path``."""
    return workload_from_input(read_input(path))


def _spread_label(w: LayerWorkload, t: int) -> str:
    if math.isnan(w.std[t]):
        return "no tokens"
    ratio = "∞" if math.isinf(w.max_over_min[t]) else f"{w.max_over_min[t]:.2f}"
    return f"std {100 * w.std[t]:.1f} pp, max/min {ratio}"


def plot_workload(workload: Sequence[LayerWorkload], path: str | Path, title: str = "") -> Path:
    """One PNG: per layer, a rounds x experts heat map of the shares (values annotated, in %)
    with each round's spread beside its row. Returns ``path``."""
    if not workload:
        raise ValueError("no layers to plot")
    n, t_count = workload[0].num_experts, workload[0].num_rounds
    height = 0.9 + 0.42 * t_count
    fig = new_figure(max(6.0, 0.75 * n + 3.5), 0.8 + height * len(workload))
    axes: Any = fig.subplots(len(workload), 1, squeeze=False)[:, 0]
    vmax = max(max(max(r) for r in w.shares) for w in workload) or 1.0
    image = None
    for ax, w in zip(axes, workload, strict=True):
        image = ax.imshow(w.shares, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        for t in range(t_count):
            for e in range(n):
                share = w.shares[t][e]
                ax.text(e, t, f"{100 * share:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if share > 0.6 * vmax else "white")
        ax.set_xticks(range(n), [str(e) for e in range(n)], fontsize=7)
        ax.set_yticks(range(t_count), [f"round {t + 1}" for t in range(t_count)], fontsize=7)
        side = ax.secondary_yaxis("right")
        side.set_yticks(range(t_count), [_spread_label(w, t) for t in range(t_count)],
                        fontsize=7)
        ax.set_title(w.name, fontsize=8)
    axes[-1].set_xlabel("expert")
    fig.colorbar(image, ax=list(axes), label="share of the round's selections", shrink=0.8,
                 format="{x:.0%}")
    fig.suptitle(title or "Expert workload per round (%)", fontsize=10)
    return save_png(fig, path)
