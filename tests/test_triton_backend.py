"""The whole layer on the ``triton`` backend against ``backend="reference"`` (Algorithm 1 written
literally): forward in fp32 (tight) and fp16/bf16 (honest), T = 1..3, both GRU options, k = n,
one token, odd token counts, LoRA dropout; backward through the recomputing path; the clear error
off CUDA without the interpreter.

Without a GPU the kernels run under the Triton interpreter (set by ``conftest.py``), so the
layers are tiny (d = 32, D' = 48, n = 4, r = 4) and each test runs few forwards.

In fp16/bf16 the two backends round differently, and a token whose top-k is a near tie can pick
another expert in a later round; every later value of that token then legitimately differs.
Tokens never interact, so the low-precision checks compare the tokens whose routing agrees in
every round, and require that almost all do.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

from graphmoe_fused.backends.reference import graphmoe_reference  # noqa: E402
from graphmoe_fused.backends.torch import graphmoe_torch  # noqa: E402
from graphmoe_fused.backends.triton import graphmoe_triton  # noqa: E402
from tests.helpers import make_layer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN, INTER = 32, 48
SMALL = {"num_experts": 4, "top_k": 2, "lora_r": 4}
# Norm-wise relative error allowed on the tokens whose routing agrees.
LOW_PRECISION_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def layers(dtype=torch.float32, **cfg):
    """The same random layer twice: on the triton and on the reference backend."""
    cfg = {**SMALL, **cfg}
    tri = make_layer(HIDDEN, INTER, dtype=dtype, device=DEVICE, backend="triton", **cfg)
    ref = make_layer(HIDDEN, INTER, dtype=dtype, device=DEVICE, backend="reference", **cfg)
    ref.load_state_dict(tri.state_dict())
    return tri, ref


def inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, HIDDEN, generator=g).to(dtype).to(DEVICE)


def backend_outputs(layer, x, backend):
    with torch.no_grad():
        return backend(x.reshape(-1, HIDDEN), layer.params(), layer.round_options())


@pytest.mark.parametrize(
    "rounds,cand_input,cand_act",
    [(1, "y", "sigmoid"), (2, "x", "tanh"), (3, "y", "tanh"), (3, "x", "sigmoid")],
)
def test_forward_fp32_matches_reference(rounds, cand_input, cand_act):
    tri, ref = layers(num_rounds=rounds, gru_candidate_input=cand_input,
                      gru_candidate_activation=cand_act)
    x = inputs((7,), seed=rounds)
    out = backend_outputs(tri, x, graphmoe_triton)
    want = backend_outputs(ref, x, graphmoe_reference)
    assert out.y.dtype == x.dtype and out.router_probs.dtype == torch.float32
    assert out.expert_index.dtype == torch.int64
    assert out.router_probs.shape == (rounds, 7, 4) and out.expert_index.shape == (rounds, 7, 2)
    assert torch.equal(out.expert_index, want.expert_index)
    torch.testing.assert_close(out.router_probs, want.router_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.y, want.y, rtol=1e-5, atol=1e-5 * want.y.abs().max().item())


def assert_close_where_routing_agrees(out, want, dtype):
    agree = (out.expert_index == want.expert_index).all(dim=2).all(dim=0)  # [M]
    assert agree.float().mean() >= 0.75, f"routing differs for {int((~agree).sum())} tokens"
    got, exp = out.y[agree].double(), want.y[agree].double()
    rel = ((got - exp).norm() / exp.norm()).item()
    assert rel <= LOW_PRECISION_TOL[dtype], f"relative error {rel:.2e}"
    probs_err = (out.router_probs[0] - want.router_probs[0]).abs().max().item()
    assert probs_err <= 20 * LOW_PRECISION_TOL[dtype]  # round 1 sees the same input


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_low_precision_matches_reference(dtype):
    tri, ref = layers(dtype, num_rounds=2)
    x = inputs((3, 5), dtype, seed=11)
    out = backend_outputs(tri, x, graphmoe_triton)
    want = backend_outputs(ref, x, graphmoe_reference)
    assert out.y.dtype == dtype and out.router_probs.dtype == torch.float32
    assert not out.y.isnan().any()
    assert_close_where_routing_agrees(out, want, dtype)


@pytest.mark.parametrize(
    "shape,cfg",
    [((1,), {"num_rounds": 2}),  # one token
     ((33,), {"num_rounds": 1}),  # odd count over several 16-row blocks
     ((5,), {"num_rounds": 2, "top_k": 4})],  # k = n: every expert, every token
    ids=["one-token", "33-tokens", "k-equals-n"],
)
def test_forward_edge_shapes(shape, cfg):
    tri, ref = layers(**cfg)
    x = inputs(shape, seed=len(shape) + shape[0])
    y = tri(x)
    want = ref(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_forward_with_dropout_uses_the_reference_masks():
    tri, ref = layers(num_rounds=2, lora_dropout=0.3)
    tri.train()
    ref.train()
    x = inputs((9,), seed=3)
    torch.manual_seed(123)  # the options' dropout seed comes from the global generator
    y = tri(x)
    torch.manual_seed(123)
    want = ref(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    ref.eval()
    assert (ref(x) - want).abs().max() > 1e-3  # the masks mattered


def grads_of(layer, x, with_aux):
    x = x.detach().clone().requires_grad_(True)
    if with_aux:
        y, aux = layer(x, return_aux_loss=True)
    else:
        y, aux = layer(x), 0.0
    loss = (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + 3.0 * aux
    loss.backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    return y.detach(), grads


@pytest.mark.parametrize(
    "rounds,dropout,with_aux", [(1, 0.0, False), (3, 0.0, True), (2, 0.25, True)],
)
def test_backward_fp32_matches_reference(rounds, dropout, with_aux):
    tri, ref = layers(num_rounds=rounds, lora_dropout=dropout)
    tri.train(dropout > 0)
    ref.train(dropout > 0)
    x = inputs((2, 4), seed=rounds)
    torch.manual_seed(7)
    y_tri, g_tri = grads_of(tri, x, with_aux)
    torch.manual_seed(7)
    y_ref, g_ref = grads_of(ref, x, with_aux)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    assert g_tri.keys() == g_ref.keys()
    for name, want in g_ref.items():
        got = g_tri[name]
        if want is None:  # e.g. the GRU with one round: unused by the reference
            assert got is None or not got.any(), name
            continue
        assert got is not None, name
        # fp32 through different algebra (and CPU reductions whose order varies with the
        # threads): ~1e-6 relative in norm; a wrong gradient is off by O(1).
        rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-4, f"grad of {name}: relative error {rel:.2e}"
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * max(scale, 1e-6),
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    # The router gets a gradient only through router_probs (the aux loss) and the weights.
    assert g_tri["router.weight"].abs().max() > 0


def test_backward_bf16_is_the_torch_backends():
    """In bf16 the backward is exactly the torch backend's recompute (same masks, same
    routing), so the gradients agree with a direct torch-backend run."""
    tri, _ = layers(torch.bfloat16, num_rounds=2)
    torch_layer = make_layer(HIDDEN, INTER, dtype=torch.bfloat16, device=DEVICE,
                             backend="torch", num_rounds=2, **SMALL)
    torch_layer.load_state_dict(tri.state_dict())
    x = inputs((6,), torch.bfloat16, seed=5)
    y_tri, g_tri = grads_of(tri, x, with_aux=True)
    y_torch, g_torch = grads_of(torch_layer, x, with_aux=True)
    assert (y_tri.float() - y_torch.float()).norm() <= 3e-2 * y_torch.float().norm()
    for name, want in g_torch.items():
        torch.testing.assert_close(g_tri[name], want, rtol=0, atol=0,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_router_probs_is_differentiable_output():
    tri, _ = layers(num_rounds=2)
    x = inputs((5,), seed=9)
    out = graphmoe_triton(x, tri.params(), tri.round_options())
    assert out.router_probs.requires_grad and not out.expert_index.requires_grad
    (out.router_probs[1, :, 0].sum()).backward()
    assert tri.router.weight.grad.abs().max() > 0
    assert tri.gru.weight_g.grad.abs().max() > 0  # round 2's routing depends on the GRU


def test_base_weight_requiring_grad_is_rejected():
    tri, _ = layers()
    tri.gate_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        tri(inputs((3,)))


def test_fp64_input_is_rejected():
    tri, _ = layers(torch.float64)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        tri(inputs((3,), torch.float64))


def test_past_the_masked_dense_limit_falls_back_to_torch(monkeypatch):
    # The real limit (256 columns) needs LoRA shapes the torch backend's CPU path is slow on; a
    # lower limit exercises the same fallback (the limit itself: test_kernel_expert).
    import graphmoe_fused.kernels.expert.layout as kernel_module

    monkeypatch.setattr(kernel_module, "MAX_MASKED_DENSE_COLS", 8)
    tri, ref = layers(num_rounds=2)  # n·r = 16 > 8
    x = inputs((5,))
    with pytest.warns(UserWarning, match="masked-dense"):
        y = tri(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5 * ref(x).abs().max().item())


def test_matches_the_torch_backend_too():
    tri, _ = layers(num_rounds=3)
    x = inputs((7,), seed=2)
    out = backend_outputs(tri, x, graphmoe_triton)
    want = backend_outputs(tri, x, graphmoe_torch)
    assert torch.equal(out.expert_index, want.expert_index)
    torch.testing.assert_close(out.y, want.y, rtol=1e-5, atol=1e-5 * want.y.abs().max().item())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_cpu_without_interpreter_raises_clear_error():
    script = textwrap.dedent("""
        import torch
        from tests.helpers import make_layer
        layer = make_layer(16, 24, num_experts=2, top_k=1, lora_r=2, backend="triton")
        try:
            layer(torch.randn(3, 16))
        except RuntimeError as err:
            print("ERROR:", err)
        else:
            print("NO ERROR")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR:" in proc.stdout, proc.stdout
    assert "needs a CUDA device" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout
