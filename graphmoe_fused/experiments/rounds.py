"""T = 1 (MixLoRA: one routing, no GRU) against T = 3 (GraphMoE) on the same data, budget and
seed, scored as the paper scores multiple choice, with how much the routing moves between rounds.

Only ``num_rounds`` differs between the arms: the same base model, data order, adapter init seed,
optimizer and number of steps. The built-in ``chain`` task asks 2-hop questions (which country
does a person live in?) whose two facts were trained but whose chain was not, so an answer needs
both facts: round 1 can recall the first, and a later round's router, fed the GRU's summary of it,
can pick experts for the second. Whether it does is what the experiment measures; it reports the
figures as they come, including when more rounds do not help.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import builtin_task
from ..evaluation import multiple_choice_accuracy
from ..hf.adapters import load_adapter
from ..hf.local_model import load_base_model
from ..hf.routing_trace import changed_between_rounds, trace_routing
from ..training import TrainConfig, TrainResult, train
from ..training.outputs import check_output_dir

SUMMARY_FILE = "experiment.json"


def default_experiment_dir() -> str:
    return time.strftime("runs/experiment-%Y%m%d-%H%M%S")


@dataclass
class RoundsArm:
    """One arm: ``accuracy`` per eval split; ``routing_change[t]`` the share of eval tokens whose
    set of chosen experts differs between rounds ``t + 1`` and ``t + 2`` (mean over layers)."""

    num_rounds: int
    seed: int
    result: TrainResult
    accuracy: dict[str, float]
    routing_change: list[float]

    def summary(self) -> dict[str, Any]:
        return {"num_rounds": self.num_rounds, "seed": self.seed,
                "output_dir": str(self.result.output_dir), "steps": self.result.steps,
                "final_loss": self.result.losses[-1],
                "accuracy": self.accuracy, "routing_change": self.routing_change,
                "tokens_per_s": self.result.tokens_per_s}


def _score(cfg: TrainConfig, adapter: Path) -> tuple[dict[str, float], list[float]]:
    """The trained arm reloaded from its saved adapter (what a user gets back, scored on the
    device training ran on, with the backend that device runs): accuracy per eval split and the
    routing change between rounds on the same questions."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_base_model(cfg.model, device=device)
    load_adapter(model, adapter, backend="auto")
    accuracy, per_layer = {}, []
    with trace_routing(model) as traces:
        for name, examples in builtin_task(cfg.builtin_task).eval.items():
            result = multiple_choice_accuracy(model, tokenizer, examples,
                                              batch_size=cfg.eval_batch_size,
                                              cutoff_len=cfg.cutoff_len)
            accuracy[name] = result.accuracy
    for chunks in traces.values():
        per_layer.append(changed_between_rounds(torch.cat(chunks, dim=1)))
    change = torch.stack(per_layer).mean(0).tolist() if per_layer else []
    return accuracy, change


def run_rounds_experiment(base: TrainConfig, rounds: Sequence[int] = (1, 3),
                          log: Callable[[str], None] = print, progress: bool = True,
                          seeds: Sequence[int] | None = None) -> list[RoundsArm]:
    """Trains one arm per entry of ``rounds`` and per seed of ``seeds`` (default: ``base.seed``)
    from ``base``, which must use the built-in task (the experiment needs its held-out 2-hop
    split), each into ``output_dir/T<rounds>`` (``output_dir/seed<s>/T<rounds>`` with several
    seeds), and writes ``output_dir/experiment.json``. ``output_dir`` is refused when it exists
    and is not empty, unless ``base.overwrite``."""
    if base.data:
        raise ValueError("the rounds experiment runs on the built-in task (its held-out 2-hop "
                         "questions); leave out --data")
    if base.resume:
        raise ValueError("the rounds experiment cannot --resume: run it again")
    seeds = [base.seed] if seeds is None else list(seeds)
    for name, values, low in (("rounds", list(rounds), 1), ("seeds", seeds, 0)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low
                             for v in values):
            raise ValueError(f"{name}={values!r} must be integers >= {low}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name}={values!r} has a repeated entry")
    out = Path(base.output_dir or default_experiment_dir())
    check_output_dir(out, overwrite=base.overwrite, resume=False)
    arms = []
    for seed in seeds:
        for t in rounds:
            arm_dir = out / f"T{t}" if len(seeds) == 1 else out / f"seed{seed}" / f"T{t}"
            cfg = base.replace(num_rounds=t, seed=seed, output_dir=str(arm_dir))
            log(f"--- T = {t} ({'MixLoRA: one routing' if t == 1 else 'GraphMoE'}), "
                f"seed {seed} ---")
            result = train(cfg, log, progress=progress)
            accuracy, change = _score(result.config, result.adapter_path)
            arms.append(RoundsArm(t, seed, result, accuracy, change))
    summary = {"steps": arms[0].result.steps, "seeds": seeds,
               "mean": {f"T={t}": _mean_of([a for a in arms if a.num_rounds == t])
                        for t in rounds},
               "arms": [arm.summary() for arm in arms]}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return arms


def _mean_of(arms: Sequence[RoundsArm]) -> dict[str, Any]:
    """The seeds' mean of one number of rounds: accuracy per split, final loss, routing change."""
    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    return {"accuracy": {s: mean([a.accuracy[s] for a in arms]) for s in arms[0].accuracy},
            "final_loss": mean([a.result.losses[-1] for a in arms]),
            "routing_change": [mean(c) for c in zip(*(a.routing_change for a in arms),
                                                     strict=True)]}


def format_rounds_table(arms: Sequence[RoundsArm]) -> list[str]:
    """One row per number of rounds: the seeds' mean accuracy per split (each seed's in
    brackets when there are several), final training loss and routing change per round pair."""
    rounds = list(dict.fromkeys(a.num_rounds for a in arms))
    splits = list(arms[0].accuracy) if arms else []
    head = ["rounds", *splits, "final loss", "routing change between rounds"]
    rows = []
    for t in rounds:
        group = [a for a in arms if a.num_rounds == t]
        mean = _mean_of(group)
        cells = []
        for s in splits:
            cell = f"{100 * mean['accuracy'][s]:.1f}%"
            if len(group) > 1:
                cell += " (" + " ".join(f"{100 * a.accuracy[s]:.0f}" for a in group) + ")"
            cells.append(cell)
        change = ", ".join(f"{i + 1}->{i + 2}: {100 * c:.1f}%"
                           for i, c in enumerate(mean["routing_change"])) or "-"
        rows.append([f"T={t}", *cells, f"{mean['final_loss']:.3f}", change])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [head, *rows]]
