"""The fused router kernel against the reference's routing (softmax of ``F.linear``, stable
top-k): probabilities, renormalised weights, lowest-index tie-breaking, block shapes, checks.
tests/conftest.py poisons every kernel output (NaN, -1) for the session, so an element the
kernel never writes fails.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1``, which ``triton.jit`` reads at
decoration time: tests/conftest.py sets it for the session before any test module imports
triton.
"""


import pytest
import torch
import torch.nn.functional as F
import triton
from graphmoe_fused.kernels.routing.router_topk import MAX_EXPERTS, fused_router_topk

from graphmoe_fused.backends.reference import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference(x: torch.Tensor, w: torch.Tensor, k: int):
    probs, weights, index = route(x, w, k)
    return F.linear(x, w).float(), probs, weights, index


# Probabilities. The kernel rounds its fp32 logits to the input dtype as F.linear does, so both
# sides usually softmax the very same logits and agree to fp32 precision (EXACT). A logit whose
# fp32 sum lies within the two sides' summation-order difference of a rounding boundary may
# round the other way: one ulp of the dtype. That is rare (≤ 1 row in 33 on these data), so
# all but a few rows must be EXACT, and every row within the one-ulp bound (_prob_tolerance). A
# kernel that skipped the rounding would miss EXACT in every 16-bit row (1e-3 to 3e-2 off);
# the one-ulp bound alone (6-15 % for bf16 logits of 2-4) would pass it.
EXACT = 1e-5
MAX_INEXACT_ROWS = 0.1  # of the rows (at least one)


def _prob_tolerance(dtype: torch.dtype, logits: torch.Tensor) -> torch.Tensor:
    """Per-row bound on the relative error of a probability when every logit of the row may
    land one ulp of ``dtype`` away from the reference's: dp_i/p_i = δ_i − Σ_j p_j δ_j with
    |δ_j| ≤ ulp(l_j), so |dp/p| ≤ 2·max_j ulp(l_j). fp32 logits are not rounded: EXACT."""
    if dtype == torch.float32:
        return torch.full((logits.shape[0], 1), EXACT, device=logits.device)
    finfo = torch.finfo(dtype)
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(logits.abs().clamp_min(finfo.tiny))))
    return 2 * ulp.amax(dim=1, keepdim=True)


