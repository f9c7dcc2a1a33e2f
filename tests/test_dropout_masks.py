"""The counter-based LoRA dropout masks: the torch definition and the Triton one agree bit for
bit, and the masks behave as dropout masks should (rate, independence across streams, rounds,
tokens, columns and seeds)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from graphmoe_fused.kernels import dropout as kernel_side

from graphmoe_fused.backends import dropout as torch_side
from graphmoe_fused.backends.torch import masks as torch_masks

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)


@triton.jit
def _keep_kernel(out_ptr, key, threshold, M, N, row0, col0, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    keep = kernel_side.keep_mask(key, rows + row0, cols + col0, threshold)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], keep.to(tl.int8), mask=ok)


def _kernel_mask(key: int, rows: int, cols: int, p: float, row0: int = 0, col0: int = 0):
    out = torch.full((rows, cols), -1, dtype=torch.int8)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 32))
    _keep_kernel[grid](out, key, kernel_side.drop_threshold(p), rows, cols, row0, col0,
                       BM=16, BN=32)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**32 + 5, 2**62 - 3])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_kernel_and_torch_masks_are_bit_identical(seed, p):
    for round_index, stream in ((0, 0), (2, 1), (7, 3)):
        key = torch_side.stream_key(seed, round_index, stream)
        assert key == kernel_side.stream_key(seed, round_index, stream)
        want = torch_side.keep_mask(key, 37, 70, p, torch.device("cpu"))
        got = _kernel_mask(key, 37, 70, p)
        assert torch.equal(got.bool(), want) and (got >= 0).all()


def test_large_token_and_column_indices_agree():
    # Row and column indices past 2^16 (and a token index past 2^31 / 4): the uint32 products
    # must wrap identically on both sides.
    key = torch_side.stream_key(12345, 1, 2)
    rows, cols = 1_000_003, 70_001
    got = _kernel_mask(key, 16, 32, 0.3, row0=rows, col0=cols)
    full_rows = torch.arange(rows, rows + 16, dtype=torch.int64)
    full_cols = torch.arange(cols, cols + 32, dtype=torch.int64)
    bits = torch_side._mix32(torch_side._mix32(full_rows ^ key)[:, None]
                             ^ torch_side._mul32(full_cols, 0x9E3779B9)[None, :])
    assert torch.equal(got.bool(), bits >= torch_side.drop_threshold(0.3))


def test_mul32_is_exact_modular_multiplication():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**32, (10_000,), generator=g, dtype=torch.int64)
    for c in (0x7FEB352D, 0x846CA68B, 0x9E3779B9, 1, 0xFFFFFFFF):
        want = torch.tensor([(int(v) * c) % 2**32 for v in x[:200]], dtype=torch.int64)
        assert torch.equal(torch_side._mul32(x[:200], c), want)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_rate_and_independence(p):
    masks = torch_side.lora_dropout_masks(7, 1, 256, 64, 2, 96, p, torch.device("cpu"))
    keep_x, keep_h = masks
    n = keep_x.numel() + keep_h.numel()
    rate = (keep_x.sum() + keep_h.sum()).item() / n
    # Binomial standard error at n ≈ 65k draws: 5 sigma is < 1%.
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    # Different streams, rounds and seeds give unrelated masks: agreement is the chance rate.
    chance = p * p + (1 - p) * (1 - p)
    others = [keep_h[:, 1, :64], torch_side.lora_dropout_masks(7, 2, 256, 64, 2, 96, p,
                                                                torch.device("cpu"))[0],
              torch_side.lora_dropout_masks(8, 1, 256, 64, 2, 96, p, torch.device("cpu"))[0]]
    for a, b in ((keep_x, others[0]), (keep_x, others[1]), (keep_x, others[2]),
                 (keep_h[:, 0], keep_h[:, 1])):
        agree = (a == b).float().mean().item()
        assert abs(agree - chance) < 5 * (chance * (1 - chance) / a.numel()) ** 0.5 + 1e-3
    # Neighbouring tokens and columns are not correlated either.
    for a, b in ((keep_x[1:], keep_x[:-1]), (keep_x[:, 1:], keep_x[:, :-1])):
        agree = (a == b).float().mean().item()
        assert abs(agree - chance) < 5 * (chance * (1 - chance) / a.numel()) ** 0.5 + 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="dropout probability"):
        torch_side.drop_threshold(1.0)
    with pytest.raises(ValueError, match="round"):
        torch_side.stream_key(0, 70_000, 0)


# ---------------------------------------------------------------------------------------------
# The fast torch path (int32 bit patterns in row chunks) against the definition written plainly
# on int64 (one hash per element, exact modular products).
# ---------------------------------------------------------------------------------------------


def _plain_keep(row_bits: torch.Tensor, num_cols: int, p: float) -> torch.Tensor:
    cols = torch.arange(num_cols, dtype=torch.int64)
    bits = torch_side._mix32(row_bits.reshape(-1)[:, None]
                             ^ torch_side._mul32(cols, 0x9E3779B9)[None, :])
    return (bits >= torch_side.drop_threshold(p)).view(*row_bits.shape, num_cols)


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.05, 0.5, 0.75, 1 - 2**-33])
def test_fast_keep_rows_is_the_definition(monkeypatch, p):
    # Small chunks, so a run spans several with a ragged last one; row hashes with the top bit
    # set and clear, and the extremes, where a signed-vs-unsigned slip would show.
    monkeypatch.setattr(torch_side, "_CPU_CHUNK", 3 * 53)
    g = torch.Generator().manual_seed(1)
    row_bits = torch.randint(0, 2**32, (7, 5), generator=g, dtype=torch.int64)
    row_bits[0, :3] = torch.tensor([0, 2**31 - 1, 2**32 - 1])
    got = torch_side.keep_rows(row_bits, 53, p)
    assert got.dtype == torch.bool and got.shape == (7, 5, 53)
    assert torch.equal(got, _plain_keep(row_bits, 53, p))
    # And element by element with Python integers, for a few of them.
    for r, c in ((0, 0), (0, 1), (0, 2), (3, 52), (6, 17)):
        x = (int(row_bits.view(-1)[r]) ^ (c * 0x9E3779B9)) & 0xFFFFFFFF
        assert bool(got.view(-1, 53)[r, c]) == (kernel_side._mix32(x)
                                                >= kernel_side.drop_threshold(p))


def test_lora_dropout_masks_are_the_definition():
    seed, round_index, tokens, hidden, top_k, inter, p = 2**33 + 9, 4, 67, 40, 3, 90, 0.2
    keep_x, keep_h = torch_side.lora_dropout_masks(seed, round_index, tokens, hidden, top_k,
                                                   inter, p, torch.device("cpu"))
    rows = torch.arange(tokens, dtype=torch.int64)
    want_x = _plain_keep(torch_side._mix32(rows ^ torch_side.stream_key(seed, round_index, 0)),
                         hidden, p)
    assert torch.equal(keep_x, want_x)
    assert keep_h.shape == (tokens, top_k, inter)
    for j in range(top_k):
        want = torch_side.keep_mask(torch_side.stream_key(seed, round_index, 1 + j), tokens,
                                    inter, p, torch.device("cpu"))
        assert torch.equal(keep_h[:, j], want)
    # Rows in any order (the torch backend's pair layouts): the same masks, rearranged.
    bits = torch_side.slot_row_bits(seed, round_index, tokens, top_k, torch.device("cpu"))
    order = torch.randperm(tokens * top_k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch_side.keep_rows(bits.t(), inter, p), keep_h.transpose(0, 1))
    assert torch.equal(torch_side.keep_rows(bits.reshape(-1)[order], inter, p),
                       keep_h.reshape(-1, inter)[order])


def test_empty_masks():
    keep_x, keep_h = torch_side.lora_dropout_masks(1, 0, 0, 8, 2, 12, 0.1, torch.device("cpu"))
    assert keep_x.shape == (0, 8) and keep_h.shape == (0, 2, 12)
    assert torch_side.keep_mask(5, 3, 0, 0.1, torch.device("cpu")).shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# kernels.dropout.keep_rows_mask: the masks as one kernel (the torch backend's on a GPU).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2**-32, 1e-9, 0.05, 0.5, 0.9, 1 - 2**-33])
def test_keep_rows_kernel_is_the_definition(p):
    # Ragged against the kernel's 16 × 512 tiles in both directions; the extremes of the row
    # hashes. p = 2^-32 gives threshold 1 (a value triton would otherwise specialise), 0.5 and
    # above thresholds past 2^31; the outputs are poisoned (True) before the kernel writes, so
    # p = 0.9 (mostly False) catches an unwritten element.
    g = torch.Generator().manual_seed(2)
    row_bits = torch.randint(0, 2**32, (35,), generator=g, dtype=torch.int64)
    row_bits[:3] = torch.tensor([0, 2**31 - 1, 2**32 - 1])
    threshold = torch_side.drop_threshold(p)
    got = kernel_side.keep_rows_mask(row_bits, 530, threshold)
    assert got.dtype == torch.bool and got.shape == (35, 530)
    assert torch.equal(got, _plain_keep(row_bits, 530, p))
    # Through the custom op the torch backend calls.
    assert torch.equal(torch_masks.keep_rows_kernel(row_bits, 530, threshold), got)


def test_keep_rows_kernel_op_passes_opcheck():
    row_bits = torch.randint(0, 2**32, (21,), generator=torch.Generator().manual_seed(3),
                             dtype=torch.int64)
    torch.library.opcheck(torch_masks.keep_rows_kernel, (row_bits, 40, 2**30))


def test_keep_rows_kernel_rejects_bad_arguments():
    bits = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="1-D int64"):
        kernel_side.keep_rows_mask(bits.int(), 8, 5)
    with pytest.raises(ValueError, match="1-D int64"):
        kernel_side.keep_rows_mask(bits.view(2, 2), 8, 5)
    with pytest.raises(ValueError, match="num_cols"):
        kernel_side.keep_rows_mask(bits, -1, 5)
    with pytest.raises(ValueError, match="32-bit"):
        kernel_side.keep_rows_mask(bits, 8, 2**32)
    assert kernel_side.keep_rows_mask(bits[:0], 8, 5).shape == (0, 8)


def test_torch_backend_on_the_mask_kernel_is_bit_identical(monkeypatch):
    """The torch backend with its masks from the kernel (as on a GPU; here under the
    interpreter) gives the same output and gradients, bit for bit, as with the torch masks."""
    from .helpers import make_layer

    def step():
        layer = make_layer(backend="torch", lora_dropout=0.1, num_rounds=2, num_experts=4,
                           top_k=2, lora_r=4, seed=5).train()
        x = torch.randn(13, 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
        y, aux = layer(x, return_aux_loss=True)
        (y.square().sum() + aux).backward()
        return [y, x.grad, *(p.grad for p in layer.parameters() if p.requires_grad)]

    want = step()
    calls = []
    kernel = torch_masks.keep_rows_kernel
    monkeypatch.setattr(torch_masks, "draws_masks_in_one_pass", lambda device: True)
    monkeypatch.setattr(torch_masks, "keep_rows_kernel",
                        lambda *args: calls.append(args) or kernel(*args))
    got = step()
    # The x mask and the slot masks of each round, drawn in forward and again in backward.
    assert len(calls) == 2 * 2 * 2
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
