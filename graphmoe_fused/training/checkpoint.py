"""Checkpoints of a training run: ``checkpoints/step-N/`` holds everything a bit-exact resume
needs: the adapter (a usable adapter directory by itself), the optimizer and scheduler states,
the RNG states, and ``trainer_state.json`` (the step, which fixes the data position, the
cumulative token count, elapsed time and routing counts).

The data position needs no more than the step: the order of the examples and the dropout seeds
are functions of (seed, step) (:mod:`~graphmoe_fused.training.batches`). The RNG states are
saved and restored anyway, so torch's global generators continue as they would have.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hf.adapters import load_adapter, save_adapter
from .outputs import ADAPTER_DIR, STATE_FILE, write_atomic

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FIELDS = ("step", "tokens", "elapsed_s", "routing")  # what the trainer writes and reads


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: Mapping[str, Any]) -> Path:
    """Writes ``directory`` (atomically); ``model`` is the unwrapped converted model."""

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_adapter(model, tmp / ADAPTER_DIR)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / OPTIMIZER_FILE)
        torch.save(rng_states(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(dict(state), indent=2) + "\n",
                                      encoding="utf-8")

    directory.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(directory, write)


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restores what :func:`save_checkpoint` wrote into ``model`` (converted, unwrapped),
    ``optimizer``, ``scheduler`` and the RNGs; returns the trainer state."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in STATE_FIELDS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a checkpoint this trainer wrote, or "
                         "damaged; resume from another checkpoint")
    load_adapter(model, directory / ADAPTER_DIR)
    saved = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_states(torch.load(directory / RNG_FILE, map_location="cpu", weights_only=False))
    return state
