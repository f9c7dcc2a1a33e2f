"""Where a training step of one GraphMoE layer spends its time, by kind of work.

    python -m bench.profile_step [--backend torch] [--shape cpu-small] [--rounds 3]
                                 [--dropout 0.05] [--recompute] [--steps 3] [--threads 2]

Runs the layer's fwd+bwd (as ``pytest bench/`` does: training mode, seeded non-zero weights,
load-balancing loss) under ``torch.profiler`` and sorts every aten op's own time into: base
GEMMs (a product with the token, hidden and intermediate sizes: the floor), LoRA products
(rank ``r`` on one side), GRU and router products, dropout-mask hashing, gathers/scatters and
the rest of the elementwise passes. The base-GEMM time is also expressed in units of one
dense ``[M, d] × [d, D']`` product timed in the same process, so the count of units the backend
runs shows up next to its share. Profiling slows small ops a little: read shares, not times.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.harness import BenchContext, build_layer, layer_input, module_step, timed_call
from bench.shapes import SHAPES, BenchShape

GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}
HASH = {"bitwise_xor", "bitwise_xor_", "bitwise_and", "bitwise_and_", "bitwise_right_shift",
        "ge", "__rshift__", "__irshift__"}
MOVES = {"index_select", "index_add_", "scatter_add_", "scatter_", "gather", "index_copy_",
         "sort", "argsort"}


BASE = "base GEMMs"


def _category(name: str, shapes: Sequence[Sequence[int]], s: BenchShape) -> str:
    """The kind of work of one aten op, from its name and input shapes: only a base product has
    both the hidden and the intermediate size (and the token count) among its dimensions."""
    op = name.removeprefix("aten::")
    dims = {d for shape in shapes for d in shape}
    if op in GEMMS:
        if {s.d, s.intermediate, s.tokens} <= dims:
            return BASE
        if dims & {s.lora_r, 2 * s.lora_r, s.num_experts * s.lora_r}:
            return "LoRA products (rank r)"
        if dims & {s.dh, 2 * s.dh}:
            return "GRU products"
        return "router and other products"
    if op in HASH:
        return "dropout-mask hashing"
    if op in MOVES:
        return "gathers, scatters, sort"
    return "elementwise and the rest"


def measure(shape: BenchShape, backend: str = "torch", dropout: float = 0.0,
            recompute: bool = False, steps: int = 3) -> dict[str, Any]:
    """Profiles ``steps`` fwd+bwd steps; returns the seconds per step of each kind of work
    (``categories``), the base-GEMM calls per step, the unprofiled step time and one base-GEMM
    unit's time, both medians."""
    device = torch.device("cpu")
    ctx = BenchContext(shape, device, budget_s=1.0, min_rounds=1, max_rounds=1,
                       dropout=dropout, recompute_intermediates=recompute)
    layer = build_layer(ctx, backend)
    x, grad = layer_input(ctx, requires_grad=True)
    step = module_step(ctx, layer, x, grad, "fwd_bwd")
    a = torch.randn(shape.tokens, shape.d, dtype=shape.dtype)
    w = torch.randn(shape.intermediate, shape.d, dtype=shape.dtype)
    for _ in range(2):  # warm-up
        timed_call(step)
        a @ w.t()
    units = []
    for _ in range(5):
        start = time.perf_counter()
        a @ w.t()
        units.append(time.perf_counter() - start)
    step_times = [timed_call(step) for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            timed_call(step)
    categories: dict[str, float] = defaultdict(float)
    base_calls = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            kind = _category(event.name, event.input_shapes or [], shape)
            categories[kind] += event.self_cpu_time_total / 1e6 / steps
            base_calls += kind == BASE
    return {"categories": dict(categories), "base_gemm_calls": base_calls / steps,
            "step_s": statistics.median(step_times), "unit_s": statistics.median(units)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "reference"])
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=None, help="T (default: the shape's)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--recompute", action="store_true",
                        help="recompute_intermediates=True (default: the config's, False)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    if args.rounds:
        shape = dataclasses.replace(shape, num_rounds=args.rounds)
    m = measure(shape, args.backend, args.dropout, args.recompute, args.steps)
    unit, step_s = m["unit_s"], m["step_s"]
    total = sum(m["categories"].values())
    print(f"{args.backend} backend, {shape.name}, T={shape.num_rounds}, dropout {args.dropout:g}, "
          f"recompute_intermediates={args.recompute}, {torch.get_num_threads()} threads: step "
          f"{step_s * 1e3:.1f} ms unprofiled (median of {args.steps}) = {step_s / unit:.2f} base "
          f"GEMM units of {unit * 1e3:.1f} ms; {m['base_gemm_calls']:g} base GEMMs per step")
    print("| work | ms per step (profiled) | share | units |")
    print("| --- | --- | --- | --- |")
    for name, seconds in sorted(m["categories"].items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / total:.1%} | {seconds / unit:.2f} |")
    print(f"| all aten ops | {total * 1e3:.1f} | 100% | {total / unit:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
