"""The Triton backward of one MoE round (``kernels/expert/backward.py``) against torch autograd
of a plain per-slot fp64 formula with gathered expert factors and the masks of
``graphmoe_fused.backends.dropout`` (a different algebra from the kernels' masked-dense,
summed-before-the-GEMM products, so a layout, masking or algebra mistake shows).

Coverage: every output (∂x, ∂w, the six LoRA factors); fp32 / fp16 / bf16; k = n; one token;
odd token counts over several row blocks; n·r up to 256 with the padded rank wider than the
LoRA chunk; an expert no token chose (its six gradients exactly zero); repeated expert ids;
dropout > 0; saved G/U against recomputation; deterministic mode (bit-identical twice, equal
to the atomic path to rounding, token groups of several blocks); pinned block configs;
validation errors; zero tokens. tests/conftest.py poisons every kernel output with NaN, and
every comparison rejects NaN.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
from graphmoe_fused.kernels.expert import backward as bw
from graphmoe_fused.kernels.expert import expert_lora_layout
from graphmoe_fused.kernels.expert.backward import expert_round_backward
from graphmoe_fused.kernels.utils import new_output

from graphmoe_fused.backends.dropout import lora_dropout_masks

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SCALING = 1.5  # not a power of two: a misplaced c shows
SEED, ROUND = 7, 1
NAMES = ("grad_x", "grad_weights", "grad_lora_A_gate", "grad_lora_B_gate", "grad_lora_A_up",
         "grad_lora_B_up", "grad_lora_A_down", "grad_lora_B_down")

# ---------------------------------------------------------------------------------------------
# Tolerances, as max |error| / max |reference| per output. The oracle is fp64 on the very values
# the kernels got (inputs rounded to the kernel dtype first), so what is left is the kernels'
# own rounding:
#
# 1. Intermediates rounded to the kernel dtype (unit roundoff u): each moves the output by at
#    most ~u of its scale. Counted on each output's path: a_gu (the recomputed LoRA input),
#    dh_base (stored), b (a tensor-core operand), dgate_j / dup_j (operands of the rank-r
#    products), dG / dU (stored), drop(h_j) and w_j·b (operands of ∂A_D), da (operand of the dx
#    LoRA and ∂A), drop_x(x), c·a_mix (operand of ∂B_D).
# 2. fp32 accumulation over K terms, ~√K·u32 with random signs (K ≤ max(d, D', M) + n·R here),
#    and fp32 silu / sigmoid (approximate on a GPU: 4·u32).
#
# fp32 is governed by part 2 (measured ≤ 10·u32 here; allowed 4√K·u32 + 8·u32 ≈ 1.2e-6 to
# 3e-6), fp16 and bf16 by part 1 (measured ≤ 2·u, allowed ROUNDINGS·u). Measured against a
# deliberate 1 % error (9 tokens, n = 4, r = 4, dropout 0.1): fp32 flags every affected output
# by 10^3-10^4 × its tolerance (c × 1.01 everywhere; only da's c in the gate/up kernel; only the
# wgrad kernel's dropout scale); bf16 flags c × 1.01 everywhere in 6 of 8 outputs but neither
# local 1 % error (≤ 0.9 × tolerance): a 1 % error is ~2.5 bf16 roundoffs, so the fp32 cases are
# the ones that pin the algebra down.
# ---------------------------------------------------------------------------------------------
U32 = torch.finfo(F32).eps / 2
ROUNDINGS = {"grad_x": 7, "grad_weights": 3, "grad_lora_A_gate": 6, "grad_lora_A_up": 6,
             "grad_lora_B_gate": 4, "grad_lora_B_up": 4, "grad_lora_A_down": 4,
             "grad_lora_B_down": 1}


def tolerance(dtype, name, reduction):
    fp32 = 4 * math.sqrt(reduction) * U32 + 8 * U32
    if dtype == F32:
        return fp32
    return ROUNDINGS[name] * torch.finfo(dtype).eps / 2 + fp32


def assert_close(actual, expected, dtype, name, reduction):
    assert actual.shape == expected.shape, name
    assert actual.dtype == F32, name
    assert not actual.isnan().any(), f"{name}: NaN (an element no launch wrote?)"
    scale = expected.abs().max().item()
    if scale == 0:
        assert not actual.any(), f"{name}: non-zero where the reference is all zero"
        return
    worst = (actual.double() - expected).abs().max().item() / scale
    tol = tolerance(dtype, name, reduction)
    assert worst <= tol, f"{name}: max error {worst:.3g} of the scale > {tol:.3g}"


# ---------------------------------------------------------------------------------------------
# Problems and the oracle.
# ---------------------------------------------------------------------------------------------


def make_problem(tokens, hidden, inter, experts, rank, top_k, dtype, seed=0, index=None):
    """Random weights of moderate scale, every LoRA factor non-zero (B included)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    if index is None:
        index = torch.rand(tokens, experts, generator=g).argsort(1)[:, :top_k]
    weights = torch.softmax(torch.randn(tokens, index.shape[1], generator=g), 1).float()
    p = dict(
        x=rn(tokens, hidden), dy=rn(tokens, hidden),
        gate=rn(inter, hidden, std=hidden ** -0.5), up=rn(inter, hidden, std=hidden ** -0.5),
        down=rn(hidden, inter, std=inter ** -0.5),
        A_gate=rn(experts, rank, hidden, std=hidden ** -0.5),
        B_gate=rn(experts, inter, rank, std=0.3),
        A_up=rn(experts, rank, hidden, std=hidden ** -0.5),
        B_up=rn(experts, inter, rank, std=0.3),
        A_down=rn(experts, rank, inter, std=inter ** -0.5),
        B_down=rn(experts, hidden, rank, std=0.3),
    )
    return p, weights, index


