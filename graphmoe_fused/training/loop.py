"""`train(cfg)`: fine-tune a GraphMoE adapter with our own loop on ``accelerate.Accelerator``.

Run it as is for one process, or under ``accelerate launch`` (DDP, FSDP2) with no change: the
Accelerator picks the set-up up from the launcher. ``fsdp=True`` shards the model with torch's
``fully_shard`` where accelerate's own FSDP2 is not active (on the CPU accelerate has none), see
:mod:`~graphmoe_fused.training.sharding`.

The loss of a step is the token-weighted mean over the whole global batch, whatever the number of
processes and micro-batches: every forward gets ``num_items_in_batch`` = the label tokens of the
global batch (the model's cross-entropy becomes ``sum / num_items_in_batch``, and the GraphMoE
hooks weight the aux term by the micro-batch's share of them, see
:mod:`graphmoe_fused.hf.hooks`), the micro-batches' gradients add up, and each process scales its
loss by the number of processes because DDP (and FSDP's reduce-scatter) averages gradients.
Together with the process-independent micro-batches and dropout seeds of
:mod:`~graphmoe_fused.training.batches`, N processes compute the same step as one, up to the
order of the floating-point sums.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hf.adapters import save_adapter
from ..hf.checkpointing import enable_activation_checkpointing
from ..hf.convert import apply_graphmoe, graphmoe_layers
from ..hf.stats import counts_to_lists, parameter_report, routing_document, routing_statistics
from . import batches as order
from .checkpoint import load_checkpoint, save_checkpoint
from .outputs import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOG_FILE,
    ROUTING_FILE,
    EventLog,
    check_output_dir,
    checkpoint_dirs,
    default_output_dir,
    read_events,
    remove_previous_results,
    write_atomic,
    write_json,
)
from .recipe import RESUMABLE_CHANGES, TrainConfig
from .sharding import (
    full_adapter_state,
    local_base_elements,
    shard_model,
    unsharded_metadata,
    write_adapter,
)

Log = Callable[[str], Any]
BATCH_FIELDS = frozenset({"batch_size", "micro_batch_size"})


@dataclass
class TrainResult:
    """What :func:`train` did. Lists hold one value per optimizer step since the run began (a
    resumed run includes the steps before its checkpoint)."""

    config: TrainConfig
    output_dir: Path
    adapter_path: Path
    steps: int
    losses: list[float]
    aux_losses: list[float]
    aux_losses_per_round: list[list[float]]
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    world_size: int
    eval_accuracy: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


@dataclass
class _Prepared:
    """Everything validated before the output directory is touched."""

    config: TrainConfig
    output_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    features: list[dict[str, list[int]]]
    eval_sets: dict[str, list]
    resume_from: Path | None


def train(cfg: TrainConfig, log: Log = print, *, progress: bool = True,
          on_step: Callable[[dict[str, Any]], Any] | None = None) -> TrainResult:
    """Trains a GraphMoE adapter as ``cfg`` says; returns a :class:`TrainResult`.

    Everything is validated (config, model path, convertibility, data, label tokens, output
    directory) before anything is written; a refusal is a one-line ``ValueError`` /
    ``FileNotFoundError``. ``log`` gets the human-readable lines (main process only);
    ``on_step`` gets each step's log event after the step (and its checkpoint) is done.
    """
    try:
        from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
    except ImportError:
        raise RuntimeError("graphmoe-fused train needs accelerate: pip install "
                           "'graphmoe_fused[train]'") from None

    # No CUDA: processes started by torch.distributed.run / accelerate launch form a gloo group
    # (accelerate only looks for a CPU group when told the run is on the CPU).
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    main = state.is_main_process
    say: Log = log if main else (lambda _line: None)
    prep = _prepare(cfg, state.num_processes, say)
    if prep.config.backend == "triton":  # refused before the output directory is written
        from ..backends.triton import unavailable_reason

        reason = unavailable_reason(state.device)
        if reason is not None:
            raise ValueError(f"backend='triton': {reason}")
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=_mixed_precision(prep.config.mixed_precision),
        # With one round the GRU is never used: DDP must not wait for its gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=prep.config.num_rounds == 1)])
    if accelerator.mixed_precision != "no" and not accelerator.native_amp:
        # accelerate accepts fp16 on a CPU but never autocasts there: a low-precision base
        # would meet fp32 adapters, and an fp32 one would train in fp32 under the fp16 label.
        raise ValueError(f"mixed_precision={accelerator.mixed_precision!r} has no autocast on "
                         f"{accelerator.device.type} (accelerate runs fp16 on a CUDA device "
                         "only); use bf16 or no")
    cfg, out = prep.config, prep.output_dir
    world, rank = accelerator.num_processes, accelerator.process_index
    # accelerate's FSDP2 wraps the model in prepare(); otherwise fsdp=True shards it here.
    accelerate_fsdp = accelerator.distributed_type.value == "FSDP"
    own_fsdp = cfg.fsdp and not accelerate_fsdp and world > 1
    sharded = accelerate_fsdp or own_fsdp
    if cfg.fsdp and world == 1:
        say("fsdp: one process, nothing to shard: the model stays whole")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and \
            not accelerate_fsdp and not own_fsdp:
        # accelerate enables FSDP only for accelerator devices (MULTI_GPU and the like); on a
        # CPU group it keeps DDP without a word.
        say(f"warning: FSDP was asked for but accelerate runs {accelerator.distributed_type.value}"
            " (it has no FSDP on the CPU; --fsdp shards with torch's fully_shard): every process "
            "holds the whole model")
    if accelerate_fsdp and (cfg.resume or cfg.save_every):
        raise ValueError("FSDP does not support resume or save_every yet (no sharded "
                         "checkpoints): drop them or run without FSDP")
    accumulation = cfg.accumulation_steps(world)
    model = prep.model
    dtypes = _training_dtypes(model, autocast=accelerator.native_amp)

    accelerator.wait_for_everyone()  # every process has checked the directory before it fills
    if main:  # validated: from here on we write
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:  # a crashed run must not leave the old adapter beside its config
            remove_previous_results(out)
        if prep.resume_from is None:  # resuming, once the checkpoint has loaded (below)
            write_json(out / CONFIG_FILE, cfg.to_dict())
    accelerator.wait_for_everyone()

    # The base fingerprint of the adapter's metadata reads the whole base: before sharding.
    metadata = unsharded_metadata(model) if sharded else None
    if own_fsdp:
        _shard_from_cpu(model, accelerator.device, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if own_fsdp:  # not accelerate's DDP: only the optimizer goes through prepare
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    layers = list(graphmoe_layers(inner).values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    num_examples = len(prep.features)
    per_epoch = order.steps_per_epoch(num_examples, cfg.batch_size)
    total_steps = _total_steps(cfg, num_examples)
    scheduler = _scheduler(cfg, optimizer.optimizer, total_steps)

    start_step, tokens_before, elapsed_before = 0, 0, 0.0
    history: list[dict[str, Any]] = []
    if prep.resume_from is not None:
        state = load_checkpoint(prep.resume_from, inner, optimizer, scheduler)
        start_step, tokens_before = int(state["step"]), int(state["tokens"])
        elapsed_before = float(state["elapsed_s"])
        _restore_counts(inner, state["routing"], keep=main)
        if main:  # a resume that failed above leaves the run's own settings
            write_json(out / CONFIG_FILE, cfg.to_dict())
        if (out / LOG_FILE).is_file():
            history = [e for e in read_events(out / LOG_FILE)
                       if e.get("event") == "step" and e["step"] <= start_step]
        say(f"resuming from {prep.resume_from} (step {start_step}/{total_steps})")

    events = EventLog(out / LOG_FILE, keep_until_step=start_step if prep.resume_from else None) \
        if main else None
    gm_cfg = cfg.graphmoe_config()
    header = {"world_size": world, "num_layers": len(layers), "num_experts": gm_cfg.num_experts,
              "num_rounds": gm_cfg.num_rounds, "top_k": gm_cfg.top_k, **dtypes}
    if sharded:  # what each process holds of the frozen base (all of it, unsharded)
        local, total = local_base_elements(inner)
        held = accelerator.gather(torch.tensor([local], device=accelerator.device)).cpu()
        header["fsdp"] = {"base_elements": total,
                          "base_elements_per_process": [int(n) for n in held]}
    if events is not None:
        if prep.resume_from is None:
            events.write({"event": "start", "time": _now(), "config": cfg.to_dict(), **header})
        else:
            events.write({"event": "resume", "step": start_step, "time": _now(), **header})
    say(f"{len(layers)} GraphMoE layers; {parameter_report(inner)}; "
        f"{'one process' if world == 1 else accelerator.distributed_type.value}"
        f"{' (FSDP2)' if getattr(accelerator, 'is_fsdp2', False) else ''}"
        f"{' + FSDP2 (torch fully_shard)' if own_fsdp else ''} on {accelerator.device}"
        f", mixed precision {accelerator.mixed_precision}; adapter {dtypes['adapter_dtype']}, "
        f"base {dtypes['base_dtype']}")
    say(f"{num_examples} training examples; {total_steps} steps of {cfg.batch_size} "
        f"({world} process{'es' if world > 1 else ''} × {accumulation} micro-batches of "
        f"{cfg.micro_batch_size}); output: {out}")

    bar = _progress_bar(total_steps, start_step, enabled=progress and main)
    coef = gm_cfg.router_aux_loss_coef
    from ..data import collate, pad_token_id

    pad_id = pad_token_id(prep.tokenizer)

    supervised = [sum(1 for t in f["labels"][1:] if t != -100) for f in prep.features]
    lengths = [sum(f["attention_mask"]) for f in prep.features]
    t_start, tokens = time.perf_counter(), tokens_before
    model.train()
    try:
        for step in range(start_step, total_steps):
            indices = order.step_examples(num_examples, cfg.batch_size, cfg.seed, step)
            n_items = sum(supervised[i] for i in indices)
            micros = order.micro_batches(indices, cfg.micro_batch_size)
            mine = [(j, mb) for j, mb in enumerate(micros) if j % world == rank]
            # on the device: no host sync per micro-batch, one .cpu() per step
            totals = torch.zeros(1 + gm_cfg.num_rounds, dtype=torch.float64,
                                 device=accelerator.device)
            for position, (j, mb) in enumerate(mine):
                batch = collate([prep.features[i] for i in mb], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                torch.manual_seed(order.forward_seed(cfg.seed, step, j))
                last = position == len(mine) - 1
                if own_fsdp:  # reduce-scatter the gradients after the last micro-batch only
                    model.set_requires_gradient_sync(last)
                    sync = accelerator.autocast()  # prepare() does this for its models
                else:
                    sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with sync:
                    # The loss is all we need; the per-round aux losses come from the layers.
                    loss = model(**batch, num_items_in_batch=n_items, return_dict=False)[0]
                    accelerator.backward(loss * world)
                weight = sum(supervised[i] for i in mb) / n_items
                aux_rounds = torch.stack([layer.last_aux_loss.float() for layer in layers])
                aux = aux_rounds.mean().double()  # what the hooks added: mean over layers, rounds
                totals[0] += loss.detach().double() - coef * weight * aux
                totals[1:] += weight * aux_rounds.mean(0).double()
            if world > 1:
                totals = accelerator.reduce(totals, "sum")
            totals = totals.cpu()
            grad_norm = accelerator.clip_grad_norm_(
                trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            lr = scheduler.get_last_lr()[0]
            _check_finite(float(totals[0]), float(grad_norm), step + 1, cfg,
                          scaled=getattr(accelerator, "scaler", None) is not None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            tokens += sum(lengths[i] for i in indices)
            session = time.perf_counter() - t_start
            record = {
                "event": "step", "step": done, "epoch": done / per_epoch,
                "loss": float(totals[0]), "aux_loss": float(totals[1:].mean()),
                "aux_loss_per_round": [float(v) for v in totals[1:]], "lr": float(lr),
                "grad_norm": float(grad_norm), "tokens": tokens,
                "tokens_per_s": (tokens - tokens_before) / max(session, 1e-9),
                "elapsed_s": elapsed_before + session}
            history.append(record)
            counts = None
            if done % cfg.log_every == 0 or done == total_steps:
                counts = _global_counts(accelerator, inner)
            if cfg.save_every and done % cfg.save_every == 0:
                counts = counts if counts is not None else _global_counts(accelerator, inner)
                if main:
                    save_checkpoint(out / CHECKPOINTS_DIR / f"step-{done}", inner, optimizer,
                                    scheduler, {"step": done, "tokens": tokens,
                                                "elapsed_s": record["elapsed_s"],
                                                "routing": counts_to_lists(counts)})
                accelerator.wait_for_everyone()
            if events is not None:
                events.write(record)
                if counts is not None and (done % cfg.log_every == 0 or done == total_steps):
                    events.write({"event": "routing", "step": done, "phase": "train",
                                  "layers": counts_to_lists(counts)})
            _show(bar, say, record, cfg.log_every, total_steps)
            if on_step is not None:
                on_step(record)
    except BaseException:
        if events is not None:
            events.close()  # every event so far is on disk; the checkpoints hold the rest
        raise
    finally:
        bar.close()

    final_counts = _global_counts(accelerator, inner)
    elapsed = elapsed_before + time.perf_counter() - t_start
    # Sharded: every process gathers the full tensors (a collective), the main one writes them.
    full = full_adapter_state(inner) if sharded else None
    if main:
        if full is not None:
            write_atomic(out / ADAPTER_DIR,
                         lambda tmp: write_adapter(inner, full, metadata, tmp))
        else:
            write_atomic(out / ADAPTER_DIR, lambda tmp: save_adapter(inner, tmp))
        write_json(out / ROUTING_FILE, routing_document(
            final_counts, num_experts=gm_cfg.num_experts, num_rounds=gm_cfg.num_rounds,
            top_k=gm_cfg.top_k, phase="train", tokens=tokens))
        say(f"adapter written to {out / ADAPTER_DIR}")
    accelerator.wait_for_everyone()

    with accelerator.autocast():  # the unprepared (own FSDP) model has no autocast of its own
        accuracy = _evaluate(inner, prep, cfg, say)
    if events is not None:
        if accuracy:
            events.write({"event": "eval", "step": total_steps, "files": accuracy,
                          "split": "builtin:" + cfg.builtin_task})
        events.write({"event": "end", "step": total_steps, "adapter": ADAPTER_DIR,
                      "elapsed_s": elapsed})
        events.close()
    accelerator.wait_for_everyone()
    session_tokens = tokens - tokens_before
    return TrainResult(
        config=cfg, output_dir=out, adapter_path=out / ADAPTER_DIR, steps=total_steps,
        losses=[e["loss"] for e in history], aux_losses=[e["aux_loss"] for e in history],
        aux_losses_per_round=[e["aux_loss_per_round"] for e in history], tokens=tokens,
        tokens_per_s=session_tokens / max(elapsed - elapsed_before, 1e-9), elapsed_s=elapsed,
        world_size=world, eval_accuracy=accuracy,
        resumed_from=start_step if prep.resume_from is not None else None)


# --- validation and set-up (nothing written) -------------------------------------------------


def resolve_config(cfg: TrainConfig, say: Log = print) -> TrainConfig:
    """``cfg`` with the built-in preset (no ``model``: the preset's fields the user did not set)
    and, on ``resume``, the saved config of the run (the user's settings must agree with it)."""
    if cfg.resume:
        if cfg.output_dir is None:
            raise ValueError("--resume needs --output-dir: the run to continue")
        saved_file = Path(cfg.output_dir) / CONFIG_FILE
        if not saved_file.is_file():
            raise FileNotFoundError(f"--resume: {saved_file} does not exist (not a training "
                                    "run's output directory)")
        saved = TrainConfig.from_file(saved_file)
        differ = sorted(k for k in cfg.user_set - RESUMABLE_CHANGES
                        if getattr(cfg, k) != getattr(saved, k))
        if differ:
            details = ", ".join(f"{k}={getattr(cfg, k)!r} (the run has {getattr(saved, k)!r})"
                                for k in differ)
            raise ValueError(f"--resume: settings differ from {saved_file}: {details}")
        keep = {k: getattr(cfg, k) for k in cfg.user_set & RESUMABLE_CHANGES}
        return saved.replace(**{**keep, "resume": True, "overwrite": False})
    if cfg.model is None:
        from ..data import BUILTIN_PRESET

        user_set = set(cfg.user_set)
        if user_set & BATCH_FIELDS:  # a batch size and its micro-batch size go together
            user_set |= BATCH_FIELDS
        applied = {k: v for k, v in BUILTIN_PRESET.items() if k not in user_set}
        if applied:
            say("no --model: the built-in tiny model, with its training preset "
                + ", ".join(f"{k}={v}" for k, v in applied.items())
                + " (set a field to override it)")
            cfg = TrainConfig(**{**cfg.to_dict(), **applied}, user_set=cfg.user_set)
    return cfg


def _prepare(cfg: TrainConfig, world: int, say: Log) -> _Prepared:
    cfg = resolve_config(cfg, say)
    cfg.accumulation_steps(world)
    out = Path(cfg.output_dir or _same_everywhere(default_output_dir(), world))
    check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume)
    if cfg.output_dir is None:
        cfg = cfg.replace(output_dir=str(out))

    from ..data import (
        builtin_task,
        encode_example,
        encoded_length,
        label_token_ids,
        load_data_files,
    )
    from ..hf.local_model import check_convertible, load_base_model

    model, tokenizer = load_base_model(cfg.model)  # the built-in base is one fixed model
    check_convertible(model, cfg.model, cfg.graphmoe_config())
    eval_sets: dict[str, list] = {}
    if cfg.data:
        examples = [ex for exs in load_data_files(cfg.data).values() for ex in exs]
    else:
        task = builtin_task(cfg.builtin_task)
        examples, eval_sets = list(task.train), dict(task.eval)
        say(f"data: the built-in task: {task.description}")
    features = [encode_example(tokenizer, ex, cfg.cutoff_len) for ex in examples]
    # Only an example that fills the cutoff can have been cut: only those are encoded again.
    cut = sum(len(f["input_ids"]) == cfg.cutoff_len
              and encoded_length(tokenizer, ex) > cfg.cutoff_len
              for ex, f in zip(examples, features, strict=True))
    if cut:
        say(f"warning: {cut} of {len(features)} training examples are longer than cutoff_len="
            f"{cfg.cutoff_len} tokens: cut there, their ends are not learnt (raise "
            "--cutoff-len to keep them)")
    checked: set[tuple[str, ...]] = set()
    for ex in [*examples, *(e for exs in eval_sets.values() for e in exs)]:
        if ex.choices and ex.choices not in checked:
            try:
                label_token_ids(tokenizer, ex.choices)
            except ValueError as exc:
                raise ValueError(f"{ex.source}: {exc}") from None
            checked.add(ex.choices)
    torch.manual_seed(cfg.seed)  # the adapter's init
    try:
        apply_graphmoe(model, cfg.graphmoe_config())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot convert {cfg.model or 'the built-in model'}: {exc}") from None
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    resume_from = None
    if cfg.resume and (found := checkpoint_dirs(out)):
        done, resume_from = found[-1]
        total = _total_steps(cfg, len(features))
        if done >= total:
            raise ValueError(f"--resume: {resume_from} is at step {done} and the run ends at "
                             f"step {total}: nothing is left to train (set --max-steps above "
                             f"{done})")
    return _Prepared(cfg, out, model, tokenizer, features, eval_sets, resume_from)


def _check_finite(loss: float, grad_norm: float, step: int, cfg: TrainConfig,
                  scaled: bool) -> None:
    """Stops a run whose loss (or, without fp16 loss scaling, whose gradient norm) is not
    finite, before the step updates the weights: what it would write is NaN, and an eval of a
    NaN model picks the first label everywhere, a plausible-looking score. (With fp16 loss
    scaling an infinite gradient is expected now and then: that step is skipped.)"""
    if math.isfinite(loss) and (scaled or math.isfinite(grad_norm)):
        return
    raise RuntimeError(
        f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the step "
        f"was not applied and no adapter is written (checkpoints saved before it are kept). "
        f"Lower the learning rate (learning_rate {cfg.learning_rate:g}) or clip the gradient "
        f"norm (max_grad_norm {cfg.max_grad_norm:g})")


def _total_steps(cfg: TrainConfig, num_examples: int) -> int:
    return cfg.max_steps or cfg.epochs * order.steps_per_epoch(num_examples, cfg.batch_size)


def _shard_from_cpu(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """``--fsdp``: shards ``model`` where it was loaded (the CPU). ``fully_shard`` moves each
    process's shards to ``device`` itself (and :func:`shard_model` what it leaves), so no
    process ever holds the whole base on its device, as ``model.to(device)`` first would."""
    shard_model(model, device, world)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _training_dtypes(model: torch.nn.Module, *, autocast: bool) -> dict[str, str]:
    """Puts ``model`` (converted, not yet sharded or prepared) in the dtypes it trains in;
    returns ``{"adapter_dtype", "base_dtype"}`` for the log.

    A checkpoint loads in its own dtype and the GraphMoE tensors are built in the base's, but
    AdamW on bf16/fp16 weights rounds most updates away: the trainable parameters are kept in
    float32. The frozen base may stay in bf16/fp16 only under autocast (mixed precision), which
    casts both operands of every GEMM; without it the layers refuse mixed dtypes (the LoRA and
    base GEMMs need one dtype), so the base goes to float32 too.
    """
    for p in model.parameters():
        if p.dtype in LOW_PRECISION and (p.requires_grad or not autocast):
            p.data = p.data.float()
    if not autocast:
        for module in model.modules():
            for name, b in module.named_buffers(recurse=False):
                if b is not None and b.dtype in LOW_PRECISION:
                    module._buffers[name] = b.float()

    def names(params) -> str:
        return "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params})) or "none"

    params = list(model.parameters())
    return {"adapter_dtype": names(p for p in params if p.requires_grad),
            "base_dtype": names(p for p in params if not p.requires_grad)}


def _same_everywhere(value: Any, world: int) -> Any:
    """The main process's ``value`` on every process (the default directory is a timestamp)."""
    if world == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _mixed_precision(setting: str) -> str | None:
    if setting != "auto":
        return setting
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # accelerate launch --mixed_precision
        return None
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=total_steps)


def _global_counts(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Routing counts summed over the processes (one all-reduce)."""
    counts = routing_statistics(model)
    if accelerator.num_processes == 1 or not counts:
        return counts
    names = list(counts)
    stacked = torch.stack([counts[n] for n in names]).to(accelerator.device)
    summed = accelerator.reduce(stacked, "sum").cpu()
    return dict(zip(names, summed, strict=True))


def _restore_counts(model: torch.nn.Module, saved: Mapping[str, list], keep: bool) -> None:
    # The checkpoint holds the sum over processes: one process carries it on, the others
    # start from zero, so the next all-reduce gives the same cumulative sum.
    for name, layer in graphmoe_layers(model).items():
        values = torch.tensor(saved[name], dtype=layer.expert_counts.dtype)
        layer.expert_counts.copy_(values if keep else torch.zeros_like(values))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, leave=False)


def _show(bar: Any, say: Log, record: Mapping[str, Any], log_every: int, total: int) -> None:
    bar.set_postfix(loss=f"{record['loss']:.4f}", aux=f"{record['aux_loss']:.4f}",
                    lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False)
    bar.update(1)
    step = record["step"]
    if step % log_every == 0 or step == total:
        rounds = " ".join(f"{v:.4f}" for v in record["aux_loss_per_round"])
        line = (f"step {step:>{len(str(total))}}/{total}  epoch {record['epoch']:.2f}  "
                f"loss {record['loss']:.4f}  aux {record['aux_loss']:.4f} [{rounds}]  "
                f"lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}  "
                f"{record['tokens_per_s']:.0f} tok/s")
        if bar.disable:
            say(line)
        else:
            bar.write(line)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- after the run -------------------------------------------------------------------------------


def _evaluate(model: torch.nn.Module, prep: _Prepared, cfg: TrainConfig,
              say: Log) -> dict[str, float]:
    """The built-in task's eval split, scored as the paper does (every process runs it: under
    FSDP the forward needs them all)."""
    if not prep.eval_sets:
        return {}
    try:
        from ..evaluation.multiple_choice import multiple_choice_accuracy
    except ImportError as exc:
        say(f"eval skipped: {exc}")
        return {}
    accuracy = {}  # multiple_choice_accuracy switches to eval mode and back itself
    for name, examples in prep.eval_sets.items():
        result = multiple_choice_accuracy(model, prep.tokenizer, examples,
                                          batch_size=cfg.eval_batch_size,
                                          cutoff_len=cfg.cutoff_len)
        accuracy[name] = float(result.accuracy)
        say(f"eval {name}: accuracy {result.accuracy:.3f} ({len(examples)} questions)")
    return accuracy
