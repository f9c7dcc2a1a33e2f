"""Test session set-up.

Without a GPU the Triton kernels can only run under the interpreter, and ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before any test module
imports ``graphmoe_fused.kernels``; the kernel modules are imported here, once, so that a test
that unsets it to check an error path (or runs first in a subset) cannot decorate them without
it for the rest of the session. On a CUDA machine the real kernels run.

Every buffer a fast path allocates starts as NaN (integers: -1) in the tests, so an element that
a kernel or a backend forgets to write fails a comparison instead of hiding behind whatever
``torch.empty`` returned (``GRAPHMOE_FUSED_POISON_OUTPUTS``, read at each allocation).
"""

import importlib
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRAPHMOE_FUSED_POISON_OUTPUTS", "1")
if importlib.util.find_spec("triton") is not None:
    for family in ("dropout", "expert", "gru", "routing"):
        importlib.import_module(f"graphmoe_fused.kernels.{family}")
