"""The GRU cell backward kernels (``kernels.gru.lowrank_gru_backward``) against the torch
backend's hand-written backward (``gru_step_backward``), itself checked against torch autograd
of the reference GRU step.

Oracle: ``gru_step_backward`` in fp64 on the very (already rounded) inputs the kernels got, so
what is left is the kernels' own rounding. tests/conftest.py poisons every kernel output and
workspace with NaN, so an element no launch writes (or a workspace padding a dot reads) fails.
Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py).
"""

import math

import pytest
import torch
import triton
from graphmoe_fused.kernels.gru import lowrank_gru_backward
from graphmoe_fused.kernels.gru.lowrank_gru_backward import _token_groups

from graphmoe_fused.backends.reference import lowrank_gru_step
from graphmoe_fused.backends.torch.gru import gru_step_backward, prepare_gru

from .single_thread import one_cpu_thread  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPTIONS = [("y", "sigmoid"), ("y", "tanh"), ("x", "sigmoid"), ("x", "tanh")]
NAMES = ("grad_h", "grad_y", "grad_x", "grad_weight_z", "grad_weight_r", "grad_weight_o",
         "grad_bias_o")

# Tolerances, relative to each output's largest oracle value (its scale).
# - fp32: no operand is rounded below fp32; what is left is fp32 accumulation over K ≤ dh + d
#   terms (√K·u32 for random signs, ≤ 10 u32 here) along a chain of up to three dependent
#   products (candidate → gp → W_o^T → gr → W_zr^T), plus sigmoid/tanh (≤ 8 u32 on a GPU).
#   32·u32 ≈ 1.9e-6 covers it; measured ≤ 4.1 u32.
# - fp16/bf16: the kernels round r ⊙ h and the three pre-activation gradients (gz, gr, gp) to
#   the input dtype once each, as dot operands; gr is computed from the rounded gp, so the
#   longest chain (∂h, ∂y through gr) carries ~3 roundings of unit u: max ≤ 4u, relative RMS
#   ≤ 2u (independent errors add in quadrature). Measured ≤ 0.9u max, ≤ 0.7u RMS.
U32 = torch.finfo(torch.float32).eps / 2
MIN_RMS_ELEMENTS = 64


def _bounds(dtype):
    if dtype == torch.float32:
        return 32 * U32, 32 * U32
    u = torch.finfo(dtype).eps / 2
    return 4 * u + 32 * U32, 2 * u + 32 * U32


def _inputs(num_tokens, d, dh, dtype, has_h=True, seed=0):
    """``(grad_h_new, h, y, x, wz, wr, wo, bo)``; weights scaled like nn.Linear so the gates are
    not saturated (a saturated gate would hide errors). ``grad_h_new`` is fp32, as the layer
    passes it."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(DEVICE)

    h = rnd(num_tokens, dh, scale=0.5) if has_h else None
    y, x = rnd(num_tokens, d), rnd(num_tokens, d)
    wz, wr, wo = (rnd(dh, dh + d, scale=(dh + d) ** -0.5) for _ in range(3))
    grad = rnd(num_tokens, dh, dt=torch.float32)
    return grad, h, y, x, wz, wr, wo, rnd(dh, scale=0.1)


def _oracle(args, options):
    """``gru_step_backward`` in fp64 on the kernels' inputs, as a dict of NAMES."""
    grad, h, y, x, wz, wr, wo, bo = (None if t is None else t.double() for t in args)
    dh = wz.shape[0]
    if h is None:
        h = torch.zeros(y.shape[0], dh, dtype=torch.float64, device=y.device)
    w = prepare_gru(wz, wr, wo, bo, torch.zeros(y.shape[1], dh, dtype=torch.float64,
                                                device=y.device), torch.float64, torch.float64)
    g = gru_step_backward(grad, h, y, x, w, w, *options)
    return {"grad_h": g.h, "grad_y": g.y, "grad_x": g.x, "grad_weight_z": g.zr[:dh],
            "grad_weight_r": g.zr[dh:], "grad_weight_o": g.o, "grad_bias_o": g.bias_o}


