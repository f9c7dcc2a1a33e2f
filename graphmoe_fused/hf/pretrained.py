"""Whole checkpoints and PEFT: loading a converted model in one call, and PEFT in either order.

Checkpoints. ``model.save_pretrained(dir)`` of a converted model writes every tensor under the
names of design.md §3 and the :class:`GraphMoEConfig` as ``graphmoe_config`` in ``config.json``.
``AutoModelForCausalLM.from_pretrained(dir)`` cannot rebuild that model: it knows nothing of
GraphMoE, drops the GraphMoE tensors as unexpected, and renames keys ending in ``weight_g`` (its
legacy weight-norm rule) before dropping them. :func:`from_pretrained` loads the base part with
transformers, converts with the saved config, then reads the GraphMoE tensors from the checkpoint
files itself, under their saved names, so ``gru.weight_g`` arrives unrenamed.

PEFT. ``peft.get_peft_model`` freezes every parameter it did not add, and ``PeftModel``'s
``save_pretrained`` writes only PEFT's tensors, so a converted model wrapped by plain PEFT would
train and save nothing of GraphMoE. :func:`prepare_peft_model` repairs a ``PeftModel`` holding
GraphMoE layers: the GraphMoE parameters train again and that ``PeftModel``'s ``save_pretrained``
(the one HF ``Trainer`` checkpoints call) also writes them into ``adapter_model.safetensors``,
under the model's own state-dict names, plus ``graphmoe_config.json``. ``PeftModel.from_pretrained``
on a freshly converted base then loads them with PEFT's own tensors. :func:`get_peft_model` is
``peft.get_peft_model`` followed by it; ``apply_graphmoe`` on a ``PeftModel`` calls it itself.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import GraphMoEConfig
from .adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _graphmoe_parameters,
    adapter_metadata,
    check_base_model,
    convert_for,
    copy_into,
    is_peft_model,
    load_adapter,
    load_adapter_config,
    peft_wrapper_names,
    saved_base_model,
    unwrap_peft,
)
from .convert import CONFIG_ATTRIBUTE, MLP_PROJECTIONS, graphmoe_layers, is_converted
from .safetensors_file import open_safetensors

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Checkpoint files of a full model, safetensors first (what save_pretrained writes).
CHECKPOINT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# The name transformers' legacy weight-norm rule gives `weight_g` (should a version ever apply it
# on save as well as on load): accepted as an alias when reading a checkpoint.
_RENAMED_WEIGHT_G = "parametrizations.weight.original0"
# Keyword arguments of from_pretrained that locate files on the Hub (passed to hf_hub_download).
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download")


# --------------------------------------------------------------------------------------- PEFT


def _graphmoe_names_in(model: nn.Module) -> dict[str, nn.Parameter]:
    """GraphMoE parameters under ``model``'s own state-dict names (``base_model.model....`` in a
    ``PeftModel``): the keys PEFT's loader passes through to ``load_state_dict`` unchanged."""
    inner = unwrap_peft(model)
    prefix = next(n for n, m in model.named_modules() if m is inner)
    prefix = f"{prefix}." if prefix else ""
    return {prefix + n: p for n, p in _graphmoe_parameters(inner).items()}


def _check_experts_not_peft_targets(inner: nn.Module) -> None:
    # The experts read gate/up/down_proj.weight directly: a PEFT layer there would be ignored.
    wrapped = peft_wrapper_names(inner)
    hits = [key for key in _expert_projections(inner) if key in wrapped]
    if hits:
        raise _experts_targeted(f"PEFT adapters sit on GraphMoE's frozen base projections "
                                f"({hits[0]}, ...)")


def _expert_projections(inner: nn.Module) -> list[str]:
    return [f"{name}.{proj}" for name in graphmoe_layers(inner) for proj in MLP_PROJECTIONS]


def _experts_targeted(what: str) -> ValueError:
    return ValueError(
        f"{what}: GraphMoE computes its experts from those weights directly, so these adapters "
        "would be ignored. Leave gate_proj/up_proj/down_proj out of the PEFT config's "
        "target_modules (and do not use 'all-linear')."
    )