def oracle(p, weights, index, dropout_p=0.0, saved=None):
    """``(gradients by name, a_mix)`` in fp64: autograd of ``<y, dy>`` with
    ``y = Σ_j w_j (W_D h_j + c B_D[e_j] A_D[e_j] drop_j(h_j))``, one slot at a time."""
    trained = ("x", "A_gate", "B_gate", "A_up", "B_up", "A_down", "B_down")
    f = {k: v.double().clone().requires_grad_(k in trained) for k, v in p.items()}
    w = weights.double().clone().requires_grad_(True)
    tokens, hidden = f["x"].shape
    experts, rank, _ = f["A_gate"].shape
    inter, top_k = f["gate"].shape[0], index.shape[1]
    keep_h = None
    x_lora = f["x"]
    if dropout_p > 0:
        keep_x, keep_h = lora_dropout_masks(SEED, ROUND, tokens, hidden, top_k, inter,
                                            dropout_p, torch.device("cpu"))
        x_lora = f["x"] * keep_x / (1 - dropout_p)
    base_g, base_u = f["x"] @ f["gate"].T, f["x"] @ f["up"].T
    if saved is not None:  # the saved values, the gradient still flowing to x
        base_g = saved[0].double() + (base_g - base_g.detach())
        base_u = saved[1].double() + (base_u - base_u.detach())
    y = 0
    a_mix = torch.zeros(tokens, experts, rank, dtype=torch.float64)
    rows = torch.arange(tokens)
    for j in range(top_k):
        e = index[:, j]
        a_g = SCALING * torch.einsum("md,mrd->mr", x_lora, f["A_gate"][e])
        a_u = SCALING * torch.einsum("md,mrd->mr", x_lora, f["A_up"][e])
        gate = base_g + torch.einsum("mr,mir->mi", a_g, f["B_gate"][e])
        up = base_u + torch.einsum("mr,mir->mi", a_u, f["B_up"][e])
        h = F.silu(gate) * up
        h_lora = h if keep_h is None else h * keep_h[:, j] / (1 - dropout_p)
        a_down = torch.einsum("mi,mri->mr", h_lora, f["A_down"][e])
        a_mix = a_mix.index_put((rows, e), (w[:, j, None] * a_down).detach(), accumulate=True)
        y = y + w[:, j, None] * (h @ f["down"].T
                                 + SCALING * torch.einsum("mr,mdr->md", a_down, f["B_down"][e]))
    (y * f["dy"]).sum().backward()
    grads = dict(zip(NAMES, (f["x"].grad, w.grad) + tuple(f[k].grad for k in trained[1:]),
                     strict=True))
    return grads, a_mix.flatten(1).float()


