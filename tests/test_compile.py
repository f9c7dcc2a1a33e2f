"""``torch.compile``: a compiled converted model (and a compiled layer) computes the loss and every
gradient of eager mode, the load-balancing gradient included.

Compiler backend: ``aot_eager``. It runs Dynamo (which traces the model's and the layers' hooks
with the forward) and AOTAutograd (which traces the joint forward/backward graph and
functionalises it): the two stages where an aux-loss mechanism can be dropped — the former
injection mechanism lost its gradient there. Inductor only adds code generation on top, and
took 160 s to compile this tiny model on the test machine (its gradients matched eager to 1e-7).

Each test resets Dynamo and counts what it compiled, so a silent fall-back to eager (a
recompilation limit, say) cannot pass as a compiled run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from .helpers import make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import batch, converted, enable_checkpointing, trainable_grads

ROUTER = "model.layers.0.mlp.router.weight"


@pytest.fixture
def compiler():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    yield counter
    torch._dynamo.reset()


def _step(model, scale: float = 0.25):
    """Forward with labels, the loss scaled in place (as HF Trainer and AMP do), backward."""
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    loss = out.loss
    loss *= scale
    loss.backward()
    return out.loss.detach(), out.aux_loss.detach()


def _grads(model) -> dict[str, torch.Tensor]:
    grads = trainable_grads(model)
    model.zero_grad()
    return grads


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compiled_model_matches_eager(compiler, backend):
    model = converted("llama", router_aux_loss_coef=1.0, backend=backend).train()
    loss, aux = _step(model)
    eager = _grads(model)

    c_loss, c_aux = _step(torch.compile(model, backend=compiler))
    assert compiler.frame_count > 0 and compiler.op_count > 0
    compiled = _grads(model)
    torch.testing.assert_close(c_loss, loss)
    torch.testing.assert_close(c_aux, aux)
    for name, grad in eager.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    # The aux term's share of the router gradient is really there (the former mechanism, under
    # compile, gave exactly the gradient of coefficient 0).
    model.graphmoe_config.router_aux_loss_coef = 0.0
    _step(model)
    without_aux = _grads(model)[ROUTER]
    assert (compiled[ROUTER] - without_aux).abs().max() > 1e-3


def test_compiled_model_with_reentrant_checkpointing_matches_eager(compiler):
    # Reentrant checkpointing takes the fallback path (injection during the recomputation),
    # which runs eagerly inside the compiled model.
    model = converted("llama", router_aux_loss_coef=1.0, backend="torch").train()
    _step(model)
    eager = _grads(model)
    enable_checkpointing(model, use_reentrant=True)
    _step(torch.compile(model, backend=compiler))
    assert compiler.frame_count > 0
    compiled = _grads(model)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("backend", "experts", "rank"),
                         [("reference", 4, 4), ("torch", 4, 4), ("torch", 8, 16),
                          ("triton", 4, 4)])
def test_compiled_layer_matches_eager(compiler, backend, experts, rank):
    # n·r = 16 runs the torch backend's masked expert plan in both modes. n·r = 128 (the paper's
    # n = 8, r = 16) runs the grouped plan eagerly on a CPU, but the masked plan when compiled
    # (the grouped plan's per-expert segments are data-dependent shapes): the same function, to
    # fp32 rounding.
    # The triton backend compiles as two opaque custom ops (forward, backward); on a CPU its
    # kernels run under the interpreter.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    layer = make_layer(backend=backend, num_experts=experts, lora_r=rank, num_rounds=3,
                       device=device)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(device)
    probe = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(device)
    mask = (torch.arange(15).reshape(3, 5) % 4 != 0).to(device)

    def step(fn):
        layer.reset_routing_stats()
        y, aux = fn(x, return_aux_loss=True, token_mask=mask)
        ((y * probe).sum() + aux).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
        layer.zero_grad()
        return y.detach(), aux.detach(), grads, layer.expert_counts.clone()

    y, aux, grads, counts = step(layer)
    c_y, c_aux, c_grads, c_counts = step(torch.compile(layer, backend=compiler))
    assert compiler.frame_count > 0 and compiler.op_count > 0
    torch.testing.assert_close(c_y, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
    torch.testing.assert_close(c_aux, aux)
    assert torch.equal(c_counts, counts) and counts.sum() == (
        layer.config.top_k * layer.config.num_rounds * int(mask.sum()))
    # Another expert plan sums in another order: fp32 rounding, ~5e-7 of the largest entry
    # (measured); the same plan agrees to the default fp32 tolerances.
    same_plan = experts * rank <= 32
    for name, grad in grads.items():
        atol = 1e-7 if same_plan else 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(c_grads[name], grad, rtol=1e-5, atol=atol, msg=name)


def test_compiled_layer_with_dropout_compiles_once(compiler):
    """With LoRA dropout every step draws a new seed, which the masks' keys hash on the host.
    Traced, the seed became a constant to recompile for at each step, then a symbolic integer
    whose hash Inductor never finished simplifying (a hang at step 2). The torch backend's
    Function runs eagerly inside the compiled layer then: steps with new seeds compile nothing
    more and match eager."""
    layer = make_layer(backend="torch", num_experts=4, lora_r=4, num_rounds=2,
                       lora_dropout=0.2)
    x = torch.randn(11, 32, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(layer, backend=compiler)

    def step(fn, seed):
        torch.manual_seed(seed)  # the forward's dropout seed
        y, aux = fn(x, return_aux_loss=True)
        (y.square().sum() + aux).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
        layer.zero_grad()
        return y.detach(), grads

    frames = []
    for seed in range(4):
        y, grads = step(layer, seed)
        c_y, c_grads = step(compiled, seed)
        frames.append(compiler.frame_count)
        torch.testing.assert_close(c_y, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert frames[0] > 0 and frames[-1] == frames[0], frames  # compiled, and only once


# In a fresh interpreter: the functions that must run eagerly inside a compiled model are made on
# their first call (graphmoe_fused.eager), so only a process whose first call is compiled reaches
# that path; the tests above run eagerly first.
COMPILED_FIRST = textwrap.dedent("""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend
    from tests.test_compile import _grads, _step
    from tests.tiny_models import converted, enable_checkpointing

    for reentrant in (False, True):  # True: the aux term deferred to the backward
        model = converted("llama", router_aux_loss_coef=1.0, backend="torch",
                          lora_dropout=0.1).train()
        if reentrant:
            enable_checkpointing(model, use_reentrant=True)
        counter = CompileCounterWithBackend("aot_eager")
        torch.manual_seed(0)
        c_loss, c_aux = _step(torch.compile(model, backend=counter))
        compiled = _grads(model)
        torch.manual_seed(0)
        loss, aux = _step(model)
        eager = _grads(model)
        assert counter.frame_count > 0
        torch.testing.assert_close(c_loss, loss)
        torch.testing.assert_close(c_aux, aux)
        for name, grad in eager.items():
            assert torch.count_nonzero(grad) > 0, name
            torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    print("ok")
""")


def test_compiled_first_in_a_fresh_process_matches_eager():
    """The load-balancing term, the output class with ``aux_loss`` and the dropout path, each
    first called inside a compiled model (with and without reentrant checkpointing): the
    loss, aux loss and every gradient of eager mode."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", COMPILED_FIRST], cwd=root, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_import_leaves_dynamo_unloaded():
    """``import graphmoe_fused`` does not import Dynamo (1.3 s of every process that neither
    compiles nor loads a transformers model, the GPU check's workers among them):
    ``torch.compiler.disable`` waits for a call."""
    code = "import sys, graphmoe_fused; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          text=True, capture_output=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
