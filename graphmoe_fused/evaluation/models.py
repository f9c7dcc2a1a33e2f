"""The two models of an evaluation: the base as loaded, and the base with a GraphMoE adapter.

``--adapter`` may name three layouts, told apart by their files:

* ``adapter``: a GraphMoE adapter directory (``graphmoe_config.json`` and
  ``graphmoe_adapter.safetensors``, as :func:`~graphmoe_fused.save_adapter` writes it), loaded
  onto the base with :func:`~graphmoe_fused.load_adapter` (which converts it);
* a training output directory holding such an adapter in ``adapter/`` (``graphmoe-fused
  train``'s layout): the same;
* ``checkpoint``: a ``save_pretrained`` directory of a converted model (its ``config.json`` has
  ``graphmoe_config``), loaded whole with :func:`~graphmoe_fused.from_pretrained`.

An adapter is checked against the base before anything is evaluated, on a weightless
(``meta``-device) copy of the base's architecture, so a misfit is refused at once rather than
after the base column has been computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import GraphMoEConfig
from ..hf.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_base_identity,
    adapter_state_dict,
    base_model_mismatch,
    load_adapter,
    load_adapter_config,
)
from ..hf.convert import CONFIG_ATTRIBUTE, apply_graphmoe, graphmoe_layers
from ..hf.pretrained import PEFT_CONFIG_NAME, from_pretrained
from ..hf.safetensors_file import open_safetensors

TRAINING_ADAPTER_SUBDIR = "adapter"


@dataclass(frozen=True)
class AdapterSource:
    """Where the converted model comes from: ``kind`` is ``"adapter"`` or ``"checkpoint"``."""

    kind: str
    path: Path


def _is_checkpoint(directory: Path) -> bool:
    import json

    config = directory / "config.json"
    if not config.is_file():
        return False
    try:
        return CONFIG_ATTRIBUTE in json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False


def resolve_adapter(path: str | Path) -> AdapterSource:
    """The layout of ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` is missing or holds none of the layouts.
        ValueError: it is a PEFT adapter (not supported by the evaluation).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if (directory / CONFIG_NAME).is_file():
        return AdapterSource("adapter", directory)
    if (directory / TRAINING_ADAPTER_SUBDIR / CONFIG_NAME).is_file():
        return AdapterSource("adapter", directory / TRAINING_ADAPTER_SUBDIR)
    if _is_checkpoint(directory):
        return AdapterSource("checkpoint", directory)
    if (directory / PEFT_CONFIG_NAME).is_file():
        raise ValueError(f"{path} is a PEFT adapter; the evaluation loads GraphMoE adapters "
                         "(graphmoe_fused.save_adapter) and save_pretrained checkpoints")
    raise FileNotFoundError(
        f"{path} holds no GraphMoE adapter ({CONFIG_NAME}), no {TRAINING_ADAPTER_SUBDIR}/ "
        "subdirectory from training and no save_pretrained checkpoint of a converted model"
    )


def _skeleton(model: nn.Module) -> nn.Module | None:
    """A weightless copy of ``model``'s architecture, or ``None`` if it cannot be built so."""
    try:
        with torch.device("meta"):
            return type(model)(model.config)
    except Exception:  # noqa: BLE001 - only a shortcut: load_adapter checks again for real
        return None


def _check_shapes(skeleton: nn.Module, saved: GraphMoEConfig, directory: str | Path,
                  weights: Path) -> None:
    try:
        apply_graphmoe(skeleton, GraphMoEConfig.from_dict({**saved.to_dict(),
                                                           "backend": "reference"}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the adapter in {directory} cannot be applied to this model: "
                         f"{exc}") from None
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(skeleton).items()}
    with open_safetensors(weights) as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the adapter in {directory} does not fit this model's architecture: "
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:2]})"
        )
    for key, shape in found.items():
        if shape != expected[key]:
            raise ValueError(
                f"the adapter in {directory} does not fit this model's architecture: {key} has "
                f"shape {shape}, the model expects {expected[key]}"
            )


def check_adapter_fits(model: nn.Module, directory: str | Path,
                       allow_other_base: bool = False) -> GraphMoEConfig:
    """Raises ``ValueError`` (one line) unless the adapter in ``directory`` loads onto
    ``model``'s architecture: the model must convert with the adapter's config and the adapter's
    tensors must be exactly the converted model's, shape for shape; and, unless
    ``allow_other_base``, the adapter must not record another base (its weights' fingerprint).
    Returns the saved config."""
    saved = load_adapter_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    skeleton = _skeleton(model)
    if skeleton is not None:
        _check_shapes(skeleton, saved, directory, weights)
    if not allow_other_base:
        problem = base_model_mismatch(adapter_base_identity(directory), model, str(directory))
        if problem is not None:
            raise ValueError(f"{problem}; pass --allow-other-base to evaluate it anyway")
    return saved


def check_checkpoint_base(model: nn.Module, directory: str | Path) -> None:
    """Raises ``ValueError`` (one line) unless the converted checkpoint in ``directory`` holds
    ``model``'s base. Its column runs the checkpoint's own base weights and the base column
    ``model``'s: two bases would set two different models side by side. The input embeddings
    decide (one tensor read), equal to the coarser dtype's rounding."""
    from ..hf.pretrained import _checkpoint_files, _read_tensors

    mine = model.get_input_embeddings().weight.detach()
    name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    saved = _read_tensors(_checkpoint_files(str(directory), {}), {name}).get(name)
    if saved is not None and saved.shape == mine.shape:
        eps = max(torch.finfo(saved.dtype).eps, torch.finfo(mine.dtype).eps)
        if torch.allclose(mine.float().cpu(), saved.float(), rtol=eps, atol=0.0):
            return
    raise ValueError(
        f"the checkpoint {directory} holds another base model than --model's (their input "
        f"embeddings {name} differ): its column would run its own base, the base column this "
        "one; pass the base it was converted from as --model, --no-base, or "
        "--allow-other-base to compare them anyway")


def _configs(model: nn.Module) -> list[GraphMoEConfig]:
    found = [getattr(model, CONFIG_ATTRIBUTE, None)]
    found += [layer.config for layer in graphmoe_layers(model).values()]
    return [c for c in found if isinstance(c, GraphMoEConfig)]


def _relay(caught: list[warnings.WarningMessage], warn: Callable[[str], None]) -> None:
    for record in caught:
        warn(" ".join(str(record.message).split()))


def convert_with_adapter(model: nn.Module, source: AdapterSource, *, backend: str = "auto",
                         warn: Callable[[str], None] | None = None,
                         **hf_kwargs) -> nn.Module:
    """The converted model of ``source``: ``model`` itself converted in place with the adapter
    (kind ``"adapter"``), or the checkpoint loaded whole (kind ``"checkpoint"``, ``hf_kwargs``
    going to ``from_pretrained``; ``model`` is then unused). Warnings raised while loading (an
    adapter trained on another base) go to ``warn`` as one line each; without ``warn`` they
    are issued as usual. The result is frozen and in eval mode."""
    with warnings.catch_warnings(record=warn is not None) as caught:
        if warn is not None:
            warnings.simplefilter("always")
        if source.kind == "adapter":
            converted = load_adapter(model, source.path, backend=backend)
        else:
            converted = from_pretrained(str(source.path), local_files_only=True, **hf_kwargs)
            # A runtime field (as load_adapter's override): the checkpoint may name a backend
            # this machine lacks (triton, saved on a GPU).
            for config in {id(c): c for c in _configs(converted)}.values():
                config.backend = backend
    if warn is not None:
        _relay(caught or [], warn)
    converted.requires_grad_(False)
    return converted.eval()
