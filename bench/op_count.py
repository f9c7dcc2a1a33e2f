"""What eager PyTorch launches for a module's forward + backward, counted op by op on the
``meta`` device: no data, no GPU, the real sequence of ATen ops (autograd's backward included).

Each ATen op that computes is one kernel on a GPU, so its floor is ``max(FLOPs / peak, bytes /
bandwidth)`` as in :mod:`bench.roofline`, and a module's floor is the sum over its ops. That
gives the roofline of what the benchmarks time against the Triton kernels' without a GPU: the
dense SwiGLU MLP as eager PyTorch runs it (cuBLAS GEMMs plus a separate pass per elementwise
op, each reading and writing ``[M, D']`` tensors) and the torch backend (which, on any device
but the CPU, takes the masked expert plan a CUDA GPU takes). The layer's custom ops (the triton
backend's, and the torch backend's dropout-mask kernel) run their fake implementations here and
are costed as reading their inputs and writing their outputs once: exact for an elementwise
kernel, a lower bound for the triton backend's rounds (whose floors are ``bench.roofline``'s).

Bytes are each tensor argument read once and each result written once, at the extent it spans
(stride-0 dimensions of an expanded tensor count once); views and allocations move nothing.
FLOPs are the matmuls' (:mod:`torch.utils.flop_counter`); elementwise ops count as memory only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from bench.harness import AUX_LOSS_COEF, BenchContext, DenseSwiGLU, SavedTensorCounter, build_layer
from bench.roofline import ALL_GPUS, GPUS, dense_round, graphmoe_round, step_floor
from bench.shapes import SHAPES, BenchShape, print_shape_report

# Peak fp32 FLOP/s without tensor cores (data sheets: A100 SXM, H100 SXM; the H200's are the
# H100's): torch leaves TF32 off for matmuls by default, so fp32 products run at this rate.
FP32_PEAK = {"A100": 19.5e12, "H100": 67e12, "H200": 67e12, "H100 PCIe": 51e12}
TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)

# Ops that write their whole first argument without reading it.
_OVERWRITE = {"copy_", "zero_", "fill_", "uniform_", "normal_", "bernoulli_", "random_"}
# Allocations: no kernel, nothing moved.
_ALLOCATE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


@dataclass(frozen=True)
class Op:
    """One launched ATen op."""

    name: str
    flops: float
    bytes: float
    tensor_cores: bool  # a matmul of bf16/fp16 operands (else fp32 rate)

    def floor(self, gpu: str) -> float:
        peak, bandwidth = ALL_GPUS[gpu]
        if not self.tensor_cores:
            peak = FP32_PEAK[gpu]
        return max(self.flops / peak, self.bytes / bandwidth)


def _extent(t: torch.Tensor) -> int:
    """Bytes ``t`` spans: its elements, counting a stride-0 (expanded) dimension once."""
    n = math.prod(size for size, stride in zip(t.shape, t.stride(), strict=True) if stride)
    return n * t.element_size()


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class OpCounter(TorchDispatchMode):
    """Records every ATen op run inside it as an :class:`Op` (``self.ops``), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _ALLOCATE:
            return out
        reads = _tensors(args) + _tensors({k: v for k, v in kwargs.items() if k != "out"})
        if name in _OVERWRITE and reads:
            reads = reads[1:]
        writes = _tensors(out)
        flops = 0.0
        if func.overloadpacket in flop_registry:
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        # By the operands: a bf16/fp16 product with an fp32 result (``mm(out_dtype=)``) still
        # runs on tensor cores.
        tensor_cores = bool(flops) and all(t.dtype in TENSOR_CORE_DTYPES for t in reads)
        moved = sum(_extent(t) for t in reads) + sum(_extent(t) for t in writes)
        self.ops.append(Op(str(func.overloadpacket), flops, float(moved), tensor_cores))
        return out


def count_ops(step: Callable[[], None]) -> list[Op]:
    """The ops ``step`` (a forward + backward on ``meta`` tensors) launches, in order."""
    counter = OpCounter()
    with counter:
        step()
    return counter.ops


def floor(ops: list[Op], gpu: str) -> float:
    """Seconds: the ops one after another, each at its own floor."""
    return sum(op.floor(gpu) for op in ops)


def launches(ops: list[Op]) -> int:
    """Kernels launched: the ops that move bytes or compute."""
    return sum(1 for op in ops if op.bytes or op.flops)


# ---------------------------------------------------------------------------------------------
# The report: the benchmarks' eager implementations at a shape, against the kernels' roofline.
# ---------------------------------------------------------------------------------------------


# The triton backend's custom ops: its kernels, costed by bench.roofline instead.
TRITON_ROUND_OPS = ("graphmoe_fused.triton_rounds", "graphmoe_fused.rounds_backward")


@dataclass(frozen=True)
class Counted:
    """One implementation's training step (forward + backward) as counted on ``meta``."""

    label: str
    ops: list[Op]
    saved_bytes: int  # kept for backward (bench.harness.SavedTensorCounter's rule)


def meta_context(s: BenchShape, dropout: float, recompute: bool) -> BenchContext:
    return BenchContext(shape=s, device=torch.device("meta"), budget_s=0.0, min_rounds=1,
                        max_rounds=1, dropout=dropout, recompute_intermediates=recompute)


