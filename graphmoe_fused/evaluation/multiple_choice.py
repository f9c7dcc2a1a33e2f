"""Multiple-choice accuracy as the GraphMoE paper measures it: the model reads the prompt (which
ends with "Answer:"), and its answer is the label (" A", " B", ...) whose token gets the highest
logit at the last prompt token, the other tokens of the vocabulary ignored.

Examples are batched by length and right-padded; the logits are read at each row's own last real
token (:mod:`.batching` says why padding then changes nothing), and only at those positions
(``logits_to_keep``), so a large vocabulary costs ``[batch, vocab]``, not ``[batch, seq, vocab]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data import collate, pad_token_id
from .batching import check_cutoff, evaluating, input_device, length_batches


@dataclass(frozen=True)
class MCResult:
    """``predictions[i]``: the label chosen for ``examples[i]``; ``scores[i]``: the logits of that
    example's label tokens at its last prompt token (float32), in the order of its choices."""

    correct: int
    total: int
    predictions: tuple[str, ...]
    scores: tuple[tuple[float, ...], ...] = ()

    @property
    def accuracy(self) -> float:
        """``correct / total`` (a fraction in [0, 1])."""
        return self.correct / self.total if self.total else 0.0


def check_example(example) -> None:
    """Refuses (``ValueError`` naming ``example.source``) an example that is not multiple choice
    or whose answer is not one of its labels."""
    where = example.source or "example"
    if not example.choices or example.answer is None:
        raise ValueError(f"{where}: not a multiple-choice example (it has no choices or answer)")
    if example.answer not in example.choices:
        raise ValueError(f"{where}: answer {example.answer!r} is not one of the labels "
                         f"{list(example.choices)}")


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def last_token_logits(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` float32 logits at each row's last real token of a right-padded batch."""
    last = attention_mask.sum(1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if _accepts_logits_to_keep(model):
        # The positions needed by some row, for every row: few distinct ones, as batches are
        # grouped by length.
        keep, column = torch.unique(last, return_inverse=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=keep).logits
        return logits[rows, column].float()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[rows, last].float()


def multiple_choice_accuracy(model: nn.Module, tokenizer, examples: Sequence,
                             batch_size: int = 8, cutoff_len: int = 512) -> MCResult:
    """The share of ``examples`` (multiple-choice :class:`~graphmoe_fused.data.Example`) whose
    highest-logit label at the last prompt token is the right one.

    Prompts longer than ``cutoff_len`` tokens keep their end (the question's tail and "Answer:").
    Runs in eval mode under ``torch.no_grad`` and restores the model's mode afterwards. A
    converted model counts its routing decisions as in any forward (reset them first to see
    this evaluation's alone).

    Raises:
        ValueError: no examples, an example without choices or answer, or a label that is not one
            token for ``tokenizer`` (from :func:`~graphmoe_fused.data.label_token_ids`).
    """
    from ..data import encode_prompt, label_token_ids

    check_cutoff(cutoff_len)
    if not examples:
        raise ValueError("no examples to evaluate")
    for example in examples:
        check_example(example)
    label_ids: dict[tuple[str, ...], list[int]] = {}
    for example in examples:
        if example.choices not in label_ids:
            label_ids[example.choices] = label_token_ids(tokenizer, example.choices)
    prompts = [encode_prompt(tokenizer, example.prompt, cutoff_len) for example in examples]
    for example, ids in zip(examples, prompts, strict=True):
        if not ids:
            raise ValueError(f"{example.source or 'example'}: the prompt encodes to no tokens")

    device = input_device(model)
    predictions: list[str] = [""] * len(examples)
    scores: list[tuple[float, ...]] = [()] * len(examples)
    with evaluating(model):
        for batch in length_batches([len(p) for p in prompts], batch_size):
            padded = collate([{"input_ids": prompts[i], "attention_mask": [1] * len(prompts[i])}
                              for i in batch], pad_token_id(tokenizer))
            ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
            logits = last_token_logits(model, ids, mask).cpu()
            for row, i in enumerate(batch):
                choices = examples[i].choices
                restricted = logits[row, label_ids[choices]]
                if not bool(torch.isfinite(restricted).all()):
                    # argmax would pick the first label for every question, a plausible score
                    raise ValueError(
                        f"{examples[i].source or 'example'}: the model's logits for the labels "
                        f"are not finite ({restricted.tolist()}); are its (adapter) weights "
                        "NaN, e.g. from a training run that diverged?")
                predictions[i] = choices[int(restricted.argmax())]
                scores[i] = tuple(restricted.tolist())
    correct = sum(p == e.answer for p, e in zip(predictions, examples, strict=True))
    return MCResult(correct, len(examples), tuple(predictions), tuple(scores))


def overall(results: Sequence[MCResult]) -> MCResult:
    """All examples pooled: ``correct`` and ``total`` summed, so every example weighs the same
    whichever file it came from."""
    return MCResult(
        sum(r.correct for r in results), sum(r.total for r in results),
        tuple(p for r in results for p in r.predictions),
        tuple(s for r in results for s in r.scores),
    )
