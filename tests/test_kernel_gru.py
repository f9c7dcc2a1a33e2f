"""The fused low-rank GRU kernels against ``lowrank_gru_reference`` + ``x + F.linear(h', W_g)``.

Oracle: the reference evaluated in fp64 on the same (already rounded) inputs; the tolerances
(``_bounds``) follow from the kernels' roundings. tests/conftest.py poisons every kernel output
with NaN for the session, so an element a pass never writes fails.

Without a GPU the kernels run under ``TRITON_INTERPRET=1``, which ``triton.jit`` reads at
decoration time: tests/conftest.py sets it for the session before any test module imports
triton.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
from graphmoe_fused.kernels.gru.lowrank_gru import (
    _launch_lowrank_gru,
    _pack_gate_weights,
    _pack_projection,
    fused_lowrank_gru,
    gru_project,
)

from graphmoe_fused.backends.reference import lowrank_gru_step as lowrank_gru_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPTIONS = [("y", "sigmoid"), ("y", "tanh"), ("x", "sigmoid"), ("x", "tanh")]


# Tolerances. The oracle is fp64 on the very values the kernels got, so what is left is the
# kernels' own rounding (the model of test_kernel_expert.py):
# 1. values rounded to the kernel dtype (unit roundoff u = eps/2), each ≤ u of its own magnitude
#    and seen in the output as ≤ ~u of its scale: for h' the output itself, plus r ⊙ h (stored
#    in the input dtype as the update pass's dot operand) when h is given; for x_next those of
#    h' (read back by the projection) plus its own. Max error ≤ R·u·max|ref|, relative RMS error
#    ≤ √R·u (independent errors add in quadrature; each has RMS u/√3).
# 2. fp32 accumulation over K = dh + d terms: √K·u32 (random-sign growth);
# 3. sigmoid/tanh on a GPU (ex2.approx and an approximate division, ≤ 2 ulp each), composed in
#    z·ĥ and (1 − z)·h: 8·u32.
# Measured: ≤ 0.9 u max and ≤ 0.6 u RMS for fp16/bf16, ≤ 5.5·u32 for fp32. The former bound, two
# ulps of max(1, max|ref|), was 4-8 u for h' (values < 1), wider than a 1 % error in h' (2.6 u in
# bf16), which these bounds reject.
U32 = torch.finfo(torch.float32).eps / 2
ACTIVATION_ERROR = 8 * U32
MIN_RMS_ELEMENTS = 64  # RMS is a statistic: asserted on outputs with enough elements


def _bounds(dtype, roundings, reduction):
    """``(max, rms)`` error bounds relative to the oracle's scale (see above)."""
    u = torch.finfo(dtype).eps / 2
    fp32 = math.sqrt(reduction) * U32 + ACTIVATION_ERROR
    return roundings * u + fp32, math.sqrt(roundings) * u + fp32


