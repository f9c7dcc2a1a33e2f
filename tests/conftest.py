"""Test session set-up.

Without a GPU the Triton kernels can only run under the interpreter, and ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before any test module
imports ``graphmoe_fused.kernels``. On a CUDA machine the real kernels run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
