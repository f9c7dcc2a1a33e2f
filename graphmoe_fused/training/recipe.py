"""`TrainConfig`: every setting of ``graphmoe-fused train``, with the paper's recipe as defaults.

One source of truth for validation: the GraphMoE fields are flat fields of :class:`TrainConfig`
with :class:`~graphmoe_fused.GraphMoEConfig`'s names and defaults, and are validated by building
that config. Values come from three places, later ones winning: the defaults, a YAML/JSON file
(:meth:`TrainConfig.from_sources`), and explicit overrides (the command line's flags).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GraphMoEConfig

_GM = GraphMoEConfig()
# GraphMoEConfig fields exposed by TrainConfig. router_init_std only matters for a fresh init
# and deterministic/recompute_intermediates steer kernels; they are exposed too so a config file
# can say everything a GraphMoEConfig can.
GRAPHMOE_FIELDS = tuple(f.name for f in dataclasses.fields(GraphMoEConfig))
LR_SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
# Fields a --resume run may change without changing the result (or that name the run itself).
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "output_dir", "save_every", "log_every", "eval_batch_size",
     "max_steps"})


@dataclass
class TrainConfig:
    """Settings of one training run.

    Defaults are the paper's recipe (GraphMoE paper §4.4 / Table 4.4, which "strictly follows"
    MixLoRA, Li et al. 2024): cutoff 512, learning rate 2e-4, AdamW, batch 16, 2 epochs, dropout
    0.05, r = 16, alpha = 32, 8 experts, top-2. What the paper leaves open is taken from the
    MixLoRA reference implementation (TUDB-Labs/MoE-PEFT): ``moe_peft/trainer.py`` (AdamW with
    ``weight_decay=0.01``, torch's default betas and eps, no gradient clipping) and
    ``templates/mixlora.json`` (``scheduler_type: "constant"``, ``warmup_steps: 0``). The paper's
    "accumulation steps 8" at batch 16 is micro-batch 2; micro-batches only change memory here
    (the loss is token-weighted over the whole batch), so the default is 4.

    Args:
        model: local Hugging Face checkpoint directory; ``None``: the built-in tiny model (then
            ``BUILTIN_PRESET`` replaces the fields the user did not set).
        data: JSONL training files; empty: the built-in task's train split.
        builtin_task: the built-in task used when ``data`` is empty.
        output_dir: where everything is written; ``None``: ``runs/train-YYYYmmdd-HHMMSS``.
        overwrite: write into a non-empty ``output_dir`` (over our own file names only).
        resume: continue from the newest checkpoint in ``output_dir``.
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps to run; ``None``: ``epochs`` worth.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        lr_schedule: ``constant``, ``linear`` (to 0) or ``cosine`` (to 0), after the warmup.
        warmup_steps: linear warmup from 0 over this many steps.
        cutoff_len: examples are truncated to this many tokens.
        batch_size: examples per optimizer step, over all processes.
        micro_batch_size: examples per forward; accumulation = batch / (micro × processes).
        eval_batch_size: batch size of the final multiple-choice evaluation (paper: 8).
        seed: seeds the adapter init, the data order and the dropout masks.
        max_grad_norm: clip the gradient norm to this; 0: no clipping (MoE-PEFT clips nothing).
        mixed_precision: ``auto`` (bf16 on a CUDA device that has it, else none), ``no``,
            ``bf16``, ``fp16``.
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers.
        fsdp: shard the model with FSDP2 (torch fully_shard): every decoder layer and the root;
            the frozen base is sharded, the GraphMoE tensors are trained (resume and
            save_every are refused under it for now).
        save_every: write a checkpoint every this many steps; 0: only the final adapter.
        log_every: print a log line and a routing event every this many steps.
        num_experts ... deterministic: the :class:`~graphmoe_fused.GraphMoEConfig` fields.
    """

    model: str | None = None
    data: list[str] = field(default_factory=list)
    builtin_task: str = "chain"
    output_dir: str | None = None
    overwrite: bool = False
    resume: bool = False
    epochs: int = 2
    max_steps: int | None = None
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    cutoff_len: int = 512
    batch_size: int = 16
    micro_batch_size: int = 4
    eval_batch_size: int = 8
    seed: int = 42
    max_grad_norm: float = 0.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    save_every: int = 0
    log_every: int = 10
    num_experts: int = _GM.num_experts
    top_k: int = _GM.top_k
    lora_r: int = _GM.lora_r
    lora_alpha: float = _GM.lora_alpha
    lora_dropout: float = _GM.lora_dropout
    num_rounds: int = _GM.num_rounds
    gru_hidden_ratio: float = _GM.gru_hidden_ratio
    router_aux_loss_coef: float = _GM.router_aux_loss_coef
    backend: str = _GM.backend
    gru_candidate_input: str = _GM.gru_candidate_input
    gru_candidate_activation: str = _GM.gru_candidate_activation
    attention_lora: bool = _GM.attention_lora
    attention_lora_r: int | None = _GM.attention_lora_r
    attention_lora_alpha: float | None = _GM.attention_lora_alpha
    router_init_std: float = _GM.router_init_std
    recompute_intermediates: bool = _GM.recompute_intermediates
    deterministic: bool = _GM.deterministic
    # The fields the user set (file or flags); the built-in preset leaves them alone. Built
    # directly in Python, a field counts as set when it differs from its default.
    user_set: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [self.data]
        self.data = [str(p) for p in self.data]
        if not self.user_set:
            self.user_set = frozenset(
                f.name for f in config_fields() if getattr(self, f.name) != _default(f))
        self.validate()

    # --- validation ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field."""
        for name in ("model", "output_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}={value!r} must be a non-empty path or null")
        if not all(isinstance(p, str) and p for p in self.data):
            raise ValueError(f"data={self.data!r} must be a list of file paths")
        from ..data.builtin import BUILTIN_TASKS

        if self.builtin_task not in BUILTIN_TASKS:
            raise ValueError(f"builtin_task={self.builtin_task!r} is not a built-in task; "
                             f"choose from {', '.join(BUILTIN_TASKS)}")
        for name in ("overwrite", "resume", "gradient_checkpointing", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other: pick one")
        for name in ("epochs", "cutoff_len", "batch_size", "micro_batch_size", "eval_batch_size",
                     "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "save_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.fsdp and (self.resume or self.save_every):
            raise ValueError("fsdp does not support resume or save_every yet (no sharded "
                             "checkpoints): drop them or run without fsdp")
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1)
        if self.cutoff_len < 2:
            raise ValueError(f"cutoff_len={self.cutoff_len} must be at least 2 tokens")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        _check_number("learning_rate", self.learning_rate, positive=True)
        _check_number("weight_decay", self.weight_decay)
        _check_number("max_grad_norm", self.max_grad_norm)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} must be one of {MIXED_PRECISIONS}")
        self.graphmoe_config()  # GraphMoEConfig's own checks name the field

    def graphmoe_config(self) -> GraphMoEConfig:
        """The :class:`GraphMoEConfig` of these settings."""
        return GraphMoEConfig(**{name: getattr(self, name) for name in GRAPHMOE_FIELDS})

    def accumulation_steps(self, num_processes: int = 1) -> int:
        """Micro-batches per process per optimizer step; ``ValueError`` when they do not divide."""
        per_step = self.batch_size // self.micro_batch_size
        if per_step % num_processes:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size="
                f"{self.micro_batch_size} × {num_processes} processes")
        return per_step // num_processes

    # --- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (``user_set`` left out)."""
        return {f.name: _plain(getattr(self, f.name)) for f in config_fields()}

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``, which count as set by the user."""
        values = {**self.to_dict(), **changes}
        return TrainConfig(**values, user_set=self.user_set | frozenset(changes))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Settings from a mapping; an unknown key is a ``ValueError`` naming it and ``source``."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a mapping of settings, got "
                             f"{type(values).__name__}")
        known = {f.name for f in config_fields()}
        for key in values:
            if key not in known:
                raise ValueError(f"{source}: unknown key {key!r} (known keys: "
                                 f"{', '.join(sorted(known))})")
        try:
            return cls(**dict(values), user_set=frozenset(values))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Settings from a YAML or JSON file (``.json``: JSON; anything else: YAML)."""
        return cls.from_dict(read_config_file(path), str(path))

    @classmethod
    def from_sources(cls, path: str | Path | None = None,
                     overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """Defaults < the file at ``path`` < ``overrides`` (e.g. the command line's flags).

        Raises:
            ValueError: a bad key or value in the file (one the overrides do not replace).
            OverrideError: the overrides make the settings invalid.
        """
        values = dict(read_config_file(path)) if path is not None else {}
        overrides = dict(overrides or {})
        try:
            cfg = cls.from_dict({**values, **overrides},
                                "command line" if path is None else f"{path} + flags")
        except ValueError as exc:
            if path is not None:  # a bad key or value in the file itself, named as such
                cls.from_dict({k: v for k, v in values.items() if k not in overrides}, str(path))
            raise OverrideError(str(exc)) from None
        if path is not None and "data" not in overrides:
            for data_file in cfg.data:
                if not Path(data_file).exists():
                    raise ValueError(
                        f"{path}: data file {data_file!r} does not exist (a relative path in a "
                        f"config file is taken from the directory you run in, {Path.cwd()}, "
                        "as on the command line)")
        return cfg


class OverrideError(ValueError):
    """A setting given over the defaults and the file (a command-line flag) is refused."""


def config_fields() -> tuple[dataclasses.Field, ...]:
    """The settings (every field but ``user_set``)."""
    return tuple(f for f in dataclasses.fields(TrainConfig) if f.name != "user_set")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML/JSON config file; one-line errors naming the file."""
    from ..data.records import read_text_file, unique_keys

    path = Path(path)
    text = read_text_file(path, "config file")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text, object_pairs_hook=unique_keys)
        else:
            values = _yaml_load(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        # PyYAML names the text it read as '"<unicode string>"'; the path is named already.
        message = " ".join(str(exc).replace(' in "<unicode string>",', " at").split())
        raise ValueError(f"{path}: not valid YAML: {message}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level, got "
                         f"{type(values).__name__}")
    return values


# YAML 1.1, which PyYAML reads, has no float without a dot: it reads 1e-3 (how the README and
# most configs write a learning rate) as a string. YAML 1.2's float forms are added.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


def _yaml_load(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # PyYAML keeps the last of a key given twice, silently.
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT,
                                 list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"{name}={value!r} must be a finite number {'>' if positive else '>='} 0")
