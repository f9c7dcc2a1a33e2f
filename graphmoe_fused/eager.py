"""``eager_under_compile``: ``torch.compiler.disable`` made on first call.

``torch.compiler.disable`` imports Dynamo, 1.3 s that every ``import graphmoe_fused`` would pay
for the few functions that must run eagerly inside a compiled model, also where nothing is ever
compiled and no Hugging Face model is loaded (transformers' modeling modules import Dynamo
themselves): the layer on its own, the kernels, the GPU check's worker processes. Made on first
call instead, it costs that only when one of them runs: inside a compiled region the first call
is traced up to the ``disable``, which Dynamo runs eagerly (a graph break where the function
would break the graph anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    """``fn`` as ``torch.compiler.disable(fn)`` runs it: eagerly, also inside a compiled model."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call  # type: ignore[return-value]
