"""Recurrent-round latency against T (the paper's Fig. 5c) and the speed-up table, drawn from a
:class:`~graphmoe_fused.plotting.benchmarks.BenchmarkSummary`."""

from __future__ import annotations

from pathlib import Path

from ._figure import fmt_ms, fmt_ratio, markdown_table, new_figure, save_png
from .benchmarks import BenchmarkSummary

MODE_NAMES = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}


def plot_round_latency(summary: BenchmarkSummary, path: str | Path) -> Path:
    """Two panels over T: the median latency per backend (ms), and the latency relative to
    T = 1 beside the line ``T ×`` (every round as costly as the first). Returns ``path``."""
    if not summary.rounds:
        raise ValueError(f"{summary.path}: no round-latency (T = 1..5) benchmarks to plot")
    fig = new_figure(10.0, 4.2)
    left, right = fig.subplots(1, 2)
    all_t = sorted({t for r in summary.rounds for t in r.median_s})
    for r in summary.rounds:
        ts = list(r.median_s)
        slope = r.per_extra_round
        label = r.backend + ("" if slope is None else f" (+{slope:.2f}× per extra round)")
        left.plot(ts, [1e3 * v for v in r.median_s.values()], marker="o", label=label)
        if r.relative:
            right.plot(list(r.relative), list(r.relative.values()), marker="o", label=r.backend)
    right.plot(all_t, all_t, color="gray", linestyle=":", label="T × round 1")
    left.set_ylabel("median latency (ms)")
    right.set_ylabel("latency / latency at T = 1")
    for ax in (left, right):
        ax.set_xlabel("recurrent rounds T")
        ax.set_xticks(all_t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    how = "interleaved calls" if all(r.paired for r in summary.rounds) else "separate medians"
    fig.suptitle(f"Layer inference latency vs rounds — {summary.label} ({how})", fontsize=10)
    return save_png(fig, path)


def speedup_rows(summary: BenchmarkSummary) -> tuple[list[str], list[list[str]]]:
    """The speed-up table's header and rows, as printed and drawn."""
    t = summary.num_rounds or "T"
    header = ["impl", "mode", "× vs reference", "× vs MixLoRA-style", f"time / ({t} × dense)",
              "ratios from"]
    rows = [[s.impl, MODE_NAMES.get(s.mode, s.mode), fmt_ratio(s.vs_reference),
             fmt_ratio(s.vs_mixlora), fmt_ratio(s.vs_t_dense),
             "interleaved calls" if s.source == "paired" else "separate medians"]
            for s in summary.speedups]
    return header, rows


def speedup_markdown(summary: BenchmarkSummary) -> str:
    """The speed-up table (and the round sweep, when the JSON has one) as markdown."""
    parts = []
    if summary.speedups:
        parts += [f"Speed-ups — {summary.label}", "", markdown_table(*speedup_rows(summary))]
    if summary.rounds:
        ts = sorted({t for r in summary.rounds for t in r.median_s})
        rows = [[r.backend, *(f"{fmt_ratio(r.relative.get(t))} ({fmt_ms(r.median_s.get(t))})"
                              for t in ts), fmt_ratio(r.per_extra_round)]
                for r in summary.rounds]
        parts += ["" if parts else None, f"Latency relative to T = 1 — {summary.label}", "",
                  markdown_table(["backend", *(f"T={t}" for t in ts), "per extra round"], rows)]
    return "\n".join(p for p in parts if p is not None) + "\n"


def plot_speedups(summary: BenchmarkSummary, path: str | Path) -> Path:
    """The speed-up table as an image. Returns ``path``."""
    if not summary.speedups:
        raise ValueError(f"{summary.path}: no speed-up benchmarks to tabulate")
    header, rows = speedup_rows(summary)
    fig = new_figure(9.5, 0.9 + 0.32 * (len(rows) + 1))
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(header))))
    table.scale(1.0, 1.3)
    for col in range(len(header)):
        table[0, col].set_text_props(fontweight="bold")
    ax.set_title(f"Speed-ups — {summary.label}\n× = other time / this time (> 1 is faster); "
                 "time / (T × dense): 1 is the floor; fwd = inference, fwd+bwd = training step",
                 fontsize=9)
    return save_png(fig, path)