def run(p, weights, index, a_mix, dropout_p=0.0, **kwargs):
    lora = expert_lora_layout(p["A_gate"], p["B_gate"], p["A_up"], p["B_up"], p["A_down"],
                              p["B_down"])
    return expert_round_backward(
        p["x"], p["dy"], p["gate"], p["up"], p["down"], lora, weights, index, a_mix, SCALING,
        dropout_p=dropout_p, dropout_seed=SEED, round_index=ROUND, **kwargs)


def check(p, weights, index, dtype, dropout_p=0.0, saved=None, **kwargs):
    ref, a_mix = oracle(p, weights, index, dropout_p, saved)
    out = run(p, weights, index, a_mix, dropout_p, saved_gate_up=saved, **kwargs)
    tokens, hidden = p["x"].shape
    experts, rank, _ = p["A_gate"].shape
    reduction = max(tokens, hidden, p["gate"].shape[0]) + experts * triton.next_power_of_2(rank)
    for name in NAMES:
        assert_close(getattr(out, name), ref[name], dtype, name, reduction)
    return out, ref


# ---------------------------------------------------------------------------------------------
# Against the oracle.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tokens, hidden, inter, experts, rank, top_k, dropout_p",
    [
        pytest.param(F32, 5, 32, 48, 4, 4, 2, 0.0, id="fp32-base"),
        pytest.param(F32, 1, 32, 48, 3, 8, 3, 0.0, id="fp32-one-token-k=n"),
        pytest.param(F32, 37, 32, 48, 4, 4, 2, 0.25, id="fp32-odd-tokens-dropout"),
        # R = 64 > LORA_CHUNK = 16 (one expert per chunk), n·r = 256 (the masked-dense limit).
        pytest.param(F32, 9, 40, 50, 4, 64, 3, 0.1, id="fp32-r64-nr256-dropout"),
        # Rank 3 padded to 4: padded rows stay out of every gradient.
        pytest.param(F32, 7, 24, 40, 6, 3, 3, 0.0, id="fp32-r3-padded"),
        pytest.param(F16, 7, 40, 50, 8, 16, 2, 0.0, id="fp16-r16-nr128"),
        pytest.param(BF16, 9, 32, 48, 4, 4, 4, 0.2, id="bf16-k=n-dropout"),
        pytest.param(BF16, 5, 32, 48, 8, 32, 2, 0.0, id="bf16-r32-nr256"),
    ],
)
def test_matches_autograd(dtype, tokens, hidden, inter, experts, rank, top_k, dropout_p):
    p, weights, index = make_problem(tokens, hidden, inter, experts, rank, top_k, dtype,
                                     seed=tokens + rank)
    check(p, weights, index, dtype, dropout_p)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_saved_gate_up_matches_recompute(dtype):
    p, weights, index = make_problem(11, 32, 48, 4, 4, 2, dtype, seed=3)
    # What the forward saves with recompute_intermediates=False: W_G x, W_U x in x's dtype.
    saved = ((p["x"].double() @ p["gate"].double().T).to(dtype),
             (p["x"].double() @ p["up"].double().T).to(dtype))
    with_saved, _ = check(p, weights, index, dtype, 0.1, saved=saved)
    recomputed, _ = check(p, weights, index, dtype, 0.1)
    if dtype == F32:
        for name in NAMES:  # same values up to fp32 accumulation order
            torch.testing.assert_close(getattr(with_saved, name), getattr(recomputed, name),
                                       rtol=1e-5, atol=1e-5)


