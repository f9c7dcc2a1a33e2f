"""Test session set-up.

Without a GPU the Triton kernels can only run under the interpreter, and ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before any test module
imports ``graphmoe_fused.kernels``. On a CUDA machine the real kernels run.

Every buffer a fast path allocates starts as NaN (integers: -1) in the tests, so an element that
a kernel or a backend forgets to write fails a comparison instead of hiding behind whatever
``torch.empty`` returned (``GRAPHMOE_FUSED_POISON_OUTPUTS``, read at each allocation).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRAPHMOE_FUSED_POISON_OUTPUTS", "1")