def _inputs(num_tokens, d, dh, dtype, has_h=True, seed=0):
    """``(h, y, x, wz, wr, wo, bo, wg)``; weights scaled like nn.Linear so the gates are not
    saturated (a saturated sigmoid would hide errors)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    h = rnd(num_tokens, dh, scale=0.5) if has_h else None
    y, x = rnd(num_tokens, d), rnd(num_tokens, d)
    wz, wr, wo = (rnd(dh, dh + d, scale=(dh + d) ** -0.5) for _ in range(3))
    return h, y, x, wz, wr, wo, rnd(dh, scale=0.1), rnd(d, dh, scale=dh**-0.5)


def _reference(args, options, dtype):
    """``(h', x_next)`` of the reference in ``dtype`` (fp64 for the oracle)."""
    h, y, x, wz, wr, wo, bo, wg = (None if t is None else t.to(dtype) for t in args)
    if h is None:
        h = torch.zeros(y.shape[0], wz.shape[0], dtype=dtype, device=y.device)
    h_new = lowrank_gru_reference(h, y, x, wz, wr, wo, bo, *options)
    return h_new, x + F.linear(h_new, wg)


def _check(args, options, h_new, x_next):
    dtype = args[1].dtype
    assert h_new.dtype == dtype and x_next.dtype == dtype
    h64, x64 = _reference(args, options, torch.float64)
    assert h_new.shape == h64.shape and x_next.shape == x64.shape
    h_roundings = 1 if args[0] is None else 2
    reduction = h64.shape[1] + x64.shape[1]
    for name, out, oracle, roundings in (("h_new", h_new, h64, h_roundings),
                                         ("x_next", x_next, x64, h_roundings + 1)):
        assert torch.isfinite(out).all(), f"{name} has unwritten (NaN) elements"
        max_tol, rms_tol = _bounds(dtype, roundings, reduction)
        err = out.double() - oracle
        scale = oracle.abs().max().item()
        worst = err.abs().max().item() / scale
        assert worst <= max_tol, f"{name}: max error {worst:.3g} of the scale > {max_tol:.3g}"
        if out.numel() >= MIN_RMS_ELEMENTS:
            rms = (err.norm() / oracle.norm()).item()
            assert rms <= rms_tol, f"{name}: relative RMS error {rms:.3g} > {rms_tol:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_h", [False, True], ids=["round1", "h"])
@pytest.mark.parametrize(
    "num_tokens, d, dh",
    [
        (1, 40, 13),  # one token; dh and d off every block size (weights repacked)
        (7, 48, 16),  # aligned dh and d: the weights are used as given
        (33, 72, 20),  # tokens over three blocks, dh over two
    ],
)
def test_matches_reference(dtype, has_h, num_tokens, d, dh):
    args = _inputs(num_tokens, d, dh, dtype, has_h, seed=num_tokens)
    _check(args, ("y", "sigmoid"), *fused_lowrank_gru(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_h", [False, True], ids=["round1", "h"])
@pytest.mark.parametrize("options", OPTIONS[1:], ids=["y-tanh", "x-sigmoid", "x-tanh"])
def test_gru_options(dtype, has_h, options):
    args = _inputs(19, 56, 18, dtype, has_h, seed=5)
    _check(args, options, *fused_lowrank_gru(*args, *options))


def test_candidate_input_matters():
    """Guards the option tests: with y ≠ x the two candidate inputs give different states."""
    args = _inputs(5, 32, 16, torch.float32)
    h_y, _ = fused_lowrank_gru(*args, candidate_input="y")
    h_x, _ = fused_lowrank_gru(*args, candidate_input="x")
    assert (h_y - h_x).abs().max() > 1e-2


def test_zero_state_paths_agree():
    """Round 1 (h=None: two passes, no r) equals an explicit zero state (three passes)."""
    args = _inputs(21, 40, 13, torch.float32, has_h=False)
    zeros = torch.zeros(21, 13, device=DEVICE)
    for options in OPTIONS:
        h1, x1 = fused_lowrank_gru(*args, *options)
        h2, x2 = fused_lowrank_gru(zeros, *args[1:], *options)
        torch.testing.assert_close(h1, h2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x1, x2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounds_chain(dtype):
    """Three rounds feeding h' (a row-padded view) and x_next back, as the layer does. Each
    round is checked against the oracle on the inputs it got (so the bounds stay those of one
    step); fp32 also end to end against an fp64 chain."""
    h, y, x, wz, wr, wo, bo, wg = _inputs(10, 40, 13, dtype, has_h=False, seed=2)
    g = torch.Generator().manual_seed(9)
    h_ref = torch.zeros(10, 13, dtype=torch.float64, device=DEVICE)
    x_ref = x.double()
    for _ in range(3):
        y = torch.randn(10, 40, generator=g).to(dtype).to(DEVICE)
        h_next, x_next = fused_lowrank_gru(h, y, x, wz, wr, wo, bo, wg)
        assert h_next.shape == (10, 13) and h_next.stride() == (16, 1)
        _check((h, y, x, wz, wr, wo, bo, wg), ("y", "sigmoid"), h_next, x_next)
        h, x = h_next, x_next
        h_ref = lowrank_gru_reference(h_ref, y.double(), x_ref, wz.double(), wr.double(),
                                      wo.double(), bo.double())
        x_ref = x_ref + F.linear(h_ref, wg.double())
    if dtype == torch.float32:
        assert (h.double() - h_ref).abs().max() <= 1e-5
        assert (x.double() - x_ref).abs().max() <= 1e-5 * x_ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_h", [False, True], ids=["round1", "h"])
@pytest.mark.parametrize(
    "blocks",
    [
        # BLOCK_K wider than dh and d; one program covers all units of a token block.
        ((32, 32, 64), (32, 32, 64), (32, 64, 64)),
        # many K steps, several unit and d blocks, token blocks of 16.
        ((16, 16, 16), (16, 32, 16), (16, 16, 16)),
    ],
    ids=["wide", "narrow"],
)
def test_block_shapes(dtype, has_h, blocks):
    """Block shapes beyond the interpreter's single autotune config; h' is written into a
    NaN-filled padded buffer whose padding columns must stay untouched."""
    num_tokens, d, dh = 23, 40, 21
    args = _inputs(num_tokens, d, dh, dtype, has_h, seed=4)
    gates, update, project = blocks
    configs = {
        "gates": triton.Config(dict(zip(("BLOCK_M", "BLOCK_H", "BLOCK_K"), gates, strict=True))),
        "update": triton.Config(dict(zip(("BLOCK_M", "BLOCK_H", "BLOCK_K"), update, strict=True))),
        "project": triton.Config(
            dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), project, strict=True))
        ),
    }
    h_buf = torch.full((num_tokens, 32), float("nan"), dtype=dtype, device=DEVICE)
    x_next = torch.full((num_tokens, d), float("nan"), dtype=dtype, device=DEVICE)
    _launch_lowrank_gru(*args, h_buf[:, :dh], x_next, "x", "tanh", configs=configs)
    assert h_buf[:, dh:].isnan().all(), "a kernel wrote past dh"
    _check(args, ("x", "tanh"), h_buf[:, :dh], x_next)


def test_public_configs_pin_each_pass():
    """``fused_lowrank_gru(configs=...)`` pins the passes it names; a pass it does not name is
    autotuned, and a name that is no pass is an error (not a silently autotuned launch)."""
    args = _inputs(23, 40, 21, torch.float32, seed=4)
    configs = {
        "gates": triton.Config({"BLOCK_M": 32, "BLOCK_H": 32, "BLOCK_K": 64}),
        "project": triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16}),
    }
    _check(args, ("y", "tanh"), *fused_lowrank_gru(*args, "y", "tanh", configs=configs))
    with pytest.raises(ValueError, match="unknown launches"):
        fused_lowrank_gru(*args, configs={"gate": configs["gates"]})


def test_strided_inputs():
    """Row-strided views are used in place, column-strided ones copied: same result."""
    args = list(_inputs(9, 40, 13, torch.float32, seed=6))
    base = [t.clone() if t is not None else None for t in args]
    wide = torch.randn(9, 100, device=DEVICE)
    wide[:, 30:70] = args[1]
    args[1] = wide[:, 30:70]  # y: row stride 100
    args[2] = args[2].t().contiguous().t()  # x: column stride 9
    args[7] = args[7].t().contiguous().t()  # W_g: column-major
    h_new, x_next = fused_lowrank_gru(*args)
    h_ref, x_ref = fused_lowrank_gru(*base)
    assert torch.equal(h_new, h_ref) and torch.equal(x_next, x_ref)
    _check(base, ("y", "sigmoid"), h_new, x_next)


