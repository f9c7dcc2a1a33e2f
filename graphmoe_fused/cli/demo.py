"""A small end-to-end run: a tiny LLaMA built from a config (no download), converted to GraphMoE,
fine-tuned for a few dozen steps on a built-in synthetic task, then evaluated.

The task is copying: ``BOS a1..aL SEP a1..aL`` with digits ``a_i``; the loss is taken on the
copy only. A model that has learnt only which tokens can appear scores ``ln 10 ≈ 2.30``, so a loss
clearly below that means the adapters learnt to copy (the base model is random and frozen: every
bit of it is learnt by the GraphMoE experts, the GRU and the attention LoRA).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backends import resolve_backend
from ..backends.triton import unavailable_reason
from ..config import BACKENDS, GraphMoEConfig
from ..hf.convert import apply_graphmoe
from ..hf.stats import (
    ParameterReport,
    parameter_report,
    reset_routing_statistics,
    routing_fractions,
)
from ..hf.stats import routing_statistics as _routing_statistics

NUM_DIGITS = 10
SEP, BOS, PAD = 10, 11, 12
VOCAB_SIZE = 16
MAX_SEED = 2**64 - 1
# Device types the demo knows how to check for; others (meta, hpu, ...) are refused up front.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps or xpu"


@dataclass
class DemoOptions:
    """Everything the demo can vary (the CLI flags)."""

    steps: int = 40
    rounds: int = 3
    experts: int = 8
    top_k: int = 2
    lora_r: int = 8
    backend: str = "auto"
    seed: int = 0
    device: str = "auto"
    lr: float = 5e-3
    batch_size: int = 32
    seq_len: int = 3
    hidden_size: int = 96
    num_layers: int = 2
    progress: bool = True


@dataclass
class DemoResult:
    """What a run measured; ``workload`` maps layer name to ``[T, n]`` selection fractions."""

    losses: list[float]
    aux_losses: list[float]
    eval_loss: float
    eval_accuracy: float
    report: ParameterReport
    workload: dict[str, torch.Tensor]
    backend: str
    seconds: float


def copy_batch(batch_size: int, seq_len: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of copy examples; the loss sees the copy only.

    Examples get 1..seq_len digits, right-padded, so the padding path (and its exclusion from the
    load-balancing loss and the routing statistics) is exercised.
    """
    width = 2 * seq_len + 2
    ids = torch.full((batch_size, width), PAD, dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=generator)
    digits = torch.randint(0, NUM_DIGITS, (batch_size, seq_len), generator=generator)
    for b, n in enumerate(lengths.tolist()):
        seq = torch.cat([torch.tensor([BOS]), digits[b, :n], torch.tensor([SEP]), digits[b, :n]])
        ids[b, : seq.numel()] = seq
        labels[b, n + 2 : 2 * n + 2] = digits[b, :n]
    mask = (ids != PAD).long()
    return ids.to(device), mask.to(device), labels.to(device)


def build_model(opts: DemoOptions, device: torch.device) -> nn.Module:
    """A seeded tiny ``LlamaForCausalLM`` (fp32), not yet converted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=opts.hidden_size,
        intermediate_size=2 * opts.hidden_size, num_hidden_layers=opts.num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP,
    )
    torch.manual_seed(opts.seed)
    return LlamaForCausalLM(config).to(device)


def _answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    keep = target != -100
    return (predicted[keep] == target[keep]).float().mean().item()


def parse_device(name: str) -> torch.device | None:
    """``None`` for ``"auto"``, else the ``torch.device`` it names (not checked to exist).

    Raises ``ValueError`` for a string torch does not read as a device, or for a device type the
    demo does not run on (see :data:`DEVICE_TYPES`).
    """
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"the demo does not run on {device.type!r} devices: use {DEVICE_CHOICES}")
    return device


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def resolve_device(name: str) -> torch.device:
    """The device the demo runs on: ``"auto"`` is CUDA when present, else the CPU.

    Raises ``ValueError`` when ``name`` is not a device, or names one this machine does not have
    (``cuda`` on a CPU-only torch or without a GPU, ``cuda:3`` with one GPU, ``mps`` off Apple
    silicon). The message is one line and does not repeat ``name`` unless it is the problem.
    """
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                   else f"torch {torch.__version__} sees no CUDA GPU")
            raise ValueError(f"CUDA is not available: {why}; use cpu or auto")
        count = torch.cuda.device_count()
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available on this machine; use cpu or auto")
        count = 1
    else:  # xpu
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ValueError("XPU is not available on this machine; use cpu or auto")
        count = xpu.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{name!r} does not exist: this machine has "
                         f"{_plural(count, device.type + ' device')}, numbered from 0")
    return device


def check_backend(backend: str, device: torch.device) -> None:
    """Raises ``ValueError`` when ``backend`` cannot run on ``device``.

    ``triton`` needs the triton package (published for Linux only) and a CUDA device; on the CPU
    it runs only under the Triton interpreter (``TRITON_INTERPRET=1`` in the environment: slow,
    meant for tests). The other backends run wherever torch does.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend != "triton":
        return
    reason = unavailable_reason(device)
    if reason is not None:
        raise ValueError(reason)