def _check_peft_config_spares_experts(inner: nn.Module, peft_config) -> None:
    """:func:`_check_experts_not_peft_targets` for a PEFT config not applied yet."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = getattr(peft_config, "target_modules", None)
    for key in _expert_projections(inner):
        if targets == "all-linear" or (targets and check_target_module_exists(peft_config, key)):
            raise _experts_targeted(f"the PEFT config targets GraphMoE's frozen base projections "
                                    f"({key}, ...)")


def prepare_peft_model(model: nn.Module) -> nn.Module:
    """Makes a ``PeftModel`` that holds GraphMoE layers train and save them; returns it.

    * The GraphMoE parameters (router, expert LoRA, GRU, attention LoRA) get ``requires_grad``
      back (PEFT froze everything it did not add), unless the active PEFT config is in inference
      mode, where they are frozen like PEFT's own adapters.
    * ``model.save_pretrained`` (this instance's) writes them too, so a ``PeftModel`` checkpoint
      (also HF ``Trainer``'s) holds the whole trained state; ``PeftModel.from_pretrained`` on a
      base converted with the same config, or :func:`from_pretrained`, restores it bit for bit.

    Idempotent. ``apply_graphmoe`` calls it on the ``PeftModel`` it converts; call it yourself
    after ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` on a converted model (or use
    :func:`get_peft_model` / :func:`from_pretrained`, which do).

    Raises:
        TypeError: ``model`` is not a ``PeftModel``.
        ValueError: it holds no GraphMoE layers, or PEFT targets GraphMoE's base projections.
    """
    if not is_peft_model(model):
        raise TypeError(f"prepare_peft_model expects a peft.PeftModel, got {type(model).__name__}")
    inner = unwrap_peft(model)
    if not is_converted(inner):
        raise ValueError("the PeftModel holds no GraphMoE layers: convert it with apply_graphmoe")
    _check_experts_not_peft_targets(inner)
    active = getattr(model, "active_peft_config", None)
    trainable = not getattr(active, "inference_mode", False)
    for p in _graphmoe_parameters(inner).values():
        p.requires_grad_(trainable)
    if not isinstance(model.__dict__.get("save_pretrained"), types.MethodType):
        # An instance attribute: only this model changes, never PeftModel itself.
        model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)
    return model


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args, **kwargs) -> None:
    """``PeftModel.save_pretrained`` plus the GraphMoE state (installed on a ``PeftModel`` by
    :func:`prepare_peft_model`; callable directly as ``save_pretrained(peft_model, dir)``).

    Arguments are PEFT's. Into every adapter directory PEFT writes, the GraphMoE tensors are added
    to PEFT's weights file under the model's own state-dict names (taken from ``state_dict=``
    when given, as ``Trainer`` does), with the GraphMoE config and base identity in its metadata,
    and ``graphmoe_config.json`` is written beside it.
    """
    peft_save = type(model).save_pretrained
    peft_save(model, save_directory, *args, **kwargs)
    bound = inspect.signature(peft_save).bind(model, save_directory, *args, **kwargs)
    bound.apply_defaults()
    options = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    if not options.get("is_main_process", True):
        return
    config = getattr(unwrap_peft(model), CONFIG_ATTRIBUTE, None)
    if not isinstance(config, GraphMoEConfig):
        return
    state_dict = options.get("state_dict")
    tensors = {}
    for key, param in _graphmoe_names_in(model).items():
        value = state_dict[key] if state_dict is not None and key in state_dict else param
        tensors[key] = value.detach().to("cpu").contiguous()
    metadata = adapter_metadata(model, config)
    for adapter in options.get("selected_adapters") or list(model.peft_config):
        directory = Path(save_directory)
        if adapter != "default":  # PEFT's layout: extra adapters in subdirectories
            directory = directory / adapter
        _add_to_peft_weights(directory, tensors, metadata)
        (directory / CONFIG_NAME).write_text(config.to_json() + "\n", encoding="utf-8")


def _add_to_peft_weights(directory: Path, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str]) -> None:
    safetensors_file, bin_file = (directory / name for name in PEFT_WEIGHTS_NAMES)
    if safetensors_file.is_file():
        with open_safetensors(safetensors_file) as f:
            existing = {k: f.get_tensor(k) for k in f.keys()}
            old_metadata = f.metadata() or {}
        save_file({**existing, **tensors}, str(safetensors_file),
                  metadata={**old_metadata, **metadata})
    elif bin_file.is_file():
        existing = torch.load(bin_file, map_location="cpu", weights_only=True)
        torch.save({**existing, **tensors}, bin_file)
    else:
        raise FileNotFoundError(f"PEFT wrote no adapter weights into {directory}")


def get_peft_model(model: nn.Module, peft_config, *args, **kwargs) -> nn.Module:
    """``peft.get_peft_model`` for a converted model: then :func:`prepare_peft_model`, so that
    the GraphMoE parameters keep training and are saved with PEFT's. On an unconverted model it
    is exactly ``peft.get_peft_model`` (``apply_graphmoe`` on the result prepares it later)."""
    import peft

    inner = unwrap_peft(model)
    if is_converted(inner):  # refused before PEFT wraps (and freezes) anything in place
        _check_peft_config_spares_experts(inner, peft_config)
    peft_model = peft.get_peft_model(model, peft_config, *args, **kwargs)
    if is_converted(unwrap_peft(peft_model)):
        prepare_peft_model(peft_model)
    return peft_model


# -------------------------------------------------------------------------- files and loading


def _resolve(location: str | os.PathLike, filename: str, hf_kwargs: dict[str, Any]) -> str | None:
    """Local path of ``filename`` in a local directory or Hub repository; ``None`` if absent."""
    subfolder = hf_kwargs.get("subfolder") or ""
    if os.path.isdir(location):
        path = os.path.join(location, subfolder, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    kwargs = {k: hf_kwargs[k] for k in _HUB_KWARGS if k in hf_kwargs and k != "subfolder"}
    try:
        return hf_hub_download(str(location), filename, subfolder=subfolder or None, **kwargs)
    except EntryNotFoundError:
        return None


def _checkpoint_files(location, hf_kwargs) -> list[str]:
    for index_name, single_name in CHECKPOINT_FILES:
        index = _resolve(location, index_name, hf_kwargs)
        if index is not None:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
            return [_resolve(location, shard, hf_kwargs) for shard in shards]
        single = _resolve(location, single_name, hf_kwargs)
        if single is not None:
            return [single]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {location}")


def _read_tensors(files: list[str], wanted: set[str]) -> dict[str, torch.Tensor]:
    """The tensors among ``wanted`` (or their weight_g alias) that ``files`` hold, by the
    names in ``wanted``; raw reads, so no transformers renaming applies."""
    aliases = {key[: -len("weight_g")] + _RENAMED_WEIGHT_G: key
               for key in wanted if key.endswith(".weight_g")}
    found: dict[str, torch.Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            with open_safetensors(file) as f:
                for key in f.keys():
                    name = key if key in wanted else aliases.get(key)
                    if name is not None and name not in found:
                        found[name] = f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key, value in state.items():
                name = key if key in wanted else aliases.get(key)
                if name is not None and name not in found:
                    found[name] = value
    return found


def _load_checkpoint_tensors(model: nn.Module, location, hf_kwargs) -> None:
    params = _graphmoe_names_in(model)
    tensors = _read_tensors(_checkpoint_files(location, hf_kwargs), set(params))
    copy_into(params, tensors, f"checkpoint {location}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silences transformers' load report while the base loads: it would list every GraphMoE
    tensor as unexpected; :func:`_load_base` reports what is really wrong itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_base(location, hf_kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            location, output_loading_info=True, **hf_kwargs
        )
    return model, info


def _report_base_loading(location, info: dict[str, Any], graphmoe_keys: set[str]) -> None:
    """Warns about what transformers would have reported, less the GraphMoE tensors (read by
    :func:`_load_checkpoint_tensors`, renamed or not)."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(
        k for k in info.get("unexpected_keys") or ()
        if k not in graphmoe_keys and not k.endswith(_RENAMED_WEIGHT_G)
    )
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        warnings.warn(
            f"loading {location}: base weights missing from the checkpoint (left at their "
            f"initialisation) {missing[:5]}, unexpected {unexpected[:5]}, mismatched "
            f"{mismatched[:5]}",
            UserWarning,
            stacklevel=3,
        )


def _adapter_kind(directory) -> str | None:
    if directory is None or not os.path.isdir(directory):
        return None
    if os.path.isfile(os.path.join(directory, PEFT_CONFIG_NAME)):
        return "peft"
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return "graphmoe"
    return None


def _recorded_base(adapter_dir, kind: str) -> str:
    name = None
    if kind == "peft":
        config = json.loads(Path(adapter_dir, PEFT_CONFIG_NAME).read_text(encoding="utf-8"))
        name = config.get("base_model_name_or_path")
    else:
        with open_safetensors(Path(adapter_dir, WEIGHTS_NAME)) as f:
            name = (saved_base_model(f.metadata()) or {}).get("name_or_path")
    if not name:
        raise ValueError(
            f"the adapter in {adapter_dir} records no base model: "
            "pass it as from_pretrained(base_name_or_path, adapter_dir)"
        )
    return name


def _peft_weights(adapter_dir) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    safetensors_file, bin_file = (Path(adapter_dir, name) for name in PEFT_WEIGHTS_NAMES)
    if safetensors_file.is_file():
        with open_safetensors(safetensors_file) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    return torch.load(bin_file, map_location="cpu", weights_only=True), {}


def _load_peft_adapter(model: nn.Module, adapter_dir, is_trainable: bool) -> nn.Module:
    from peft import PeftModel

    graphmoe_config = None
    if Path(adapter_dir, CONFIG_NAME).is_file():
        graphmoe_config = load_adapter_config(adapter_dir)
        convert_for(model, graphmoe_config)
    if not is_converted(model):
        raise ValueError(
            f"{adapter_dir} is a PEFT adapter without GraphMoE state and the base model is not a "
            "GraphMoE checkpoint: load it with peft.PeftModel.from_pretrained"
        )
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    if graphmoe_config is not None:
        # Read here too: PEFT versions before the structural key mapping (0.17 and older) rename
        # every key holding "lora_" on load, which the expert factors' names do.
        tensors, metadata = _peft_weights(adapter_dir)
        params = _graphmoe_names_in(peft_model)
        copy_into(params, {k: tensors[k] for k in params if k in tensors}, f"adapter {adapter_dir}")
        check_base_model(saved_base_model(metadata), peft_model, str(adapter_dir))
    return prepare_peft_model(peft_model)


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike,
                    adapter_dir: str | os.PathLike | None = None, *, is_trainable: bool = False,
                    **hf_kwargs) -> nn.Module:
    """Loads a converted GraphMoE model in one call.

    ``pretrained_model_name_or_path`` is any of:

    * a checkpoint written by ``save_pretrained`` of a converted model (its ``config.json`` holds
      ``graphmoe_config``): the model is converted with that config and every tensor is loaded,
      bit for bit, ``gru.weight_g`` included;
    * a base model (Hub name or directory), with ``adapter_dir`` naming a GraphMoE adapter
      (:func:`~graphmoe_fused.save_adapter`) or a PEFT adapter saved from a GraphMoE model
      (which returns a ``PeftModel``, prepared by :func:`prepare_peft_model`);
    * an adapter directory alone: the base is the one the adapter recorded.

    ``hf_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``,
    ``revision``...). With ``is_trainable=False`` (as ``PeftModel.from_pretrained``) every
    parameter is frozen, for inference; with ``True`` the adapters (GraphMoE's, and PEFT's if
    any) train and the base stays frozen. An adapter recorded on another base warns.

    Raises:
        ValueError: nothing to convert (a plain base without an adapter), or an adapter that does
            not fit (see :func:`~graphmoe_fused.load_adapter`).
        FileNotFoundError: a checkpoint or adapter file is missing.
    """
    kind = _adapter_kind(adapter_dir)
    if adapter_dir is not None and kind is None:
        raise FileNotFoundError(
            f"{adapter_dir} holds neither {CONFIG_NAME} (a GraphMoE adapter) nor "
            f"{PEFT_CONFIG_NAME} (a PEFT adapter)"
        )
    location = pretrained_model_name_or_path
    if adapter_dir is None and not os.path.isfile(os.path.join(location, "config.json")):
        kind = _adapter_kind(location)
        if kind is not None:
            adapter_dir, location = location, _recorded_base(location, kind)

    model, info = _load_base(location, hf_kwargs)
    saved = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if saved is not None:
        convert_for(model, GraphMoEConfig.from_dict(dict(saved)))
        _load_checkpoint_tensors(model, location, hf_kwargs)
    _report_base_loading(location, info, set(_graphmoe_names_in(model)))
    if saved is None and adapter_dir is None:
        raise ValueError(
            f"{location} is not a GraphMoE checkpoint (its config.json has no graphmoe_config) "
            "and no adapter_dir was given: convert it with apply_graphmoe instead"
        )
    if kind == "peft":
        return _load_peft_adapter(model, adapter_dir, is_trainable)
    if kind == "graphmoe":
        load_adapter(model, adapter_dir)
    model.requires_grad_(False)
    if is_trainable:
        for p in _graphmoe_parameters(model).values():
            p.requires_grad_(True)
    return model
