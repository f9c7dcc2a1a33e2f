"""``graphmoe-fused plot INPUT [INPUT ...] --out DIR``: PNGs of train logs, routing statistics
and benchmark JSONs (the logic is graphmoe_fused.plotting; this module parses and prints)."""

from __future__ import annotations

import argparse
from typing import Any

from .args import non_empty_path, run_guarded

PROG = "graphmoe-fused plot"


def add_parser(subparsers: Any) -> None:
    """Adds the ``plot`` subcommand to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "plot", help="plot expert workload, aux loss, round latency and speed-ups",
        description="Plot train_log.jsonl (aux loss per round, LM loss, workload of the last "
        "routing event), routing_statistics.json (expert workload per layer and round) and "
        "benchmark JSONs (pytest bench/ --benchmark-json, python -m bench.gpu_check: latency vs "
        "rounds T, speed-up table). Each file's kind is read from its content; the PNGs are "
        "named by kind (workload.png, aux_loss.png, round_latency.png, speedups.png), "
        "prefixed with the input's stem when several inputs give the same kind.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=non_empty_path,
                        help="train_log.jsonl, routing_statistics.json or benchmark JSON files")
    parser.add_argument("--out", required=True, metavar="DIR", type=non_empty_path,
                        help="folder for the PNGs (created when missing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PNGs that already exist (refused by default)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Writes the PNGs, prints their paths and each benchmark's markdown tables."""

    def job() -> int:
        from ..plotting import plot_files

        report = plot_files(args.inputs, args.out, overwrite=args.overwrite)
        for text in report.markdown:
            print(text)
        for path in report.written:
            print(path)
        return 0

    return run_guarded(PROG, job, args.debug)
