"""Plots of what GraphMoE did (``graphmoe-fused plot``): the expert workload per layer and round,
the per-round aux loss over training, and the round latency and speed-ups of a benchmark run.

Needs the optional ``plot`` extra (matplotlib), imported only when a figure is drawn; reading
and checking the files, and the numbers behind every plot, work without it.
"""

from .aux_loss import AuxLossCurves, aux_loss_curves, load_aux_loss, plot_aux_loss
from .benchmarks import (
    BenchmarkSummary,
    RoundLatency,
    SpeedupRow,
    benchmark_summary,
    load_benchmark,
)
from .latency import plot_round_latency, plot_speedups, speedup_markdown
from .render import PlotReport, plot_files
from .sources import PlotInput, read_input
from .workload import (
    LayerWorkload,
    expert_workload,
    layer_workload,
    load_workload,
    plot_workload,
)

__all__ = [
    "AuxLossCurves",
    "BenchmarkSummary",
    "LayerWorkload",
    "PlotInput",
    "PlotReport",
    "RoundLatency",
    "SpeedupRow",
    "aux_loss_curves",
    "benchmark_summary",
    "expert_workload",
    "layer_workload",
    "load_aux_loss",
    "load_benchmark",
    "load_workload",
    "plot_aux_loss",
    "plot_files",
    "plot_round_latency",
    "plot_speedups",
    "plot_workload",
    "read_input",
    "speedup_markdown",
]
