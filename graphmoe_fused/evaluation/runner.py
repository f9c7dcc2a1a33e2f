"""``graphmoe-fused eval`` without the command line: the base model and the GraphMoE-converted
one side by side on multiple-choice files, a perplexity file and a prompt.

Order of work: every input is checked first (output directory, adapter layout, data files and
every example in them, perplexity file, model, label tokens, whether the adapter fits the
model), then the base is evaluated, then converted in place with the adapter (one copy of the
weights in memory) and evaluated again.

What the routing statistics cover: every token the converted model read during the
multiple-choice and perplexity evaluation (padding excluded); generation is left out (its
tokens are the model's own).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hf.convert import CONFIG_ATTRIBUTE
from ..hf.stats import reset_routing_statistics, routing_document, routing_statistics
from .generation import generate
from .models import (
    AdapterSource,
    check_adapter_fits,
    check_checkpoint_base,
    convert_with_adapter,
    resolve_adapter,
)
from .multiple_choice import MCResult, check_example, multiple_choice_accuracy, overall
from .perplexity import PerplexityResult, perplexity_stats, read_documents

RESULTS_NAME = "eval_results.json"
ROUTING_NAME = "routing_statistics.json"
COLUMNS = ("base", "graphmoe")
BUILTIN = "builtin"


@dataclass
class EvalOptions:
    """What to evaluate. ``data`` empty: the builtin task's eval split, unless ``perplexity`` or
    ``prompt`` is given (then no multiple choice runs). ``adapter`` None: the base alone."""

    model: str | None = None
    adapter: str | None = None
    data: list[str] = field(default_factory=list)
    perplexity: str | None = None
    prompt: str | None = None
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    cutoff_len: int = 512
    base: bool = True
    out: str | None = None
    overwrite: bool = False
    device: str = "cpu"
    dtype: torch.dtype | None = None
    backend: str = "auto"
    allow_other_base: bool = False


@dataclass
class EvalReport:
    """Per column (``"base"``, ``"graphmoe"``; ``None`` where not evaluated)."""

    options: EvalOptions
    files: dict[str, dict[str, MCResult | None]] = field(default_factory=dict)
    perplexity: dict[str, PerplexityResult | None] = field(default_factory=dict)
    generation: dict[str, str | None] = field(default_factory=dict)
    routing: dict[str, Any] | None = None

    def overall(self) -> dict[str, MCResult | None]:
        """Every example of every file pooled (each example weighs the same)."""
        if not self.files:
            return {}
        return {c: (overall([r[c] for r in self.files.values()])
                    if all(r[c] is not None for r in self.files.values()) else None)
                for c in COLUMNS}

    def to_json(self) -> dict[str, Any]:
        """The content of ``eval_results.json`` (accuracies are fractions in [0, 1])."""
        o = self.options
        return {
            "model": o.model or BUILTIN,
            "adapter": o.adapter,
            "settings": {"batch_size": o.batch_size, "cutoff_len": o.cutoff_len,
                         "device": str(o.device),
                         "dtype": str(o.dtype).removeprefix("torch.") if o.dtype else None,
                         "backend": o.backend},
            "files": {name: _accuracy_entry(r) for name, r in self.files.items()},
            "overall": _accuracy_entry(self.overall()) if self.files else None,
            "perplexity": None if not self.perplexity else {
                "file": o.perplexity,
                "tokens": next(r.tokens for r in self.perplexity.values() if r is not None),
                **{c: (r.perplexity if r is not None else None)
                   for c, r in self.perplexity.items()},
            },
            "generation": None if not self.generation else {
                "prompt": o.prompt, "max_new_tokens": o.max_new_tokens, "sample": o.sample,
                "temperature": o.temperature if o.sample else None,
                "top_p": o.top_p if o.sample else None, "seed": o.seed, **self.generation,
            },
        }


def _accuracy_entry(results: dict[str, MCResult | None]) -> dict[str, Any]:
    n = next(r.total for r in results.values() if r is not None)
    entry: dict[str, Any] = {"n": n}
    for c in COLUMNS:
        r = results.get(c)
        entry[c] = r.accuracy if r is not None else None
    for c in COLUMNS:
        r = results.get(c)
        entry[f"{c}_correct"] = r.correct if r is not None else None
    if all(r is None or r.predictions for r in results.values()):
        entry["predictions"] = {c: (list(results[c].predictions)
                                    if results.get(c) is not None else None)
                                for c in COLUMNS}
    return entry


def check_output_dir(out: str | None, overwrite: bool) -> None:
    """Refuses an ``out`` that is a file, or a non-empty directory without ``overwrite``."""
    if out is None:
        return
    path = Path(out)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():  # the path, or a folder it would be made in, is a file
        raise FileExistsError(f"output directory {out}: {existing} is not a directory")
    if (path / "train_config.json").is_file():  # training.outputs.CONFIG_FILE
        # its routing_statistics.json is the training run's: --overwrite would replace it
        raise FileExistsError(f"output directory {out} is a training run's: write the "
                              f"evaluation into a folder of its own (e.g. {path / 'eval'})")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty: pass --overwrite "
                              f"to replace its {RESULTS_NAME} and {ROUTING_NAME}")


def _write_json(path: Path, content: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_outputs(report: EvalReport, out: str | Path) -> list[Path]:
    """Writes ``eval_results.json`` (and ``routing_statistics.json`` when a converted model was
    evaluated) into ``out``; files already there under other names are left alone."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / RESULTS_NAME]
    _write_json(written[0], report.to_json())
    if report.routing is not None:
        written.append(directory / ROUTING_NAME)
        _write_json(written[1], report.routing)
    return written