def _describe_backend(backend: str, device: torch.device) -> str:
    """``backend``, and what ``auto`` picks on ``device`` for training and for evaluation."""
    if backend != "auto":
        return backend
    train = resolve_backend(backend, device, needs_grad=True)
    infer = resolve_backend(backend, device, needs_grad=False)
    return f"auto ({train})" if train == infer else f"auto ({train} to train, {infer} to evaluate)"


def check_options(opts: DemoOptions) -> torch.device:
    """Checks every option before anything is built; returns the device to run on.

    Raises ``ValueError`` naming the option and the reason, in one line (the CLI prints it as
    such). The GraphMoE options (experts, top-k, rank, rounds) are ``GraphMoEConfig``'s to check.
    """
    for name in ("steps", "batch_size", "seq_len", "hidden_size", "num_layers"):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    seed = opts.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**64 - 1]")
    lr = opts.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
            math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    try:
        device = resolve_device(opts.device)
    except ValueError as exc:
        raise ValueError(f"device={opts.device!r}: {exc}") from None
    try:
        check_backend(opts.backend, device)
    except ValueError as exc:
        raise ValueError(f"backend={opts.backend!r}: {exc}") from None
    return device


def run_demo(opts: DemoOptions, log: Callable[[str], None] = print) -> DemoResult:
    """Builds, converts, trains and evaluates; ``log`` gets the human-readable lines."""
    start = time.perf_counter()
    device = check_options(opts)
    backend = opts.backend
    cfg = GraphMoEConfig(num_experts=opts.experts, top_k=opts.top_k, lora_r=opts.lora_r,
                         lora_alpha=2 * opts.lora_r, num_rounds=opts.rounds, backend=backend)
    model = apply_graphmoe(build_model(opts, device), cfg)
    report = parameter_report(model)
    log(f"tiny LLaMA: d={opts.hidden_size}, {opts.num_layers} layers, vocab {VOCAB_SIZE} -> "
        f"GraphMoE n={cfg.num_experts} k={cfg.top_k} r={cfg.lora_r} T={cfg.num_rounds} "
        f"backend={_describe_backend(backend, device)} on {device}")
    log(str(report))
    log(f"task: copy up to {opts.seq_len} digits; loss on the copy (ln 10 = {math.log(10):.2f} "
        "is knowing only which tokens appear)")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    # Linear decay to 10%: the last steps settle instead of bouncing at the peak rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - 0.9 * step / max(opts.steps, 1))
    generator = torch.Generator().manual_seed(opts.seed)
    losses, aux_losses = [], []
    model.train()
    bar = tqdm(range(opts.steps), desc="training", disable=not opts.progress, leave=False)
    for step in bar:
        ids, mask, labels = copy_batch(opts.batch_size, opts.seq_len, generator, device)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        aux_losses.append(out.aux_loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{aux_losses[-1]:.3f}")
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == opts.steps:
            line = (f"step {step + 1:3d}/{opts.steps}  loss {losses[-1]:.3f}  "
                    f"aux {aux_losses[-1]:.3f}")
            if opts.progress:
                bar.write(line)
            else:
                log(line)
    bar.close()

    # Workload as the paper measures it (Fig. 4): selections counted during evaluation.
    model.eval()
    reset_routing_statistics(model)
    ids, mask, labels = copy_batch(4 * opts.batch_size, opts.seq_len, generator, device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    workload = {name: routing_fractions(c) for name, c in _routing_statistics(model).items()}
    return DemoResult(
        losses, aux_losses, out.loss.item() - cfg.router_aux_loss_coef * out.aux_loss.item(),
        _answer_accuracy(out.logits, labels), report, workload, backend,
        time.perf_counter() - start,
    )


def format_workload(workload: dict[str, torch.Tensor]) -> list[str]:
    """A small table per layer: one row per round, the fraction of selections each expert got."""
    lines = []
    for name, fractions in workload.items():
        lines.append(name)
        lines.append("           " + " ".join(f"{f'e{i}':>5}" for i in range(fractions.shape[-1])))
        for t, row in enumerate(fractions.tolist()):
            lines.append(f"  round {t + 1}: " + " ".join(f"{v:5.3f}" for v in row))
    return lines