def _check(args, options, out):
    dtype = args[2].dtype
    oracle = _oracle(args, options)
    max_tol, rms_tol = _bounds(dtype)
    for name in NAMES:
        got, want = getattr(out, name), oracle[name]
        if name == "grad_h" and args[1] is None:
            assert got is None, "the zero state has no gradient output"
            continue
        if name == "grad_x" and options[0] == "y":
            assert got is None, "candidate y: the u path is in grad_y"
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name} has unwritten (NaN) elements"
        scale = want.abs().max().item()
        if scale == 0:  # W_r with the zero state: exactly zero
            assert (got == 0).all(), f"{name} should be exactly zero"
            continue
        err = got.double() - want
        worst = err.abs().max().item() / scale
        assert worst <= max_tol, f"{name}: max error {worst:.3g} of the scale > {max_tol:.3g}"
        if got.numel() >= MIN_RMS_ELEMENTS:
            rms = (err.norm() / want.norm()).item()
            assert rms <= rms_tol, f"{name}: relative RMS error {rms:.3g} > {rms_tol:.3g}"


@pytest.mark.parametrize("options", OPTIONS, ids=["-".join(o) for o in OPTIONS])
def test_oracle_is_autograd(options):
    """``gru_step_backward`` (the oracle) equals torch autograd of the reference step (fp64)."""
    grad, h, y, x, wz, wr, wo, bo = (t.double().requires_grad_() for t in
                                     _inputs(5, 24, 7, torch.float64, seed=3))
    h_new = lowrank_gru_step(h, y, x, wz, wr, wo, bo, *options)
    wanted = [h, y, x, wz, wr, wo, bo]
    auto = torch.autograd.grad(h_new, wanted, grad, allow_unused=True)
    oracle = _oracle((grad, h, y, x, wz, wr, wo, bo), options)
    if options[0] == "y":
        assert oracle["grad_x"] is None
        auto_x = None
    else:
        auto_x = auto[2]
    for name, a in zip(("grad_h", "grad_y", "grad_weight_z", "grad_weight_r", "grad_weight_o",
                        "grad_bias_o"), (auto[0], auto[1], *auto[3:]), strict=True):
        torch.testing.assert_close(oracle[name], a, rtol=1e-12, atol=1e-12)
    if auto_x is not None:
        torch.testing.assert_close(oracle["grad_x"], auto_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_h", [False, True], ids=["round1", "h"])
@pytest.mark.parametrize(
    "num_tokens, d, dh",
    [
        (1, 40, 10),  # one token; dh and d off the 16-alignment (the dh = 409 padding)
        (37, 40, 10),  # odd token count over three token blocks and three weight token groups
        (20, 48, 32),  # aligned dh and d: the weights are used as given; two dh blocks
    ],
)
def test_matches_reference(dtype, has_h, num_tokens, d, dh):
    args = _inputs(num_tokens, d, dh, dtype, has_h, seed=num_tokens + dh)
    _check(args, ("y", "sigmoid"), lowrank_gru_backward(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_h", [False, True], ids=["round1", "h"])
@pytest.mark.parametrize("options", OPTIONS[1:], ids=["y-tanh", "x-sigmoid", "x-tanh"])
def test_gru_options(dtype, has_h, options):
    args = _inputs(19, 56, 18, dtype, has_h, seed=5)
    _check(args, options, lowrank_gru_backward(*args, *options))


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[3]], ids=["y-sigmoid", "x-tanh"])
def test_pinned_larger_blocks(options):
    """Block shapes beyond the interpreter's single config: dh and d tiles straddling the
    padding, BLOCK_K past dh, 32-token groups."""
    args = _inputs(45, 72, 20, torch.float32, seed=11)
    configs = {
        "gates": triton.Config({"BLOCK_M": 32, "BLOCK_H": 32, "BLOCK_K": 64}),
        "candidate": triton.Config({"BLOCK_M": 16, "BLOCK_H": 32, "BLOCK_K": 32}),
        "reset": triton.Config({"BLOCK_M": 32, "BLOCK_H": 16, "BLOCK_K": 32}),
        "input": triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}),
        "weight": triton.Config({"BLOCK_R": 32, "BLOCK_N": 64, "BLOCK_K": 32}),
    }
    for deterministic in (False, True):
        out = lowrank_gru_backward(*args, *options, deterministic=deterministic, configs=configs)
        _check(args, options, out)


