"""Saving and loading the GraphMoE adapter alone: the tensors GraphMoE added (router, expert LoRA,
GRU, attention LoRA) as safetensors, and the :class:`GraphMoEConfig` as JSON. The base model's
weights are never written: they come from the base checkpoint, so the adapter also records which
base it was trained on (name and a weight fingerprint) and loading it onto another base warns.

Models wrapped by PEFT are handled here too: names are *canonical* (as in the unwrapped Hugging
Face model, with PEFT's ``base_layer`` / ``original_module`` hops removed), so an adapter saved
from a ``PeftModel`` loads into a plain converted model and the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import GraphMoEConfig
from ..layer import GraphMoEMLP
from ..version import __version__
from .attention_lora import LoRALinear
from .convert import CONFIG_ATTRIBUTE, apply_graphmoe, is_converted
from .safetensors_file import open_safetensors

WEIGHTS_NAME = "graphmoe_adapter.safetensors"
CONFIG_NAME = "graphmoe_config.json"
# safetensors metadata key of the base model's identity (a JSON object, see base_model_identity).
BASE_MODEL_KEY = "graphmoe_base_model"
FINGERPRINT_VERSION = 1
# Strided values read from every base tensor, and how many tensors keep theirs in the clear (to
# compare bases held in different precisions, where the hash of the values cannot match).
SAMPLES_PER_TENSOR = 8
KEPT_SAMPLE_TENSORS = 16
# Fields that only steer how a layer runs or trains; an adapter loads whatever they are.
RUNTIME_FIELDS = frozenset(
    {"backend", "recompute_intermediates", "lora_dropout", "router_aux_loss_coef",
     "router_init_std", "deterministic"}
)
# Module attributes through which PEFT wrappers hold the module they wrap.
_PEFT_WRAPPED = ("base_layer", "original_module")


class _PeftTypes(NamedTuple):
    peft_model: tuple[type, ...]
    tuner_layer: tuple[type, ...]
    auxiliary: tuple[type, ...]


def _peft_types() -> _PeftTypes | None:
    """PEFT's wrapper classes, or ``None`` when peft was never imported.

    A model can only hold PEFT modules if peft is in ``sys.modules``, so peft (optional, slow to
    import) is never imported here on behalf of a model that cannot contain it.
    """
    if "peft" not in sys.modules:
        return None
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    wrappers: list[type] = [PeftModel]
    try:
        from peft import PeftMixedModel
        wrappers.append(PeftMixedModel)
    except ImportError:
        pass
    try:  # peft >= 0.15 generalised ModulesToSaveWrapper into AuxiliaryTrainingWrapper
        from peft.utils.other import AuxiliaryTrainingWrapper as auxiliary
    except ImportError:
        try:
            from peft.utils.other import ModulesToSaveWrapper as auxiliary
        except ImportError:
            auxiliary = None
    return _PeftTypes(tuple(wrappers), (BaseTunerLayer,), (auxiliary,) if auxiliary else ())


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (or ``PeftMixedModel``)."""
    peft = _peft_types()
    return peft is not None and isinstance(model, peft.peft_model)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a ``PeftModel``; any other module unchanged."""
    return model.get_base_model() if is_peft_model(model) else model


def peft_wrapper_names(model: nn.Module) -> dict[str, str]:
    """``{module name: "tuner" | "auxiliary"}`` of the PEFT layers inside ``model``."""
    peft = _peft_types()
    if peft is None:
        return {}
    found = {}
    for name, module in model.named_modules():
        if peft.auxiliary and isinstance(module, peft.auxiliary):
            found[name] = "auxiliary"
        elif isinstance(module, peft.tuner_layer):
            found[name] = "tuner"
    return found


def _classify(name: str, wrappers: dict[str, str]) -> tuple[str, bool]:
    """``(canonical name, owned by PEFT)`` of the parameter ``name`` of an unwrapped model.

    A PEFT layer at ``p`` keeps the module it wraps at ``p.base_layer`` (tuner layers) or
    ``p.original_module`` (modules_to_save): those hops are removed; anything else under ``p``
    (``p.lora_A.default.weight``, ``p.modules_to_save.default...``) belongs to PEFT.
    """
    if not wrappers:
        return name, False
    parts, kept, owned = name.split("."), [], False
    for i, part in enumerate(parts):
        parent = ".".join(parts[:i])
        if parent in wrappers and i > 0:
            if part in _PEFT_WRAPPED:
                continue
            owned = True
        kept.append(part)
    return ".".join(kept), owned


def _graphmoe_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """GraphMoE-added parameters of ``model`` (unwrapped) under their actual names."""
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, GraphMoEMLP):
            base = {f"{proj}.{p}" for proj in ("gate_proj", "up_proj", "down_proj")
                    for p, _ in getattr(module, proj).named_parameters()}
            found.update((prefix + n, p) for n, p in module.named_parameters() if n not in base)
        elif isinstance(module, LoRALinear):
            found.update({prefix + "lora_A": module.lora_A, prefix + "lora_B": module.lora_B})
    return found


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The GraphMoE-added parameters of ``model`` by canonical name: the ``state_dict`` name in the
    unwrapped Hugging Face model, as if no PEFT layer were there (see :func:`unwrap_peft`)."""
    inner = unwrap_peft(model)
    wrappers = peft_wrapper_names(inner)
    return {_classify(n, wrappers)[0]: p for n, p in _graphmoe_parameters(inner).items()}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters inside ``model`` by canonical name: everything neither GraphMoE
    nor PEFT added (whatever their ``requires_grad``)."""
    inner = unwrap_peft(model)
    wrappers = peft_wrapper_names(inner)
    added = {id(p) for p in _graphmoe_parameters(inner).values()}
    base = {}
    for name, p in inner.named_parameters():
        canonical, peft_owned = _classify(name, wrappers)
        if not peft_owned and id(p) not in added:
            base[canonical] = p
    return base


def _samples(t: torch.Tensor) -> torch.Tensor:
    """``SAMPLES_PER_TENSOR`` evenly strided values of ``t`` as float64 on the CPU (exact for
    every floating dtype up to float64)."""
    flat = t.detach().reshape(-1)
    count = min(SAMPLES_PER_TENSOR, flat.numel())
    if count == 0:
        return torch.zeros(0, dtype=torch.float64)
    index = torch.linspace(0, flat.numel() - 1, count).round().long().to(flat.device)
    return flat.index_select(0, index).to(device="cpu", dtype=torch.float64)


def base_model_fingerprint(model: nn.Module) -> dict[str, Any] | None:
    """A fingerprint of the frozen base weights inside ``model`` (GraphMoE and PEFT tensors left
    out), or ``None`` when they are not materialised (meta device) or cannot be read.

    ``structure`` hashes every ``(canonical name, shape)``; ``values`` hashes every ``(name,
    dtype, strided samples)``; ``samples`` keeps the samples of a few tensors in the clear, so that
    the same base in another precision can still be recognised (see :func:`same_base`). Reading
    a few values per tensor keeps this cheap for multi-billion-parameter models.
    """
    tensors = base_state_dict(model)
    if not tensors or any(t.is_meta for t in tensors.values()):
        return None
    structure, values = hashlib.sha256(), hashlib.sha256()
    names = sorted(tensors)
    kept = set(names[:: max(1, -(-len(names) // KEPT_SAMPLE_TENSORS))])
    samples, dtypes = {}, set()
    try:
        for name in names:
            t = tensors[name]
            structure.update(f"{name}:{tuple(t.shape)}\n".encode())
            sample = _samples(t)
            values.update(f"{name}:{t.dtype}\n".encode())
            values.update(sample.numpy().tobytes())
            dtypes.add(str(t.dtype).removeprefix("torch."))
            if name in kept:
                samples[name] = sample.tolist()
    except (RuntimeError, TypeError, NotImplementedError):  # sharded or otherwise unreadable
        return None
    return {
        "version": FINGERPRINT_VERSION,
        "tensors": len(names),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted(dtypes),
        "structure": "sha256:" + structure.hexdigest(),
        "values": "sha256:" + values.hexdigest(),
        "samples": samples,
    }


def base_model_identity(model: nn.Module) -> dict[str, Any]:
    """``{"name_or_path", "fingerprint"}`` of the base model inside ``model``: what an adapter
    records so that loading it onto another base can be noticed."""
    inner = unwrap_peft(model)
    name = getattr(inner, "name_or_path", None) or getattr(
        getattr(inner, "config", None), "_name_or_path", None
    )
    return {"name_or_path": name or None, "fingerprint": base_model_fingerprint(inner)}


def _resolution(dtypes: list[str]) -> float:
    """Relative rounding step of the coarsest floating dtype named in ``dtypes``."""
    found = [getattr(torch, d, None) for d in dtypes]
    eps = [torch.finfo(d).eps for d in found if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(eps, default=0.0)


def same_base(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> bool | None:
    """Whether two fingerprints describe the same base weights; ``None`` when undecidable (one is
    missing or of an unknown version).

    Same dtypes: the value hashes decide, bit for bit. Different dtypes (an adapter trained on a
    float32 base, loaded onto its bfloat16 copy): the kept samples must agree to the coarser
    precision's rounding.
    """
    if not saved or not current or saved.get("version") != FINGERPRINT_VERSION:
        return None
    if saved.get("structure") != current.get("structure"):
        return False
    if saved.get("values") == current.get("values"):
        return True
    if saved.get("dtypes") == current.get("dtypes"):
        return False
    eps = max(_resolution(saved.get("dtypes", [])), _resolution(current.get("dtypes", [])))
    theirs, ours = saved.get("samples", {}), current.get("samples", {})
    if not theirs or set(theirs) != set(ours):
        return None
    for name, values in theirs.items():
        for a, b in zip(values, ours[name], strict=True):
            if abs(a - b) > eps * max(abs(a), abs(b)) + 1e-30:
                return False
    return True


def _short(identity: dict[str, Any]) -> str:
    fingerprint = identity.get("fingerprint") or {}
    digest = fingerprint.get("values", "no fingerprint")
    return f"{identity.get('name_or_path') or 'an unnamed model'} ({digest[:19]})"


def base_model_mismatch(saved: dict[str, Any] | None, model: nn.Module,
                        source: str) -> str | None:
    """Why the adapter from ``source`` (trained on ``saved``, a :func:`base_model_identity`)
    does not belong on ``model``'s base, in one sentence; ``None`` when it does or nothing can
    tell (adapters that recorded no identity). The fingerprints decide when both exist;
    otherwise two different recorded names do."""
    if not saved:
        return None
    current = base_model_identity(model)
    verdict = same_base(saved.get("fingerprint"), current["fingerprint"])
    if verdict is None:
        names = saved.get("name_or_path"), current["name_or_path"]
        verdict = None if not all(names) else names[0] == names[1]
    if verdict is not False:
        return None
    return (f"the GraphMoE adapter {source} was trained on base model {_short(saved)} but is "
            f"being loaded onto {_short(current)}, whose weights differ: the adapter will not "
            "compute what it was trained to")


def adapter_base_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    """The base identity recorded in the adapter directory ``path`` (``None``: none recorded)."""
    with open_safetensors(Path(path) / WEIGHTS_NAME) as f:
        return saved_base_model(f.metadata())


def check_base_model(saved: dict[str, Any] | None, model: nn.Module, source: str) -> None:
    """Warns (``UserWarning``) when :func:`base_model_mismatch` finds one."""
    problem = base_model_mismatch(saved, model, source)
    if problem is not None:
        warnings.warn(f"{problem}. Load it onto the base it was trained on.", UserWarning,
                      stacklevel=3)


def _graphmoe_config_of(model: nn.Module) -> GraphMoEConfig:
    config = getattr(unwrap_peft(model), CONFIG_ATTRIBUTE, None)
    if not isinstance(config, GraphMoEConfig) or not is_converted(model):
        raise ValueError(
            f"{type(model).__name__} is not a GraphMoE model; convert it with apply_graphmoe first"
        )
    return config


def adapter_metadata(model: nn.Module, config: GraphMoEConfig,
                     identity: dict[str, Any] | None = None) -> dict[str, str]:
    """The safetensors metadata of an adapter file: version, config and base identity
    (``identity``, or :func:`base_model_identity` of ``model`` when ``None``)."""
    identity = base_model_identity(model) if identity is None else identity
    return {"format": "pt", "graphmoe_fused_version": __version__,
            "graphmoe_config": config.to_json(),
            BASE_MODEL_KEY: json.dumps(identity, sort_keys=True)}


def write_adapter_files(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str], config: GraphMoEConfig) -> Path:
    """Writes the adapter files from precomputed parts: ``tensors`` (canonical names, plain
    tensors; moved to the CPU here) with ``metadata`` (:func:`adapter_metadata`) as
    ``path/graphmoe_adapter.safetensors``, and ``config`` as ``path/graphmoe_config.json``.
    The one writer behind :func:`save_adapter` and the sharded (FSDP) saves. Returns the
    directory."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
    (directory / CONFIG_NAME).write_text(config.to_json() + "\n", encoding="utf-8")
    return directory


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes ``path/graphmoe_adapter.safetensors`` and ``path/graphmoe_config.json``.

    Tensors are stored under canonical names (a ``PeftModel`` saves the same names as the plain
    converted model), and the metadata records the base model's identity
    (:func:`base_model_identity`). Returns the directory.

    Raises:
        ValueError: ``model`` is not a converted model.
    """
    config = _graphmoe_config_of(model)
    return write_adapter_files(path, adapter_state_dict(model), adapter_metadata(model, config),
                               config)


def load_adapter_config(path: str | os.PathLike) -> GraphMoEConfig:
    """The :class:`GraphMoEConfig` saved in adapter directory ``path``."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a GraphMoE adapter directory")
    return GraphMoEConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))


