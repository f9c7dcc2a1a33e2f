"""``graphmoe-demo`` / ``python -m graphmoe_fused``: the built-in demo from the command line.

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
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from ..config import BACKENDS
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
USAGE_ERROR = 2  # argparse's status for a bad command line
RUN_ERROR = 1  # the library refused something during the run


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: no usage block above the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)} "
                               f"(see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def _seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**64 - 1]")
    return value


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def _device(text: str) -> str:
    try:
        parse_device(text)  # the syntax only; whether this machine has it is checked later
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoOptions()
    parser = _Parser(
        prog=PROG,
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
                        help="experts per token k, at most n (default %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="GraphMoE backend; triton needs a CUDA device (default %(default)s)")
    parser.add_argument("--seed", type=_seed, default=defaults.seed,
                        help="seed of the model init and the data (default %(default)s)")
    parser.add_argument("--device", type=_device, default=defaults.device,
                        help=f"{DEVICE_CHOICES}; auto is CUDA when present, else the CPU "
                        "(default %(default)s)")
    parser.add_argument("--lr", type=_learning_rate, default=defaults.lr,
                        help="AdamW learning rate, > 0 (default %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                        help="sequences per step (default %(default)s)")
    parser.add_argument("--threads", type=_positive_int, default=1,
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
    try:
        result = run_demo(opts, log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {one_line(str(exc)) or '(no message)'} "
              "(--debug shows the traceback)", file=sys.stderr)
        return RUN_ERROR
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
