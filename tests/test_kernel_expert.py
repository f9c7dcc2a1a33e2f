"""The expert kernels (``expert_lora_in``, ``expert_gate_up``, ``expert_down``) against a plain
fp64 torch computation written per slot, with each expert's factors gathered: a different
algebra from the kernels' masked-dense products, so a layout or masking mistake shows.

Coverage: ranks 1, 3, 8, 16, 32 and 64 with n·r up to 256 (the masked-dense limit), including
padded ranks wider than the gate/up kernel's LoRA chunk (R > LORA_CHUNK = 16: one expert per
chunk) and chunks holding several experts; n = 1; k = n; odd token counts and a single token; an
expert no token chose; non-zero LoRA B factors everywhere; block configs pinned past the single
interpreter config. tests/conftest.py poisons every kernel output with NaN for the session, so
an element a launch never writes fails the comparison.

Without a GPU the kernels run under the Triton interpreter, in one 16×16×16 tile config unless a
test pins one, so the odd sizes below span several blocks with ragged edges; bf16 goes through
the interpreter workaround (fp32 dot of the bf16 values, round-to-nearest casts:
``kernels.utils.interpreter_bf16``).
"""

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
import triton
from graphmoe_fused.kernels.expert import (
    MAX_MASKED_DENSE_COLS,
    ExpertLoRA,
    expert_down,
    expert_gate_up,
    expert_lora_in,
    expert_lora_layout,
    padded_rank,
)
from graphmoe_fused.kernels.expert import gate_up as gate_up_module
from graphmoe_fused.kernels.expert.token_order import ONE_TILE_TOKENS, routing_order
from graphmoe_fused.kernels.utils import new_output

from graphmoe_fused.backends.dropout import apply_dropout, lora_dropout_masks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SCALING = 1.5  # not a power of two: a misplaced c shows

# ---------------------------------------------------------------------------------------------
# Tolerances. The oracle is fp64 on the very values the kernels got (inputs rounded to the
# kernel dtype first), so what is left is the kernels' own rounding, in three parts:
#
# 1. Intermediates rounded to the kernel dtype (unit roundoff u = eps/2): each is off by at most
#    u of its own magnitude, and reaches the output through dots with random-sign terms as at
#    most ~u of the output's scale. On the way to h_mix there are R = 2 such roundings (the
#    rank-r a_gu = c·A·x_lora, stored in x's dtype; h_mix itself), to a_mix 2 (a_gu; h_j, fed to
#    A_D in x's dtype; a_mix itself is fp32), to y 5 (a_gu, h_mix, h_j, c·a_mix fed to B_D, y).
#    So max |error| ≤ R·u·max|ref|; and since independent errors add in quadrature, the
#    relative RMS error ≤ √R·u (a rounding error is uniform, RMS u/√3: a √3 margin).
# 2. fp32 accumulation over a reduction of K terms: each addition rounds by ≤ u32 of the running
#    sum; with random signs these grow like √K·u32 (K·u32 is the adversarial worst case), with
#    K = d + n·R (h_mix: base and masked-dense LoRA), D' (a_mix), D' + n·r (y).
# 3. silu in fp32: on a GPU exp and the division are approximate (ex2.approx, div.full: ≤ 2 ulp
#    each), 4·u32 on every output computed through it (h_mix, a_mix, y).
#
# fp32 is governed by parts 2 and 3 (≤ 30·u32 ≈ 1.8e-6 of the scale here), fp16 and bf16 by
# part 1 (y: 2.4e-3 and 2e-2 max, 1.1e-3 and 8.7e-3 RMS). Measured on these problems, honest
# kernels stay within 2/3 of every bound (≤ 1.4 u max and ≤ 1.1 u RMS for fp16/bf16, ≤ 7·u32
# for fp32). A kernel whose LoRA scaling c is off by 1 % moves h_mix, a_mix and y by 1-3 % of
# their scale here (the LoRA factors are not small next to the base weights) and fails every
# numeric test below, bf16 included; so does h_mix scaled by 1.01. With c off by 1 % in the down
# launch alone (a smaller share of y) every fp32 and fp16 case fails, and 4 of the 8 bf16 cases
# that run that launch: in the others the error is below bf16's resolution.
# ---------------------------------------------------------------------------------------------
U32 = torch.finfo(torch.float32).eps / 2
# Output -> (roundings to the kernel dtype on its path, computed through silu).
PATHS = {"h_mix": (2, True), "a_mix": (2, True), "y": (5, True),
         "a_gu": (1, False), "y_down": (2, False)}  # expert_lora_in / expert_down alone
SILU_ERROR = 4 * U32
# RMS is a statistic: it is only asserted on outputs with enough elements to average over.
MIN_RMS_ELEMENTS = 64


def bounds(dtype: torch.dtype, what: str, reduction: int) -> tuple[float, float]:
    """``(max, rms)`` bounds of the error of output ``what`` relative to the oracle, for a
    reduction of ``reduction`` terms (see above)."""
    roundings, through_silu = PATHS[what]
    u = torch.finfo(dtype).eps / 2
    fp32 = math.sqrt(reduction) * U32 + (SILU_ERROR if through_silu else 0.0)
    return roundings * u + fp32, math.sqrt(roundings) * u + fp32


