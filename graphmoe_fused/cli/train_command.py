"""``graphmoe-fused train``: a flag for every :class:`~graphmoe_fused.training.TrainConfig`
field (kebab-case), ``--config FILE`` (YAML/JSON; flags win over it), ``--debug``.

Flags the user does not give stay unset (``argparse.SUPPRESS``), so the file's values and the
built-in preset see exactly which settings were chosen on the command line.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from .args import FlagError, OneLineParser, finite_float, integer, run_guarded

PROG = "graphmoe-fused train"
# Shorter spellings of GraphMoE flags (the demo's names).
ALIASES = {"num_experts": ["--experts"], "num_rounds": ["--rounds"],
           "router_aux_loss_coef": ["--aux-coef"], "learning_rate": ["--lr"]}


def _help(name: str) -> str:
    from ..training.recipe import TrainConfig

    doc = TrainConfig.__doc__ or ""
    marker = f"        {name}: "
    start = doc.find(marker)
    if start < 0:
        return "see graphmoe_fused.GraphMoEConfig"
    lines = [doc[start + len(marker):].split("\n", 1)[0]]
    for line in doc[start:].split("\n")[1:]:
        if line.startswith("            "):
            lines.append(line.strip())
        else:
            break
    return " ".join(lines).replace("%", "%%")


def _optional(kind: Any) -> tuple[Any, bool]:
    """``(inner type, accepts None)`` of a field annotation such as ``int | None``."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], True
    return kind, False


def _none_or(parse):
    def parser(text: str):
        return None if text.lower() in ("none", "null") else parse(text)
    parser.__name__ = parse.__name__
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.recipe import TrainConfig, config_fields

    hints = typing.get_type_hints(TrainConfig)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML or JSON file of settings (flags win over it)")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *ALIASES.get(f.name, [])]
        kind, nullable = _optional(hints[f.name])
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f.name)}
        if kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
            continue
        if typing.get_origin(kind) is list:
            parser.add_argument(*names, action="extend", nargs="+", metavar="FILE", **common)
            continue
        parse = {int: integer, float: finite_float, str: str}[kind]
        parser.add_argument(*names, type=_none_or(parse) if nullable else parse,
                            metavar=f.name.upper().split("_")[-1], **common)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (log lines only)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a GraphMoE adapter (the paper's recipe)",
        description="Fine-tune a GraphMoE adapter on a local Hugging Face model (or the "
        "built-in tiny one) with the paper's recipe; writes the adapter, a JSONL log, routing "
        "statistics and checkpoints to --output-dir. Runs on N processes under accelerate "
        "launch.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_guarded(PROG, lambda: _train(args), getattr(args, "debug", False))


def setting_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~graphmoe_fused.training.TrainConfig` fields given on the command line."""
    from ..training.recipe import config_fields

    names = {f.name for f in config_fields()}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace, **overrides: Any):
    """Defaults < ``--config FILE`` < the flags < ``overrides``, as a ``TrainConfig``."""
    from ..training.recipe import OverrideError, TrainConfig

    try:
        return TrainConfig.from_sources(getattr(args, "config", None),
                                        {**setting_flags(args), **overrides})
    except OverrideError as exc:
        raise FlagError(str(exc)) from None


def _train(args: argparse.Namespace) -> int:
    from ..training.loop import train

    result = train(config_from_args(args), progress=getattr(args, "progress", True))
    if result.world_size > 1:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return 0
    summary = [f"steps: {result.steps}", f"last loss: {result.last_loss:.4f}"]
    if result.aux_losses:
        summary.append(f"aux loss: {result.aux_losses[-1]:.4f}")
    for name, accuracy in result.eval_accuracy.items():
        summary.append(f"eval {name} accuracy: {accuracy:.3f}")
    summary.append(f"adapter: {result.adapter_path}")
    print("\n".join(["done."] + ["  " + s for s in summary]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``graphmoe-fused train`` as a program by itself (``python -m graphmoe_fused.training``)."""
    parser = OneLineParser(prog=PROG, description="Fine-tune a GraphMoE adapter.")
    add_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run(args)