@pytest.mark.parametrize("has_h", [False, True], ids=["round1", "h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype, has_h):
    """``deterministic=True``: bit-identical twice, and the same gradients as the atomics
    (within rounding: only the summation order differs)."""
    args = _inputs(37, 40, 10, dtype, has_h, seed=2)
    assert _token_groups(37)[0] > 1  # several weight partial slabs are summed
    first = lowrank_gru_backward(*args, "x", "tanh", deterministic=True)
    second = lowrank_gru_backward(*args, "x", "tanh", deterministic=True)
    atomic = lowrank_gru_backward(*args, "x", "tanh")
    _check(args, ("x", "tanh"), first)
    for name in NAMES:
        a, b, c = getattr(first, name), getattr(second, name), getattr(atomic, name)
        if a is None:
            continue
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_zero_state_paths_agree():
    """Round 1 (h=None: r, the h halves and ∂h drop out) equals an explicit zero state."""
    args = _inputs(21, 40, 13, torch.float32, has_h=False, seed=4)
    zeros = torch.zeros(21, 13, device=DEVICE)
    for options in OPTIONS:
        a = lowrank_gru_backward(*args, *options)
        b = lowrank_gru_backward(args[0], zeros, *args[2:], *options)
        for name in NAMES[1:]:
            if getattr(a, name) is not None:
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6,
                                           atol=1e-6)
        assert (b.grad_weight_r == 0).all()


def test_strided_inputs():
    """Views with a row stride (slices of wider buffers) and a fp16 upstream gradient."""
    grad, h, y, x, wz, wr, wo, bo = _inputs(9, 32, 12, torch.float32, seed=6)
    wide_h = torch.zeros(9, 20, device=DEVICE)
    wide_h[:, 3:15] = h
    wide_y = torch.zeros(9, 50, device=DEVICE)
    wide_y[:, 5:37] = y
    grad16 = grad.half()
    out = lowrank_gru_backward(grad16, wide_h[:, 3:15], wide_y[:, 5:37], x, wz, wr, wo, bo,
                               "x", "sigmoid")
    _check((grad16.float(), h, y, x, wz, wr, wo, bo), ("x", "sigmoid"), out)


def test_rejects_bad_input():
    grad, h, y, x, wz, wr, wo, bo = _inputs(4, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="candidate_input"):
        lowrank_gru_backward(grad, h, y, x, wz, wr, wo, bo, "z")
    with pytest.raises(ValueError, match="candidate_activation"):
        lowrank_gru_backward(grad, h, y, x, wz, wr, wo, bo, "y", "relu")
    with pytest.raises(ValueError, match="needs x"):
        lowrank_gru_backward(grad, h, y, None, wz, wr, wo, bo, "x")
    with pytest.raises(ValueError, match="grad_h_new"):
        lowrank_gru_backward(grad[:, :5], h, y, x, wz, wr, wo, bo)
    with pytest.raises(TypeError, match="weight_o"):
        lowrank_gru_backward(grad, h, y, x, wz, wr, wo.half(), bo)
    with pytest.raises(ValueError, match="unknown launches"):
        lowrank_gru_backward(grad, h, y, x, wz, wr, wo, bo,
                             configs={"update": triton.Config({})})


def test_no_tokens():
    args = _inputs(0, 16, 8, torch.float32)
    out = lowrank_gru_backward(*args, "x", "tanh")
    assert out.grad_y.shape == (0, 16) and out.grad_x.shape == (0, 16)
    assert out.grad_h.shape == (0, 8)
    assert all(math.isclose(float(t.abs().sum()), 0.0) for t in
               (out.grad_weight_z, out.grad_weight_r, out.grad_weight_o, out.grad_bias_o))