def assert_close(actual, expected, dtype, what, reduction):
    """``actual`` within the rounding bounds of ``what`` (a key of ``PATHS``)."""
    assert actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: NaN (an element no launch wrote?)"
    max_tol, rms_tol = bounds(dtype, what, reduction)
    err = actual.double() - expected
    scale = expected.abs().max().item()
    if scale == 0:
        assert not actual.any(), f"{what}: non-zero where the reference is all zero"
        return
    worst = err.abs().max().item() / scale
    assert worst <= max_tol, f"{what}: max error {worst:.3g} of the scale > {max_tol:.3g}"
    if actual.numel() >= MIN_RMS_ELEMENTS:
        rms = (err.norm() / expected.norm()).item()
        assert rms <= rms_tol, f"{what}: relative RMS error {rms:.3g} > {rms_tol:.3g}"


# ---------------------------------------------------------------------------------------------
# Problems and the oracle.
# ---------------------------------------------------------------------------------------------


class Problem(NamedTuple):
    x: torch.Tensor
    x_lora: torch.Tensor
    gate_weight: torch.Tensor
    up_weight: torch.Tensor
    down_weight: torch.Tensor
    lora_A_gate: torch.Tensor
    lora_B_gate: torch.Tensor
    lora_A_up: torch.Tensor
    lora_B_up: torch.Tensor
    lora_A_down: torch.Tensor
    lora_B_down: torch.Tensor
    weights: torch.Tensor  # fp32 [M, k]
    index: torch.Tensor  # int64 [M, k]
    keep_h: torch.Tensor | None  # the torch side's masks, for the oracle only: the kernels
    dropout_p: float  # hash their own from (dropout_p, dropout_seed, round_index)
    dropout_seed: int = 0
    round_index: int = 0

    def lora(self) -> ExpertLoRA:
        return expert_lora_layout(self.lora_A_gate, self.lora_B_gate, self.lora_A_up,
                                  self.lora_B_up, self.lora_A_down, self.lora_B_down)

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """``(d, D', n, r)``."""
        experts, rank, hidden = self.lora_A_gate.shape
        return hidden, self.gate_weight.shape[0], experts, rank


def make_problem(tokens, hidden, inter, experts, rank, top_k, dtype, seed=0, dropout_p=0.0,
                 index=None, dropout_seed=1234, round_index=1) -> Problem:
    """Random weights of moderate scale, every LoRA factor non-zero (B included, so the LoRA
    terms are a large share of every output), distinct experts per token unless ``index`` is
    given. With dropout, the oracle's masks are the torch backends' (``lora_dropout_masks``),
    and ``x_lora`` is ``dropout(x)`` made as they make it (in x's dtype)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(DEVICE)

    x = randn(tokens, hidden)
    keep_h = None
    x_lora = x
    if dropout_p > 0:
        keep_x, keep_h = lora_dropout_masks(dropout_seed, round_index, tokens, hidden, top_k,
                                            inter, dropout_p, x.device)
        x_lora = apply_dropout(x, keep_x, dropout_p)
    if index is None:
        index = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k]
    logits = torch.randn(tokens, index.shape[1], generator=g)
    weights = torch.softmax(logits, dim=1).float()
    return Problem(
        x, x_lora,
        randn(inter, hidden, std=hidden ** -0.5), randn(inter, hidden, std=hidden ** -0.5),
        randn(hidden, inter, std=inter ** -0.5),
        randn(experts, rank, hidden, std=hidden ** -0.5), randn(experts, inter, rank, std=0.3),
        randn(experts, rank, hidden, std=hidden ** -0.5), randn(experts, inter, rank, std=0.3),
        randn(experts, rank, inter, std=inter ** -0.5), randn(experts, hidden, rank, std=0.3),
        weights.to(DEVICE), index.to(DEVICE), keep_h, dropout_p, dropout_seed, round_index,
    )


def reference(pr: Problem, scaling: float = SCALING):
    """``(h_mix, a_mix, y)`` in fp64, one slot at a time with gathered expert factors. An expert
    id outside ``[0, n)`` has no LoRA (the kernels' documented behaviour)."""
    f = {name: getattr(pr, name).double() for name in Problem._fields
         if isinstance(getattr(pr, name), torch.Tensor) and getattr(pr, name).is_floating_point()}
    tokens, top_k = pr.index.shape
    experts, rank, _ = pr.lora_A_gate.shape

    def gathered(name, e):
        # A zero expert at index n stands in for every out-of-range id.
        t = f[name]
        return torch.cat([t, torch.zeros_like(t[:1])])[e]

    h_mix = 0
    a_mix = torch.zeros(tokens, experts + 1, rank, dtype=torch.float64, device=pr.x.device)
    y = 0
    rows = torch.arange(tokens, device=pr.x.device)
    for j in range(top_k):
        e = torch.where((pr.index[:, j] >= 0) & (pr.index[:, j] < experts), pr.index[:, j],
                        experts)
        w = f["weights"][:, j, None]
        a_g = scaling * torch.einsum("md,mrd->mr", f["x_lora"], gathered("lora_A_gate", e))
        a_u = scaling * torch.einsum("md,mrd->mr", f["x_lora"], gathered("lora_A_up", e))
        gate = f["x"] @ f["gate_weight"].T + torch.einsum("mr,mir->mi", a_g,
                                                            gathered("lora_B_gate", e))
        up = f["x"] @ f["up_weight"].T + torch.einsum("mr,mir->mi", a_u, gathered("lora_B_up", e))
        h = F.silu(gate) * up
        h_mix = h_mix + w * h
        h_lora = h if pr.keep_h is None else h * pr.keep_h[:, j].double() / (1 - pr.dropout_p)
        a_d = torch.einsum("mi,mri->mr", h_lora, gathered("lora_A_down", e))
        a_mix[rows, e] += w * a_d
        y = y + w * (h @ f["down_weight"].T
                     + scaling * torch.einsum("mr,mdr->md", a_d, gathered("lora_B_down", e)))
    return h_mix, a_mix[:, :experts].flatten(1), y


def run_both(pr: Problem, configs=None, down_config=None, **kwargs):
    lora = pr.lora()
    out = expert_gate_up(pr.x, pr.gate_weight, pr.up_weight, lora, pr.weights, pr.index, SCALING,
                         dropout_p=pr.dropout_p, dropout_seed=pr.dropout_seed,
                         round_index=pr.round_index, configs=configs, **kwargs)
    y = expert_down(out.h_mix, pr.down_weight, lora, out.a_mix, SCALING, config=down_config)
    return out.h_mix, out.a_mix, y


def check_problem(pr: Problem, dtype: torch.dtype, **kwargs):
    h_mix, a_mix, y = run_both(pr, **kwargs)
    ref_h, ref_a, ref_y = reference(pr)
    hidden, inter, experts, rank = pr.sizes
    assert h_mix.dtype == dtype and a_mix.dtype == torch.float32 and y.dtype == dtype
    assert_close(h_mix, ref_h, dtype, "h_mix", hidden + experts * padded_rank(rank))
    assert_close(a_mix, ref_a, dtype, "a_mix", inter)
    assert_close(y, ref_y, dtype, "y", inter + experts * rank)
    return h_mix, a_mix, y


def blocks(m, n, k, group_m, **extra):
    """A pinned block config (see the pinned-config tests below)."""
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group_m, **extra},
                         num_warps=4, num_stages=1)



