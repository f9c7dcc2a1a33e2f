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
"""

from __future__ import annotations

import triton
import triton.language as tl

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
