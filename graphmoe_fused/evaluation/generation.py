"""Text generation with the KV cache (``model.generate(use_cache=True)``): greedy by default,
nucleus sampling with ``do_sample``. The generation settings are built here whole, so a model's
own ``generation_config`` (a checkpoint may ship sampling defaults) never changes what greedy
means."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import pad_token_id
from .batching import evaluating, input_device


def _check(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


def generate_ids(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0) -> list[int]:
    """The new token ids ``model`` writes after ``prompt`` (encoded with the tokenizer's special
    tokens), up to ``max_new_tokens`` or its EOS (kept in the result). ``seed`` seeds sampling;
    the global RNG state is restored afterwards."""
    from transformers import GenerationConfig

    _check(max_new_tokens, temperature, top_p)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    device = input_device(model)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "use_cache": True,
                "pad_token_id": pad_token_id(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        # top_k=0: no top-k cut besides top_p (transformers' default would keep only 50).
        settings.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    config = GenerationConfig(**settings)
    devices = [device] if device.type == "cuda" else []
    with evaluating(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_ids):].tolist()


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0) -> str:
    """The text ``model`` writes after ``prompt`` (special tokens dropped); see
    :func:`generate_ids`."""
    new = generate_ids(model, tokenizer, prompt, max_new_tokens, do_sample, temperature, top_p,
                       seed)
    return tokenizer.decode(new, skip_special_tokens=True)
