"""What every benchmark shares: building layers and inputs, timing with pytest-benchmark, and
counting memory.

Timing rule: the timed function ends with a device synchronisation and the (untimed) setup
before it synchronises too, so on a GPU a round measures exactly the kernels of one call. Warm-up
calls (cuBLAS heuristics, Triton compilation, allocator growth) run before the timed rounds and
are not in the statistics.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmoe_fused as gm

from .shapes import BenchShape

BACKENDS = ("reference", "torch", "triton")
MODES = ("fwd", "fwd_bwd")
# Gradient of the load-balancing loss in fwd+bwd: the paper's coefficient, as in fine-tuning.
AUX_LOSS_COEF = 0.01


@dataclass(frozen=True)
class BenchContext:
    """The run-wide choices: shape, device and how long to spend on each benchmark."""

    shape: BenchShape
    device: torch.device
    budget_s: float  # timed seconds aimed at per benchmark (more rounds for fast cases)
    min_rounds: int
    max_rounds: int
    dropout: float
    recompute_intermediates: bool = False  # GraphMoEConfig's memory/speed switch (its default)
    seed: int = 0
    loadavg_start: tuple[float, float, float] | None = None  # os.getloadavg() at session start

    @property
    def dtype(self) -> torch.dtype:
        return self.shape.dtype

    def info(self, **extra: Any) -> dict[str, Any]:
        """The ``extra_info`` every benchmark records (the report reads these keys)."""
        return {
            "shape": self.shape.name,
            "shape_params": self.shape.as_info(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tokens": self.shape.tokens,
            "lora_dropout": self.dropout,
            "recompute_intermediates": self.recompute_intermediates,
            **extra,
        }


# --------------------------------------------------------------------------- availability


def backend_skip_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot be benchmarked here, or ``None`` when it can."""
    if name == "triton" and not triton_runnable(device):
        return (
            "the triton backend needs a CUDA device (on CPU the Triton interpreter is a "
            "correctness tool whose speed means nothing; TRITON_INTERPRET=1 runs these "
            "benchmarks anyway, for smoke runs)"
        )
    return None


def triton_runnable(device: torch.device) -> bool:
    """Triton kernels run on CUDA, and on CPU under the interpreter (smoke runs only)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def skip_unless_backend(name: str, device: torch.device) -> None:
    reason = backend_skip_reason(name, device)
    if reason is not None:
        pytest.skip(reason)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(ctx: BenchContext) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "graphmoe_fused": gm.__version__,
        "python": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "device": str(ctx.device),
        "shape": ctx.shape.as_info(),
        "budget_s": ctx.budget_s,
        "recompute_intermediates": ctx.recompute_intermediates,
        "min_rounds": ctx.min_rounds,
        "max_rounds": ctx.max_rounds,
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        # Other work on the CPUs makes CPU timings unreliable; the load average at the start and
        # when the JSON is written (the end) lets the report say so.
        if ctx.loadavg_start is not None:
            info["loadavg_start"] = [round(v, 2) for v in ctx.loadavg_start]
        info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


# --------------------------------------------------------------------------- building


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded non-zero weights on the module's own device (the default init has LoRA B = 0 and
    ``W_g`` = 0, which would skip most of the work a trained layer does).

    Same rule as ``tests/helpers.randomize_``: normal with std ``fan_in ** -0.5``, and 0.1 for
    LoRA B and the GRU bias. Drawn on the device so the LLaMA-3-8B shape does not spend seconds
    in a CPU generator; identical parameter names and shapes give identical weights, which is what
    lets layers with different ``T`` or backends be compared.
    """
    if any(p.is_meta for p in module.parameters()):  # shapes only (bench.op_count)
        return module
    with torch.no_grad():
        for index, (name, p) in enumerate(sorted(module.named_parameters())):
            gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + index)
            std = 0.1 if name.startswith(("lora_B", "gru.bias")) else p.shape[-1] ** -0.5
            sample = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            p.copy_(sample.mul_(std).to(p.dtype))
    return module


