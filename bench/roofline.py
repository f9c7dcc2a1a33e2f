"""Roofline of a GraphMoE training round on the Triton kernels, against a dense SwiGLU MLP.

    python -m bench.roofline [--shape llama3-8b]

Counts the FLOPs and the bytes every kernel of one non-final round moves, forward and backward,
as the kernels are laid out (issue 8's design: the expert LoRA as masked-dense products over all
``n·r`` columns, the ``k`` per-slot ``D'``-wide tensors kept in registers, the slots summed before
the base GEMMs of ``dx``), and the floor ``max(FLOPs / peak, bytes / bandwidth)`` per kernel on an
A100 and an H100. The dense baseline is what cuBLAS would run for a frozen SwiGLU MLP whose input
needs a gradient: 3 GEMMs forward, 3 backward (``dy W_D``, then ``dG W_G + dU W_U``), no weight
gradients, and the activation backward in one elementwise pass.

These are estimates of a floor, not measurements: a kernel reaches its floor only at cuBLAS-like
efficiency. Their use is the ratio, which says how much of the round's cost the design adds on
top of the dense MLP, and which term to attack first.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from bench.shapes import SHAPES, BenchShape

# Peak dense bf16 tensor-core FLOP/s and HBM bandwidth (vendor data sheets: A100 SXM 80 GB,
# H100 SXM).
GPUS = {"A100": (312e12, 2.0e12), "H100": (989e12, 3.35e12)}
# Bytes per element: the compute dtype (bf16 at llama3-8b) and fp32 (rank-r and accumulators).
B16, B32 = 2, 4


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float

    def floor(self, gpu: str) -> float:
        peak, bandwidth = GPUS[gpu]
        return max(self.flops / peak, self.bytes / bandwidth)

    def bound(self, gpu: str) -> str:
        peak, bandwidth = GPUS[gpu]
        return "compute" if self.flops / peak >= self.bytes / bandwidth else "memory"


def gemm(m: int, n: int, k: int) -> float:
    """FLOPs of an ``[m, k] @ [k, n]`` product."""
    return 2.0 * m * n * k


def dense_round(s: BenchShape) -> list[Kernel]:
    """A frozen dense SwiGLU MLP, forward and input backward (the cuBLAS baseline)."""
    m, d, f = s.tokens, s.d, s.intermediate
    weights = 3 * d * f * B16
    return [
        Kernel("dense forward: gate, up, down GEMMs", 3 * gemm(m, f, d),
               weights + m * d * B16 * 2 + 2 * m * f * B16 * 2 + m * f * B16),
        Kernel("dense backward: dy W_D, SwiGLU backward, dG W_G + dU W_U", 3 * gemm(m, f, d),
               weights + m * d * B16 * 2 + 2 * m * f * B16 * 3 + m * f * B16 * 2),
    ]


def graphmoe_round(s: BenchShape, recompute: bool, grouped: bool = False) -> list[Kernel]:
    """One non-final GraphMoE round on the kernels, forward and backward. ``grouped``: the
    per-slot LoRA products over ``r`` columns (a grouped, token-sorted path) instead of the
    masked-dense ``n·r``, to show what that path would buy."""
    m, d, f, n, k, r, dh = s.tokens, s.d, s.intermediate, s.num_experts, s.top_k, s.lora_r, s.dh
    # LoRA columns a slot's products run over: every expert's block, zeros for the unchosen
    # (masked dense), or only its own (grouped).
    nr = r if grouped else n * r
    wgu, wd = 2 * d * f * B16, d * f * B16
    act_d, act_f = m * d * B16, m * f * B16
    lora_f = nr * f * B16  # one [n·r, D'] factor
    gru_w = (3 * dh * (dh + d) + d * dh) * B16
    saved_gu = 0 if recompute else 2 * act_f  # G and U kept for backward
    fwd = [
        Kernel("router + top-k", gemm(m, n, d), act_d + m * n * B32),
        Kernel("lora_in: c·x·[A_G; A_U]ᵀ", gemm(m, 2 * nr, d), act_d + 2 * nr * d * B16),
        Kernel("gate/up: dual GEMM, k slots' masked LoRA, SwiGLU, mix, A_D products",
               2 * gemm(m, f, d) + k * (2 * gemm(m, f, nr) + gemm(m, nr, f)),
               act_d + wgu + 3 * lora_f + act_f + m * nr * B32 + saved_gu),
        Kernel("down: W_D h_mix + masked B_D", gemm(m, d, f) + gemm(m, d, nr),
               act_f + wd + act_d + m * nr * B32),
        Kernel("GRU cell + x + W_g h", gemm(m, 3 * dh, dh + d) + gemm(m, d, dh),
               3 * act_d + gru_w),
    ]
    bwd = [
        Kernel("GRU cell backward (recomputed gates)",
               2 * gemm(m, 3 * dh, dh + d) + 2 * gemm(m, 3 * dh, dh + d) + 2 * gemm(m, d, dh),
               5 * act_d + 2 * gru_w),
        Kernel("down backward: dh_base = dy W_D, b = c·dy B_Dᵀ, dB_D",
               gemm(m, f, d) + 2 * gemm(m, nr, d), act_d + wd + act_f + 2 * m * nr * B32),
        Kernel("gate/up backward: G, U (recomputed or read), k slots' LoRA, SwiGLU backward, "
               "dG, dU, dw, d a",
               (2 * gemm(m, f, d) if recompute else 0)
               + k * (2 * gemm(m, f, nr)  # the slot's gate and up deltas again
                      + gemm(m, f, nr)  # dh_j's rank-r term A_Dᵀ b_j
                      + 2 * gemm(m, nr, f)),  # d a_g, d a_u
               # reads x and the weights (recompute) or the saved G, U; writes G, U once when
               # recomputed (for the second kernel), dG, dU and the rank-r results.
               (act_d + wgu + 2 * act_f if recompute else saved_gu) + 3 * lora_f + 3 * act_f
               + 2 * m * nr * B32),
        Kernel("gate/up weight gradients: dB_G, dB_U, dA_D (token reductions, the slots' "
               "dgate, dup, h re-derived from G, U)",
               k * (3 * gemm(m, f, nr)  # the slot's deltas and A_Dᵀ b_j again
                    + 2 * gemm(nr, f, m)  # dB_G, dB_U
                    + gemm(nr, f, m)),  # dA_D
               2 * act_f + act_f + 3 * lora_f + 3 * nr * f * B32 + 2 * m * nr * B32),
        Kernel("dx: dG W_G + dU W_U + masked A paths, dA_G, dA_U",
               2 * gemm(m, d, f) + 2 * gemm(m, d, 2 * nr), 2 * act_f + wgu + 2 * act_d),
        Kernel("router backward (softmax, top-k renormalisation, dR, dx)",
               2 * gemm(m, n, d), 2 * act_d),
    ]
    return fwd + bwd


def report(shape_name: str = "llama3-8b") -> str:
    s = SHAPES[shape_name]
    dense = dense_round(s)
    lines = [
        f"Shape `{s.name}`: d = {s.d}, D' = {s.intermediate}, n = {s.num_experts}, "
        f"k = {s.top_k}, r = {s.lora_r}, dh = {s.dh}, {s.tokens} tokens, "
        f"{str(s.dtype).removeprefix('torch.')}; one non-final round, forward + backward.",
        "",
        "| kernel | GFLOP | MB moved | A100 floor | H100 floor |",
        "| --- | --- | --- | --- | --- |",
    ]

    def row(kernel: Kernel) -> str:
        cells = [kernel.name, f"{kernel.flops / 1e9:.0f}", f"{kernel.bytes / 1e6:.0f}"]
        cells += [f"{kernel.floor(g) * 1e3:.2f} ms ({kernel.bound(g)})" for g in GPUS]
        return "| " + " | ".join(cells) + " |"

    def total_row(name: str, kernels: list[Kernel]) -> str:
        # Kernels run one after another: the floor of the sequence is the sum of their floors.
        cells = [name, f"{sum(x.flops for x in kernels) / 1e9:.0f}",
                 f"{sum(x.bytes for x in kernels) / 1e6:.0f}"]
        cells += [f"{sum(x.floor(g) for x in kernels) * 1e3:.2f} ms" for g in GPUS]
        return "| " + " | ".join(f"**{c}**" for c in cells) + " |"

    for recompute in (False, True):
        kernels = graphmoe_round(s, recompute)
        label = "recompute_intermediates=" + str(recompute)
        lines.append(f"| *{label}* | | | | |")
        lines += [row(x) for x in kernels]
        lines.append(total_row(f"GraphMoE round ({label})", kernels))
    lines += [row(x) for x in dense]
    lines.append(total_row("dense SwiGLU MLP, forward + input backward", dense))
    lines.append("")

    def floor(kernels: list[Kernel], gpu: str) -> float:
        return sum(x.floor(gpu) for x in kernels)

    t = s.num_rounds
    for recompute in (False, True):
        for grouped in (False, True):
            kernels = graphmoe_round(s, recompute, grouped)
            gru = [x for x in kernels if x.name.startswith("GRU")]
            # T rounds, the GRU (and its backward) between them only: T - 1 times.
            ratios = [(t * floor(kernels, g) - floor(gru, g)) / (t * floor(dense, g))
                      for g in GPUS]
            lines.append(
                f"- recompute_intermediates={recompute}, "
                f"{'grouped' if grouped else 'masked-dense'} LoRA: T = {t} rounds at "
                + ", ".join(f"{v:.2f}× ({g})" for v, g in zip(ratios, GPUS, strict=True))
                + f" the floor of {t} × the dense MLP")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    args = parser.parse_args(argv)
    print(report(args.shape))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
