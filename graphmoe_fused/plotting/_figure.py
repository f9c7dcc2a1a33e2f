"""matplotlib, imported only when a plot is drawn (it is the optional ``plot`` extra).

Figures are built as ``matplotlib.figure.Figure`` objects and saved through the Agg canvas, never
through ``pyplot``: pyplot would pick (and switch) a global GUI backend, which breaks headless
runs and changes the state of a user's notebook.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MISSING = "matplotlib is not installed: pip install 'graphmoe_fused[plot]'"
DPI = 110


def require_matplotlib() -> None:
    """RuntimeError (one line, with the install command) when matplotlib cannot be imported."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise RuntimeError(MISSING) from None


def new_figure(width: float, height: float) -> Any:
    """An Agg-backed ``Figure`` of ``width`` x ``height`` inches; RuntimeError (one line) when
    matplotlib is missing."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # constrained layout keeps titles, side labels and colour bars from overlapping
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    """Writes ``fig`` as a PNG at ``path`` (via a temporary file, so a failed save leaves no
    half-written image behind) and returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fmt_ratio(value: float | None) -> str:
    """``1.23×``; ``—`` for a ratio that was not measured, ``∞`` for a division by zero."""
    if value is None or math.isnan(value):
        return "—"
    return "∞" if math.isinf(value) else f"{value:.2f}×"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    ms = 1e3 * seconds
    return f"{ms:.3g} ms" if ms >= 1 else f"{ms * 1e3:.3g} µs"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
