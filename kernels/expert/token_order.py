"""Tokens in routing order, so that a tile's masked-dense LoRA chunks are mostly skipped.

The expert kernels multiply every slot's LoRA deltas as masked-dense products over all ``n·r``
columns (:mod:`.gate_up`): each token may pick any expert, and the base products are shared by
the ``k`` slots, so the tokens cannot be split into one group per expert as a grouped GEMM
would. But the kernels can *visit* the tokens in any order: a tile's rows are looked up in
:func:`routing_order`, a permutation that sorts the tokens by their first slot's expert, then
their second's. A tile of sorted tokens then holds one or two experts per slot instead of all
``n``, and a chunk of expert blocks that no row of the tile chose adds exactly zero. A slot's
loops run only from its lowest to its highest expert's chunk (:func:`chunk_range`: loop bounds,
no branch around the products); the loops that serve all slots at once (``∂x``'s LoRA path,
``∂A_G``, ``∂A_U``, ``∂B_D``) test each chunk against every slot (:func:`slots_use_chunk`). With
``n = 8, k = 2`` uniform routing and 64-row tiles, a slot's loops run over 1.06 expert blocks
on average for the first slot and 1.8 for the second, the union over 2.5 (``python -m
bench.roofline``), which removes most of the masked-dense work of the forward and the backward.

Every token's row is computed from its own data: the chunks that hold its experts (at fixed
multiples of the chunk width) with the same instructions whatever tile it lands in, any other
chunk a tile runs adding exact zeros. So the per-token outputs are bit for bit those of the
identity order (finite factors assumed: a NaN in a chunk a tile runs reaches all its rows);
only sums over tokens (the weight gradients) add in another order. The LoRA dropout masks hash
the token id, which the tiles look up, not the position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["chunk_in_use", "chunk_range", "routing_order", "slots_use_chunk", "tile_tokens"]


# The fewest rows of any expert kernel's tile (tl.dot needs 16): up to this many tokens share
# one tile, whose experts their order cannot change (decoding: no sort to launch).
ONE_TILE_TOKENS = 16


def routing_order(expert_index: torch.Tensor, sort: bool = True) -> torch.Tensor:
    """The order the expert kernels visit the tokens of ``expert_index [M, k]`` in: ``[M]`` int32
    token ids sorted by (slot 0's expert, slot 1's), stable (a deterministic function of the
    routing: the backward recomputes the forward's); the identity when ``sort`` is false or all
    the tokens fit one tile.

    Ids outside ``[0, n)`` (no LoRA) sort wherever their value puts them; they only cost a tile
    the chunk that value would fall in, or none.
    """
    num_tokens = expert_index.shape[0]
    if not sort or num_tokens <= ONE_TILE_TOKENS:
        return torch.arange(num_tokens, dtype=torch.int32, device=expert_index.device)
    key = expert_index[:, 0].to(torch.int64)
    if expert_index.shape[1] > 1:
        # Slot 0 outermost; ids are small (n ≤ 64), and any clamped id keeps the key in range.
        key = key.clamp(-1, 1 << 20) * (1 << 22) + expert_index[:, 1].clamp(-1, 1 << 20)
    return torch.sort(key, stable=True).indices.to(torch.int32)


@triton.jit
def tile_tokens(order_ptr, positions, M):
    """``(tokens, ok)``: the int64 token ids of a tile's ``positions`` in the visiting order,
    and which positions exist (``< M``; the others read token 0, masked everywhere)."""
    ok = positions < M
    tokens = tl.load(order_ptr + positions, mask=ok, other=0)
    return tokens.to(tl.int64), ok


@triton.jit
def chunk_in_use(experts, c0, CH: tl.constexpr, BLOCK: tl.constexpr):
    """Whether any row's expert in ``experts`` owns a column of the masked-dense chunk
    ``[c0, c0 + CH)``, whose experts have ``BLOCK`` columns each (an id outside ``[0, n)``, such
    as a masked row's ``-1``, owns none). A chunk no row uses contributes exact zeros, so
    skipping it changes no bit of a row's result."""
    first = c0 // BLOCK
    last = (c0 + CH - 1) // BLOCK
    hit = (experts >= first) & (experts <= last)
    return tl.max(hit.to(tl.int32), axis=0) > 0


@triton.jit
def slots_use_chunk(idx_ptr, rows, row_ok, c0, TOP_K: tl.constexpr, CH: tl.constexpr,
                    BLOCK: tl.constexpr):
    """:func:`chunk_in_use` for any of the ``TOP_K`` slots of the tile's ``rows`` (ids read from
    the ``[M, k]`` ``idx_ptr``; an id outside ``[0, n)`` uses no chunk)."""
    used = chunk_in_use(tl.load(idx_ptr + rows * TOP_K, mask=row_ok, other=-1), c0, CH, BLOCK)
    for j in tl.static_range(1, TOP_K):
        e_j = tl.load(idx_ptr + rows * TOP_K + j, mask=row_ok, other=-1)
        used = used | chunk_in_use(e_j, c0, CH, BLOCK)
    return used


@triton.jit
def chunk_range(experts, NUM_EXPERTS: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr):
    """``(start, end)``: the masked-dense chunks ``[c0, c0 + CH)``, ``c0 = start, start + CH, ...
    < end``, that hold the blocks (``BLOCK`` columns each) of every expert in ``experts`` (ids
    outside ``[0, n)`` ignored; an empty range when there is none). In sorted tiles the experts
    of a slot are one or two neighbours, so a loop over this range visits about as few chunks
    as a test of each chunk would, without a branch around the products."""
    valid = (experts >= 0) & (experts < NUM_EXPERTS)
    first = tl.min(tl.where(valid, experts, NUM_EXPERTS), axis=0)
    last = tl.max(tl.where(valid, experts, -1), axis=0)
    return (first * BLOCK) // CH * CH, (last + 1) * BLOCK
