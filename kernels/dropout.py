"""LoRA dropout masks evaluated in registers: a counter-based hash of (stream, token, column).

The keep decision of one element is a pure function of the forward's seed, the round, the stream
(0: the round input ``x_t``; ``1 + j``: slot ``j``'s activation ``h_j``), the token and the
column, so a kernel computes it where it needs it and no ``[M, k, D']`` mask tensor exists. The
torch side (``graphmoe_fused.backends.dropout``) implements the same function on int64 tensors,
bit for bit; the tests compare them. The definition:

    mix32(x)   = lowbias32 (x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B;
                 x ^= x >> 16), on uint32 with wrap-around
    stream key = mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ (round << 16 | stream))   (on the host)
    bits       = mix32(mix32(key ^ token) ^ (column · 0x9E3779B9))
    keep       = bits >= round(p · 2^32)

``stream_key`` and ``drop_threshold`` are computed on the host (:func:`stream_key`,
:func:`drop_threshold`) and passed to the kernels as plain integers.

:func:`keep_rows_mask` is the one kernel of this file: the masks as a bool tensor, for the torch
backend on a GPU, where the torch version's thirteen passes over an int32 ``[rows, D']``
tensor are thirteen kernel launches (~30 GB per training round at llama3-8b, ``bench.op_count``)
and this is one that writes a byte per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_spec import KernelSpec
from .utils import check_device, new_output, on_device_of

__all__ = ["drop_threshold", "keep_mask", "keep_rows_mask", "mix32", "stream_key"]

_M1, _M2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9
_MASK32 = 0xFFFFFFFF
# The same constants for the jit functions: a compiled kernel may read module globals only when
# they are constexprs (the interpreter reads any, so only a GPU compile would catch plain ints).
M1_C: tl.constexpr = tl.constexpr(_M1)
M2_C: tl.constexpr = tl.constexpr(_M2)
GOLDEN_C: tl.constexpr = tl.constexpr(_GOLDEN)


def _mix32(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, round_index: int, stream: int) -> int:
    """The 32-bit key of one (forward seed, round, stream); ``stream`` 0 is the round input's
    mask, ``1 + j`` slot ``j``'s."""
    if not (0 <= round_index < 1 << 16 and 0 <= stream < 1 << 16):
        raise ValueError(f"round {round_index} and stream {stream} must be in [0, 65536)")
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    return _mix32(_mix32(_mix32(lo) ^ hi) ^ (round_index << 16 | stream))


def drop_threshold(p: float) -> int:
    """``round(p · 2^32)``: an element is kept when its 32 hash bits are at least this."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    return min(round(p * 2.0**32), _MASK32)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (wrap-around multiplies)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), M1_C, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), M2_C, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def keep_mask(key, rows, cols, threshold):
    """``[len(rows), len(cols)]`` bool keep-mask of one stream: ``rows`` token indices,
    ``cols`` column indices (any integer type), ``key``/``threshold`` from the host helpers."""
    row_bits = mix32(key.to(tl.uint32) ^ rows.to(tl.uint32))
    col_bits = cols.to(tl.uint32) * tl.full((), GOLDEN_C, tl.uint32)
    return mix32(row_bits[:, None] ^ col_bits[None, :]) >= threshold.to(tl.uint32)


# ---------------------------------------------------------------------------------------------
# The masks of given rows as a bool tensor (the torch backend's, on a GPU).
# ---------------------------------------------------------------------------------------------


# threshold is not specialised: triton would make a value of 1 a constexpr.
@triton.jit(do_not_specialize=["threshold"])
def _keep_rows_kernel(row_bits_ptr, out_ptr, num_rows, num_cols, threshold,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    col_ok = cols < num_cols
    # Per-row halves mix32(key ^ token) in [0, 2^32), stored as int64: the low 32 bits.
    row_bits = tl.load(row_bits_ptr + rows, mask=row_ok, other=0).to(tl.uint32)
    col_bits = cols.to(tl.uint32) * tl.full((), GOLDEN_C, tl.uint32)
    keep = mix32(row_bits[:, None] ^ col_bits[None, :]) >= threshold.to(tl.uint32)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * num_cols + cols[None, :]
    tl.store(ptrs, keep, mask=row_ok[:, None] & col_ok[None, :])


# One config: a memory-bound elementwise kernel, 8 KiB of output per program.
_BLOCK_R, _BLOCK_C, _WARPS = 16, 512, 4


@on_device_of("row_bits")
def keep_rows_mask(row_bits: torch.Tensor, num_cols: int, threshold: int) -> torch.Tensor:
    """Bool keep-mask ``[len(row_bits), num_cols]``: element ``(i, c)`` is kept when
    ``mix32(row_bits[i] ^ c · 0x9E3779B9) >= threshold``, the torch backend's
    ``keep_rows`` bit for bit.

    Args:
        row_bits: int64 ``[rows]``, each row's ``mix32(key ^ token)`` (in ``[0, 2^32)``).
        num_cols: the mask's width (``d`` or ``D'``).
        threshold: :func:`drop_threshold` of the dropout probability.
    """
    check_device("row_bits", row_bits)
    if row_bits.dtype != torch.int64 or row_bits.ndim != 1:
        raise ValueError(f"row_bits must be a 1-D int64 tensor, got {row_bits.dtype} with "
                         f"shape {tuple(row_bits.shape)}")
    if num_cols < 0:
        raise ValueError(f"num_cols must be >= 0, got {num_cols}")
    if not 0 <= threshold <= _MASK32:
        raise ValueError(f"threshold {threshold} is not a 32-bit unsigned value")
    num_rows = row_bits.shape[0]
    out = new_output((num_rows, num_cols), torch.bool, row_bits.device)
    if num_rows and num_cols:
        grid = (triton.cdiv(num_rows, _BLOCK_R), triton.cdiv(num_cols, _BLOCK_C))
        _keep_rows_kernel[grid](row_bits.contiguous(), out, num_rows, num_cols, threshold,
                                BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_WARPS)
    return out


# The slot masks of llama3-8b's training round: k·M = 16384 rows of D' = 14336.
COMPILE_SPECS = [
    KernelSpec(
        name="dropout.keep_rows",
        fn=_keep_rows_kernel,
        types={"row_bits_ptr": "*i64", "out_ptr": "*i1", "num_rows": "i32", "num_cols": "i32",
               "threshold": "i32"},
        constexprs={},
        configs=[triton.Config({"BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C},
                               num_warps=_WARPS, num_stages=1)],
        aligned=("row_bits_ptr", "out_ptr", "num_rows", "num_cols"),
        tensor_cores=False,
        note="k·M = 16384 rows, D' = 14336 columns",
    ),
]