def _routing_document(model: nn.Module) -> dict[str, Any]:
    """``routing_statistics.json`` of ``model``'s counts since the last reset (phase ``eval``)."""
    config = getattr(model, CONFIG_ATTRIBUTE)
    return routing_document(routing_statistics(model), num_experts=config.num_experts,
                            num_rounds=config.num_rounds, top_k=config.top_k, phase="eval")


def load_inputs(opts: EvalOptions) -> tuple[dict[str, list], list | None]:
    """``(multiple-choice examples by file name, perplexity documents or None)``."""
    from ..data import builtin_task, load_data_files

    documents = read_documents(opts.perplexity) if opts.perplexity is not None else None
    if opts.data:
        files = load_data_files(opts.data)
    elif opts.perplexity is None and opts.prompt is None:
        files = dict(builtin_task().eval)
    else:
        files = {}
    return files, documents


def _check_options(opts: EvalOptions) -> None:
    if not opts.base and opts.adapter is None:
        raise ValueError("nothing to evaluate: skipping the base (--no-base) needs --adapter")
    if opts.backend == "triton" and opts.adapter is not None:
        # Before the base column runs, which on a real model takes as long as the adapter's.
        from ..backends.triton import unavailable_reason

        reason = unavailable_reason(torch.device(opts.device))
        if reason is not None:
            raise ValueError(f"backend='triton': {reason}")


def _check_examples(files: dict[str, list]) -> None:
    """Every example of every file is multiple choice with its answer among its labels (before
    any model loads): a one-line error naming the file and line otherwise."""
    for examples in files.values():
        for example in examples:
            check_example(example)


def _label_check(tokenizer, files: dict[str, list]) -> None:
    """Every label of every file is one token (before any model runs): a one-line error
    naming the file otherwise."""
    from ..data import label_token_ids

    for name, examples in files.items():
        for choices in dict.fromkeys(e.choices for e in examples if e.choices):
            try:
                label_token_ids(tokenizer, choices)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None


def _evaluate_column(model: nn.Module, tokenizer, opts: EvalOptions, files: dict[str, list],
                     documents: list | None, column: str, report: EvalReport,
                     log: Callable[[str], None]) -> None:
    for name, examples in files.items():
        result = multiple_choice_accuracy(model, tokenizer, examples,
                                          batch_size=opts.batch_size, cutoff_len=opts.cutoff_len)
        report.files.setdefault(name, dict.fromkeys(COLUMNS))[column] = result
        log(f"{column}: {name}: {result.correct}/{result.total} correct")
    if documents is not None:
        report.perplexity.setdefault("base", None)
        report.perplexity[column] = perplexity_stats(
            model, tokenizer, documents, opts.cutoff_len, batch_size=opts.batch_size)


