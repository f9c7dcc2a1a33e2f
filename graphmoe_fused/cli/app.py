"""``graphmoe-fused`` / ``python -m graphmoe_fused``: train, eval, plot, experiment, demo.

Each subcommand lives in its own module with ``add_parser(subparsers)`` (which sets
``func``, called with the parsed arguments and returning the exit status).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import main as demo_main
from .args import OneLineParser

PROG = "graphmoe-fused"
SUBCOMMANDS = ("train", "eval", "plot", "experiment", "demo")


def build_parser() -> OneLineParser:
    from . import eval_command, experiment_command, plot_command, train_command

    parser = OneLineParser(
        prog=PROG,
        description="Fine-tune LLaMA-family models with GraphMoE (recurrent LoRA experts), "
        "evaluate them as the GraphMoE paper does, and plot what the experts did.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}",
                                parser_class=OneLineParser)
    train_command.add_parser(sub)
    eval_command.add_parser(sub)
    plot_command.add_parser(sub)
    experiment_command.add_parser(sub)
    sub.add_parser("demo", add_help=False,
                   help="the built-in copy-task demo (graphmoe-demo; --help lists its options)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return demo_main.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)
