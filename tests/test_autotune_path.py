"""The autotuners as a GPU runs them: every kernel's GPU config list, its early pruning with the
arguments triton passes it, the tuning key and the reset hooks, then a launch of the config the
tuning picked, in a layer's forward and backward against the reference backend.

Without a GPU the kernels run under the interpreter, whose autotuners hold one small config, so
the GPU lists and the pruning functions never run anywhere else on a CPU. Here each autotuner
gets its kernel's GPU configs (those the compile report compiles, ``COMPILE_SPECS``) and a fake
benchmark that ranks them (nothing can be timed on a CPU): the first config of the pruned list
wins, or the last, so both ends of every list run; recompute and deterministic both ways.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import triton  # noqa: E402
from graphmoe_fused.kernels.compile_report import DEFAULT_MODULES, collect_specs  # noqa: E402

from tests.helpers import make_layer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULES = [importlib.import_module(f"graphmoe_fused.kernels.{m}") for m in DEFAULT_MODULES]


def _key(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def autotuners() -> dict[str, tuple[triton.runtime.Autotuner, list[triton.Config]]]:
    """Every autotuner of the kernel modules, with the GPU configs its kernel is compiled for."""
    specs = collect_specs()
    found = {}
    for module in MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.Autotuner):
                configs = {}
                for spec in specs:
                    if spec.fn is obj.fn:
                        configs.update((_key(c), c) for c in spec.configs)
                short = module.__name__.rsplit(".", 1)[-1]
                found[f"{short}.{name}"] = (obj, list(configs.values()))
    return found


def test_every_autotuned_kernel_has_gpu_configs():
    tuners = autotuners()
    assert len(tuners) >= 14
    assert all(len(configs) >= 2 for _, configs in tuners.values()), {
        n: len(c) for n, (_, c) in tuners.items()}


@pytest.mark.parametrize(("winner", "recompute", "deterministic"), [
    ("first", False, False), ("last", True, False), ("first", True, True),
    ("last", False, True)])
def test_layer_through_the_gpu_autotuning(monkeypatch, winner, recompute, deterministic):
    tuned: dict[str, list[tuple[dict, list[tuple]]]] = {}  # what each benchmark call saw
    picked: dict[str, dict] = {}  # each autotuner's cache: a pruned list of one is not timed
    for name, (tuner, configs) in autotuners().items():
        order = {_key(c): i for i, c in enumerate(configs)}

        def bench(*args, config, name=name, order=order, **meta):
            tuned.setdefault(name, []).append((meta, _key(config)))
            rank = order[_key(config)]
            return [float(rank if winner == "first" else -rank)]

        monkeypatch.setattr(tuner, "configs", configs)
        picked[name] = {}
        monkeypatch.setattr(tuner, "cache", picked[name])
        monkeypatch.setattr(tuner, "_bench", bench)

    # 40 tokens: a token bucket of 64, so the pruning keeps the 64-row tiles too.
    cfg = {"num_experts": 4, "top_k": 2, "lora_r": 4, "num_rounds": 3, "lora_dropout": 0.25,
           "recompute_intermediates": recompute, "deterministic": deterministic}
    tri = make_layer(32, 48, device=DEVICE, backend="triton", **cfg).train()
    ref = make_layer(32, 48, device=DEVICE, backend="reference", **cfg).train()
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    probe = torch.linspace(-1, 1, x.numel(), device=DEVICE).view_as(x)
    results = []
    for layer in (tri, ref):
        torch.manual_seed(7)  # the same dropout seed for both
        xi = x.clone().requires_grad_(True)
        y, aux = layer(xi, return_aux_loss=True)
        ((y * probe).sum() + 3.0 * aux).backward()
        grads = {"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()
                                 if p.requires_grad}}
        results.append((y.detach(), grads))
    (y_tri, g_tri), (y_ref, g_ref) = results

    # Every autotuned kernel went through tuning (T = 3: the GRU's reset path runs from round 2),
    # but for the token-reducing backward kernels in deterministic mode: their buffers are shaped
    # by the config, so they run the first one the pruning keeps, untimed.
    fixed = {"backward._dx_tuned", "backward._gate_up_backward_tuned",
             "backward._gate_up_wgrad_tuned"} if deterministic else set()
    assert {name for name, cache in picked.items() if not cache} == fixed
    gate_up = tuned["gate_up._expert_gate_up_tuned"]
    saving = {c for meta, c in gate_up if meta["SAVE_BASE"]}
    assert bool(saving) == (not recompute)
    # The 64×128×64 3-stage tile spills with SAVE_BASE on sm_80 and is pruned there.
    assert all(c[0] != (("BLOCK_K", 64), ("BLOCK_M", 64), ("BLOCK_N", 128), ("GROUP_M", 8),
                        ("LORA_CHUNK", 16)) or c[2] != 3 for c in saving)

    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    for name, want in g_ref.items():
        got = g_tri[name]
        rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert rel <= 2e-5, f"grad of {name}: relative error {rel:.2e}"
