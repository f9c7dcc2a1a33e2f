"""The base model of a run: the builtin tiny LLaMA (no download) or a local Hugging Face
checkpoint directory, loaded offline. Nothing here converts; :func:`check_convertible` says
beforehand whether :func:`~graphmoe_fused.apply_graphmoe` could.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..config import GraphMoEConfig
from ..data.builtin import BUILTIN_MODEL
from ..data.tokenizer import builtin_tokenizer
from .adapters import peft_wrapper_names, unwrap_peft
from .attention_lora import LoRALinear
from .convert import (
    CONFIG_ATTRIBUTE,
    _attention_projections,
    _check_mlp,
    find_decoder_layers,
    is_converted,
)

BUILTIN_NAME = "(builtin)"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def builtin_model(seed: int = 0) -> LlamaForCausalLM:
    """The builtin tiny ``LlamaForCausalLM`` of :data:`~graphmoe_fused.data.BUILTIN_MODEL`,
    randomly initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**BUILTIN_MODEL))
    return model.eval()


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        raise ValueError(f"{path}: the tokenizer has no pad, eos or unk token to pad with")


def _load_local(path: str, dtype: torch.dtype | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not directory.is_dir():
        raise ValueError(f"model path {path} is not a directory (expected a Hugging Face "
                         "checkpoint directory with config.json)")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read config.json: {_first_line(e)}") from None
    if hasattr(config, CONFIG_ATTRIBUTE):
        raise ValueError(f"{path} is a converted GraphMoE checkpoint (its config holds "
                         f"{CONFIG_ATTRIBUTE}): pass it as --adapter, with its base model as "
                         "--model; loaded as a base its GraphMoE weights would be dropped")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{path}: model type {config.model_type!r} is not a causal language "
                         "model (no AutoModelForCausalLM class for it)")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{path}: no model weights (expected one of "
                                f"{', '.join(WEIGHT_FILES)})")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer (expected one of "
                                f"{', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer: {_first_line(e)}") from None
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                           **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        # a truncated or corrupt weights file: one line, not the loader's traceback
        raise ValueError(f"{path}: cannot load the weights: {_first_line(e)}") from None
    missing = sorted(info.get("missing_keys") or ())
    mismatched = [key for key, *_ in info.get("mismatched_keys") or ()]
    if missing or mismatched:
        # transformers would initialise them at random and only log a table
        raise ValueError(
            f"{path}: the weights do not fit its config.json: {len(missing)} missing "
            f"{missing[:3]}, {len(mismatched)} of another shape {mismatched[:3]}; a partial "
            "copy, or a config from another model?")
    return model, tokenizer


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_base_model(path: str | None, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu",
                    seed: int = 0) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``, in eval mode on ``device``, not converted.

    ``path`` None: the builtin tiny LLaMA (random init from ``seed``: training and evaluation
    must pass the same seed, the default, or an adapter meets another base) and
    :func:`~graphmoe_fused.data.builtin_tokenizer`. Otherwise ``path`` is a local Hugging Face
    checkpoint directory, loaded offline (``local_files_only=True``) in ``dtype`` (None:
    transformers' default for the checkpoint). A tokenizer with no pad token gets its eos token
    as pad token (its unk token when it has no eos), since batches are padded.

    Raises:
        FileNotFoundError: the directory, its config.json, its weights or its tokenizer is
            missing.
        ValueError: ``path`` is not a directory, its config is unreadable, it is not a causal
            LM, or its tokenizer cannot be loaded or has nothing to pad with.
    """
    if path is None:
        model, tokenizer = builtin_model(seed), builtin_tokenizer()
        if dtype is not None:
            model = model.to(dtype)
    else:
        model, tokenizer = _load_local(str(path), dtype)
    _set_pad_token(tokenizer, BUILTIN_NAME if path is None else str(path))
    return model.to(device).eval(), tokenizer


def save_builtin_model(directory: str | Path, seed: int = 0) -> Path:
    """Writes the builtin model (from ``seed``) and tokenizer to ``directory`` with
    ``save_pretrained``: a local checkpoint that :func:`load_base_model` reads back."""
    directory = Path(directory)
    model, tokenizer = builtin_model(seed), builtin_tokenizer()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def check_convertible(model: nn.Module, path: str | None,
                      config: GraphMoEConfig | None = None) -> None:
    """Raises a one-line ``ValueError`` naming ``path`` when ``apply_graphmoe(model, config)``
    would refuse ``model``; converts nothing. It runs apply_graphmoe's own checks: decoder
    layers found, each MLP a bias-free SwiGLU, attention projections when ``attention_lora``,
    the GRU width, and not already converted."""
    config = config or GraphMoEConfig()
    name = BUILTIN_NAME if path is None else str(path)
    try:
        if is_converted(model) or any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ValueError("it is already converted to GraphMoE")
        target = unwrap_peft(model)
        peft_layers = peft_wrapper_names(target)
        for layer_name, layer in find_decoder_layers(target):
            _check_mlp(f"{layer_name}.mlp", layer.mlp, peft_layers)
            if config.attention_lora:
                _attention_projections(layer_name, layer, peft_layers)
            config.gru_hidden_size(layer.mlp.gate_proj.in_features)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot convert {type(model).__name__} to GraphMoE: {e}") \
            from None
