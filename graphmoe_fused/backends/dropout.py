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

On tensors: the per-row and per-column halves are computed exactly on int64 (``_mix32``,
``_mul32``: few values); the per-element half on int32 bit patterns in cache-sized row chunks
(``keep_rows``), which on one CPU thread costs about what ``bernoulli_`` did (the int64 version
was ~6x slower). The tests compare both against the Triton kernel's masks.
"""

from __future__ import annotations

import torch

from .contract import new_empty

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


def _row_bits(keys: torch.Tensor | int, tokens: torch.Tensor) -> torch.Tensor:
    """``mix32(key ^ token)``, the per-row half of the hash, exactly on int64 (a few values per
    row: no need to be fast)."""
    return _mix32(tokens ^ keys)


def _int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 tensor with the same 32 bits (exact: no
    out-of-range conversion)."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _signed32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


# The per-element half runs on int32, not int64: half the bytes per pass, and an int32 multiply
# wraps mod 2^32 exactly as uint32 does, where the int64 version needs four products per
# multiply (_mul32). torch has no logical right shift (and no uint32 shift) on the CPU: an
# arithmetic shift masked to the 32 - s low bits is one.
_INT32_MIN = -(1 << 31)
# Rows are hashed in chunks of about this many elements: the int32 tile and its scratch twin
# (512 KB each) then stay in L2 through the ~12 passes over them. On a GPU one chunk: the
# passes are kernel launches there.
_CPU_CHUNK = 1 << 17


def _mix32_int32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """``x = mix32(x)`` in place on int32 bit patterns (``tmp``: scratch of ``x``'s shape)."""
    for shift, factor in ((16, _M1), (15, _M2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if factor is not None:
            x.mul_(_signed32(factor))


def keep_rows(row_bits: torch.Tensor, num_cols: int, p: float) -> torch.Tensor:
    """Bool keep-mask ``[*row_bits.shape, num_cols]`` of rows whose per-row hash
    ``mix32(key ^ token)`` is given (int64, any shape; rows of different streams may be mixed,
    in any order: how the torch backend draws the slot masks straight in its pair layout)."""
    threshold = drop_threshold(p)
    device = row_bits.device
    flat = _int32_bits(row_bits.reshape(-1))
    num_rows = flat.numel()
    out = new_empty((num_rows, num_cols), torch.bool, device)
    if num_rows == 0 or num_cols == 0:
        return out.view(*row_bits.shape, num_cols)
    cols = torch.arange(num_cols, dtype=torch.int64, device=device)
    col_bits = _int32_bits(_mul32(cols, _GOLDEN))
    # Unsigned bits >= threshold is the signed comparison with both sign bits flipped.
    signed_threshold = _signed32(threshold ^ 0x80000000)
    chunk = max(1, _CPU_CHUNK // num_cols) if device.type == "cpu" else num_rows
    chunk = min(chunk, num_rows)
    x = new_empty((chunk, num_cols), torch.int32, device)
    tmp = new_empty((chunk, num_cols), torch.int32, device)
    for r0 in range(0, num_rows, chunk):
        rows = min(chunk, num_rows - r0)
        xs, ts = x[:rows], tmp[:rows]
        torch.bitwise_xor(flat[r0:r0 + rows, None], col_bits[None, :], out=xs)
        _mix32_int32_(xs, ts)
        xs.bitwise_xor_(_INT32_MIN)
        torch.ge(xs, signed_threshold, out=out[r0:r0 + rows])
    return out.view(*row_bits.shape, num_cols)


def token_row_bits(key: int, num_rows: int, device: torch.device) -> torch.Tensor:
    """int64 ``[num_rows]``: the per-row hashes of one stream's mask (``keep_rows`` of them is
    :func:`keep_mask`)."""
    return _row_bits(key, torch.arange(num_rows, dtype=torch.int64, device=device))


def keep_mask(key: int, num_rows: int, num_cols: int, p: float,
              device: torch.device) -> torch.Tensor:
    """``[num_rows, num_cols]`` bool keep-mask of one stream (rows: tokens, cols: columns)."""
    return keep_rows(token_row_bits(key, num_rows, device), num_cols, p)


def slot_row_bits(seed: int, round_index: int, num_tokens: int, top_k: int,
                  device: torch.device) -> torch.Tensor:
    """int64 ``[M, k]``: the per-row hash of token ``m``'s row in slot ``j``'s mask (stream
    ``1 + j``). ``keep_rows`` of it (or of any rearrangement) gives the slot masks."""
    keys = torch.tensor([stream_key(seed, round_index, 1 + j) for j in range(top_k)],
                        dtype=torch.int64, device=device)
    tokens = torch.arange(num_tokens, dtype=torch.int64, device=device)
    return _row_bits(keys[None, :], tokens[:, None])


def lora_dropout_masks(
    seed: int, round_index: int, num_tokens: int, hidden: int, top_k: int,
    intermediate: int, p: float, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean keep-masks ``(keep_x [M, d], keep_h [M, k, D'])`` of round ``round_index``."""
    keep_x = keep_mask(stream_key(seed, round_index, 0), num_tokens, hidden, p, device)
    keep_h = keep_rows(slot_row_bits(seed, round_index, num_tokens, top_k, device),
                       intermediate, p)
    return keep_x, keep_h


def apply_dropout(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask (what ``F.dropout`` computes)."""
    return t * keep.to(t.dtype) * (1.0 / (1.0 - p))
