"""Model-level hooks that drive the shared :class:`RoutingRecorder` of a converted model.

A forward pre-hook on the model starts recording (token mask from a 2-D ``attention_mask``, and
the gradient-accumulation weight of :func:`loss_weight_from`); a forward hook stops it, exposes
``aux_loss`` on the output (the mean over layers and rounds, detached: a value to log) and, with
``labels``, adds ``coef · weight ·`` that mean to ``loss`` as a differentiable term. Why it is
built this way, and its reentrant-checkpointing fallback: :mod:`graphmoe_fused.hf.aux_loss`.

The module that owns the decoder layers (``model.model`` in LLaMA) is hooked too, so calling it
directly also records statistics and reports ``aux_loss``; a depth counter makes the outermost
hooked call the only one that starts and stops.

Limitation (as for every recorder-based design): activation checkpointing re-runs a layer during
backward with the recorder's current token mask, so call ``backward`` before the next forward.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..config import GraphMoEConfig
from ..eager import eager_under_compile
from ..layer import GraphMoEMLP
from .aux_loss import RoutingRecorder


class RoutingHooks:
    """State shared by the hooks of one converted model (kept as ``model._graphmoe_hooks``).

    The hooks are bound methods of :class:`_ModuleHooks` objects that reference this state, so
    ``copy.deepcopy`` / pickling a converted model carries hooks, state and recorder together.
    ``config`` is the model's own ``graphmoe_config``: the coefficient is read at each forward,
    so changing ``model.graphmoe_config.router_aux_loss_coef`` (a schedule) takes effect.
    """

    def __init__(self, recorder: RoutingRecorder, config: GraphMoEConfig, num_layers: int) -> None:
        self.recorder = recorder
        self.config = config
        self.num_layers = num_layers
        self.depth = 0
        self.labels_given = False
        self.loss_weight: torch.Tensor | float = 1.0

    @property
    def coef(self) -> float:
        return self.config.router_aux_loss_coef


def _bind(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name, whether passed positionally or as keywords."""
    if signature is None:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:  # let the forward itself report a bad call
        return dict(kwargs)
    named = dict(bound.arguments)
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(param.name, {}))
    return named


def token_mask_from(named: Mapping[str, Any]) -> torch.Tensor | None:
    """``[B, S]`` bool mask of real tokens from a 2-D ``attention_mask``, else ``None``.

    With a KV cache the mask covers past and new tokens while the layers see only the new ``S``:
    its last ``S`` columns are the ones that apply.
    """
    mask = named.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    tokens = named.get("input_ids")
    if not isinstance(tokens, torch.Tensor):
        tokens = named.get("inputs_embeds")
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
        seq = tokens.shape[1]
        if mask.shape[1] > seq:
            mask = mask[:, -seq:]
    return mask != 0


def loss_weight_from(named: Mapping[str, Any]) -> torch.Tensor | float:
    """This forward's share of the accumulated batch's label tokens: ``n / num_items_in_batch``.

    HF ``Trainer`` passes ``num_items_in_batch`` (the label tokens of all the micro-batches of one
    optimizer step, counted as the causal-LM loss counts them: ``labels[..., 1:]`` or
    ``shift_labels``, ``!= -100``) and the model's cross-entropy becomes
    ``sum / num_items_in_batch``, so the micro-batches' losses add up. Weighting the aux term by
    the same share counts it once per step (a token-weighted mean over micro-batches) instead of
    once per micro-batch; without accumulation the share is exactly 1. ``1.0`` when
    ``num_items_in_batch`` is not given.
    """
    total = named.get("num_items_in_batch")
    if total is None:
        return 1.0
    labels = named.get("shift_labels")
    if not isinstance(labels, torch.Tensor):
        labels = named.get("labels")
        if not isinstance(labels, torch.Tensor):
            return 1.0
        labels = labels[..., 1:]
    ignore_index = named.get("ignore_index", -100)
    return (labels != ignore_index).sum() / total