def build_layer(ctx: BenchContext, backend: str, num_rounds: int | None = None) -> gm.GraphMoEMLP:
    """A training-mode GraphMoE layer (LoRA, router, GRU trainable; base frozen)."""
    s = ctx.shape
    cfg = gm.GraphMoEConfig(
        num_experts=s.num_experts,
        top_k=s.top_k,
        lora_r=s.lora_r,
        lora_dropout=ctx.dropout,
        num_rounds=num_rounds or s.num_rounds,
        gru_hidden_ratio=s.gru_hidden_ratio,
        backend=backend,
        recompute_intermediates=ctx.recompute_intermediates,
    )
    layer = gm.GraphMoEMLP(s.d, s.intermediate, cfg, device=ctx.device, dtype=ctx.dtype)
    if layer.gru.gru_hidden_size != s.dh:
        raise AssertionError(f"GRU width {layer.gru.gru_hidden_size} != shape's dh {s.dh}")
    randomize_(layer, ctx.seed)
    return layer.train()


class DenseSwiGLU(nn.Module):
    """The floor: LLaMA's frozen MLP ``down(silu(gate x) * up x)`` on the same base weights."""

    def __init__(self, layer: gm.GraphMoEMLP) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = layer.gate_proj, layer.up_proj
        self.down_proj = layer.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_mixlora(ctx: BenchContext, num_rounds: int | None = None) -> nn.Module:
    """The MixLoRA-style peer (bench/peers.py) on the weights every backend gets."""
    from bench.peers import MixLoRAStyle

    return MixLoRAStyle(build_layer(ctx, "reference", num_rounds)).train()


def build_dense(ctx: BenchContext) -> DenseSwiGLU:
    return DenseSwiGLU(build_layer(ctx, "reference", num_rounds=1))