# ---------------------------------------------------------------------------------------------
# Gate/up and down together, against the per-slot reference.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tokens, hidden, inter, experts, rank, top_k",
    [
        pytest.param(F32, 1, 40, 50, 4, 8, 2, id="fp32-one-token"),
        pytest.param(F32, 7, 40, 50, 1, 16, 1, id="fp32-n1"),
        pytest.param(F32, 9, 24, 40, 4, 1, 4, id="fp32-r1-k=n"),
        pytest.param(F32, 33, 40, 50, 8, 8, 2, id="fp32-r8-three-row-blocks"),
        # n·r = 256, the masked-dense limit, three ways: R > LORA_CHUNK (one expert per chunk,
        # a 32- or 64-wide chunk) and R = LORA_CHUNK (16 chunks).
        pytest.param(F32, 5, 40, 50, 8, 32, 2, id="fp32-r32-nr256"),
        pytest.param(F32, 5, 40, 50, 4, 64, 3, id="fp32-r64-nr256"),
        pytest.param(F32, 11, 24, 40, 16, 16, 3, id="fp32-r16-n16-nr256"),
        pytest.param(F16, 7, 40, 50, 8, 16, 2, id="fp16-r16"),
        pytest.param(F16, 5, 40, 50, 4, 64, 2, id="fp16-r64-nr256"),
        pytest.param(F16, 1, 40, 50, 2, 8, 2, id="fp16-one-token-k=n"),
        pytest.param(BF16, 7, 40, 50, 8, 16, 2, id="bf16-r16"),
        pytest.param(BF16, 5, 40, 50, 8, 32, 2, id="bf16-r32-nr256"),
        pytest.param(BF16, 33, 40, 50, 4, 8, 2, id="bf16-r8-three-row-blocks"),
        pytest.param(BF16, 7, 40, 50, 1, 1, 1, id="bf16-n1-r1"),
    ],
)
def test_expert_mlp_matches_reference(dtype, tokens, hidden, inter, experts, rank, top_k):
    # d = 40 / 24 and D' = 50 / 40: not all multiples of the 16-wide interpreter tiles.
    pr = make_problem(tokens, hidden, inter, experts, rank, top_k, dtype, seed=tokens + rank)
    check_problem(pr, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_lora_blocks_straddling_chunks(dtype):
    # Rank 3 padded to 4: n·R = 6·4 = 24 columns, two 16-wide chunks (the second partial) with
    # expert 3's block in the second; three slots, so the in-place slot-to-slot update runs
    # twice.
    check_problem(make_problem(9, 24, 40, 6, 3, 3, dtype, seed=2), dtype)


@pytest.mark.parametrize("rank", [4, 32])
def test_expert_no_token_chose_gets_nothing(rank):
    tokens, experts = 11, 4
    g = torch.Generator().manual_seed(4)
    # Experts 0, 1 and 3 only; expert 2 is never chosen.
    index = torch.stack([torch.tensor([0, 1, 3])[torch.randperm(3, generator=g)[:2]]
                         for _ in range(tokens)])
    pr = make_problem(tokens, 24, 40, experts, rank, 2, F32, seed=4, index=index)
    # A NaN-filled a_mix buffer: the zeroing must reach the block no atomic touches.
    poisoned = torch.full((tokens, experts * rank), float("nan"), device=DEVICE)
    _, a_mix, _ = check_problem(pr, F32, a_mix_out=poisoned)
    assert torch.equal(a_mix.view(tokens, experts, rank)[:, 2], torch.zeros(tokens, rank))
    assert a_mix.view(tokens, experts, rank)[:, [0, 1, 3]].abs().amax(-1).gt(0).sum() == 2 * tokens


# ---------------------------------------------------------------------------------------------
# LoRA dropout: the kernels hash the masks in registers; the oracle uses the torch side's
# lora_dropout_masks. The masks are bit-identical (tests/test_dropout_masks.py), so fp32 outputs
# agree to fp32 rounding, where one wrong keep bit in a row of D' = 40-50 moves a_mix by ~1/D'
# of its scale (> 100 times the fp32 bound).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tokens, experts, rank, top_k, p",
    [(F32, 7, 4, 4, 2, 0.25), (F32, 21, 4, 3, 3, 0.5), (BF16, 7, 4, 4, 2, 0.25),
     (F16, 9, 8, 16, 2, 0.1)],
)
def test_lora_dropout_masks(dtype, tokens, experts, rank, top_k, p):
    pr = make_problem(tokens, 24, 40, experts, rank, top_k, dtype, seed=5, dropout_p=p)
    check_problem(pr, dtype)
    # The masks matter, each of them: without dropout, in another round, with another seed,
    # or with the slots' masks swapped, the oracle moves far past the bound.
    h_mix, a_mix, _ = run_both(pr)
    for other in (pr._replace(keep_h=None, x_lora=pr.x, dropout_p=0.0),
                  make_problem(tokens, 24, 40, experts, rank, top_k, dtype, seed=5, dropout_p=p,
                               round_index=2),
                  make_problem(tokens, 24, 40, experts, rank, top_k, dtype, seed=5, dropout_p=p,
                               dropout_seed=99),
                  pr._replace(keep_h=pr.keep_h.flip(1))):
        _, ref_a, _ = reference(other)
        assert (a_mix.double() - ref_a).abs().max() > 1e-2 * ref_a.abs().max()


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_lora_in_applies_the_torch_dropout_exactly(dtype):
    # The x mask is applied as the tiles load and rounded to x's dtype as the torch side's
    # dropout(x) is: the kernel multiplies the very operand bits a materialised dropout(x)
    # would give it, in the same order, so the outputs are the same bits.
    tokens, hidden, p = 21, 40, 0.3
    pr = make_problem(tokens, hidden, 16, 3, 5, 2, dtype, seed=8, dropout_p=p)
    lora = pr.lora()
    got = expert_lora_in(pr.x, lora, SCALING, dropout_p=p, dropout_seed=pr.dropout_seed,
                         round_index=pr.round_index)
    want = expert_lora_in(pr.x_lora, lora, SCALING)
    assert not got.isnan().any()
    assert torch.equal(got, want)
    assert not torch.equal(got, expert_lora_in(pr.x, lora, SCALING))


def test_dropout_keys_do_not_reach_the_kernel_signature(monkeypatch):
    """Triton specialises scalar int arguments on their value (== 1, divisibility by 16, i32 or
    i64 range): seeds and rounds must change tensor contents only, never a scalar argument
    or a constexpr, or some seeds would compile the kernels again."""
    launches = []
    real = gate_up_module.launch

    def recording(tuned, kernel, grid, args, meta, config=None):
        launches.append(([a for a in args if not isinstance(a, torch.Tensor)], dict(meta)))
        return real(tuned, kernel, grid, args, meta, config)

    monkeypatch.setattr(gate_up_module, "launch", recording)
    seen = []
    for seed, round_index in ((0, 0), (1, 1), (2**40 + 17, 3), (12345, 16)):
        launches.clear()
        pr = make_problem(5, 24, 40, 4, 4, 2, F32, seed=3, dropout_p=0.2, dropout_seed=seed,
                          round_index=round_index)
        check_problem(pr, F32)
        seen.append(list(launches))
    assert len(seen[0]) == 2 and all(s == seen[0] for s in seen)
    # The seed is in the keys tensor: different keys, same signature.
    keys = [gate_up_module.dropout_keys(0.2, seed, 0, 2, torch.device(DEVICE))
            for seed in (0, 1)]
    assert keys[0].dtype == torch.int64 and keys[0].shape == (4,)
    assert keys[0][0] == keys[1][0] and not torch.equal(keys[0][1:], keys[1][1:])
    assert gate_up_module.dropout_keys(0.0, 5, 0, 2, torch.device(DEVICE)) is None


# ---------------------------------------------------------------------------------------------
# deterministic=True: per-D'-tile partials and a fixed-order reduction instead of atomics.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, experts, rank, top_k, index, gate_up",
    [
        pytest.param(9, 4, 4, 2, None, None, id="interpreter-config"),
        # D' = 50 in 32-wide tiles (two, the second partial); rank 3 (padded to 4) over
        # 16-wide reduction column tiles; a repeated id, one out of range and an expert no
        # token chose.
        pytest.param(4, 6, 3, 3, [[1, 1, 0], [7, 2, 4], [4, 0, 2], [0, 2, 1]],
                     blocks(16, 32, 16, 1, LORA_CHUNK=16), id="repeats-out-of-range"),
        pytest.param(21, 8, 8, 2, None, blocks(32, 64, 32, 2, LORA_CHUNK=32), id="one-tile"),
    ],
)
def test_deterministic_matches_the_atomic_path(monkeypatch, tokens, experts, rank, top_k,
                                               index, gate_up):
    index = None if index is None else torch.tensor(index)
    pr = make_problem(tokens, 24, 50, experts, rank, top_k, F32, seed=tokens, dropout_p=0.2,
                      index=index)
    configs = None if gate_up is None else {"gate_up": gate_up}
    spaces, reductions = [], []
    real_workspace, real_reduce = gate_up_module.partials_workspace, gate_up_module._launch_reduce

    def keep(*args):
        spaces.append(real_workspace(*args))
        return spaces[-1]

    def reduce(*args):
        reductions.append(args[3])  # the number of D' tiles the launch used
        return real_reduce(*args)

    monkeypatch.setattr(gate_up_module, "partials_workspace", keep)
    monkeypatch.setattr(gate_up_module, "_launch_reduce", reduce)
    # a_mix_out poisoned by hand too: the reduction must write every element.
    poisoned = torch.full((tokens, experts * rank), float("nan"), device=DEVICE)
    h_det, a_det, y_det = check_problem(pr, F32, configs=configs, deterministic=True,
                                        a_mix_out=poisoned)
    assert a_det.data_ptr() == poisoned.data_ptr()
    h_again, a_again, _ = run_both(pr, configs=configs, deterministic=True)
    h_atomic, a_atomic, _ = run_both(pr, configs=configs)
    assert torch.equal(a_again, a_det) and torch.equal(h_again, h_det)
    assert torch.equal(h_atomic, h_det)
    # The same terms summed in another order: fp32 rounding apart (a few ulps of the scale).
    scale = a_atomic.abs().max().item()
    torch.testing.assert_close(a_det, a_atomic, rtol=0, atol=1e-6 * scale)
    # The partials: every element of the tiles the launch used was written (poisoned by
    # new_output in the tests); they hold each slot's share of a_mix.
    used = reductions[0]
    if gate_up is not None:
        assert used == triton.cdiv(50, gate_up.kwargs["BLOCK_N"])
    ws = spaces[0]
    assert ws.shape[1:] == (tokens, top_k * rank) and ws.shape[0] >= used
    assert not ws[:used].isnan().any()
    partial = ws[:used].double().sum(0).view(tokens, top_k, rank)
    valid = (pr.index >= 0) & (pr.index < experts)
    want = torch.zeros(tokens, experts + 1, rank, dtype=torch.float64)
    for j in range(top_k):
        e = torch.where(valid[:, j], pr.index[:, j], experts)
        want[torch.arange(tokens), e] += partial[:, j]
    torch.testing.assert_close(want[:, :experts].flatten(1), a_det.double(), rtol=0,
                               atol=1e-6 * scale)


def test_deterministic_zero_tokens():
    pr = make_problem(0, 24, 40, 4, 4, 2, F32)
    h_mix, a_mix, _ = run_both(pr, deterministic=True)
    assert h_mix.shape == (0, 40) and a_mix.shape == (0, 16)


def test_repeated_and_out_of_range_expert_ids():
    # Token 0 names expert 1 twice (both slots get expert 1's LoRA, counted twice in a_mix);
    # token 1 names expert 7 of 4 (documented: no LoRA for that slot); token 2 is ordinary.
    index = torch.tensor([[1, 1], [7, 2], [3, 0]])
    pr = make_problem(3, 24, 40, 4, 4, 2, F32, seed=6, index=index)
    check_problem(pr, F32)


def test_strided_input_and_output_buffers():
    tokens, hidden, inter = 7, 24, 40
    pr = make_problem(tokens, hidden, inter, 4, 4, 2, F32, seed=7)
    wide = torch.full((tokens, hidden + 8), float("nan"), device=DEVICE)
    wide[:, 3:3 + hidden] = pr.x
    out_buf = torch.full((tokens, inter + 5), float("nan"), device=DEVICE)
    a_buf = torch.full((tokens, 16), float("nan"), device=DEVICE)  # zeroed by the kernel
    pr = pr._replace(x=wide[:, 3:3 + hidden], x_lora=wide[:, 3:3 + hidden])
    h_mix, a_mix, _ = check_problem(pr, F32, out=out_buf[:, :inter], a_mix_out=a_buf)
    assert h_mix.data_ptr() == out_buf.data_ptr() and a_mix.data_ptr() == a_buf.data_ptr()
    # Nothing written outside the view.
    assert out_buf[:, inter:].isnan().all()


# ---------------------------------------------------------------------------------------------
# Tokens in routing order (kernels/expert/token_order.py): the tiles visit the tokens sorted by
# their experts and skip the LoRA chunks no row of the tile chose.
# ---------------------------------------------------------------------------------------------


def test_routing_order_sorts_by_slot_0_then_slot_1_stably():
    g = torch.Generator().manual_seed(3)
    index = torch.randint(-1, 5, (200, 2), generator=g)  # -1: a row with no LoRA
    order = routing_order(index)
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(200))
    visited = [tuple(index[m].tolist()) + (m,) for m in order.tolist()]
    assert visited == sorted(visited)  # (e0, e1), ties in token order
    k1 = index[:, :1]
    assert [int(k1[m]) for m in routing_order(k1).tolist()] == sorted(k1[:, 0].tolist())
    identity = list(range(200))
    assert routing_order(index, sort=False).tolist() == identity
    # One tile holds them all: their order cannot change its experts.
    few = index[:ONE_TILE_TOKENS].flip(0)
    assert routing_order(few).tolist() == identity[:ONE_TILE_TOKENS]
    assert routing_order(index[:ONE_TILE_TOKENS + 1]).tolist() != identity[:ONE_TILE_TOKENS + 1]


@pytest.mark.parametrize(
    "dtype, experts, rank, top_k, gate_up",
    [
        pytest.param(F32, 4, 4, 2, None, id="fp32-interpreter-config"),
        # 8 rank-4 experts per 32-wide chunk: a chunk is skipped only when none of them is used.
        pytest.param(F32, 8, 4, 3, blocks(32, 32, 16, 2, LORA_CHUNK=32), id="fp32-wide-chunks"),
        pytest.param(BF16, 6, 3, 2, None, id="bf16-r3-padded"),
    ],
)
def test_routing_order_changes_no_bit(dtype, experts, rank, top_k, gate_up):
    # 70 tokens over 5 row blocks, dropout on (its masks hash the token id, not the position),
    # the base products saved: every output is per token, so visiting the tokens in another
    # order must give the same bits. The deterministic a_mix too (its D'-tile order is fixed).
    pr = make_problem(70, 24, 50, experts, rank, top_k, dtype, seed=5, dropout_p=0.2)
    configs = None if gate_up is None else {"gate_up": gate_up}
    inter = pr.gate_weight.shape[0]
    results = []
    for sort in (True, False):
        base = tuple(new_output((70, inter), dtype, DEVICE) for _ in range(2))
        h_mix, a_mix, y = run_both(pr, configs=configs, deterministic=True, base_out=base,
                                   sort_tokens=sort)
        results.append((h_mix, a_mix, y, *base))
    for name, got, want in zip(("h_mix", "a_mix", "y", "gate", "up"), *results, strict=True):
        assert torch.equal(got, want), name
    check_problem(pr, dtype, configs=configs)


def test_sorted_tiles_skip_the_chunks_of_unused_experts():
    # Expert 3's LoRA B is NaN and 8 of 64 tokens (every 8th) choose it, k = 1; rank 16, so a
    # 16-wide LoRA chunk is one expert. A masked-dense product multiplies the other rows' zeros
    # by that NaN wherever a tile runs expert 3's chunk; sorted, the 8 tokens share one 16-row
    # tile and only that tile runs it, in the original order every tile does. Without the skip
    # every row would be NaN either way.
    tokens, experts = 64, 4
    index = torch.tensor([[3] if m % 8 == 0 else [m % 3] for m in range(tokens)])
    pr = make_problem(tokens, 24, 40, experts, 16, 1, F32, seed=7, index=index)
    pr = pr._replace(lora_B_gate=pr.lora_B_gate.index_fill(0, torch.tensor([3]), float("nan")))
    chose_3 = index[:, 0] == 3
    nan_rows = {}
    for sort in (True, False):
        h_mix, _, _ = run_both(pr, sort_tokens=sort)
        nan_rows[sort] = h_mix.isnan().any(1)
        assert nan_rows[sort][chose_3].all()  # the tokens that chose expert 3 get its NaN
    assert nan_rows[True].sum() <= 16  # the one tile of sorted tokens
    assert nan_rows[False].all()  # every 16-row tile holds two of them


def test_zero_tokens():
    pr = make_problem(0, 24, 40, 4, 4, 2, F32)
    h_mix, a_mix, y = run_both(pr)
    assert h_mix.shape == (0, 40) and a_mix.shape == (0, 16) and y.shape == (0, 24)


def test_session_poisons_outputs():
    """tests/conftest.py turns poisoning on for the whole session; the tests above rely on it to
    catch an output element no launch writes."""
    assert new_output((3,), torch.float32, DEVICE).isnan().all()
    assert (new_output((3,), torch.int64, DEVICE) == -1).all()


# ---------------------------------------------------------------------------------------------
# Pinned block configs: shapes the single interpreter config (16×16×16, LORA_CHUNK = 16) does not
# reach.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, experts, rank, top_k, tokens, gate_up, lora_in, down",
    [
        # LORA_CHUNK = 16 below the padded rank: the chunk widens to one whole expert block.
        pytest.param(F32, 8, 32, 2, 21, blocks(16, 32, 32, 2, LORA_CHUNK=16),
                     blocks(32, 64, 16, 1), blocks(16, 32, 64, 4), id="chunk16-R32"),
        pytest.param(F32, 4, 64, 3, 21, blocks(16, 32, 32, 1, LORA_CHUNK=16),
                     blocks(16, 128, 32, 2), blocks(32, 16, 32, 1), id="chunk16-R64"),
        pytest.param(BF16, 4, 64, 2, 9, blocks(16, 32, 32, 1, LORA_CHUNK=16),
                     blocks(16, 64, 32, 2), blocks(16, 32, 32, 2), id="chunk16-R64-bf16"),
        # Chunks of several experts: 4 rank-8 blocks per 32 columns; 4 rank-16 blocks per 64
        # columns with one column tile wider than D' = 50.
        pytest.param(F32, 8, 8, 3, 21, blocks(32, 16, 16, 1, LORA_CHUNK=32),
                     blocks(16, 32, 32, 1), blocks(16, 16, 16, 2), id="chunk32-R8"),
        pytest.param(F32, 16, 16, 2, 9, blocks(16, 64, 64, 4, LORA_CHUNK=64),
                     blocks(16, 64, 64, 1), blocks(16, 64, 64, 1), id="chunk64-R16-wide-tile"),
        # One chunk (32) wider than all n·R = 5·4 = 20 columns: the masked tail.
        pytest.param(F32, 5, 3, 2, 21, blocks(16, 16, 16, 2, LORA_CHUNK=32),
                     blocks(16, 16, 16, 2), blocks(16, 16, 16, 2), id="chunk32-R4-partial"),
    ],
)
def test_pinned_block_configs(dtype, experts, rank, top_k, tokens, gate_up, lora_in, down):
    pr = make_problem(tokens, 40, 50, experts, rank, top_k, dtype, seed=experts * rank)
    check_problem(pr, dtype, configs={"gate_up": gate_up, "lora_in": lora_in}, down_config=down)


def test_unknown_config_name_is_an_error():
    pr = make_problem(3, 24, 40, 4, 4, 2, F32)
    with pytest.raises(ValueError, match="unknown launches"):
        run_both(pr, configs={"gateup": blocks(16, 16, 16, 1, LORA_CHUNK=16)})


# ---------------------------------------------------------------------------------------------
# Each launch alone.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, config", [(F32, None), (BF16, None),
                                           (F32, blocks(32, 32, 64, 1))])
def test_lora_in_alone(dtype, config):
    # Rank 5 is padded to 8 in the kernel layout: columns [m, (gate|up), expert, rank].
    tokens, experts, rank, padded = 21, 3, 5, 8
    pr = make_problem(tokens, 40, 16, experts, rank, 2, dtype, seed=8)
    out = torch.full((tokens, 2 * experts * padded), float("nan"), dtype=dtype, device=DEVICE)
    got = expert_lora_in(pr.x_lora, pr.lora(), SCALING, out=out, config=config)
    assert got.data_ptr() == out.data_ptr()
    expected = torch.zeros(tokens, 2, experts, padded, dtype=torch.float64, device=DEVICE)
    for side, a in enumerate((pr.lora_A_gate, pr.lora_A_up)):
        expected[:, side, :, :rank] = SCALING * torch.einsum("md,erd->mer", pr.x_lora.double(),
                                                             a.double())
    assert_close(got, expected.flatten(1), dtype, "a_gu", 40)
    assert torch.equal(got.view(tokens, 2, experts, padded)[..., rank:],
                       torch.zeros(tokens, 2, experts, padded - rank, dtype=dtype))


@pytest.mark.parametrize("dtype, tokens, config", [(F32, 33, None), (BF16, 7, None),
                                                   (F32, 19, blocks(16, 32, 64, 2))])
def test_down_alone(dtype, tokens, config):
    hidden, inter, experts, rank = 40, 50, 4, 4
    pr = make_problem(tokens, hidden, inter, experts, rank, 2, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    h_mix = torch.randn(tokens, inter, generator=g).to(dtype).to(DEVICE)
    a_mix = torch.randn(tokens, experts * rank, generator=g).to(DEVICE)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    y = expert_down(h_mix, pr.down_weight, pr.lora(), a_mix, SCALING, out=out, config=config)
    assert y.data_ptr() == out.data_ptr()
    b_cat = pr.lora_B_down.double().permute(0, 2, 1).reshape(experts * rank, hidden)
    expected = h_mix.double() @ pr.down_weight.double().T + SCALING * a_mix.double() @ b_cat
    assert_close(y, expected, dtype, "y_down", inter + experts * rank)


@pytest.mark.parametrize("rank,padded", [(2, 2), (3, 4)])
def test_layout_is_the_transposed_padded_factors(rank, padded):
    pr = make_problem(1, 8, 12, 3, rank, 1, F32)
    lora = pr.lora()
    assert lora.a_in.shape == (2, 3, padded, 8) and lora.b_gate.shape == (3, padded, 12)
    assert torch.equal(lora.a_in[0, :, :rank], pr.lora_A_gate)
    assert torch.equal(lora.a_in[1, :, :rank], pr.lora_A_up)
    assert torch.equal(lora.b_gate[:, :rank], pr.lora_B_gate.transpose(1, 2))
    assert torch.equal(lora.b_up[:, :rank], pr.lora_B_up.transpose(1, 2))
    assert torch.equal(lora.a_down[:, :rank], pr.lora_A_down)
    assert torch.equal(lora.b_down, pr.lora_B_down.transpose(1, 2))
    padding = [lora.a_in[:, :, rank:], lora.b_gate[:, rank:], lora.b_up[:, rank:],
               lora.a_down[:, rank:]]
    assert all(not t.any() for t in padding)
    assert all(t.is_contiguous() for t in lora if isinstance(t, torch.Tensor))
    assert (lora.num_experts, lora.rank) == (3, rank)


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


def test_validation_errors():
    pr = make_problem(4, 16, 24, 4, 4, 2, F32)
    lora = pr.lora()

    def gate_up(**changes):
        args = {"x": pr.x, "gate_weight": pr.gate_weight, "up_weight": pr.up_weight,
                "lora": lora, "expert_weights": pr.weights, "expert_index": pr.index,
                "scaling": SCALING}
        kwargs = {k: changes.pop(k) for k in ("dropout_p", "dropout_seed", "round_index",
                                              "deterministic") if k in changes}
        args.update(changes)
        return expert_gate_up(*args.values(), **kwargs)

    with pytest.raises(TypeError, match="gate_weight"):
        gate_up(gate_weight=pr.gate_weight.half())
    with pytest.raises(ValueError, match="gate_weight must be 2-D"):
        gate_up(gate_weight=pr.gate_weight[0])
    with pytest.raises(ValueError, match="up_weight"):
        gate_up(up_weight=pr.up_weight[:, :8])
    with pytest.raises(TypeError, match="x"):
        gate_up(x=pr.x.double())
    with pytest.raises(ValueError, match="2-D"):
        gate_up(x=pr.x[None])
    with pytest.raises(TypeError, match="expert_index"):
        gate_up(expert_index=pr.index.float())
    with pytest.raises(ValueError, match="k=5"):
        gate_up(expert_index=torch.zeros(4, 5, dtype=torch.long),
                expert_weights=torch.ones(4, 5))
    with pytest.raises(TypeError, match="ExpertLoRA"):
        gate_up(lora=tuple(lora))
    with pytest.raises(ValueError, match="dropout probability"):
        gate_up(dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout probability"):
        gate_up(dropout_p=-0.1)
    with pytest.raises(TypeError, match="dropout_p"):
        gate_up(dropout_p=True)
    with pytest.raises(TypeError, match="dropout_seed"):
        gate_up(dropout_p=0.1, dropout_seed=1.5)
    with pytest.raises(ValueError, match="round_index"):
        gate_up(dropout_p=0.1, round_index=1 << 16)
    with pytest.raises(TypeError, match="deterministic"):
        gate_up(deterministic=1)
    with pytest.raises(ValueError, match="round_index"):
        expert_lora_in(pr.x, lora, SCALING, dropout_p=0.1, round_index=-1)
    with pytest.raises(TypeError, match="a_mix"):
        expert_down(pr.x.new_zeros(4, 24), pr.down_weight, lora, torch.zeros(4, 16).half(),
                    SCALING)
    with pytest.raises(ValueError, match="a_mix"):
        expert_down(pr.x.new_zeros(4, 24), pr.down_weight, lora, torch.zeros(4, 15), SCALING)
    with pytest.raises(ValueError, match="out must have unit column stride"):
        expert_down(pr.x.new_zeros(4, 24), pr.down_weight, lora, torch.zeros(4, 16), SCALING,
                    out=torch.zeros(16, 4).t())
    with pytest.raises(ValueError, match="out must be contiguous"):
        expert_lora_in(pr.x, lora, SCALING, out=torch.zeros(32, 4).t())
    with pytest.raises(ValueError, match="lora_A_down must be 3-D"):
        expert_lora_layout(pr.lora_A_gate, pr.lora_B_gate, pr.lora_A_up, pr.lora_B_up,
                           pr.lora_A_down[0], pr.lora_B_down)
    big = make_problem(1, 8, 8, 32, 16, 2, F32)  # n·r = 512
    assert 32 * 16 > MAX_MASKED_DENSE_COLS
    with pytest.raises(ValueError, match="masked-dense"):
        big.lora()
