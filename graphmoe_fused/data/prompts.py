"""Prompt templates: the Alpaca instruction template (as MoE-PEFT and LLM-Adapters use) and the
paper's multiple-choice template, with letter labels so that the answer is one token."""

from __future__ import annotations

from collections.abc import Sequence

CHOICE_LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MIN_CHOICES = 2

_INSTRUCTION_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_INSTRUCTION_ONLY = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_MULTIPLE_CHOICE = "Please choose the correct answer to the question: {question}\n{lines}\nAnswer:"


def render_instruction(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for ``instruction`` (and ``input`` when not empty); it ends with
    ``"### Response:\\n"``, after which the output follows."""
    if input:
        return _INSTRUCTION_WITH_INPUT.format(instruction=instruction, input=input)
    return _INSTRUCTION_ONLY.format(instruction=instruction)


def render_multiple_choice(question: str, choices: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """``(prompt, labels)``: the question, one ``"A. choice"`` line per choice, then ``"Answer:"``;
    ``labels`` are the letters used (``("A", "B", ...)``). The completion is ``" " + label``.

    Raises:
        ValueError: fewer than 2 or more than 26 choices.
    """
    if not MIN_CHOICES <= len(choices) <= len(CHOICE_LABELS):
        raise ValueError(
            f"a multiple-choice question needs {MIN_CHOICES} to {len(CHOICE_LABELS)} choices, "
            f"got {len(choices)}"
        )
    labels = tuple(CHOICE_LABELS[: len(choices)])
    lines = "\n".join(f"{label}. {choice}" for label, choice in zip(labels, choices, strict=True))
    return _MULTIPLE_CHOICE.format(question=question, lines=lines), labels