def test_expert_no_token_chose_gets_exact_zeros():
    tokens, experts = 13, 4
    g = torch.Generator().manual_seed(4)
    # Experts 0, 1 and 3 only; expert 2 is never chosen.
    index = torch.stack([torch.tensor([0, 1, 3])[torch.randperm(3, generator=g)[:2]]
                         for _ in range(tokens)])
    p, weights, index = make_problem(tokens, 32, 48, experts, 4, 2, F32, seed=4, index=index)
    for deterministic in (False, True):
        out, _ = check(p, weights, index, F32, 0.1, deterministic=deterministic)
        for name in NAMES[2:]:
            grad = getattr(out, name)
            assert torch.equal(grad[2], torch.zeros_like(grad[2])), name
            assert grad[[0, 1, 3]].abs().amax(dim=(1, 2)).gt(0).all(), name


def test_repeated_expert_ids():
    # Token 0 names expert 1 twice: both slots' gradients land on expert 1.
    index = torch.tensor([[1, 1], [2, 0], [3, 1]])
    p, weights, index = make_problem(3, 32, 48, 4, 4, 2, F32, seed=6, index=index)
    check(p, weights, index, F32, 0.2)


def test_dropout_masks_matter():
    p, weights, index = make_problem(7, 32, 48, 4, 4, 2, F32, seed=5)
    ref, a_mix = oracle(p, weights, index, 0.3)
    plain = run(p, weights, index, a_mix, 0.0)
    assert (plain.grad_lora_A_down.double() - ref["grad_lora_A_down"]).abs().max() > 1e-3
    assert (plain.grad_x.double() - ref["grad_x"]).abs().max() > 1e-3


def test_nan_in_an_unchosen_experts_factors_stays_there():
    # Expert 3 is never chosen and all six of its factors are NaN; rank 16, so each 16-wide
    # LoRA chunk is one expert's block. The masked-dense products would multiply zeros by those
    # NaNs; the kernels run only the chunks between the lowest and the highest expert a tile's
    # slot chose (kernels/expert/token_order.py), so every gradient is finite, expert 3's
    # exactly zero, and the rest the oracle's (which never reads expert 3).
    tokens, experts = 13, 4
    g = torch.Generator().manual_seed(11)
    index = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(tokens)])
    p, weights, index = make_problem(tokens, 32, 48, experts, 16, 2, F32, seed=11, index=index)
    for name in ("A_gate", "B_gate", "A_up", "B_up", "A_down", "B_down"):
        p[name] = p[name].index_fill(0, torch.tensor([3]), float("nan"))
    out, _ = check(p, weights, index, F32, 0.1)
    for name in NAMES[2:]:
        assert torch.equal(getattr(out, name)[3], torch.zeros_like(getattr(out, name)[3])), name


# ---------------------------------------------------------------------------------------------
# Tokens in routing order (kernels/expert/token_order.py).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("pinned", [False, True], ids=["interpreter-config", "wide-chunks"])
def test_routing_order_changes_no_per_token_bit(deterministic, pinned):
    # 70 tokens over 5 row blocks, dropout on (the masks hash the token id, not the position).
    # ∂x and ∂w are per token: the same bits in any visiting order. The weight gradients sum
    # over tokens, in another order when sorted: equal to fp32 rounding.
    p, weights, index = make_problem(70, 32, 48, 8, 4, 3, F32, seed=12)
    configs = None
    if pinned:  # 8 rank-4 experts per 32-wide chunk
        configs = {"gate_up": lora_blocks(32, 32, 16, 32), "dx": lora_blocks(16, 32, 32, 32),
                   "gate_up_wgrad": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16,
                                                   "LORA_CHUNK": 32}, num_warps=4,
                                                  num_stages=1)}
    _, a_mix = oracle(p, weights, index, 0.1)
    sorted_, ref = check(p, weights, index, F32, 0.1, deterministic=deterministic,
                         configs=configs)
    plain = run(p, weights, index, a_mix, 0.1, deterministic=deterministic, configs=configs,
                sort_tokens=False)
    for name in NAMES[:2]:
        assert torch.equal(getattr(sorted_, name), getattr(plain, name)), name
    for name in NAMES[2:]:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(getattr(sorted_, name), getattr(plain, name), rtol=0,
                                   atol=4e-7 * scale, msg=name)


