"""Perplexity: ``exp`` of the mean next-token negative log-likelihood, weighted by token (a long
document counts for more than a short one), from the logits themselves (a converted model's
``out.loss`` also holds the router's auxiliary term).

What is scored: every token of each document as the tokenizer encodes it (a BOS first when the
tokenizer adds one; no EOS is appended), each predicted from the ones before it; a document
longer than ``cutoff_len`` tokens keeps its first ``cutoff_len``. For an
:class:`~graphmoe_fused.data.Example` the document is ``prompt + completion``.

Files (:func:`read_documents`): ``.txt``, one document per paragraph (paragraphs are separated
by blank lines); ``.jsonl``, either every line ``{"text": "..."}`` (one document each) or every
line an instruction / multiple-choice record as training reads them (``prompt + completion``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ..data import collate, pad_token_id
from ..data.records import numbered_lines
from .batching import check_cutoff, evaluating, input_device, length_batches

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # summed over the predicted tokens, nats
    tokens: int  # predicted tokens (each document's length minus one)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def _text_of(item) -> str:
    if isinstance(item, str):
        return item
    prompt, completion = getattr(item, "prompt", None), getattr(item, "completion", None)
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    raise TypeError(f"perplexity takes strings or Examples, got {type(item).__name__}")


def encode_document(tokenizer, text: str, cutoff_len: int) -> list[int]:
    """The token ids scored for ``text``: special tokens as the tokenizer adds them, cut to the
    first ``cutoff_len``."""
    return list(tokenizer(text)["input_ids"])[:cutoff_len]


def perplexity_stats(model: nn.Module, tokenizer, texts_or_examples: Sequence,
                     cutoff_len: int = 512, *, batch_size: int = 8) -> PerplexityResult:
    """The summed NLL and the number of predicted tokens over ``texts_or_examples``.

    Raises:
        ValueError: nothing to predict (every document is shorter than two tokens).
    """
    check_cutoff(cutoff_len)
    documents = [encode_document(tokenizer, _text_of(item), cutoff_len)
                 for item in texts_or_examples]
    documents = [d for d in documents if len(d) >= 2]
    if not documents:
        raise ValueError("no document has two tokens or more: nothing to predict")
    device = input_device(model)
    nll, tokens = 0.0, 0
    with evaluating(model):
        for batch in length_batches([len(d) for d in documents], batch_size):
            padded = collate([{"input_ids": documents[i], "attention_mask": [1] * len(documents[i])}
                              for i in batch], pad_token_id(tokenizer))
            ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                   reduction="sum").item()
            tokens += int((targets != -100).sum())
    return PerplexityResult(nll, tokens)


def perplexity(model: nn.Module, tokenizer, texts_or_examples: Sequence, cutoff_len: int = 512,
               *, batch_size: int = 8) -> float:
    """Token-weighted ``exp(mean NLL)`` of ``model`` over ``texts_or_examples`` (strings, or
    Examples scored as ``prompt + completion``); see the module docstring for what is scored."""
    return perplexity_stats(model, tokenizer, texts_or_examples, cutoff_len,
                            batch_size=batch_size).perplexity


def _paragraphs(text: str) -> list[str]:
    documents, current = [], []
    for _, line in numbered_lines(text):  # "\n" only: a form feed or U+2028 is kept as text
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def _text_lines(path: Path, text: str) -> list[str] | None:
    """The documents of a ``{"text": ...}`` JSONL file; ``None`` when its first record is not one
    (then it is a training-format file, read by ``read_jsonl``)."""
    from ..data import DataError
    from ..data.records import unique_keys

    documents: list[str] | None = None
    for number, line in numbered_lines(text):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=unique_keys)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc})") from None
        is_text = isinstance(record, dict) and "text" in record
        if documents is None:
            if not is_text:
                return None
            documents = []
        if not is_text:
            raise DataError(f"{path}:{number}: no \"text\" field, but the file's first record "
                            "has one (one format per file)")
        extra = sorted(set(record) - {"text"})
        if extra:
            raise DataError(f"{path}:{number}: unexpected field {extra[0]!r} in a "
                            "{\"text\": ...} record")
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f"{path}:{number}: \"text\" must be a non-empty string")
        documents.append(record["text"])
    return documents if documents is not None else []


def read_documents(path: str | Path) -> list:
    """The documents of a perplexity file (see the module docstring): strings, or Examples.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory or non-UTF-8 bytes, an unknown suffix, a malformed line
            (``DataError`` "file:line: ..."), or no document at all.
    """
    from ..data import DataError, read_jsonl
    from ..data.records import read_text_file

    file = Path(path)
    text = read_text_file(file, "perplexity file")
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        documents: list = _paragraphs(text)
    elif suffix in JSONL_SUFFIXES:
        texts = _text_lines(file, text)
        documents = texts if texts is not None else list(read_jsonl(file))
    else:
        raise ValueError(f"perplexity file {path}: unknown format {suffix or '(no suffix)'!r}, "
                         "use .txt (paragraphs) or .jsonl")
    if not documents:
        raise DataError(f"{path}: no documents")
    return documents