def make_tensor(ctx: BenchContext, *shape: int, seed: int, dtype: torch.dtype | None = None,
                requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    t = torch.randn(*shape, generator=gen, device=ctx.device, dtype=torch.float32)
    return t.to(dtype or ctx.dtype).requires_grad_(requires_grad)


def layer_input(ctx: BenchContext, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (unit-scale, like a layernorm output) and the upstream gradient for backward."""
    s = ctx.shape
    x = make_tensor(ctx, s.tokens, s.d, seed=ctx.seed + 101, requires_grad=requires_grad)
    grad = make_tensor(ctx, s.tokens, s.d, seed=ctx.seed + 202)
    return x, grad


# --------------------------------------------------------------------------- steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Step:
    """One benchmarked call: ``setup`` (untimed) then ``run`` (timed)."""

    run: Callable[[], None]
    setup: Callable[[], None]


def module_step(ctx: BenchContext, module: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                mode: str) -> Step:
    """``fwd``: an inference forward under ``no_grad``; ``fwd_bwd``: a training forward (input
    requiring grad, as inside a fine-tuned network) and its backward, the load-balancing loss
    included for GraphMoE layers."""
    device = ctx.device
    is_moe = isinstance(module, gm.GraphMoEMLP)

    def setup() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        synchronize(device)

    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                module(x)
            synchronize(device)
    elif mode == "fwd_bwd":
        if not x.requires_grad:
            raise ValueError("fwd_bwd needs an input that requires grad")
        aux_grad = torch.tensor(AUX_LOSS_COEF, device=device)

        def run() -> None:
            if is_moe:
                y, aux = module(x, return_aux_loss=True)
                torch.autograd.backward((y, aux), (grad, aux_grad.to(aux.dtype)))
            else:
                torch.autograd.backward(module(x), grad)
            synchronize(device)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return Step(run, setup)


def function_step(ctx: BenchContext, fn: Callable[[], tuple[torch.Tensor, ...]],
                  grads: tuple[torch.Tensor, ...] | None, leaves: Iterable[torch.Tensor]) -> Step:
    """A step around a plain function: forward only when ``grads`` is None (under no_grad),
    else forward + backward of its outputs against ``grads``."""
    device, leaves = ctx.device, tuple(leaves)

    def setup() -> None:
        for t in leaves:
            t.grad = None
        synchronize(device)

    def run() -> None:
        if grads is None:
            with torch.no_grad():
                fn()
        else:
            torch.autograd.backward(fn(), grads)
        synchronize(device)

    return Step(run, setup)


# --------------------------------------------------------------------------- timing


def run_benchmark(benchmark: Any, ctx: BenchContext, step: Step) -> None:
    """Times ``step`` with pytest-benchmark, sizing the rounds to the budget.

    pytest-benchmark's own calibration loops a call until ``min_time`` is met and repeats it
    many times, which for a 2-second CPU reference pass would take minutes; pedantic mode with a
    measured round count keeps every benchmark near ``budget_s``. Under ``--benchmark-disable``
    the step runs once, untimed (smoke mode).
    """
    if benchmark.disabled:
        benchmark.pedantic(step.run, setup=step.setup, rounds=1)
        return
    elapsed = timed_call(step)  # the first call may compile, tune or grow the allocator
    if elapsed < ctx.budget_s / 2:
        elapsed = timed_call(step)  # a cheap case can afford a second, settled, warm-up
    rounds = max(ctx.min_rounds, min(ctx.max_rounds, math.ceil(ctx.budget_s / max(elapsed, 1e-6))))
    benchmark.extra_info["timed_rounds"] = rounds
    benchmark.pedantic(step.run, setup=step.setup, rounds=rounds, warmup_rounds=0)


def timed_call(step: Step) -> float:
    """One untimed setup, then the wall time of one call (the call ends synchronised)."""
    step.setup()
    start = time.perf_counter()
    step.run()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- memory


class SavedTensorCounter:
    """Sums the bytes autograd keeps for backward, as ``saved_tensors_hooks`` sees them.

    Counting rule: every tensor packed for backward is resolved to its storage; each storage is
    counted once, at its full size (a saved view keeps its whole base alive), and storages of
    the excluded tensors (the module's parameters and frozen base weights, which live anyway)
    are not counted. The layer input is counted: the MLP is what keeps it alive (LLaMA's RMSNorm
    saves its own input, not its output). Tensors a custom ``autograd.Function`` stashes as
    plain ``ctx`` attributes bypass the hooks and are not seen; on a GPU the
    ``cuda_retained_after_fwd`` figure cross-checks that.
    """

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._storages: dict[tuple[str, int], int] = {}
        self.packed = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.packed += 1
        key = _storage_key(t)
        if key not in self._excluded and key not in self._storages:
            self._storages[key] = _storage_nbytes(t)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # storage-less tensors (subclasses)
        # A per-object key, so they neither merge nor vanish.
        return (str(t.device), -id(t))
    # Views of one storage share its data pointer; meta and empty tensors have none, but their
    # storage object's own address is shared the same way.
    return (str(t.device), storage.data_ptr() or storage._cdata)


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def measure_memory(ctx: BenchContext, forward: Callable[[], tuple[tuple[torch.Tensor, ...],
                                                                  tuple[torch.Tensor, ...]]],
                   exclude: Iterable[torch.Tensor]) -> dict[str, Any]:
    """One training forward under the saved-tensor hooks, then its backward.

    ``forward`` returns ``(outputs, grads)``. Peak CUDA memory is the high-water mark of the
    fwd+bwd above what was allocated before it (weights, input and upstream gradient already
    there), so it includes the parameter gradients backward creates.
    """
    device = ctx.device
    counter = SavedTensorCounter(exclude)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with counter.hooks():
        outputs, grads = forward()
    info: dict[str, Any] = {}
    if cuda:
        torch.cuda.synchronize(device)
        out_bytes = sum(o.untyped_storage().nbytes() for o in outputs)
        retained = torch.cuda.memory_allocated(device) - base - out_bytes
        info["cuda_retained_after_fwd_bytes"] = retained
    torch.autograd.backward(outputs, grads)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        info["cuda_peak_fwd_bwd_bytes"] = peak
        info["cuda_peak_fwd_bwd_bytes_per_token"] = peak / ctx.shape.tokens
    s = ctx.shape
    info.update(
        saved_bytes=counter.nbytes,
        saved_bytes_per_token=counter.nbytes / s.tokens,
        # In units of one d-wide row of the layer dtype: "how many x-sized tensors per token".
        saved_rows_of_d=counter.nbytes / (s.tokens * s.d * torch.finfo(ctx.dtype).bits // 8),
        saved_tensors_packed=counter.packed,
    )
    return info
