"""The torch backend's LoRA dropout masks: on a CUDA GPU with triton installed, one Triton
kernel (``kernels.dropout.keep_rows_mask``) evaluates them; elsewhere the tensor version of
:mod:`..dropout`. Both give the same bits.

On a GPU every pass of the tensor version is a kernel launch over an int32 ``[rows, D']``
tensor: ~13 of them per mask, ~30 GB per training round at llama3-8b against the kernel's one
pass writing a byte per element (``python -m bench.op_count``). The reference keeps the tensor
version, so no mask it checks comes from the kernels.
"""

from __future__ import annotations

import importlib.util

import torch

from ..contract import new_empty
from ..dropout import drop_threshold, keep_rows


def draws_masks_in_one_pass(device: torch.device) -> bool:
    """Whether the masks on ``device`` come from the kernel (a CUDA GPU with triton; meta, for
    shape-only runs such as bench.op_count, counts the op a GPU would launch). Then drawing
    them again in backward costs one pass writing what keeping them would hold, so the forward
    does not keep them."""
    return device.type in ("cuda", "meta") and importlib.util.find_spec("triton") is not None


# A custom op: one opaque node for a compiler tracing it (under torch.compile the torch backend's
# Function runs eagerly when dropout is on: see rounds._apply_with_dropout).
@torch.library.custom_op("graphmoe_fused::keep_rows_mask", mutates_args=())
def keep_rows_kernel(row_bits: torch.Tensor, num_cols: int, threshold: int) -> torch.Tensor:
    """``kernels.dropout.keep_rows_mask`` as a ``torch.library`` op."""
    from ...kernels.dropout import keep_rows_mask

    return keep_rows_mask(row_bits, num_cols, threshold)


@keep_rows_kernel.register_fake
def _(row_bits: torch.Tensor, num_cols: int, threshold: int) -> torch.Tensor:
    return new_empty((row_bits.shape[0], num_cols), torch.bool, row_bits.device)


def device_keep_rows(row_bits: torch.Tensor, num_cols: int, p: float) -> torch.Tensor:
    """:func:`..dropout.keep_rows`, by the kernel where the device has one."""
    if not draws_masks_in_one_pass(row_bits.device):
        return keep_rows(row_bits, num_cols, p)
    mask = keep_rows_kernel(row_bits.reshape(-1).contiguous(), num_cols, drop_threshold(p))
    return mask.view(*row_bits.shape, num_cols)
