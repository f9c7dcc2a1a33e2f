"""``graphmoe-fused experiment``: T = 1 (MixLoRA) against T = 3 (GraphMoE) on the built-in
2-hop task, same budget and seed; prints both accuracies and the routing change between rounds.

It takes every ``graphmoe-fused train`` flag (``--num-rounds`` excepted: ``--compare-rounds``
sets the arms)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import FlagError, non_negative_int, positive_int, run_guarded
from .train_command import add_arguments, config_from_args, setting_flags

PROG = "graphmoe-fused experiment"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment", help="T = 1 (MixLoRA) vs T = 3 (GraphMoE) on the built-in 2-hop task",
        description="Train one adapter per number of rounds on the built-in chain task (2-hop "
        "questions whose chain was never trained, only its two facts), with the same data, "
        "steps and seed, then score the held-out questions as the paper does and measure how "
        "often the routing changes between rounds. Writes OUTPUT_DIR/T<n>/ per arm and "
        "OUTPUT_DIR/experiment.json.")
    parser.add_argument("--compare-rounds", type=positive_int, nargs="+", default=[1, 3],
                        metavar="T", help="the arms' numbers of rounds (default 1 3)")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=None, metavar="S",
                        help="train every arm once per seed and report the mean (default: "
                        "--seed alone)")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_guarded(PROG, lambda: _experiment(args), getattr(args, "debug", False))


def _experiment(args: argparse.Namespace) -> int:
    from ..experiments import format_rounds_table, run_rounds_experiment
    from ..experiments.rounds import SUMMARY_FILE, default_experiment_dir
    flags = setting_flags(args)
    if "num_rounds" in flags:
        raise FlagError("--num-rounds/--rounds: the experiment sets the rounds of each arm; "
                        "use --compare-rounds")
    if "seed" in flags and args.seeds is not None:
        raise FlagError(f"--seed {flags['seed']} with --seeds: --seeds names every seed the "
                        "arms train with; give one of the two")
    base = config_from_args(args)
    if base.output_dir is None:
        base = base.replace(output_dir=default_experiment_dir())
    arms = run_rounds_experiment(base, args.compare_rounds,
                                 progress=getattr(args, "progress", True), seeds=args.seeds)
    seeds = sorted({a.seed for a in arms})
    print(f"same data, steps ({arms[0].result.steps}) and seed{'s' if len(seeds) > 1 else ''} "
          f"({', '.join(map(str, seeds))}) for every arm; accuracy on the held-out questions"
          f"{' (mean, each seed in brackets)' if len(seeds) > 1 else ''}, routing change = "
          "share of tokens whose experts differ:")
    for line in format_rounds_table(arms):
        print("  " + line)
    print(f"written: {Path(base.output_dir) / SUMMARY_FILE}")
    return 0