def saved_base_model(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    """The base identity recorded in an adapter file's metadata (``None`` in old adapters)."""
    raw = (metadata or {}).get(BASE_MODEL_KEY)
    if not raw:
        return None
    try:
        identity = json.loads(raw)
    except ValueError:
        return None
    return identity if isinstance(identity, dict) else None


def _check_same_architecture(model_config: GraphMoEConfig, saved: GraphMoEConfig) -> None:
    have, want = model_config.to_dict(), saved.to_dict()
    differ = sorted(k for k in want if k not in RUNTIME_FIELDS and have.get(k) != want[k])
    if differ:
        details = ", ".join(f"{k}: model {have.get(k)!r} vs adapter {want[k]!r}" for k in differ)
        raise ValueError(f"the model was converted with a different GraphMoEConfig ({details})")


def convert_for(model: nn.Module, saved: GraphMoEConfig, **config_overrides) -> GraphMoEConfig:
    """Converts ``model`` with ``saved`` (``config_overrides`` replacing fields) unless it is
    converted already, in which case its architecture fields must equal ``saved``'s."""
    if not is_converted(model):
        config = GraphMoEConfig.from_dict({**saved.to_dict(), **config_overrides})
        apply_graphmoe(model, config)
        return config
    if config_overrides:
        raise ValueError("config_overrides apply only when load_adapter converts the model")
    config = getattr(unwrap_peft(model), CONFIG_ATTRIBUTE, None)
    if not isinstance(config, GraphMoEConfig):
        raise ValueError("the model holds GraphMoE layers but no graphmoe_config")
    _check_same_architecture(config, saved)
    return config


def _summary(keys: list[str]) -> str:
    return f"{keys[:5]}{'...' if len(keys) > 5 else ''} ({len(keys)})"


def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
              source: str) -> None:
    """Copies ``tensors`` into ``params`` in place (cast to each parameter's dtype and device)
    once every key and shape is known to match, so a refused load changes nothing."""
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{source} keys do not match the model: missing {_summary(missing)}, "
            f"unexpected {_summary(unexpected)}"
        )
    for key, tensor in tensors.items():
        if tensor.shape != params[key].shape:
            raise ValueError(
                f"{source} tensor {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[key].shape)}"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor.to(device=params[key].device, dtype=params[key].dtype))


def load_adapter(model: nn.Module, path: str | os.PathLike, **config_overrides) -> nn.Module:
    """Loads an adapter saved by :func:`save_adapter` into ``model`` and returns it.

    An unconverted model (a ``PeftModel`` too) is first converted with the saved config
    (``config_overrides``, e.g. ``backend="reference"``, replace fields of it); a converted one
    must have been converted with the same architecture fields. Keys and shapes must match
    exactly; values are cast to each parameter's dtype and device and copied in place (optimizers
    keep their references). Nothing is copied unless every key and shape matches; a model that
    this call converted stays converted (with fresh adapters) when the check then fails.

    Warns (``UserWarning``) when the adapter recorded a base model whose fingerprint differs from
    ``model``'s base weights; adapters saved before fingerprints existed load without a check.

    Raises:
        FileNotFoundError: ``path`` lacks the adapter files.
        ValueError: differing config, missing or unexpected keys, or a shape mismatch.
    """
    saved = load_adapter_config(path)
    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    convert_for(model, saved, **config_overrides)
    with open_safetensors(weights_file) as f:
        tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
        metadata = f.metadata()
    copy_into(adapter_state_dict(model), tensors, "adapter")
    check_base_model(saved_base_model(metadata), model, str(path))
    return model
