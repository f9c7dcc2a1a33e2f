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
top of the dense MLP, and which term to attack first. Each row names the Triton kernels that do
its work (``Kernel.launches``), so :func:`compare_kernels` can set a profiled step's device
times against the rows' floors (``bench.gpu_check``), and counts the fp32 atomic adds of its
reductions apart (they resolve in L2, outside the floor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.shapes import SHAPES, BenchShape, print_shape_report

# Peak dense bf16 tensor-core FLOP/s and HBM bandwidth (vendor data sheets: A100 SXM 80 GB,
# H100 SXM); the report's columns. H200 (same tensor cores as the H100 SXM, faster HBM) and
# H100 PCIe only serve bench.gpu_check's comparison on the GPU it ran on (gpu_spec).
GPUS = {"A100": (312e12, 2.0e12), "H100": (989e12, 3.35e12)}
OTHER_GPUS = {"H200": (989e12, 4.8e12), "H100 PCIe": (756e12, 2.0e12)}
ALL_GPUS = {**GPUS, **OTHER_GPUS}
# Bytes per element: the compute dtype (bf16 at llama3-8b) and fp32 (rank-r and accumulators).
B16, B32 = 2, 4


@dataclass(frozen=True)
class Kernel:
    """One row: the work of ``launches`` (the Triton kernels that do it; none: torch and
    cuBLAS ops), once per round, or between rounds only (the GRU: ``T − 1`` times)."""

    name: str
    flops: float
    bytes: float
    launches: tuple[str, ...] = ()
    between_rounds: bool = False
    # fp32 atomic adds of the reductions (bytes): they resolve in L2, so they are not in the
    # HBM bytes nor the floor, but a kernel that sends more atomics than it moves bytes may be
    # bound by them (bench.gpu_check's kernel profile shows it).
    atomics: float = 0.0

    def floor(self, gpu: str) -> float:
        peak, bandwidth = ALL_GPUS[gpu]
        return max(self.flops / peak, self.bytes / bandwidth)

    def bound(self, gpu: str) -> str:
        peak, bandwidth = ALL_GPUS[gpu]
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


# Rows per tile of each expert kernel (BLOCK_M of its first GPU config, kernels/expert/) and
# the masked-dense chunk width (LORA_CHUNK of every GPU config): a sorted tile's chunk loops
# cover the experts of its rows, so the work depends on both.
TILE_ROWS = {"gate_up": 64, "gate_up_backward": 32, "gate_up_wgrad": 32, "dx": 64}
# D' columns per tile (BLOCK_N) of the kernels whose reductions over D' go out per tile.
TILE_COLS = {"gate_up": 128, "gate_up_backward": 64}
LORA_CHUNK = 16
# Token groups of the GRU backward's weight reductions (kernels/gru/lowrank_gru_backward.py).
GRU_TOKEN_GROUPS = 8
# The routing the spans are averaged over: uniform top-k, seeded (a floor for balanced routers,
# which the load-balancing loss pushes towards).
ROUTING_SEED = 0
ORDERS = {"routing": "tokens in routing order (as built)",
          "tokens": "tokens in their order (sort_tokens=False)",
          "grouped": "grouped LoRA (r columns per slot, the ideal)"}


@dataclass(frozen=True)
class LoraColumns:
    """Masked-dense LoRA columns a tile's loops run over, per token, averaged over tiles:
    ``slot[j]`` for slot ``j``'s loops (from its lowest to its highest expert's chunk), and
    ``union`` for the loops that test each chunk against every slot (dx, ∂B_D)."""

    slot: tuple[float, ...]
    union: float


def lora_columns(s: BenchShape, tile_rows: int, order: str) -> LoraColumns:
    """The LoRA columns of :class:`LoraColumns` for one kernel's tiles of ``tile_rows`` tokens.
    ``order``: ``"routing"`` (the built path: tokens sorted by their experts, slot 0 first),
    ``"tokens"`` (``sort_tokens=False``), or ``"grouped"`` (the ideal: each slot's ``r``
    columns only, as a grouped GEMM would run)."""
    n, k, r = s.num_experts, s.top_k, s.lora_r
    if order == "grouped":
        return LoraColumns((float(r),) * k, float(k * r))
    g = torch.Generator().manual_seed(ROUTING_SEED)
    index = torch.rand(s.tokens, n, generator=g).argsort(dim=1)[:, :k]
    if order == "routing":
        key = index[:, 0] * n + (index[:, 1] if k > 1 else 0)
        index = index[torch.sort(key, stable=True).indices]
    elif order != "tokens":
        raise ValueError(f"order must be 'routing', 'tokens' or 'grouped', got {order!r}")
    # The kernels pad r to R_PAD (the next power of two) and step by LORA_CHUNK.
    r_pad = 1 << (r - 1).bit_length()
    slot = [0.0] * k
    union = 0.0
    tiles = index.split(tile_rows)
    for tile in tiles:
        for j in range(k):
            first = int(tile[:, j].min()) * r_pad // LORA_CHUNK
            end = -(-(int(tile[:, j].max()) + 1) * r_pad // LORA_CHUNK)
            slot[j] += (end - first) * LORA_CHUNK
        chunks = {(int(e) * r_pad + i) // LORA_CHUNK for e in tile.unique()
                  for i in range(0, r_pad, LORA_CHUNK)}
        union += len(chunks) * LORA_CHUNK
    return LoraColumns(tuple(x / len(tiles) for x in slot), union / len(tiles))


def graphmoe_round(s: BenchShape, recompute: bool, order: str = "routing") -> list[Kernel]:
    """One non-final GraphMoE round on the kernels, forward and backward, with the tokens in
    ``order`` (:func:`lora_columns`)."""
    m, d, f, n, k, r, dh = s.tokens, s.d, s.intermediate, s.num_experts, s.top_k, s.lora_r, s.dh
    nr = n * r  # the dense rank-r products (lora_in, b, the down kernel's B_D) run over all
    cols = {name: lora_columns(s, rows, order) for name, rows in TILE_ROWS.items()}

    def deltas(c: LoraColumns) -> float:
        # A slot's gate and up deltas: slot j−1's taken out, slot j's put in (the first: in).
        return sum(2 * gemm(m, f, c.slot[j]) + (2 * gemm(m, f, c.slot[j - 1]) if j else 0)
                   for j in range(k))

    def per_slot(c: LoraColumns, products: int) -> float:
        return products * sum(gemm(m, f, x) for x in c.slot)

    wgu, wd = 2 * d * f * B16, d * f * B16
    act_d, act_f = m * d * B16, m * f * B16
    lora_f = nr * f * B16  # one [n·r, D'] factor
    gru_w = (3 * dh * (dh + d) + d * dh) * B16
    saved_gu = 0 if recompute else 2 * act_f  # G and U kept for backward
    r_pad = 1 << (r - 1).bit_length()

    def tiles(extent: int, name: str, per: dict[str, int]) -> int:
        return -(-extent // per[name])

    fwd = [
        Kernel("router + top-k", gemm(m, n, d), act_d + m * n * B32, ("_router_topk_kernel",)),
        Kernel("lora_in: c·x·[A_G; A_U]ᵀ", gemm(m, 2 * nr, d), act_d + 2 * nr * d * B16,
               ("_lora_in_kernel",)),
        Kernel("gate/up: dual GEMM, k slots' LoRA deltas, SwiGLU, mix, A_D products",
               2 * gemm(m, f, d) + deltas(cols["gate_up"]) + per_slot(cols["gate_up"], 1),
               act_d + wgu + 3 * lora_f + act_f + m * nr * B32 + saved_gu,
               ("_expert_gate_up_kernel", "_a_mix_reduce_kernel"),
               # a_mix: each D' tile adds a [rows, r] partial per slot
               atomics=tiles(f, "gate_up", TILE_COLS) * m * k * r * B32),
        Kernel("down: W_D h_mix + masked B_D", gemm(m, d, f) + gemm(m, d, nr),
               act_f + wd + act_d + m * nr * B32, ("_expert_down_kernel",)),
        Kernel("GRU cell + x + W_g h", gemm(m, 3 * dh, dh + d) + gemm(m, d, dh),
               3 * act_d + gru_w, ("_gru_gates_kernel", "_gru_update_kernel",
                                   "_gru_project_kernel"), between_rounds=True),
    ]
    bwd = [
        Kernel("GRU residual again: the round input x + W_g h rebuilt (the forward's launch)",
               gemm(m, d, dh), 2 * act_d + m * dh * B16 + d * dh * B16,
               ("_gru_project_kernel",), between_rounds=True),
        Kernel("GRU cell backward (recomputed gates)",
               2 * gemm(m, 3 * dh, dh + d) + 2 * gemm(m, 3 * dh, dh + d),
               5 * act_d + 2 * gru_w, ("_gru_bwd_gates_kernel", "_gru_bwd_candidate_kernel",
                                       "_gru_bwd_reset_kernel", "_gru_bwd_input_kernel",
                                       "_gru_bwd_weight_kernel"), between_rounds=True,
               # ∂W_z, ∂W_r, ∂W_o: one full-size add per token group
               atomics=GRU_TOKEN_GROUPS * 3 * dh * (dh + d) * B32),
        Kernel("GRU W_g h backward: ∂W_g, ∂h (torch GEMMs)", 2 * gemm(m, d, dh),
               2 * act_d + 2 * m * dh * B16 + 2 * d * dh * B16, between_rounds=True),
        Kernel("lora_in again: a_gu, and b = c·dy·B_Dᵀ (fp32)",
               gemm(m, 2 * nr, d) + gemm(m, nr, d),
               2 * act_d + 3 * nr * d * B16 + m * 2 * nr * B16 + m * nr * B32,
               ("_lora_in_kernel",)),
        Kernel("dh_base = dy W_D", gemm(m, f, d), act_d + wd + act_f, ("_dh_base_kernel",)),
        Kernel("gate/up backward: G, U (recomputed or read), k slots' LoRA, SwiGLU backward, "
               "dG, dU, dw, d a",
               (2 * gemm(m, f, d) if recompute else 0)
               + deltas(cols["gate_up_backward"])  # the slots' gate and up deltas again
               + per_slot(cols["gate_up_backward"], 3),  # A_Dᵀ b_j; d a_g, d a_u
               # reads x and the weights (recompute) or the saved G, U; writes G, U once when
               # recomputed (for the second kernel), dG, dU and the rank-r results.
               (act_d + wgu + 2 * act_f if recompute else saved_gu) + 3 * lora_f + 3 * act_f
               + 2 * m * nr * B32, ("_gate_up_backward_kernel",),
               # ∂w and d a: each D' tile adds its partial for every (token, slot)
               atomics=tiles(f, "gate_up_backward", TILE_COLS) * m * k * (2 * r_pad + 1) * B32),
        Kernel("gate/up weight gradients: dB_G, dB_U, dA_D (token reductions, the slots' "
               "dgate, dup, h re-derived from G, U)",
               deltas(cols["gate_up_wgrad"])  # the slots' deltas and A_Dᵀ b_j again
               + per_slot(cols["gate_up_wgrad"], 1 + 3),  # and dB_G, dB_U, dA_D
               2 * act_f + act_f + 3 * lora_f + 3 * nr * f * B32 + 2 * m * nr * B32,
               ("_gate_up_wgrad_kernel",),
               # every token tile adds a [chunk, D'] block per chunk its slots' loops visit
               atomics=tiles(m, "gate_up_wgrad", TILE_ROWS) * sum(cols["gate_up_wgrad"].slot)
               * 3 * f * B32),
        Kernel("dx: dG W_G + dU W_U + LoRA A paths, dA_G, dA_U, dB_D",
               2 * gemm(m, d, f) + 2 * gemm(m, d, 2 * cols["dx"].union)
               + gemm(m, cols["dx"].union, d),
               2 * act_f + wgu + 3 * act_d + m * nr * B32, ("_dx_kernel",),
               # ∂A_G, ∂A_U, ∂B_D: a [chunk, d] block per token tile and chunk of the union
               atomics=tiles(m, "dx", TILE_ROWS) * cols["dx"].union * 3 * d * B32),
        Kernel("router backward (softmax, top-k renormalisation, dR, dx; torch)",
               2 * gemm(m, n, d), 2 * act_d),
    ]
    return fwd + bwd


def step_floor(kernels: Sequence[Kernel], gpu: str, rounds: int) -> float:
    """Floor of a ``rounds``-round step: every round's rows ``rounds`` times, the GRU's
    (``between_rounds``) ``rounds − 1`` times; kernels run one after another, so floors add."""
    return sum(x.floor(gpu) * (rounds - x.between_rounds) for x in kernels)


def gpu_spec(device_name: str) -> str | None:
    """The key of ``ALL_GPUS`` for a CUDA device name (``"NVIDIA H100 80GB HBM3"`` → ``"H100"``),
    or None for a GPU without data-sheet figures here."""
    for key in sorted(ALL_GPUS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(word in device_name for word in key.split()):
            return key
    return None


TORCH_OPS = "torch ops (cuBLAS, elementwise, reductions, copies)"


@dataclass(frozen=True)
class KernelGroup:
    """Measured device time of one step against the floor of the rows the same kernels do."""

    name: str  # the kernels, or TORCH_OPS for everything the rows do not name
    rows: tuple[str, ...]  # the roofline rows whose work these kernels do
    calls: float  # per step
    measured_s: float
    floor_s: float
    atomics: float  # bytes of fp32 atomic adds per step (Kernel.atomics), outside the floor

    @property
    def ratio(self) -> float | None:
        return self.measured_s / self.floor_s if self.floor_s and self.calls else None


def _named_by(kernel: str, launches: dict[str, str]) -> str | None:
    """The group of the row launch a profiled kernel name is (the name itself, or the name
    with a specialisation suffix, as older triton releases compile it)."""
    return next((g for n, g in launches.items() if kernel == n or kernel.startswith(n + "_")),
                None)


def compare_kernels(kernels: Sequence[Kernel], gpu: str, rounds: int,
                    measured: dict[str, tuple[float, float]]) -> list[KernelGroup]:
    """Groups a profiled step's device kernels (``name → (calls, seconds)``, one
    ``rounds``-round fwd+bwd step) by the rows that name them, next to those rows' floor on
    ``gpu`` (:func:`step_floor`). Rows naming the same kernel form one group (``_lora_in_kernel``
    runs in forward and backward); every kernel no row names (cuBLAS, torch's elementwise and
    reduction kernels, memsets) goes to the last group, :data:`TORCH_OPS`, against the rows
    that name none."""
    groups: dict[str, list[Kernel]] = {}
    launches: dict[str, str] = {}  # kernel name → its group
    for row in kernels:
        key = next((launches[n] for n in row.launches if n in launches),
                   " + ".join(row.launches) or TORCH_OPS)
        groups.setdefault(key, []).append(row)
        launches.update(dict.fromkeys(row.launches, key))
    groups[TORCH_OPS] = groups.pop(TORCH_OPS, [])
    found: dict[str, list[tuple[float, float]]] = {}
    for name, hit in measured.items():
        found.setdefault(_named_by(name, launches) or TORCH_OPS, []).append(hit)
    return [KernelGroup(key, tuple(r.name for r in rows), sum(c for c, _ in found.get(key, [])),
                        sum(t for _, t in found.get(key, [])), step_floor(rows, gpu, rounds),
                        sum(r.atomics * (rounds - r.between_rounds) for r in rows))
            for key, rows in groups.items()]


def report(shape_name: str = "llama3-8b") -> str:
    s = SHAPES[shape_name]
    dense = dense_round(s)
    lines = [
        f"Shape `{s.name}`: d = {s.d}, D' = {s.intermediate}, n = {s.num_experts}, "
        f"k = {s.top_k}, r = {s.lora_r}, dh = {s.dh}, {s.tokens} tokens, "
        f"{str(s.dtype).removeprefix('torch.')}; one non-final round, forward + backward.",
        "",
        "| kernel | GFLOP | MB moved | MB of fp32 atomics (L2, not in the floor) | A100 floor "
        "| H100 floor |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def row(kernel: Kernel) -> str:
        cells = [kernel.name, f"{kernel.flops / 1e9:.0f}", f"{kernel.bytes / 1e6:.0f}",
                 f"{kernel.atomics / 1e6:.0f}" if kernel.atomics else ""]
        cells += [f"{kernel.floor(g) * 1e3:.2f} ms ({kernel.bound(g)})" for g in GPUS]
        return "| " + " | ".join(cells) + " |"

    def total_row(name: str, kernels: list[Kernel]) -> str:
        # Kernels run one after another: the floor of the sequence is the sum of their floors.
        cells = [name, f"{sum(x.flops for x in kernels) / 1e9:.0f}",
                 f"{sum(x.bytes for x in kernels) / 1e6:.0f}",
                 f"{sum(x.atomics for x in kernels) / 1e6:.0f}"]
        cells += [f"{sum(x.floor(g) for x in kernels) * 1e3:.2f} ms" for g in GPUS]
        return "| " + " | ".join(f"**{c}**" for c in cells) + " |"

    for recompute in (False, True):
        kernels = graphmoe_round(s, recompute)
        label = "recompute_intermediates=" + str(recompute)
        lines.append(f"| *{label}, {ORDERS['routing']}* | | | | | |")
        lines += [row(x) for x in kernels]
        lines.append(total_row(f"GraphMoE round ({label})", kernels))
    lines += [row(x) for x in dense]
    lines.append(total_row("dense SwiGLU MLP, forward + input backward", dense))
    lines.append("")
    lines.append(f"LoRA columns a tile's loops run over, per slot and for the slots' union "
                 f"(of n·r = {s.num_experts * s.lora_r}), uniform routing:")
    for name, rows in TILE_ROWS.items():
        cells = []
        for order in ("routing", "tokens"):
            c = lora_columns(s, rows, order)
            cells.append(f"{order} order " + " / ".join(f"{x:.1f}" for x in c.slot)
                         + f", union {c.union:.1f}")
        lines.append(f"- {name} ({rows}-row tiles): " + "; ".join(cells))
    lines.append("")

    def floor(kernels: list[Kernel], gpu: str) -> float:
        return sum(x.floor(gpu) for x in kernels)

    t = s.num_rounds
    for recompute in (False, True):
        for order, label in ORDERS.items():
            kernels = graphmoe_round(s, recompute, order)
            ratios = [step_floor(kernels, g, t) / (t * floor(dense, g)) for g in GPUS]
            lines.append(
                f"- recompute_intermediates={recompute}, "
                f"{label}: T = {t} rounds at "
                + ", ".join(f"{v:.2f}× ({g})" for v, g in zip(ratios, GPUS, strict=True))
                + f" the floor of {t} × the dense MLP")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return print_shape_report("python -m bench.roofline", __doc__, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