def count_step(s: BenchShape, impl: str, dropout: float = 0.0,
               recompute: bool = False) -> Counted:
    """``impl`` (``dense``, ``torch`` or ``triton``) at shape ``s``: one training step of one
    layer on ``meta`` tensors, ``T`` rounds with the load-balancing loss for the backends, as
    ``bench/test_bench_layer.py`` times it."""
    ctx = meta_context(s, dropout, recompute)
    layer = build_layer(ctx, "torch" if impl == "dense" else impl)
    module = DenseSwiGLU(layer) if impl == "dense" else layer
    x = torch.empty(s.tokens, s.d, device="meta", dtype=s.dtype, requires_grad=True)
    grad = torch.empty(s.tokens, s.d, device="meta", dtype=s.dtype)
    saved = SavedTensorCounter(module.parameters())

    def step() -> None:
        with saved.hooks():
            if impl == "dense":
                outputs, grads = (module(x),), (grad,)
            else:
                y, aux = module(x, return_aux_loss=True)
                outputs, grads = (y, aux), (grad, torch.full_like(aux, AUX_LOSS_COEF))
        torch.autograd.backward(outputs, grads)

    ops = count_ops(step)
    if impl == "triton":  # the rounds' kernels are bench.roofline's rows
        ops = [op for op in ops if op.name not in TRITON_ROUND_OPS]
    label = {"dense": "dense SwiGLU MLP, eager (the benchmarks' `dense`, one call)",
             "torch": "torch backend", "triton": "triton backend: its torch ops only"}[impl]
    if impl != "dense":
        label += f", T = {s.num_rounds}, dropout {dropout:g}"
        label += ", recompute" if recompute else ""
    return Counted(label, ops, saved.nbytes)


def report(shape_name: str = "llama3-8b") -> str:
    s = SHAPES[shape_name]
    t = s.num_rounds
    dense = count_step(s, "dense")
    torch_steps = {(p, rec): count_step(s, "torch", p, rec)
                   for rec in (False, True) for p in (0.0, 0.05)}
    triton_glue = count_step(s, "triton")
    lines = [
        f"Shape `{s.name}`: d = {s.d}, D' = {s.intermediate}, n = {s.num_experts}, "
        f"k = {s.top_k}, r = {s.lora_r}, {s.tokens} tokens, "
        f"{str(s.dtype).removeprefix('torch.')}; one layer's training step (forward + "
        "backward, the load-balancing loss included), every ATen op counted on the meta device "
        "as eager PyTorch launches it on a GPU.",
        "",
        "| implementation | kernels | GFLOP | GB moved | saved per token | "
        + " | ".join(f"{g} floor" for g in GPUS) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in GPUS) + " |",
    ]
    for c in (dense, *torch_steps.values(), triton_glue):
        cells = [c.label, str(launches(c.ops)), f"{sum(o.flops for o in c.ops) / 1e9:.0f}",
                 f"{sum(o.bytes for o in c.ops) / 1e9:.1f}",
                 f"{c.saved_bytes / s.tokens / 1024:.1f} KiB"]
        cells += [f"{floor(c.ops, g) * 1e3:.2f} ms" for g in GPUS]
        lines.append("| " + " | ".join(cells) + " |")

    # The triton step: the kernels' roofline rows (bench.roofline, which also counts its torch
    # ops: the router's softmax backward and W_g's GEMMs), with the products saved.
    kernels = graphmoe_round(s, recompute=False)
    triton_floor = {g: step_floor(kernels, g, t) for g in GPUS}
    fused_dense = {g: sum(k.floor(g) for k in dense_round(s)) for g in GPUS}

    def ratios(values: dict[str, float]) -> str:
        return ", ".join(f"{v:.2f}× ({g})" for g, v in values.items())

    lines += [
        "",
        "Predicted from floors (not measurements), the triton step being `bench.roofline`'s "
        "kernels with the base products saved:",
        f"- triton fwd+bwd, T = {t}: "
        + ratios({g: triton_floor[g] / (t * floor(dense.ops, g)) for g in GPUS})
        + f" of {t} × the eager dense MLP above (what the benchmarks time; issue 8's target "
        "≤ 1.15), "
        + ratios({g: triton_floor[g] / (t * fused_dense[g]) for g in GPUS})
        + f" of {t} × a dense MLP whose activation and its backward are one pass each",
    ]
    for (p, rec), c in torch_steps.items():
        lines.append(
            f"- torch backend (dropout {p:g}{', recompute' if rec else ''}) over triton: "
            + ratios({g: floor(c.ops, g) / triton_floor[g] for g in GPUS})
            + " (target ≥ 1.3)")
    default_torch = torch_steps[(0.0, False)]
    lines.append(
        "- saved for backward per token, triton / torch backend: "
        f"{triton_glue.saved_bytes / s.tokens / 1024:.1f} / "
        f"{default_torch.saved_bytes / s.tokens / 1024:.1f} KiB = "
        f"{triton_glue.saved_bytes / default_torch.saved_bytes:.2f} (peak memory ≤ the torch "
        "backend's: its transient workspaces are not in this count)")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return print_shape_report("python -m bench.op_count", __doc__, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
