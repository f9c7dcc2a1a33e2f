"""``graphmoe-demo`` / ``graphmoe-fused demo``: the built-in copy-task demo from the command line.

A bad value is reported as one line on stderr, ``graphmoe-demo: error: ...``, with exit status 2:
each flag's value is checked as it is parsed (``--lr -1``, ``--steps 0``, ``--device tpu``), then
what depends on the machine or on other flags (``--device cuda`` without CUDA, ``--backend
triton`` off CUDA, ``--top-k`` above ``--experts``) before anything is built. Should the library
still refuse something during the run (a ``ValueError``, ``TypeError`` or ``RuntimeError``, e.g.
from ``GraphMoEConfig`` or ``apply_graphmoe``, or CUDA running out of memory), that too is one
line, with exit status 1; ``--debug`` shows its traceback instead. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from ..config import BACKENDS
from .args import OneLineParser, integer, positive_float, positive_int, run_guarded
from .demo import (
    DEVICE_CHOICES,
    MAX_SEED,
    DemoOptions,
    check_backend,
    format_workload,
    parse_device,
    resolve_device,
    run_demo,
)

PROG = "graphmoe-demo"


def _seed(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**64 - 1]")
    return value


def _device(text: str) -> str:
    try:
        parse_device(text)  # the syntax only; whether this machine has it is checked later
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoOptions()
    parser = OneLineParser(
        prog=PROG,
        description="Fine-tune a tiny LLaMA converted to GraphMoE on a synthetic copy task "
        "(no downloads) and show the loss, the load-balancing loss and the expert workload.",
    )
    parser.add_argument("--steps", type=positive_int, default=defaults.steps,
                        help="optimizer steps (default %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=defaults.rounds,
                        help="self-rethinking rounds T (default %(default)s)")
    parser.add_argument("--experts", type=positive_int, default=defaults.experts,
                        help="experts per layer n (default %(default)s)")
    parser.add_argument("--top-k", type=positive_int, default=defaults.top_k,
                        help="experts per token k, at most n (default %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="GraphMoE backend; triton needs a CUDA device (default %(default)s)")
    parser.add_argument("--seed", type=_seed, default=defaults.seed,
                        help="seed of the model init and the data (default %(default)s)")
    parser.add_argument("--device", type=_device, default=defaults.device,
                        help=f"{DEVICE_CHOICES}; auto is CUDA when present, else the CPU "
                        "(default %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr,
                        help="AdamW learning rate, > 0 (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="sequences per step (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch (default %(default)s: at this size more "
                        "threads cost more in synchronisation than they gain)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true",
                        help="on an error during the run, show the Python traceback")
    return parser


def _check_machine(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What parsing one flag at a time cannot see: other flags, and this machine."""
    if args.top_k > args.experts:
        parser.error(f"argument --top-k: {args.top_k} exceeds --experts {args.experts}")
    cpus = os.cpu_count() or 1
    if args.threads > cpus:
        parser.error(f"argument --threads: {args.threads} exceeds this machine's {cpus} CPUs")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"argument --device: {exc}")
    try:
        check_backend(args.backend, device)
    except ValueError as exc:
        parser.error(f"argument --backend: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the process exit status (bad arguments exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_machine(parser, args)
    torch.set_num_threads(args.threads)
    opts = DemoOptions(
        steps=args.steps, rounds=args.rounds, experts=args.experts, top_k=args.top_k,
        backend=args.backend, seed=args.seed, device=args.device, lr=args.lr,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    return run_guarded(PROG, lambda: _run(opts), args.debug)


def _run(opts: DemoOptions) -> int:
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
