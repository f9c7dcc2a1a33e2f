"""``graphmoe-fused eval``: the base model and its GraphMoE conversion side by side (the flags
and the printing; the work is :func:`graphmoe_fused.evaluation.evaluate`)."""

from __future__ import annotations

import argparse
import sys

from ..config import BACKENDS
from .args import (
    FlagError,
    finite_float,
    int_at_least_two,
    non_empty_path,
    non_negative_int,
    positive_float,
    positive_int,
    run_guarded,
)

PROG = "graphmoe-fused eval"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DESCRIPTION = (
    "Multiple-choice accuracy as the GraphMoE paper measures it (the highest-logit label token "
    "after 'Answer:'), per data file and overall, for the base model and the same base with a "
    "GraphMoE adapter; optionally the perplexity of a text file and a generation from a prompt. "
    "Without --data, the builtin task's eval split (unless only --perplexity or --prompt is "
    "asked for)."
)


def unit_interval(text: str) -> float:
    """A number in (0, 1] (``--top-p``)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def add_parser(subparsers) -> None:
    """Adds the ``eval`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("eval", help="evaluate a base model and its GraphMoE adapter",
                              description=DESCRIPTION)
    p.add_argument("--model", metavar="PATH", type=non_empty_path, default=None,
                   help="local Hugging Face checkpoint of the base model (default: the builtin "
                   "tiny model and tokenizer)")
    p.add_argument("--adapter", metavar="DIR", type=non_empty_path, default=None,
                   help="a GraphMoE adapter directory (save_adapter), a training output "
                   "directory (its adapter/), or a save_pretrained checkpoint of a converted "
                   "model; without it only the base is evaluated")
    p.add_argument("--data", metavar="FILE", type=non_empty_path, action="extend", nargs="+",
                   default=[],
                   help="multiple-choice JSONL files (default: the builtin task's eval split)")
    p.add_argument("--perplexity", metavar="FILE", type=non_empty_path, default=None,
                   help="perplexity over a .txt (paragraphs) or .jsonl ({\"text\"} or "
                   "instruction/multiple-choice records) file")
    p.add_argument("--prompt", metavar="TEXT", default=None,
                   help="generate a continuation of TEXT (KV cache; greedy unless --sample)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help="tokens to generate after --prompt (default 64)")
    p.add_argument("--sample", action="store_true",
                   help="sample (temperature, top-p) instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=None,
                   help="sampling temperature (with --sample; default 1.0)")
    p.add_argument("--top-p", type=unit_interval, default=None,
                   help="nucleus sampling mass in (0, 1] (with --sample; default 1.0)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="examples per forward (default 8)")
    p.add_argument("--cutoff-len", type=int_at_least_two, default=512, metavar="N",
                   help="longest prompt/document in tokens, at least 2: prompts keep their end, "
                   "documents their start (default 512)")
    p.add_argument("--no-base", dest="base", action="store_false",
                   help="skip the base model's column")
    p.add_argument("--allow-other-base", action="store_true",
                   help="evaluate an adapter that recorded another base model (refused by "
                   "default: its weights differ from the ones it was trained on)")
    p.add_argument("--out", metavar="DIR", type=non_empty_path, default=None,
                   help="write eval_results.json and routing_statistics.json here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace those files in a non-empty --out directory")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype: auto is bfloat16 on a GPU that has it, else float32")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="GraphMoE backend of the converted model (default auto)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(func=run)


def _check_flags(args: argparse.Namespace) -> None:
    if args.prompt is None:
        given = [flag for flag, value in (("--max-new-tokens", args.max_new_tokens),
                                          ("--sample", args.sample or None)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} applies only with --prompt")
    if not args.sample:
        given = [flag for flag, value in (("--temperature", args.temperature),
                                          ("--top-p", args.top_p)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} applies only with --sample")


def options_from(args: argparse.Namespace):
    """The :class:`~graphmoe_fused.evaluation.EvalOptions` of parsed flags (device and dtype
    resolved: a device this machine lacks is refused here)."""
    import torch

    from ..evaluation import EvalOptions
    from .demo import resolve_device

    _check_flags(args)
    device = resolve_device(args.device)
    if args.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else None
    else:
        dtype = getattr(torch, args.dtype)
    return EvalOptions(
        allow_other_base=args.allow_other_base, model=args.model, adapter=args.adapter,
        data=list(args.data),
        perplexity=args.perplexity, prompt=args.prompt,
        max_new_tokens=args.max_new_tokens or 64, sample=args.sample,
        temperature=args.temperature or 1.0, top_p=args.top_p or 1.0, seed=args.seed,
        batch_size=args.batch_size, cutoff_len=args.cutoff_len, base=args.base, out=args.out,
        overwrite=args.overwrite, device=str(device), dtype=dtype, backend=args.backend,
    )


def _job(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate
    from ..evaluation.runner import format_extras, format_table

    try:
        opts = options_from(args)
    except ValueError as exc:  # flags that do not go together, a device this machine lacks
        raise FlagError(str(exc)) from None
    report = evaluate(opts, log=lambda line: print(line, file=sys.stderr),
                      warn=lambda line: print(f"{PROG}: warning: {line}", file=sys.stderr))
    for line in format_table(report) + format_extras(report):
        print(line)
    if opts.out is not None:
        print(f"results written to {opts.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs ``graphmoe-fused eval``; returns the exit status."""
    return run_guarded(PROG, lambda: _job(args), args.debug)
