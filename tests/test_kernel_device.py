"""Every public kernel entry runs on its inputs' device (``kernels.utils.on_device_of``).

A Triton launch goes to the *current* CUDA device, whatever device the pointers live on; with
layers spread over GPUs the inputs are often on another one. No GPU is needed to check the
guard: fake CUDA tensors (``FakeTensorMode``: metadata only) stand in for inputs on ``cuda:1``,
and ``torch.cuda.device`` is replaced by a recorder, so each test sees which device a public
function makes current before it does any work.
"""

import importlib
import inspect

import pytest
import torch
import triton
from graphmoe_fused.kernels import dropout
from graphmoe_fused.kernels.expert import backward, down, gate_up, layout
from graphmoe_fused.kernels.gru import lowrank_gru
from graphmoe_fused.kernels.routing import router_topk
from graphmoe_fused.kernels.utils import interpreter_incompatibility, is_interpreter, on_device_of
from torch._subclasses.fake_tensor import FakeTensorMode

# The GRU backward's module by its full name: the package exports a function of the same name.
MODULES = (router_topk, layout, gate_up, down, backward, lowrank_gru, dropout,
           importlib.import_module("graphmoe_fused.kernels.gru.lowrank_gru_backward"))
# The argument whose device a call runs on: the activation the outputs are allocated beside.
DEVICE_ARGS = {
    "fused_router_topk": "x",
    "expert_lora_layout": "lora_A_gate",
    "expert_lora_in": "x_lora",
    "expert_gate_up": "x",
    "expert_down": "h_mix",
    "fused_lowrank_gru": "x",
    "gru_project": "x",
    "expert_round_backward": "x",
    "lowrank_gru_backward": "y",
    "keep_rows_mask": "row_bits",
}


def _public_tensor_functions():
    """Every function a kernel module exports (``__all__``) that takes a tensor."""
    for module in MODULES:
        for name in module.__all__:
            fn = getattr(module, name)
            if inspect.isfunction(fn) and any(
                "Tensor" in str(p.annotation) for p in inspect.signature(fn).parameters.values()
            ):
                yield name, fn


PUBLIC = dict(_public_tensor_functions())


class _Entered(Exception):
    """Raised by the recorder on entry: the guard ran first, the wrapped function did not."""


@pytest.fixture
def recorded(monkeypatch):
    """Replaces ``torch.cuda.device``; returns the list of devices it was entered with."""
    seen = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            seen.append(torch.device(self.device))
            raise _Entered

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    return seen


def _cuda1_tensor():
    with FakeTensorMode():
        return torch.empty(4, 8, device="cuda:1")


def test_every_public_entry_is_guarded():
    assert set(PUBLIC) == set(DEVICE_ARGS), "a public kernel entry without a device guard?"
    for name, fn in PUBLIC.items():
        assert getattr(fn, "device_arg", None) == DEVICE_ARGS[name], name


@pytest.mark.parametrize("name", sorted(DEVICE_ARGS))
@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_guard_selects_the_inputs_device(recorded, name, how):
    fn = PUBLIC[name]
    arg = DEVICE_ARGS[name]
    t = _cuda1_tensor()
    params = list(inspect.signature(fn).parameters)
    with pytest.raises(_Entered):
        if how == "keyword":
            fn(**{arg: t})
        else:
            fn(*([None] * params.index(arg)), t)
    assert recorded == [torch.device("cuda:1")]


@pytest.mark.skipif(not is_interpreter(), reason="CPU inputs run under the interpreter only")
def test_cpu_inputs_need_no_guard(monkeypatch):
    """CPU tensors (the interpreter) run as they are: ``torch.cuda.device`` is never touched."""

    def no_cuda(device):
        raise AssertionError("torch.cuda.device used for CPU inputs")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    x = torch.randn(5, 32)
    w = torch.randn(4, 32) * 0.2
    probs, _, _ = router_topk.fused_router_topk(x, w, 2)
    torch.testing.assert_close(probs, torch.softmax(x @ w.T, -1), rtol=1e-5, atol=1e-6)


class _NotAScalar:
    def __int__(self):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")


@pytest.mark.parametrize(("version", "numpy_refuses", "blocked"), [
    ("3.6.0", True, True), ("3.6.0", False, False), ("3.7.0", True, False),
    ("3.10.1", True, False)])
def test_interpreter_incompatibility(monkeypatch, version, numpy_refuses, blocked):
    """Triton 3.6's interpreter with numpy 2.4 fails in every kernel's loop bounds: named."""
    import numpy

    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(numpy, "zeros", lambda *_: _NotAScalar() if numpy_refuses else 0.0)
    interpreter_incompatibility.cache_clear()
    try:
        problem = interpreter_incompatibility()
        assert (problem is not None) == blocked
        if blocked:
            assert "numpy<2.4 or triton>=3.7" in problem and version in problem
            if is_interpreter():  # a public entry says so before any launch
                with pytest.raises(RuntimeError, match="does not run with numpy"):
                    router_topk.fused_router_topk(torch.randn(5, 32), torch.randn(4, 32), 2)
    finally:
        interpreter_incompatibility.cache_clear()


def test_guard_passes_arguments_and_result_through():
    @on_device_of("b")
    def f(a, b, *, c=3):
        """Doc."""
        return a, b, c

    assert f(1, 2, c=4) == (1, 2, 4) and f(1, b=2) == (1, 2, 3)
    assert f.__doc__ == "Doc." and f.device_arg == "b"
    assert list(inspect.signature(f).parameters) == ["a", "b", "c"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_second_gpu():
    """With cuda:0 current, inputs on cuda:1 are computed on cuda:1 (not read from cuda:0)."""
    x = torch.randn(33, 64, device="cuda:1")
    w = torch.randn(8, 64, device="cuda:1") * 0.2
    with torch.cuda.device(0):
        probs, weights, index = router_topk.fused_router_topk(x, w, 2)
        torch.cuda.synchronize(1)
    assert probs.device == torch.device("cuda:1")
    torch.testing.assert_close(probs, torch.softmax(x @ w.T, -1), rtol=1e-4, atol=1e-6)
