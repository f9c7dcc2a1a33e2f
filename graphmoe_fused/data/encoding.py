"""Examples to token ids: supervised features for training, prompts for evaluation, the label
tokens of multiple choice, and right-padded batches (for training and evaluation alike)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .records import DataError, Example

IGNORE_INDEX = -100
# What precedes a label in every multiple-choice prompt (prompts.render_multiple_choice).
_LABEL_CONTEXT = "\nAnswer:"


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _strip_added_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int],
                     reference: list[int]) -> list[int]:
    # Tokenizers that append an EOS themselves (T5-like) put it after the prompt too.
    eos = tokenizer.eos_token_id
    if eos is not None and ids and reference and ids[-1] == eos and reference[-1] == eos:
        return ids[:-1]
    return ids


def _full_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], int]:
    """The ids of the prompt, completion and EOS, uncut, and where the completion starts."""
    prompt_ids = _ids(tokenizer, example.prompt)
    full = _ids(tokenizer, example.prompt + example.completion)
    full = _strip_added_eos(tokenizer, full, prompt_ids)
    prompt_ids = _strip_added_eos(tokenizer, prompt_ids, prompt_ids)
    boundary = _common_prefix(prompt_ids, full)
    if tokenizer.eos_token_id is not None:
        full = [*full, tokenizer.eos_token_id]
    return full, boundary


def encoded_length(tokenizer: PreTrainedTokenizerBase, example: Example) -> int:
    """How many tokens :func:`encode_example` gives ``example`` before any cutoff."""
    return len(_full_ids(tokenizer, example)[0])


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example,
                   cutoff: int) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of ``example``: the prompt (with the BOS
    the tokenizer adds, if any) then the completion and EOS; labels are ``-100`` on the prompt,
    so only the completion and EOS are learnt. Truncated to ``cutoff`` tokens from the end
    (the start is kept), which may cut the completion.

    The prompt/completion boundary is where ``tokenizer(prompt + completion)`` stops agreeing
    with ``tokenizer(prompt)``, so a tokenizer that merges across it is handled.

    Raises:
        ValueError: ``cutoff`` < 1.
        DataError: no completion token survives the cutoff (names ``example.source``).
    """
    if cutoff < 1:
        raise ValueError(f"cutoff must be a positive number of tokens, got {cutoff}")
    full, boundary = _full_ids(tokenizer, example)
    labels = [IGNORE_INDEX] * boundary + full[boundary:]
    full, labels = full[:cutoff], labels[:cutoff]
    if all(label == IGNORE_INDEX for label in labels):
        where = example.source or "example"
        raise DataError(
            f"{where}: nothing left to learn: the prompt alone is {boundary} tokens, which "
            f"reaches the cutoff of {cutoff}; raise the cutoff or shorten the prompt"
        )
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, cutoff: int) -> list[int]:
    """The ids of ``prompt`` for evaluation, at most ``cutoff`` long. A longer prompt loses its
    start, not its end (``"Answer:"`` must stay last); the BOS, if the tokenizer adds one, is
    kept in front.

    Raises:
        ValueError: ``cutoff`` < 1 (or < 2 with a BOS).
    """
    ids = _ids(tokenizer, prompt)
    ids = _strip_added_eos(tokenizer, ids, ids)
    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    if cutoff < 1 + keep_bos:
        raise ValueError(f"cutoff must leave room for a prompt token, got {cutoff}")
    if len(ids) <= cutoff:
        return ids
    if keep_bos:
        return [bos, *ids[len(ids) - cutoff + 1:]]
    return ids[len(ids) - cutoff:]


def label_token_ids(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> list[int]:
    """The token id of each label ``" X"`` as it follows ``"Answer:"`` in a multiple-choice
    prompt: the first token of ``tokenizer(context + " X")`` beyond ``tokenizer(context)``.

    Raises:
        ValueError: a label is not exactly one token there (or merges with ``"Answer:"``).
    """
    context = _ids(tokenizer, _LABEL_CONTEXT)
    context = _strip_added_eos(tokenizer, context, context)
    ids = []
    for label in labels:
        full = _strip_added_eos(tokenizer, _ids(tokenizer, _LABEL_CONTEXT + " " + label), context)
        start = _common_prefix(context, full)
        extra = full[start:]
        if start < len(context):
            raise ValueError(f"label ' {label}' merges with the preceding 'Answer:' for this "
                             f"tokenizer (tokens {tokenizer.convert_ids_to_tokens(extra)})")
        if len(extra) != 1:
            raise ValueError(f"label ' {label}' is not one token for this tokenizer (it is "
                             f"{len(extra)} tokens: {tokenizer.convert_ids_to_tokens(extra)})")
        ids.append(extra[0])
    return ids


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad batches with: the tokenizer's pad id, else its EOS id, else 0. Which one
    never matters to the results: pad positions come after every real token, are masked out of
    attention and carry label ``-100``."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``[B, L]`` int64 tensors of ``features`` (``encode_example`` dicts):
    ``input_ids`` padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels``
    (when present) with ``-100``.

    Raises:
        ValueError: no features.
    """
    if not features:
        raise ValueError("collate needs at least one feature")
    length = max(len(f["input_ids"]) for f in features)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, pad in pads.items():
        if key not in features[0]:
            continue
        rows = [list(f[key]) + [pad] * (length - len(f[key])) for f in features]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch
