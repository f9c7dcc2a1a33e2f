"""The expert kernels alone (``expert_lora_in``, ``expert_gate_up``, ``expert_down``) against a
plain fp64 torch computation written per slot, with each expert's factors gathered: a different
algebra from the kernels' masked-dense products, so a layout or masking mistake shows.

Tolerances: the reference runs in fp64 on the very values the kernel got (inputs rounded to the
kernel dtype first), so what is left is the kernel's own rounding: fp32 accumulation (tight), and
for fp16/bf16 the rank-r and ``h_j`` operands and the output rounded to the kernel dtype
(honest: a few units of the dtype's last place relative to the output's scale). Without a GPU the
kernels run under the Triton interpreter, in one 16×16×16 tile config, so the odd sizes below
span several blocks with ragged edges; bf16 goes through the interpreter workaround (fp32 dot of
the bf16 values, round-to-nearest casts: ``kernels.utils.interpreter_bf16``).
"""


from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from graphmoe_fused.kernels.expert import (
    MAX_MASKED_DENSE_COLS,
    ExpertLoRA,
    expert_down,
    expert_gate_up,
    expert_lora_in,
    expert_lora_layout,
)
from graphmoe_fused.kernels.utils import POISON_ENV

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol as a fraction of the reference's largest magnitude)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}
SCALING = 1.5  # not a power of two: a misplaced c shows


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write cannot pass."""
    monkeypatch.setenv(POISON_ENV, "1")


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
    keep_h: torch.Tensor | None
    dropout_p: float

    def lora(self) -> ExpertLoRA:
        return expert_lora_layout(self.lora_A_gate, self.lora_B_gate, self.lora_A_up,
                                  self.lora_B_up, self.lora_A_down, self.lora_B_down)


def make_problem(tokens, hidden, inter, experts, rank, top_k, dtype, seed=0, dropout_p=0.0,
                 index=None) -> Problem:
    """Random weights of moderate scale, every LoRA factor non-zero, distinct experts per token
    (unless ``index`` is given)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(DEVICE)

    x = randn(tokens, hidden)
    keep_h = None
    x_lora = x
    if dropout_p > 0:
        keep_x = torch.rand(tokens, hidden, generator=g) >= dropout_p
        keep_h = (torch.rand(tokens, top_k, inter, generator=g) >= dropout_p).to(DEVICE)
        x_lora = (x.double() * keep_x.to(DEVICE) / (1 - dropout_p)).to(dtype)
    if index is None:
        index = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k]
    logits = torch.randn(tokens, top_k, generator=g)
    weights = torch.softmax(logits, dim=1).float()
    return Problem(
        x, x_lora,
        randn(inter, hidden, std=hidden ** -0.5), randn(inter, hidden, std=hidden ** -0.5),
        randn(hidden, inter, std=inter ** -0.5),
        randn(experts, rank, hidden, std=hidden ** -0.5), randn(experts, inter, rank, std=0.3),
        randn(experts, rank, hidden, std=hidden ** -0.5), randn(experts, inter, rank, std=0.3),
        randn(experts, rank, inter, std=inter ** -0.5), randn(experts, hidden, rank, std=0.3),
        weights.to(DEVICE), index.to(DEVICE), keep_h, dropout_p,
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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    rtol, atol = TOL[dtype]
    assert not actual.isnan().any(), f"{what}: NaN (an unwritten element?)"
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=atol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def run_both(pr: Problem, **kwargs):
    lora = pr.lora()
    out = expert_gate_up(pr.x, pr.gate_weight, pr.up_weight, lora, pr.weights, pr.index, SCALING,
                         x_lora=pr.x_lora, keep_h=pr.keep_h, dropout_p=pr.dropout_p, **kwargs)
    y = expert_down(out.h_mix, pr.down_weight, lora, out.a_mix, SCALING)
    return out.h_mix, out.a_mix, y


def check_problem(pr: Problem, dtype: torch.dtype, **kwargs):
    h_mix, a_mix, y = run_both(pr, **kwargs)
    ref_h, ref_a, ref_y = reference(pr)
    assert h_mix.dtype == dtype and a_mix.dtype == torch.float32 and y.dtype == dtype
    assert_close(h_mix, ref_h, dtype, "h_mix")
    assert_close(a_mix, ref_a, dtype, "a_mix")
    assert_close(y, ref_y, dtype, "y")
    return h_mix, a_mix, y


# ---------------------------------------------------------------------------------------------
# Gate/up and down together, against the per-slot reference.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,tokens",
    [(torch.float32, 1), (torch.float32, 7), (torch.float32, 33), (torch.float16, 7),
     (torch.bfloat16, 7), (torch.bfloat16, 33)],
)
def test_expert_mlp_matches_reference(dtype, tokens):
    # d = 40 and D' = 50: neither a multiple of the 16-wide interpreter tiles.
    check_problem(make_problem(tokens, 40, 50, 4, 4, 2, dtype, seed=tokens), dtype)


def test_every_expert_chosen_k_equals_n():
    check_problem(make_problem(7, 24, 40, 4, 4, 4, torch.float32, seed=1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_blocks_straddling_chunks(dtype):
    # n·r = 6·3 = 18 columns: two 16-wide masked-dense chunks with expert 5's block split across
    # them; odd rank and expert counts; three slots, so the in-place slot-to-slot update runs
    # twice.
    check_problem(make_problem(9, 24, 40, 6, 3, 3, dtype, seed=2), dtype)


def test_many_chunks():
    # n·r = 8·8 = 64 columns: four chunks, blocks aligned to chunk edges.
    check_problem(make_problem(5, 24, 20, 8, 8, 2, torch.float32, seed=3), torch.float32)


def test_expert_no_token_chose_gets_nothing():
    tokens, experts = 11, 4
    g = torch.Generator().manual_seed(4)
    # Experts 0, 1 and 3 only; expert 2 is never chosen.
    index = torch.stack([torch.tensor([0, 1, 3])[torch.randperm(3, generator=g)[:2]]
                         for _ in range(tokens)])
    pr = make_problem(tokens, 24, 40, experts, 4, 2, torch.float32, seed=4, index=index)
    _, a_mix, _ = check_problem(pr, torch.float32)
    assert torch.equal(a_mix.view(tokens, experts, 4)[:, 2], torch.zeros(tokens, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_dropout_masks(dtype):
    pr = make_problem(7, 24, 40, 4, 4, 2, dtype, seed=5, dropout_p=0.25)
    check_problem(pr, dtype)
    # The masks matter: without them the down-LoRA input differs.
    plain = pr._replace(keep_h=None, dropout_p=0.0)
    _, a_plain, _ = run_both(plain)
    _, ref_a, _ = reference(pr)
    assert (a_plain.double() - ref_a).abs().max() > 1e-3


def test_repeated_and_out_of_range_expert_ids():
    # Token 0 names expert 1 twice (both slots get expert 1's LoRA, counted twice in a_mix);
    # token 1 names expert 7 of 4 (documented: no LoRA for that slot); token 2 is ordinary.
    index = torch.tensor([[1, 1], [7, 2], [3, 0]])
    pr = make_problem(3, 24, 40, 4, 4, 2, torch.float32, seed=6, index=index)
    check_problem(pr, torch.float32)


def test_strided_input_and_output_buffers():
    tokens, hidden, inter = 7, 24, 40
    pr = make_problem(tokens, hidden, inter, 4, 4, 2, torch.float32, seed=7)
    wide = torch.full((tokens, hidden + 8), float("nan"), device=DEVICE)
    wide[:, 3:3 + hidden] = pr.x
    out_buf = torch.full((tokens, inter + 5), float("nan"), device=DEVICE)
    a_buf = torch.full((tokens, 16), float("nan"), device=DEVICE)  # zeroed by the kernel
    pr = pr._replace(x=wide[:, 3:3 + hidden], x_lora=wide[:, 3:3 + hidden])
    h_mix, a_mix, _ = check_problem(pr, torch.float32, out=out_buf[:, :inter], a_mix_out=a_buf)
    assert h_mix.data_ptr() == out_buf.data_ptr() and a_mix.data_ptr() == a_buf.data_ptr()
    # Nothing written outside the view.
    assert out_buf[:, inter:].isnan().all()


def test_zero_tokens():
    pr = make_problem(0, 24, 40, 4, 4, 2, torch.float32)
    h_mix, a_mix, y = run_both(pr)
    assert h_mix.shape == (0, 40) and a_mix.shape == (0, 16) and y.shape == (0, 24)


# ---------------------------------------------------------------------------------------------
# Each launch alone.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_in_alone(dtype):
    # Rank 5 is padded to 8 in the kernel layout: columns [m, (gate|up), expert, rank].
    tokens, experts, rank, padded = 21, 3, 5, 8
    pr = make_problem(tokens, 40, 16, experts, rank, 2, dtype, seed=8)
    out = torch.full((tokens, 2 * experts * padded), float("nan"), dtype=dtype, device=DEVICE)
    got = expert_lora_in(pr.x_lora, pr.lora(), SCALING, out=out)
    assert got.data_ptr() == out.data_ptr()
    expected = torch.zeros(tokens, 2, experts, padded, dtype=torch.float64, device=DEVICE)
    for side, a in enumerate((pr.lora_A_gate, pr.lora_A_up)):
        expected[:, side, :, :rank] = SCALING * torch.einsum("md,erd->mer", pr.x_lora.double(),
                                                             a.double())
    assert_close(got, expected.flatten(1), dtype, "a_gu")
    assert torch.equal(got.view(tokens, 2, experts, padded)[..., rank:],
                       torch.zeros(tokens, 2, experts, padded - rank, dtype=dtype))


@pytest.mark.parametrize("dtype,tokens", [(torch.float32, 33), (torch.bfloat16, 7)])
def test_down_alone(dtype, tokens):
    hidden, inter, experts, rank = 40, 50, 4, 4
    pr = make_problem(tokens, hidden, inter, experts, rank, 2, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    h_mix = torch.randn(tokens, inter, generator=g).to(dtype).to(DEVICE)
    a_mix = torch.randn(tokens, experts * rank, generator=g).to(DEVICE)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    y = expert_down(h_mix, pr.down_weight, pr.lora(), a_mix, SCALING, out=out)
    assert y.data_ptr() == out.data_ptr()
    b_cat = pr.lora_B_down.double().permute(0, 2, 1).reshape(experts * rank, hidden)
    expected = h_mix.double() @ pr.down_weight.double().T + SCALING * a_mix.double() @ b_cat
    assert_close(y, expected, dtype, "y")


@pytest.mark.parametrize("rank,padded", [(2, 2), (3, 4)])
def test_layout_is_the_transposed_padded_factors(rank, padded):
    pr = make_problem(1, 8, 12, 3, rank, 1, torch.float32)
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
    pr = make_problem(4, 16, 24, 4, 4, 2, torch.float32)
    lora = pr.lora()

    def gate_up(**changes):
        args = {"x": pr.x, "gate_weight": pr.gate_weight, "up_weight": pr.up_weight,
                "lora": lora, "expert_weights": pr.weights, "expert_index": pr.index,
                "scaling": SCALING}
        kwargs = {k: changes.pop(k) for k in ("keep_h", "dropout_p", "x_lora") if k in changes}
        args.update(changes)
        return expert_gate_up(*args.values(), **kwargs)

    with pytest.raises(TypeError, match="gate_weight"):
        gate_up(gate_weight=pr.gate_weight.half())
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
    with pytest.raises(ValueError, match="without keep_h"):
        gate_up(dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        gate_up(keep_h=torch.ones(4, 2, 24, dtype=torch.bool))
    with pytest.raises(TypeError, match="keep_h"):
        gate_up(keep_h=torch.ones(4, 2, 24), dropout_p=0.1)
    with pytest.raises(TypeError, match="a_mix"):
        expert_down(pr.x.new_zeros(4, 24), pr.down_weight, lora, torch.zeros(4, 16).half(),
                    SCALING)
    with pytest.raises(ValueError, match="a_mix"):
        expert_down(pr.x.new_zeros(4, 24), pr.down_weight, lora, torch.zeros(4, 15), SCALING)
    big = make_problem(1, 8, 8, 32, 16, 2, torch.float32)  # n·r = 512
    assert 32 * 16 > MAX_MASKED_DENSE_COLS
    with pytest.raises(ValueError, match="masked-dense"):
        big.lora()