def _row_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Largest relative error per row (an absolute 1e-7 floor for probabilities near 0)."""
    return ((actual - expected).abs() / (expected.abs() + 1e-7)).amax(dim=1, keepdim=True)


def _check_routing(x, w, k, probs, weights, index):
    logits, p_ref, w_ref, i_ref = _reference(x, w, k)
    tol = _prob_tolerance(x.dtype, logits)
    assert probs.dtype == torch.float32 and weights.dtype == torch.float32
    assert index.dtype == torch.int64
    assert probs.shape == p_ref.shape and weights.shape == w_ref.shape
    assert torch.isfinite(probs).all() and torch.isfinite(weights).all()
    prob_err = _row_errors(probs, p_ref)
    assert (prob_err <= tol).all(), f"probabilities off by {prob_err.max():.3g} (relative)"
    inexact = prob_err > EXACT
    allowed = max(1, int(MAX_INEXACT_ROWS * len(probs)))
    assert inexact.sum() <= allowed, f"{int(inexact.sum())} rows differ by > {EXACT}"
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[:, 0]))

    # The experts must be the reference's except at near-ties (probabilities within the
    # tolerance), which may resolve either way; such slots must stay rare, or the test data
    # would say nothing about the kernel's choices.
    assert (index >= 0).all() and (index < w.shape[0]).all()
    mismatch = index != i_ref
    assert mismatch.float().mean() <= 0.05, f"{int(mismatch.sum())} slots differ"
    p_kernel_pick = torch.gather(p_ref, 1, index)
    p_ref_pick = torch.gather(p_ref, 1, i_ref)
    assert (_row_errors(p_kernel_pick, p_ref_pick) <= 2 * tol).all()
    # Weights: renormalised picks, so twice the probabilities' bounds (and EXACT where the row's
    # probabilities and picks are).
    weight_err = _row_errors(weights, w_ref)
    assert (weight_err <= 2 * tol).all(), f"weights off by {weight_err.max():.3g}"
    same_rows = ~inexact & ~mismatch.any(dim=1, keepdim=True)
    assert (weight_err[same_rows] <= 2 * EXACT).all()
    picked = torch.gather(probs, 1, index)
    torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True), rtol=1e-6, atol=0)
    assert all(len(set(row)) == k for row in index.tolist()), "an expert chosen twice"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens, hidden, num_experts, top_k",
    [
        (1, 40, 8, 2),  # one token: a block that is almost all padding
        (7, 96, 8, 2),  # d spans several BLOCK_D chunks, the last one partial
        (33, 100, 5, 3),  # odd n (padded to 16), tokens over three blocks
        (20, 64, 8, 8),  # k = n
        (17, 24, MAX_EXPERTS, 4),  # the largest n
    ],
)
def test_matches_reference(dtype, num_tokens, hidden, num_experts, top_k):
    g = torch.Generator().manual_seed(num_tokens * 1000 + hidden)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(num_experts, hidden, generator=g) * hidden**-0.5 * 2).to(dtype).to(DEVICE)
    probs, weights, index = fused_router_topk(x, w, top_k)
    _check_routing(x, w, top_k, probs, weights, index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_zero_router_ties_go_to_lowest_index(dtype, top_k):
    """All logits 0: every probability is exactly 1/n and the first k experts win."""
    x = torch.randn(9, 48).to(dtype).to(DEVICE)
    w = torch.zeros(8, 48, dtype=dtype, device=DEVICE)
    probs, weights, index = fused_router_topk(x, w, top_k)
    assert (probs == 1 / 8).all()
    assert (index == torch.arange(top_k, device=DEVICE)).all()
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / top_k), rtol=0, atol=1e-7)
    _, _, w_ref, i_ref = _reference(x, w, top_k)
    assert torch.equal(index, i_ref) and torch.equal(weights, w_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_duplicate_router_rows_tie_to_lowest_index(dtype, top_k):
    """Experts 2 and 5 (and 1 and 6) share a router row: equal logits, exactly, because every
    product and partial sum is a small multiple of 1/8. The lower index must come first."""
    g = torch.Generator().manual_seed(3)
    hidden = 40
    x = torch.randint(0, 2, (21, hidden), generator=g).float()
    w = torch.randint(-4, 5, (8, hidden), generator=g).float() / 8
    # Entries of rows 2 = 5 are ≥ 1/2 ≥ every other entry: the top pair of every token.
    w[5] = w[2] = w[2].abs() + 0.5
    w[6] = w[1]
    x, w = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    probs, weights, index = fused_router_topk(x, w, top_k)
    _, p_ref, w_ref, i_ref = _reference(x, w, top_k)
    assert torch.equal(probs[:, 2], probs[:, 5]) and torch.equal(probs[:, 1], probs[:, 6])
    assert (index[:, 0] == 2).all()
    if top_k >= 2:
        assert (index[:, 1] == 5).all()
    assert torch.equal(index, i_ref)
    torch.testing.assert_close(weights, w_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs, p_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "dtype, tiny, winner",
    [
        (torch.float16, 2.0**-12, 0),  # 1 + ulp/4 rounds to 1: a tie, lowest index wins
        (torch.bfloat16, 2.0**-9, 0),
        (torch.float16, 3 * 2.0**-12, 1),  # 1 + 3·ulp/4 rounds up, not down (nearest even)
        (torch.bfloat16, 3 * 2.0**-9, 1),
    ],
)
def test_logits_rounded_like_f_linear(dtype, tiny, winner):
    """Expert 0's logit is exactly 1, expert 1's exactly 1 + tiny; the kernel must round them
    to the 16-bit values ``F.linear`` returns (to nearest even, also under the interpreter,
    whose own cast truncates) before the softmax, so it picks the reference's winner."""
    x = torch.zeros(3, 32)
    x[:, 0], x[:, 1] = 1.0, tiny
    w = torch.zeros(4, 32)
    w[0, 0] = w[1, 0] = w[1, 1] = 1.0
    x, w = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    probs, weights, index = fused_router_topk(x, w, 1)
    _, p_ref, _, i_ref = _reference(x, w, 1)
    assert torch.equal(probs[:, 0], probs[:, 1]) == (winner == 0)
    assert (index[:, 0] == winner).all() and torch.equal(index, i_ref)
    torch.testing.assert_close(probs, p_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "block",
    [
        {"BLOCK_M": 32, "BLOCK_D": 16},  # many d steps, tokens inside one block
        {"BLOCK_M": 16, "BLOCK_D": 128},  # one d step wider than d, tokens over 3 blocks
        {"BLOCK_M": 64, "BLOCK_D": 64},
    ],
)
def test_block_shapes(dtype, block):
    """Block shapes beyond the single interpreter config of the autotuner."""
    num_tokens, hidden, n, k = 40, 70, 6, 2
    g = torch.Generator().manual_seed(7)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, hidden, generator=g) * 0.25).to(dtype).to(DEVICE)
    config = triton.Config(block, num_warps=4, num_stages=2)
    _check_routing(x, w, k, *fused_router_topk(x, w, k, config=config))


def test_strided_rows_and_empty_batch():
    """Rows of x that are a slice of a wider buffer (row stride ≠ d) need no copy; a
    transposed view (column stride ≠ 1) is copied; zero tokens give empty outputs."""
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(13, 80, generator=g).to(DEVICE)
    x = wide[:, 5:53]
    w = (torch.randn(8, 48, generator=g) * 0.3).to(DEVICE)
    _check_routing(x, w, 2, *fused_router_topk(x, w, 2))
    xt = torch.randn(48, 13, generator=g).to(DEVICE).t()
    _check_routing(xt, w, 2, *fused_router_topk(xt, w, 2))
    probs, weights, index = fused_router_topk(x[:0], w, 2)
    assert probs.shape == (0, 8) and weights.shape == (0, 2) and index.shape == (0, 2)


def test_input_validation():
    x = torch.randn(4, 16, device=DEVICE)
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="2-D"):
        fused_router_topk(x[0], w, 2)
    with pytest.raises(ValueError, match=r"router_weight has shape \(8, 8\); expected \(8, 16\)"):
        fused_router_topk(x, w[:, :8], 2)
    with pytest.raises(ValueError, match="n ≤ 64"):
        fused_router_topk(x, torch.randn(MAX_EXPERTS + 1, 16, device=DEVICE), 2)
    for bad_k in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="top_k"):
            fused_router_topk(x, w, bad_k)
    with pytest.raises(TypeError, match="float64"):
        fused_router_topk(x.double(), w.double(), 2)
    with pytest.raises(TypeError, match="like the input"):
        fused_router_topk(x, w.half(), 2)
    with pytest.raises(ValueError, match="on meta"):
        fused_router_topk(x.to("meta"), w.to("meta"), 2)
