"""Reads the files ``graphmoe-fused plot`` accepts and tells their kind from their content.

Kinds: ``train_log`` (train_log.jsonl, one event object per line), ``routing_statistics``
(routing_statistics.json), ``pytest_benchmark`` (``pytest bench/ --benchmark-json=F``) and
``gpu_check`` (``python -m bench.gpu_check``). The name of a file is never trusted: a renamed
train log is still a train log, and a ``.json`` that is none of these is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["train_log", "routing_statistics", "pytest_benchmark", "gpu_check"]
KNOWN = "a train_log.jsonl, a routing_statistics.json or a benchmark JSON"


@dataclass(frozen=True)
class PlotInput:
    """One input file: its ``kind`` and parsed ``data`` (a dict for the JSON kinds; for
    ``train_log`` a list of ``(line_number, event)``)."""

    path: Path
    kind: Kind
    data: Any


def read_input(path: str | Path) -> PlotInput:
    """Parses ``path`` and detects its kind; FileNotFoundError or a one-line ValueError naming
    the file (and the line, for a train log) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected a file: {KNOWN}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected {KNOWN}") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file; expected {KNOWN}")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        first = text.lstrip().split("\n", 1)[0]
        if _is_event(first) or path.suffix == ".jsonl":
            return PlotInput(path, "train_log", parse_train_log(path, text))
        raise ValueError(f"{path}: not JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                         f"expected {KNOWN}") from None
    if not isinstance(whole, dict):
        raise ValueError(f"{path}: a JSON {type(whole).__name__}, not an object; expected {KNOWN}")
    if "event" in whole:  # a train log of one line
        return PlotInput(path, "train_log", parse_train_log(path, text))
    if isinstance(whole.get("benchmarks"), list):
        return PlotInput(path, "pytest_benchmark", whole)
    if isinstance(whole.get("steps"), dict) and "dry_run" in whole:
        return PlotInput(path, "gpu_check", whole)
    if "layers" in whole and "num_experts" in whole:
        return PlotInput(path, "routing_statistics", whole)
    keys = ", ".join(sorted(whole)[:8]) or "none"
    raise ValueError(f"{path}: unknown JSON (top-level keys: {keys}); expected {KNOWN}")


def _is_event(line: str) -> bool:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "event" in obj


def parse_train_log(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """The events of a train log with their 1-based line numbers; blank lines are skipped."""
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg} at column "
                             f"{exc.colno})") from None
        if not isinstance(event, dict):
            raise ValueError(f"{path}:{number}: a JSON {type(event).__name__}, not an event "
                             "object")
        if not isinstance(event.get("event"), str):
            raise ValueError(f"{path}:{number}: no 'event' field (a string such as \"step\")")
        events.append((number, event))
    return events


def number(value: Any, where: str) -> float:
    """``value`` as a float; ValueError naming ``where`` for a non-number (bools included).
    NaN and infinity pass: a diverged run's loss is data, not a malformed file."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def count_grid(value: Any, where: str) -> tuple[tuple[int, ...], ...]:
    """A ``[T][n]`` grid of non-negative integer counts (rows of equal length)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty [rounds][experts] list of counts")
    rows = []
    for t, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise ValueError(f"{where}: round {t + 1} is not a non-empty list of counts")
        for c in row:
            if isinstance(c, bool) or not isinstance(c, int | float) or c < 0 or (
                    isinstance(c, float) and (not math.isfinite(c) or c != int(c))):
                raise ValueError(f"{where}: round {t + 1} has {c!r}, not a count >= 0")
        rows.append(tuple(int(c) for c in row))
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{where}: rounds have different numbers of experts "
                         f"({[len(r) for r in rows]})")
    return tuple(rows)
