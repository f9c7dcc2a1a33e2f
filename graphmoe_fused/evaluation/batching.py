"""What the evaluations share: where the model's inputs go, eval mode for the duration of a run,
and batches grouped by length. The batches are right-padded (``data.collate``, with
``data.pad_token_id``), so padding cannot change any real token's output.

Right padding (not left): with a causal mask a token never attends to the positions after it, so
the pad tokens at the end of a row change nothing before them, and every real token keeps its
unpadded position id. Left padding would need explicit position ids and leaves fully masked
attention rows, whose values (NaN with some attention kernels) would then reach the routers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s input embeddings (the first parameter's, lacking those)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; the model's previous train/eval
    mode comes back afterwards (training calls the evaluation in the middle of a run)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little is padding."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def check_cutoff(cutoff_len: int) -> None:
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ValueError(f"cutoff_len={cutoff_len!r} must be an integer >= 2")
