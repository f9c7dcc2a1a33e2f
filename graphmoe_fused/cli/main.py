"""``graphmoe-demo`` / ``python -m graphmoe_fused``: the built-in demo from the command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ..config import BACKENDS
from .demo import DemoOptions, format_workload, run_demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="graphmoe-demo",
        description="Fine-tune a tiny LLaMA converted to GraphMoE on a synthetic copy task "
        "(no downloads) and show the loss, the load-balancing loss and the expert workload.",
    )
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps,
                        help="optimizer steps (default %(default)s)")
    parser.add_argument("--rounds", type=_positive_int, default=defaults.rounds,
                        help="self-rethinking rounds T (default %(default)s)")
    parser.add_argument("--experts", type=_positive_int, default=defaults.experts,
                        help="experts per layer n (default %(default)s)")
    parser.add_argument("--top-k", type=_positive_int, default=defaults.top_k,
                        help="experts per token k (default %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="GraphMoE backend (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the model init and the data (default %(default)s)")
    parser.add_argument("--device", default=defaults.device,
                        help="torch device, or 'auto' for CUDA when present (default %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                        help="sequences per step (default %(default)s)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="CPU threads for torch (default %(default)s: at this size more "
                        "threads cost more in synchronisation than they gain)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    torch.set_num_threads(args.threads)
    opts = DemoOptions(
        steps=args.steps, rounds=args.rounds, experts=args.experts, top_k=args.top_k,
        backend=args.backend, seed=args.seed, device=args.device, lr=args.lr,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    result = run_demo(opts, log=lambda line: print(line, flush=True))
    tail = min(5, len(result.losses))
    print(f"loss: first step {result.losses[0]:.3f} -> mean of last {tail} steps "
          f"{sum(result.losses[-tail:]) / tail:.3f}")
    print(f"eval (no grad): copy loss {result.eval_loss:.3f}, "
          f"copy accuracy {100 * result.eval_accuracy:.1f}% (chance 10%)")
    print("expert workload in evaluation (fraction of selections, per layer and round):")
    for line in format_workload(result.workload):
        print(line)
    print(f"trainable parameters: {result.report.percent_of_total:.2f}% of all "
          f"({result.report.percent_of_base:.2f}% of the base model); "
          f"done in {result.seconds:.1f} s")
    return 0