# ---------------------------------------------------------------------------------------------
# Deterministic mode.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [8, 2])
def test_deterministic_is_bit_identical_and_matches_atomics(monkeypatch, groups):
    # 70 tokens are 5 row blocks of 16: with 2 token groups each program walks 3 and 2 blocks
    # (read-add-write into its own slab).
    monkeypatch.setattr(bw, "DETERMINISTIC_TOKEN_GROUPS", groups)
    p, weights, index = make_problem(70, 32, 48, 4, 4, 2, F32, seed=8)
    first, _ = check(p, weights, index, F32, 0.1, deterministic=True)
    _, a_mix = oracle(p, weights, index, 0.1)
    second = run(p, weights, index, a_mix, 0.1, deterministic=True)
    atomic = run(p, weights, index, a_mix, 0.1)
    for name in NAMES:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
        torch.testing.assert_close(getattr(first, name), getattr(atomic, name),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pinned block configs, outside the single interpreter config.
# ---------------------------------------------------------------------------------------------


def lora_blocks(m, n, k, chunk):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "LORA_CHUNK": chunk},
                         num_warps=4, num_stages=1)


def gemm_blocks(m, n, k):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 2},
                         num_warps=4, num_stages=1)


@pytest.mark.parametrize("deterministic", [False, True])
def test_pinned_configs(deterministic):
    # LORA_CHUNK = 32 over rank-4 blocks: 8 experts per chunk; n·R = 20 leaves a masked tail.
    p, weights, index = make_problem(21, 40, 50, 5, 4, 2, F32, seed=9)
    wgrad = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "LORA_CHUNK": 32}, num_warps=4,
                          num_stages=1)
    configs = {"gate_up": lora_blocks(32, 32, 16, 32), "gate_up_wgrad": wgrad,
               "dx": lora_blocks(16, 32, 32, 32),
               "dh_base": gemm_blocks(32, 16, 16), "lora_in": gemm_blocks(16, 64, 32),
               "b_down": gemm_blocks(16, 32, 16)}
    check(p, weights, index, F32, 0.1, configs=configs, deterministic=deterministic)


# ---------------------------------------------------------------------------------------------
# Edges and validation.
# ---------------------------------------------------------------------------------------------


def test_zero_tokens():
    p, weights, index = make_problem(0, 32, 48, 4, 4, 2, F32)
    out = run(p, weights, index, torch.zeros(0, 16))
    assert out.grad_x.shape == (0, 32) and out.grad_weights.shape == (0, 2)
    assert out.grad_lora_B_gate.shape == (4, 48, 4) and not out.grad_lora_B_gate.any()


def test_session_poisons_outputs():
    """tests/conftest.py turns poisoning on: an output element no launch writes stays NaN and
    fails the comparisons above."""
    assert new_output((3,), F32, "cpu").isnan().all()


def test_bad_arguments():
    p, weights, index = make_problem(3, 32, 48, 4, 4, 2, F32)
    a_mix = torch.zeros(3, 16)
    with pytest.raises(TypeError, match="grad_y"):
        run({**p, "dy": p["dy"].half()}, weights, index, a_mix)
    with pytest.raises(ValueError, match="a_mix"):
        run(p, weights, index, torch.zeros(3, 15))
    with pytest.raises(TypeError, match="a_mix"):
        run(p, weights, index, a_mix.double())
    with pytest.raises(ValueError, match="dropout_p"):
        run(p, weights, index, a_mix, 1.0)
    with pytest.raises(ValueError, match="saved_gate_up"):
        run(p, weights, index, a_mix, saved_gate_up=(torch.zeros(3, 47), torch.zeros(3, 48)))
    with pytest.raises(ValueError, match="unknown launches"):
        run(p, weights, index, a_mix, configs={"gateup": lora_blocks(16, 16, 16, 16)})