class _ModuleHooks:
    """The pre-hook and hook of one hooked module; ``owns_loss`` for the top model only."""

    def __init__(self, state: RoutingHooks, owns_loss: bool) -> None:
        self.state, self.owns_loss = state, owns_loss
        self._signature: inspect.Signature | None = None
        self._signature_known = False

    def _forward_signature(self, module: nn.Module) -> inspect.Signature | None:
        # Looked up once: the forward's signature does not change between calls.
        if not self._signature_known:
            try:
                self._signature = inspect.signature(module.forward)
            except (TypeError, ValueError):
                self._signature = None
            self._signature_known = True
        return self._signature

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        state.depth += 1
        if state.depth > 1:
            return None
        named = _bind(self._forward_signature(module), args, kwargs)
        state.labels_given = self.owns_loss and named.get("labels") is not None
        state.loss_weight = loss_weight_from(named) if state.labels_given else 1.0
        state.recorder.start(token_mask_from(named))
        return None

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self.state
        state.depth -= 1
        if state.depth > 0:
            return None
        records = state.recorder.stop()
        if not records:
            return None
        aux = torch.cat([a.detach() for _, a in records]).mean()
        if isinstance(output, dict):
            loss = output.get("loss")
        else:
            loss = output[0] if isinstance(output, tuple) and output else None
        if state.labels_given and isinstance(loss, torch.Tensor) and state.coef > 0:
            loss = state.recorder.add_to_loss(loss, records, state.coef, state.loss_weight)
            if isinstance(output, tuple):
                output = (loss, *output[1:])
            else:
                output["loss"] = loss
        if isinstance(output, ModelOutput):
            output = with_aux_loss(output, aux)
        elif isinstance(output, dict):
            output["aux_loss"] = aux
        return output


# ModelOutput class -> that class plus an ``aux_loss`` field.
_WITH_AUX_LOSS: dict[type, type] = {}


@eager_under_compile  # runs once per output class; a compiled forward then finds it cached
def _output_class_with_aux_loss(cls: type[ModelOutput]) -> type[ModelOutput]:
    """``cls`` plus an ``aux_loss`` field. DDP (and anything else that flattens outputs as
    pytrees) rebuilds a ``ModelOutput`` from its fields, so a key its class does not declare
    breaks the rebuild: ``CausalLMOutputWithPast`` has no ``aux_loss``."""
    sub = dataclasses.make_dataclass(
        cls.__name__, [("aux_loss", torch.Tensor | None, dataclasses.field(default=None))],
        bases=(cls,))
    sub.__module__, sub.__qualname__ = __name__, f"_output_class_with_aux_loss.{cls.__name__}"
    sub.__doc__ = f"{cls.__name__} with the GraphMoE load-balancing loss as ``aux_loss``."
    _WITH_AUX_LOSS[cls] = sub
    return sub


def with_aux_loss(output: ModelOutput, aux: torch.Tensor) -> ModelOutput:
    """``output`` with ``aux_loss`` set (an instance of its class, or a subclass declaring it)."""
    cls = type(output)
    if "aux_loss" not in cls.__dataclass_fields__:
        sub = _WITH_AUX_LOSS.get(cls) or _output_class_with_aux_loss(cls)
        output = sub(**output)
    output["aux_loss"] = aux
    return output


def install_routing_hooks(model: nn.Module, layer_names: list[str],
                          config: GraphMoEConfig) -> RoutingHooks:
    """Shares one recorder between the GraphMoE layers under ``layer_names`` (a forward pre-hook
    and a routing hook on each) and hooks ``model`` (loss and ``aux_loss``) and each module
    owning a list of those layers (``aux_loss`` only)."""
    layers = [model.get_submodule(f"{name}.mlp") for name in layer_names]
    if not all(isinstance(layer, GraphMoEMLP) for layer in layers):
        raise TypeError("install_routing_hooks expects converted (GraphMoEMLP) layers")
    recorder = RoutingRecorder()
    for layer in layers:
        recorder.attach(layer)
    state = RoutingHooks(recorder, config, len(layers))
    owners = {name.rsplit(".", 2)[0] if name.count(".") >= 2 else "" for name in layer_names}
    hooked = [(model, True)] + [(model.get_submodule(o), False) for o in sorted(owners) if o]
    for module, owns_loss in hooked:
        hooks = _ModuleHooks(state, owns_loss)
        module.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True)
        module.register_forward_hook(hooks.post_hook, with_kwargs=True, always_call=True)
    model._graphmoe_hooks = state
    return state