def test_weight_packing():
    """Aligned weights go in as they are; others are split at an aligned column with zero
    padding that reproduces the original columns."""
    h, y, x, wz, wr, wo, bo, wg = _inputs(2, 48, 16, torch.float32)
    packed = _pack_gate_weights(wz, wr, wo, 16, 48)
    assert packed[0] is wz and packed[3:] == (64, 16)
    assert _pack_projection(wg, 16) is wg
    h, y, x, wz, wr, wo, bo, wg = _inputs(2, 40, 13, torch.float32)
    pz, pr, po, stride, u_off = _pack_gate_weights(wz, wr, wo, 13, 40)
    assert stride % 16 == 0 and u_off == 16 and pz.stride(0) == stride
    for packed_w, w in ((pz, wz), (pr, wr), (po, wo)):
        assert torch.equal(packed_w[:, :13], w[:, :13])
        assert torch.equal(packed_w[:, 16:56], w[:, 13:])
        assert (packed_w[:, 13:16] == 0).all() and (packed_w[:, 56:] == 0).all()
    pg = _pack_projection(wg, 13)
    assert pg.shape == (40, 16) and torch.equal(pg[:, :13], wg) and (pg[:, 13:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, d, dh", [(1, 40, 13), (37, 48, 16), (23, 40, 21)])
def test_project_alone_gives_the_steps_bits(dtype, num_tokens, d, dh):
    """``gru_project`` is the step's third pass alone: the same ``x_next``, bit for bit, from
    the ``h_new`` the step returned (as the triton backend's backward rebuilds the round inputs),
    whether that is the step's row-padded view or a contiguous copy of it."""
    args = _inputs(num_tokens, d, dh, dtype, seed=7)
    h_new, x_next = fused_lowrank_gru(*args)
    x, wg = args[2], args[7]
    assert torch.equal(gru_project(h_new, x, wg), x_next)
    assert torch.equal(gru_project(h_new.contiguous(), x, wg), x_next)


def test_project_validation():
    h, y, x, wz, wr, wo, bo, wg = _inputs(3, 40, 13, torch.float32)
    with pytest.raises(ValueError, match="h_new"):
        gru_project(h[:, :12], x, wg)
    with pytest.raises(ValueError, match="weight_g"):
        gru_project(h, x, wg[:39])
    with pytest.raises(TypeError):
        gru_project(h.half(), x, wg)
    assert gru_project(h[:0], x[:0], wg).shape == (0, 40)


def test_empty_batch():
    h, y, x, wz, wr, wo, bo, wg = _inputs(3, 40, 13, torch.float32)
    h_new, x_next = fused_lowrank_gru(h[:0], y[:0], x[:0], wz, wr, wo, bo, wg)
    assert h_new.shape == (0, 13) and x_next.shape == (0, 40)


def test_input_validation():
    h, y, x, wz, wr, wo, bo, wg = _inputs(3, 40, 13, torch.float32)
    good = (h, y, x, wz, wr, wo, bo, wg)

    def call(**changes):
        names = ("h", "y", "x", "weight_z", "weight_r", "weight_o", "bias_o", "weight_g")
        kwargs = dict(zip(names, good, strict=True))
        kwargs.update(changes)
        return fused_lowrank_gru(**kwargs)

    with pytest.raises(ValueError, match="candidate_input"):
        call(candidate_input="h")
    with pytest.raises(ValueError, match="candidate_activation"):
        call(candidate_activation="relu")
    with pytest.raises(ValueError, match="x must be 2-D"):
        call(x=x[0])
    with pytest.raises(ValueError, match="y has shape"):
        call(y=y[:, :20])
    with pytest.raises(ValueError, match="h has shape"):
        call(h=h[:, :5])
    with pytest.raises(ValueError, match="weight_r has shape"):
        call(weight_r=wr[:, :40])
    with pytest.raises(ValueError, match="bias_o has shape"):
        call(bias_o=bo[:5])
    with pytest.raises(ValueError, match="weight_g has shape"):
        call(weight_g=wg.t())
    with pytest.raises(TypeError, match="weight_o has dtype"):
        call(weight_o=wo.half())
    with pytest.raises(TypeError, match="float64"):
        call(**{k: v.double() for k, v in zip(("h", "y", "x"), good[:3], strict=True)})
    with pytest.raises(ValueError, match="on meta"):
        call(x=x.to("meta"))
