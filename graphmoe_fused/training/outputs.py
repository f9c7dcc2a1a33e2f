"""What a training run writes into its output directory, and the checks made before it writes.

Layout (our file names; ``--overwrite`` writes over these and touches nothing else)::

    train_config.json           the resolved TrainConfig
    train_log.jsonl             one JSON event per line (start, step, routing, eval, end, resume)
    routing_statistics.json     expert counts of the training run
    adapter/                    the final adapter (gm.save_adapter)
    checkpoints/step-N/         adapter/, optimizer.pt, rng.pt, trainer_state.json

Every file and directory is written to a temporary name beside it and renamed into place, so a
run killed mid-write leaves the previous version, never half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"
ROUTING_FILE = "routing_statistics.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OUR_NAMES = (CONFIG_FILE, LOG_FILE, ROUTING_FILE, ADAPTER_DIR, CHECKPOINTS_DIR)


def default_output_dir() -> str:
    return time.strftime("runs/train-%Y%m%d-%H%M%S")


def check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuses (``ValueError``/``FileNotFoundError``, one line) an output directory that would
    mix runs: a non-empty one without ``overwrite``/``resume``, a file, or ``resume`` without a
    checkpoint."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():  # the path, or a folder it would be made in, is a file
        raise ValueError(f"output_dir {path}: {existing} is not a directory")
    if resume:
        if newest_checkpoint(path) is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {path / CHECKPOINTS_DIR} (nothing to resume; "
                "checkpoints are written with --save-every N)")
        return
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"output_dir {path} exists and is not empty: pass --overwrite to write "
                         "over a previous run's files, or --resume to continue it")


def checkpoint_dirs(path: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the complete checkpoints under ``path/checkpoints``, oldest first."""
    root = path / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            name = child.name
            if (name.startswith("step-") and name[5:].isdigit()
                    and (child / STATE_FILE).is_file()):
                found.append((int(name[5:]), child))
    return sorted(found)


def newest_checkpoint(path: Path) -> Path | None:
    found = checkpoint_dirs(path)
    return found[-1][1] if found else None


def remove_previous_results(path: Path) -> None:
    """``--overwrite``, at the start: the previous run's results (``adapter/``,
    ``routing_statistics.json``, our checkpoints), so that a run that then fails leaves none of
    them beside its own config and log. Nothing but our names is touched."""
    _remove(path / ADAPTER_DIR)
    _remove(path / ROUTING_FILE)
    remove_our_checkpoints(path)


def remove_our_checkpoints(path: Path) -> None:
    """``--overwrite``: the previous run's checkpoints (ours: they hold our state file) would
    be resumed from by mistake; anything else under ``checkpoints/`` stays."""
    for _, directory in checkpoint_dirs(path):
        shutil.rmtree(directory)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Calls ``write(tmp)`` on a fresh temporary path beside ``path`` (a file or a directory)
    and renames it to ``path``, replacing what was there."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    write(tmp)
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def write_json(path: Path, value: Any) -> Path:
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class EventLog:
    """``train_log.jsonl``: one JSON object per line, flushed at each event so a killed run
    keeps every event before it."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        """Starts a new log, or (``keep_until_step``, on resume) keeps the events up to that
        step (a checkpoint's) and drops what a killed run logged after it."""
        self.path = path
        kept = []
        if keep_until_step is not None and path.is_file():
            kept = [e for e in read_events(path)
                    if e.get("event") not in ("end", "eval")
                    and int(e.get("step", 0)) <= keep_until_step]
        text = "".join(json.dumps(e) + "\n" for e in kept)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, event: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(dict(event)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The events of a ``train_log.jsonl``. A last line cut short (a run killed while writing
    it: no newline after it) is left out; any other line that is not JSON is an error naming
    it."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                return
            raise ValueError(f"{path}:{number}: not a JSON event ({exc.msg})") from None
