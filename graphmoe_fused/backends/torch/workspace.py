"""Scratch buffers of the torch backend's rounds, kept between calls on a CPU.

A round makes several ``[k·M, D']`` temporaries (per-slot gate, up, activation and their
gradients). On a CPU a fresh tensor that large costs more in page faults than the pass that
fills it: glibc hands such blocks back to the OS when they are freed, so every new one is
faulted in again (measured on the 2-core development machine: 2.4 ms to allocate and fill a
23 MB tensor, 0.5 ms to refill an existing one; a cpu-small training step, T = 1, ran 1.2×
faster with its scratch kept). The round code asks for one buffer per *role* (names chosen so
that no two live values share one); on a CPU the buffers of a thread are kept and shared by
every call of every layer, as a CUDA caching allocator keeps its blocks: the cost is this
working set of one layer's round (about five ``[k·M, D']``, six with LoRA dropout, and three
``[M, D']`` tensors of the compute dtype, at the largest ``M`` seen), held until
:func:`release_workspace`. Calls of one thread never overlap, and no output or saved tensor is
ever a workspace buffer.

On CUDA the caching allocator already makes fresh tensors cheap, and under ``torch.compile``
buffers written in place would only constrain the compiler: there every request is a fresh
tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from ..contract import new_empty, poisoning

_local = threading.local()


class Workspace:
    """Buffers by role; ``reuse=False`` makes every request a fresh tensor."""

    def __init__(self, reuse: bool) -> None:
        self.reuse = reuse
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, shape: Sequence[int], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous ``shape`` tensor for ``role``: a view of the role's
        buffer, grown when too small (NaN-filled again when outputs are poisoned, so an element
        a round forgets to write still fails the checks)."""
        if not self.reuse:
            return new_empty(shape, dtype, device)
        numel = math.prod(shape)
        key = (role, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            # A normal tensor even when the first call runs under inference_mode: an inference
            # tensor could not be written in place by the later calls outside it.
            with torch.inference_mode(False):
                buf = self._buffers[key] = new_empty((numel,), dtype, device)
        elif poisoning():
            buf[:numel].fill_(float("nan") if dtype.is_floating_point else -1)
        return buf[:numel].view(tuple(shape))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def workspace_for(device: torch.device) -> Workspace:
    """The calling thread's kept CPU workspace, or a non-reusing one (CUDA, compiling)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return Workspace(reuse=False)
    ws = getattr(_local, "cpu", None)
    if ws is None:
        ws = _local.cpu = Workspace(reuse=True)
    return ws


def release_workspace() -> int:
    """Frees the calling thread's kept CPU scratch (the next call allocates it again);
    returns the bytes released."""
    ws = getattr(_local, "cpu", None)
    _local.cpu = None
    return 0 if ws is None else ws.nbytes
