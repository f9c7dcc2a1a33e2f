"""`GraphMoEAdapterCallback`: the recipe for Hugging Face ``Trainer`` users.

``Trainer`` saves the whole model at each save (the frozen base too, gigabytes for an 8B model,
and no adapter that :func:`graphmoe_fused.load_adapter` reads). This callback writes the adapter
alone next to each of Trainer's checkpoints, and once more at the end of training::

    trainer = Trainer(model=converted_model, args=args, train_dataset=ds,
                      callbacks=[GraphMoEAdapterCallback()])
    trainer.train()   # -> output_dir/checkpoint-N/graphmoe_adapter/, output_dir/graphmoe_adapter/

Pass ``save_only_model=True`` to ``TrainingArguments`` too if the optimizer state is not wanted.
Only the main process writes (``state.is_world_process_zero``). Under FSDP2 (accelerate's
``fsdp_version: 2``) the adapter parameters are sharded DTensors: every process gathers the full
tensors (a collective, so every process runs the callback) and the main one writes them. The base
fingerprint of the metadata is taken when the model is still whole (``on_init_end`` or
``on_train_begin``); a callback that first sees the model sharded records the base's name only.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..hf.adapters import _graphmoe_config_of, save_adapter
from .sharding import (
    full_adapter_state,
    has_sharded_adapter,
    sharded_metadata,
    unsharded_metadata,
    write_adapter,
)

ADAPTER_DIR = "graphmoe_adapter"


class GraphMoEAdapterCallback(TrainerCallback):
    """Saves the GraphMoE adapter (router, expert LoRA, GRU, attention LoRA) at every
    ``Trainer`` save, into ``<checkpoint dir>/graphmoe_adapter``, and at the end of training,
    into ``<output_dir>/graphmoe_adapter`` (or ``final_dir``).

    Args:
        final_dir: where the final adapter goes (``None``: ``args.output_dir/graphmoe_adapter``).
    """

    def __init__(self, final_dir: str | Path | None = None) -> None:
        self.final_dir = Path(final_dir) if final_dir is not None else None
        self.saved: list[Path] = []
        self._metadata: dict[str, str] | None = None  # taken while the model is whole

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model=None, **kwargs) -> None:
        self._remember_metadata(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model=None, **kwargs) -> None:
        self._remember_metadata(model)

    def _remember_metadata(self, model) -> None:
        if self._metadata is not None or model is None:
            return
        model = _unwrap(model)
        try:
            _graphmoe_config_of(model)
        except ValueError:
            return  # not converted (yet): _save says so
        if not has_sharded_adapter(model):
            self._metadata = unsharded_metadata(model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model=None, **kwargs) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._save(model, state, checkpoint / ADAPTER_DIR)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, model=None, **kwargs) -> None:
        self._save(model, state, self.final_dir or Path(args.output_dir) / ADAPTER_DIR)

    def _save(self, model, state: TrainerState, directory: Path) -> None:
        if model is None:
            raise ValueError("GraphMoEAdapterCallback: Trainer passed no model to the callback")
        model = _unwrap(model)
        if has_sharded_adapter(model):  # FSDP2: a collective, on every process
            full = full_adapter_state(model)
            if state.is_world_process_zero:
                write_adapter(model, full, self._metadata or sharded_metadata(model), directory)
                self.saved.append(directory)
        elif state.is_world_process_zero:
            save_adapter(model, directory)
            self.saved.append(directory)


def _unwrap(model):
    # Trainer hands callbacks its model; under DDP or accelerate it may still be wrapped.
    while hasattr(model, "module") and not hasattr(model, "graphmoe_config"):
        model = model.module
    return model
