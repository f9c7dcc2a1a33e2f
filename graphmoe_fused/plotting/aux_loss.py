"""The load-balancing (aux) loss of every recurrent round over training, and the LM loss,
from a train_log.jsonl's "step" events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._figure import new_figure, save_png
from .sources import PlotInput, number, read_input


@dataclass(frozen=True)
class AuxLossCurves:
    """Per optimizer step: ``lm_loss`` (without the aux term), ``aux_mean`` (mean over layers
    and rounds) and ``per_round[t]`` (round t+1's aux, mean over layers; empty when the log has
    no "aux_loss_per_round")."""

    steps: tuple[int, ...]
    lm_loss: tuple[float, ...]
    aux_mean: tuple[float, ...]
    per_round: tuple[tuple[float, ...], ...]


def aux_loss_curves(events: Sequence[tuple[int, dict[str, Any]]], where: str = "train log"
                    ) -> AuxLossCurves:
    """The curves of the "step" events among ``(line, event)`` pairs; ValueError naming
    ``where:line`` for a step event with a missing or non-numeric field."""
    steps, lm, aux, rounds = [], [], [], []
    width: int | None = None
    for line, event in events:
        if event["event"] != "step":
            continue
        at = f"{where}:{line}"
        step = event.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{at}: 'step' must be an integer, got {step!r}")
        per_round = event.get("aux_loss_per_round")
        if per_round is not None:
            if not isinstance(per_round, list) or not per_round:
                raise ValueError(f"{at}: 'aux_loss_per_round' must be a non-empty list")
            values = [number(v, f"{at}: 'aux_loss_per_round'") for v in per_round]
            if width is not None and len(values) != width:
                raise ValueError(f"{at}: 'aux_loss_per_round' has {len(values)} rounds, earlier "
                                 f"steps {width}")
            width = len(values)
            rounds.append(values)
        elif width is not None:
            raise ValueError(f"{at}: no 'aux_loss_per_round' (earlier steps have it)")
        if "aux_loss" in event:
            aux.append(number(event["aux_loss"], f"{at}: 'aux_loss'"))
        elif per_round is not None:
            aux.append(sum(values) / len(values))
        else:
            raise ValueError(f"{at}: neither 'aux_loss' nor 'aux_loss_per_round'")
        if "loss" not in event:
            raise ValueError(f"{at}: no 'loss'")
        lm.append(number(event["loss"], f"{at}: 'loss'"))
        steps.append(step)
    if rounds and len(rounds) != len(steps):  # the first steps lacked it, later ones have it
        raise ValueError(f"{where}: 'aux_loss_per_round' is missing from some step events")
    if not steps:
        raise ValueError(f"{where}: no \"step\" events to plot the losses from")
    per = tuple(tuple(r[t] for r in rounds) for t in range(width or 0))
    return AuxLossCurves(tuple(steps), tuple(lm), tuple(aux), per)


def curves_from_input(source: PlotInput) -> AuxLossCurves:
    if source.kind != "train_log":
        raise ValueError(f"{source.path}: a {source.kind} file has no training losses")
    return aux_loss_curves(source.data, str(source.path))


def load_aux_loss(path: str | Path) -> AuxLossCurves:
    """:func:`aux_loss_curves` of the train log at ``path``."""
    return curves_from_input(read_input(path))


def plot_aux_loss(curves: AuxLossCurves, path: str | Path, title: str = "") -> Path:
    """Two panels over the optimizer step: the aux loss per round (one line each) and their
    mean, then the LM loss. Returns ``path``."""
    fig = new_figure(7.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    marker = "o" if len(curves.steps) <= 30 else None
    for t, values in enumerate(curves.per_round):
        top.plot(curves.steps, values, marker=marker, markersize=3, linewidth=1.2,
                 label=f"round {t + 1}")
    top.plot(curves.steps, curves.aux_mean, color="black", linestyle="--", linewidth=1.6,
             label="mean")
    top.set_ylabel("aux (load-balancing) loss")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(curves.steps, curves.lm_loss, marker=marker, markersize=3, color="tab:red")
    bottom.set_ylabel("LM loss (without aux)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    bottom.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    fig.suptitle(title or "Training losses", fontsize=10)
    return save_png(fig, path)