def _generate_column(model, tokenizer, opts: EvalOptions, column: str,
                     report: EvalReport) -> None:
    if opts.prompt is None:
        return
    report.generation.setdefault("base", None)
    report.generation[column] = generate(
        model, tokenizer, opts.prompt, opts.max_new_tokens, opts.sample, opts.temperature,
        opts.top_p, opts.seed)


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def evaluate(opts: EvalOptions, log: Callable[[str], None] = print,
             warn: Callable[[str], None] = _stderr) -> EvalReport:
    """Runs the evaluation ``opts`` describe (and writes ``opts.out`` when set).

    Raises:
        FileNotFoundError: a missing model, adapter, data or perplexity file.
        FileExistsError: ``opts.out`` exists and is not empty (without ``overwrite``).
        ValueError: a malformed input, a label that is not one token, an adapter that does not
            fit the model.
    """
    from ..hf.local_model import load_base_model

    _check_options(opts)
    check_output_dir(opts.out, opts.overwrite)
    source: AdapterSource | None = resolve_adapter(opts.adapter) if opts.adapter else None
    files, documents = load_inputs(opts)
    _check_examples(files)
    model, tokenizer = load_base_model(opts.model, dtype=opts.dtype, device=opts.device)
    _label_check(tokenizer, files)
    if source is not None and source.kind == "adapter":
        check_adapter_fits(model, source.path, opts.allow_other_base)
    if source is not None and source.kind == "checkpoint" and opts.base and \
            not opts.allow_other_base:
        check_checkpoint_base(model, source.path)

    report = EvalReport(opts)
    if opts.base:
        _evaluate_column(model, tokenizer, opts, files, documents, "base", report, log)
        _generate_column(model, tokenizer, opts, "base", report)
    if source is not None:
        if source.kind == "checkpoint":
            del model  # the checkpoint holds its own base weights
            hf_kwargs = {"dtype": opts.dtype} if opts.dtype is not None else {}
            model = convert_with_adapter(None, source, backend=opts.backend, warn=warn,
                                         **hf_kwargs).to(opts.device)
        else:
            model = convert_with_adapter(model, source, backend=opts.backend, warn=warn)
        reset_routing_statistics(model)
        _evaluate_column(model, tokenizer, opts, files, documents, "graphmoe", report, log)
        if files or documents is not None:
            report.routing = _routing_document(model)
        _generate_column(model, tokenizer, opts, "graphmoe", report)
    if opts.out is not None:
        write_outputs(report, opts.out)
    return report


def _percent(result: MCResult | None) -> str:
    return "-" if result is None else f"{100 * result.accuracy:.2f}"


def format_table(report: EvalReport) -> list[str]:
    """``file | n | base | graphmoe`` (accuracy in %), one row per file and ``overall``."""
    rows: list[Sequence[str]] = [("file", "n", "base", "graphmoe")]
    entries = list(report.files.items())
    if len(entries) > 0:
        entries.append(("overall", report.overall()))
    for name, results in entries:
        n = next(r.total for r in results.values() if r is not None)
        rows.append((name, str(n), _percent(results.get("base")),
                     _percent(results.get("graphmoe"))))
    if len(rows) == 1:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_extras(report: EvalReport) -> list[str]:
    """The perplexity and generation lines."""
    lines = []
    if report.perplexity:
        tokens = next(r.tokens for r in report.perplexity.values() if r is not None)
        values = "  ".join(f"{c} {r.perplexity:.3f}" for c, r in report.perplexity.items()
                           if r is not None)
        lines.append(f"perplexity of {report.options.perplexity} ({tokens} tokens): {values}")
    for column, text in report.generation.items():
        if text is not None:
            lines.append(f"{column} writes: {text!r}")
    return lines
