"""The backends: one function each, ``(x [M, d], GraphMoEParams, RoundOptions) -> RoutedOutput``
(see :mod:`.contract`). ``reference`` is the oracle, ``torch`` the fast pure-PyTorch path,
``triton`` the hand-written kernels."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch import device as Device

# Note: ``from .torch import`` below rebinds the name ``torch`` in this module to the subpackage,
# so nothing here refers to the torch library by that name.
from .contract import GraphMoEParams, RoundOptions, RoutedOutput
from .reference import graphmoe_reference
from .torch import graphmoe_torch
from .triton import graphmoe_triton, triton_available

Backend = Callable[[Tensor, GraphMoEParams, RoundOptions], RoutedOutput]

BACKENDS: dict[str, Backend] = {
    "reference": graphmoe_reference,
    "torch": graphmoe_torch,
    "triton": graphmoe_triton,
}


def resolve_backend(name: str, device: Device | str, needs_grad: bool = False) -> str:
    """``auto`` → ``triton`` on CUDA for inference, ``torch`` elsewhere; other names pass through.

    A training step (``needs_grad``) goes to ``torch`` on CUDA too, until the Triton backward
    kernels have been checked and timed on a GPU (``python -m bench.gpu_check``): they have
    only run under the interpreter so far. ``backend="triton"`` trains on them. CUDA without
    triton (Windows: no wheels) goes to ``torch`` as well, rather than to an import error.
    """
    if name == "auto":
        device = Device(device)  # also takes "cuda:0"
        use_triton = device.type == "cuda" and not needs_grad and triton_available()
        return "triton" if use_triton else "torch"
    return name


def get_backend(name: str) -> Backend:
    """The backend function called ``name`` (not ``auto``: resolve it first)."""
    if name == "auto":
        raise ValueError(
            "get_backend takes a concrete backend; resolve 'auto' first with "
            "resolve_backend('auto', device, needs_grad)"
        )
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[name]
