"""LoRA-input dropout masks: a counter-based hash of (seed, round, stream, token, column), so
every backend, a recomputing backward and a kernel evaluating it in registers draw the same
masks, and no mask has to be stored.

Per round ``t``: stream 0 is the keep-mask of the round input ``x_t`` (``[M, d]``, shared by the
gate and up LoRA of every expert), stream ``1 + j`` that of slot ``j``'s activation ``h_j``
(``[M, D']``, the down LoRA's input). The base (frozen) path never sees dropout. The function
(``kernels/dropout.py`` has the same one for the Triton kernels, bit for bit)::

    mix32(x)   = lowbias32: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B;
                 x ^= x >> 16   (uint32, wrap-around)
    stream key = mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ (t << 16 | stream))
    bits       = mix32(mix32(key ^ token) ^ (column · 0x9E3779B9))
    keep       = bits >= round(p · 2^32)

lowbias32 (C. Wellons' integer hash) passes the usual avalanche tests; hashing the token first
and the column second costs one hash per element after a per-row one.
"""

from __future__ import annotations

import torch

_M1, _M2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9
_MASK32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, round_index: int, stream: int) -> int:
    """The 32-bit key of one (forward seed, round, stream)."""
    if not (0 <= round_index < 1 << 16 and 0 <= stream < 1 << 16):
        raise ValueError(f"round {round_index} and stream {stream} must be in [0, 65536)")
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    return _mix32_int(_mix32_int(_mix32_int(lo) ^ hi) ^ (round_index << 16 | stream))


def drop_threshold(p: float) -> int:
    """``round(p · 2^32)``: an element is kept when its 32 hash bits are at least this."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    return min(round(p * 2.0**32), _MASK32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x · c mod 2^32`` for int64 ``x`` in [0, 2^32), without int64 overflow (c split in
    16-bit halves: every partial product stays below 2^48)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def keep_mask(key: int, num_rows: int, num_cols: int, p: float,
              device: torch.device) -> torch.Tensor:
    """``[num_rows, num_cols]`` bool keep-mask of one stream (rows: tokens, cols: columns)."""
    rows = torch.arange(num_rows, dtype=torch.int64, device=device)
    cols = torch.arange(num_cols, dtype=torch.int64, device=device)
    row_bits = _mix32(rows ^ key)
    col_bits = _mul32(cols, _GOLDEN)
    return _mix32(row_bits[:, None] ^ col_bits[None, :]) >= drop_threshold(p)


def lora_dropout_masks(
    seed: int, round_index: int, num_tokens: int, hidden: int, top_k: int,
    intermediate: int, p: float, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean keep-masks ``(keep_x [M, d], keep_h [M, k, D'])`` of round ``round_index``."""
    keep_x = keep_mask(stream_key(seed, round_index, 0), num_tokens, hidden, p, device)
    keep_h = torch.stack([
        keep_mask(stream_key(seed, round_index, 1 + j), num_tokens, intermediate, p, device)
        for j in range(top_k)
    ], dim=1)
    return keep_x, keep_h


def apply_dropout(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask (what ``F.dropout`` computes)."""
    return t * keep.to(t.dtype) * (1.0 / (1.0 - p))
