"""Training/evaluation examples and the JSONL reader.

Two line formats, detected per line (one file may mix them):

* instruction: ``{"instruction": str, "input": str (optional, may be ""), "output": str}``;
* multiple choice: ``{"question": str, "choices": [str, ...] (2..26), "answer": "B" | 1 |
  "choice text"}``.

Other keys are ignored (datasets often carry ids or categories). Every problem is a
:class:`DataError` naming the file and line, so a bad file fails before training starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import CHOICE_LABELS, MIN_CHOICES, render_instruction, render_multiple_choice


class DataError(ValueError):
    """Bad training or evaluation data; the message is ``"FILE:LINE: what is wrong"``."""


@dataclass(frozen=True)
class Example:
    """One supervised example: the model reads ``prompt`` and learns ``completion``.

    For multiple choice, ``prompt`` ends with ``"Answer:"``, ``completion`` is ``" X"`` (the right
    label with a leading space), ``choices`` are the labels (``("A", "B", ...)``) and ``answer``
    the right label. ``source`` is ``"path:line"`` or ``"builtin:<task>"``.
    """

    prompt: str
    completion: str
    choices: tuple[str, ...] = ()
    answer: str | None = None
    source: str = ""


def _text(obj: dict, key: str, where: str, *, required: bool = True,
          allow_empty: bool = False) -> str:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _answer_label(answer: Any, choices: list[str], where: str) -> str:
    labels = CHOICE_LABELS[: len(choices)]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise DataError(
            f"{where}: field 'answer' must be a label letter, a 0-based index or the text of a "
            f"choice, got {type(answer).__name__}"
        )
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer index {answer} is out of range for "
                            f"{len(choices)} choices (0-based)")
        return labels[answer]
    by_label = answer if len(answer) == 1 and answer in labels else None
    same_text = [label for label, choice in zip(labels, choices, strict=True) if choice == answer]
    if len(same_text) > 1:
        raise DataError(f"{where}: answer {answer!r} is ambiguous: it is the text of choices "
                        f"{', '.join(same_text)}")
    by_text = labels[choices.index(answer)] if answer in choices else None
    if by_label and by_text and by_label != by_text:
        raise DataError(f"{where}: answer {answer!r} is ambiguous: it is label {by_label} and "
                        f"the text of choice {by_text}")
    label = by_label or by_text
    if label is None:
        raise DataError(f"{where}: answer {answer!r} is not among the choices (labels "
                        f"{labels[0]}..{labels[-1]} or a choice's text)")
    return label


def _multiple_choice(obj: dict, where: str) -> Example:
    question = _text(obj, "question", where)
    if "choices" not in obj:
        raise DataError(f"{where}: missing field 'choices'")
    choices = obj["choices"]
    if not isinstance(choices, list):
        raise DataError(f"{where}: field 'choices' must be a list of strings, "
                        f"got {type(choices).__name__}")
    if not MIN_CHOICES <= len(choices) <= len(CHOICE_LABELS):
        raise DataError(f"{where}: field 'choices' needs {MIN_CHOICES} to {len(CHOICE_LABELS)} "
                        f"choices, got {len(choices)}")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise DataError(f"{where}: choice {i} must be a string, got {type(choice).__name__}")
        if not choice.strip():
            raise DataError(f"{where}: choice {i} is empty")
    if "answer" not in obj:
        raise DataError(f"{where}: missing field 'answer'")
    label = _answer_label(obj["answer"], choices, where)
    prompt, labels = render_multiple_choice(question, choices)
    return Example(prompt=prompt, completion=" " + label, choices=labels, answer=label,
                   source=where)


def _instruction(obj: dict, where: str) -> Example:
    instruction = _text(obj, "instruction", where)
    extra = _text(obj, "input", where, required=False, allow_empty=True)
    output = _text(obj, "output", where)
    return Example(prompt=render_instruction(instruction, extra), completion=output, source=where)


def parse_record(obj: Any, where: str) -> Example:
    """The :class:`Example` of one decoded JSON line; ``where`` (``"path:line"``) names it."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "instruction" in obj and "question" in obj:
        raise DataError(f"{where}: has both 'instruction' and 'question': one format per line")
    if "instruction" in obj:
        return _instruction(obj, where)
    if "question" in obj:
        return _multiple_choice(obj, where)
    raise DataError(f"{where}: neither an instruction record (instruction, input, output) nor a "
                    f"multiple-choice record (question, choices, answer)")


def read_text_file(path: str | Path, kind: str) -> str:
    """The UTF-8 text of the file ``path`` (a leading byte-order mark dropped: editors on
    Windows write one), or a one-line error naming it: ``FileNotFoundError`` where there is no
    such file, :class:`DataError` for a directory or bytes that are not UTF-8. ``kind`` names
    what the file should be (``"JSONL file"``, ``"config file"``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    if p.is_dir():
        raise DataError(f"{path}: is a directory, not a {kind}")
    try:
        return p.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    r"""``(line number from 1, line)`` of ``text`` split on ``"\n"`` alone (a trailing ``"\r"``
    dropped). Not ``str.splitlines``: that also breaks on U+2028, U+2029, U+0085, ``\x0b``,
    ``\x0c``, ``\x1c``..``\x1e``, and JSON written with ``ensure_ascii=False`` keeps the first
    three raw inside its strings."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start another
    for number, line in enumerate(lines, start=1):
        yield number, line.removesuffix("\r")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: an object, refusing a key given twice (json
    keeps the last one, silently). Raises ``ValueError`` naming the key."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"key {key!r} is given twice")
        values[key] = value
    return values


def read_jsonl(path: str | Path) -> list[Example]:
    """Every example of the JSONL file ``path`` (blank lines skipped), checked line by line.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a malformed line (``"path:line: ..."``), a file that is not UTF-8 text, or
            one with no examples (``"path: no examples"``).
    """
    text = read_text_file(path, "data file")
    examples = []
    for lineno, line in numbered_lines(text):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        except ValueError as e:  # unique_keys
            raise DataError(f"{where}: {e}") from None
        examples.append(parse_record(obj, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_data_files(paths: Sequence[str | Path]) -> dict[str, list[Example]]:
    """``{path as given: examples}`` in the given order; every file is read and checked before
    anything is returned, so one bad file fails the whole call.

    Raises:
        FileNotFoundError, DataError: as :func:`read_jsonl`; DataError for a path given twice.
    """
    if isinstance(paths, (str, Path)):
        raise TypeError("load_data_files expects a list of paths, not a single path")
    loaded: dict[str, list[Example]] = {}
    seen: dict[Path, str] = {}  # the same file under two spellings is still one file
    for path in paths:
        key, resolved = str(path), Path(path).resolve()
        if resolved in seen:
            also = "" if seen[resolved] == key else f" (as {seen[resolved]})"
            raise DataError(f"{key}: data file given twice{also}")
        seen[resolved] = key
        loaded[key] = read_jsonl(path)
    return loaded
