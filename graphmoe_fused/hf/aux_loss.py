"""How the load-balancing loss of a converted Hugging Face model reaches its loss and gradients.

**Main path: plain autograd.** Each GraphMoE layer hands its differentiable per-round aux loss
to the shared :class:`RoutingRecorder` (through
:meth:`~graphmoe_fused.layer.GraphMoEMLP.register_routing_hook`); the model's forward hook
(:mod:`graphmoe_fused.hf.hooks`) adds ``coef · mean`` of them to ``loss`` as an ordinary tensor
expression. Nothing happens in backward that autograd does not do itself, so it is right, once,
for every way of training that only *uses* the loss: a loss scaled in place (``loss /= steps``, HF
``Trainer``'s ``loss *= scale``), AMP loss scaling, gradient accumulation, non-reentrant
activation checkpointing (its recomputation rebuilds the saved tensors the aux graph needs, and
the recomputed forward records nothing) and ``torch.compile`` (the hooks are traced with the
model, the aux term is part of the graph).

Why not inject the aux gradient in backward everywhere (the previous design): the injector
(identity on ``y``, sending ``scale · g`` to the aux loss) needed the gradient ``g`` that reached
the model's loss, which a tap on the loss wrote into a holder tensor in backward. Measured: (1)
the tap's output was a view, so HF ``Trainer``'s in-place ``loss *= scale`` raised; (2) under
``torch.compile`` (``aot_eager``) an injector returning ``y.view_as(y)`` lost its gradient with
the reference backend (the router's gradient was exactly that of coefficient 0; returning a
clone fixed this), and with clones the holder hand-over still failed once the model compiled to
one graph: the tap's write and the injector's read have no data dependency in the compiled
backward, so with ``0.25 · loss`` the compiled gradients differed from eager (by 0.2) while
``1 · loss`` matched.

**Fallback: reentrant activation checkpointing.** There the first forward of each checkpointed
layer runs under ``no_grad``, so its aux loss has no graph, and the layer is re-run in backward
with grad enabled. The aux losses recorded without a graph are added to ``loss`` as constants
through :class:`_FrozenAuxTerm`, whose backward stores ``g · coef · weight / count`` (the
gradient each round's aux loss should get) in a holder. It runs before the recomputations:
autograd runs the ready node with the highest sequence number first, and this one, created after
every layer, is ready as soon as the loss's gradient reaches it. When such a layer is re-run, its
routing hook passes ``y`` through :class:`_AuxGradInjector`, which sends that stored gradient to
the recomputed (now differentiable) aux loss. Scaling of the loss is captured by ``g``. This path
runs eagerly (``torch.compiler.disable``): a write in one backward node read by another is what
compiled graphs do not keep.

**Gradient accumulation (``num_items_in_batch``).** HF's ``Trainer`` passes the token count of
the whole accumulated batch and the model's cross-entropy becomes ``sum / num_items_in_batch``,
so the micro-batches' losses add up instead of being averaged. The aux term is weighted the same
way, by the micro-batch's share of label tokens (``weight = n_labels / num_items_in_batch``,
exactly 1 without accumulation): accumulated steps then count the aux loss once, as a
token-weighted mean over micro-batches, not once per micro-batch.

Limitation (shared by every recorder-based design): checkpointing re-runs a layer during
backward with the recorder's current token mask and holder, so call ``backward`` before the next
forward of the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..eager import eager_under_compile
from ..layer import GraphMoEMLP, RoutingEvent


class _FrozenAuxTerm(torch.autograd.Function):
    """``loss + term`` for a constant ``term``; backward stores ``g · factor`` in ``holder``."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, term: torch.Tensor, factor: torch.Tensor,
                holder: torch.Tensor) -> torch.Tensor:
        ctx.holder = holder
        ctx.save_for_backward(factor)
        return loss + term  # a new tensor: the caller may scale it in place

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (factor,) = ctx.saved_tensors
        with torch.no_grad():
            ctx.holder.copy_((grad_loss * factor).reshape(()))
        return grad_loss, None, None, None


class _AuxGradInjector(torch.autograd.Function):
    """Identity on ``y``; in backward sends ``grad_each`` (0-d) to every element of ``aux``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, grad_each: torch.Tensor) -> torch.Tensor:
        ctx.grad_each = grad_each
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return y.clone()  # not a view: an in-place op on it must not bypass this backward

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_each = ctx.grad_each.to(device=grad_y.device, dtype=ctx.aux_dtype)
        return grad_y, grad_each.expand(ctx.aux_shape), None


class RoutingRecorder:
    """Shared by the GraphMoE layers of one converted model; driven by the model's hooks.

    ``recording`` is on from the model's forward pre-hook to its forward hook, so a forward that
    activation checkpointing re-runs during backward records nothing twice. ``token_mask`` and
    the reentrant fallback's ``deferred`` layers and ``aux_grad`` holder stay set until the next
    forward, so that re-run sees them.
    """

    def __init__(self) -> None:
        self.recording = False  # only a hooked forward records; stray re-runs never do
        self.token_mask: torch.Tensor | None = None
        self.records: list[tuple[GraphMoEMLP, torch.Tensor]] = []
        self.deferred: set[GraphMoEMLP] = set()
        self.aux_grad: torch.Tensor | None = None

    def attach(self, layer: GraphMoEMLP) -> None:
        """Hooks ``layer``: a forward pre-hook passes the token mask and whether to count, a
        routing hook collects its aux loss (and injects its gradient in a reentrant re-run)."""
        layer.register_forward_pre_hook(self.layer_pre_hook, with_kwargs=True)
        layer.register_routing_hook(self.on_routing)

    def start(self, token_mask: torch.Tensor | None) -> None:
        self.recording = True
        self.token_mask = None if token_mask is None else token_mask.reshape(-1).bool()
        self.records = []
        self.deferred = set()
        self.aux_grad = None

    def stop(self) -> list[tuple[GraphMoEMLP, torch.Tensor]]:
        """Ends recording; returns (and forgets) the ``(layer, [T] aux)`` of the forward."""
        self.recording = False
        records, self.records = self.records, []
        return records

    def layer_pre_hook(self, layer: nn.Module, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs.get("x")
        extra = {"update_stats": self.recording}
        mask = self.token_mask
        if (isinstance(x, torch.Tensor) and x.dim() >= 1 and mask is not None
                and mask.numel() * x.shape[-1] == x.numel()):
            extra["token_mask"] = mask
        return args, {**extra, **kwargs}  # an explicit argument of the caller wins

    def on_routing(self, layer: GraphMoEMLP, event: RoutingEvent,
                   y: torch.Tensor) -> torch.Tensor | None:
        if self.recording:
            self.records.append((layer, event.aux_loss))
            return None
        if self.aux_grad is not None and layer in self.deferred and event.aux_loss.requires_grad:
            return _inject(y, event.aux_loss, self.aux_grad)
        return None

    def add_to_loss(self, loss: torch.Tensor, records: list[tuple[GraphMoEMLP, torch.Tensor]],
                    coef: float, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``loss + coef · weight · mean(aux over layers and rounds)``, differentiable."""
        count = sum(aux.numel() for _, aux in records)
        factor = coef * weight / count
        live = [aux for _, aux in records if aux.requires_grad]
        frozen = [(layer, aux) for layer, aux in records if not aux.requires_grad]
        if live:
            term = torch.cat(live).sum() * factor
            loss = loss + term.to(device=loss.device, dtype=loss.dtype)
        if frozen:
            if loss.requires_grad:
                loss = self._defer(loss, frozen, factor)
            else:
                term = torch.cat([aux for _, aux in frozen]).sum() * factor
                loss = loss + term.to(device=loss.device, dtype=loss.dtype)
        return loss

    @eager_under_compile
    def _defer(self, loss: torch.Tensor, frozen: list[tuple[GraphMoEMLP, torch.Tensor]],
               factor: torch.Tensor | float) -> torch.Tensor:
        # Reentrant checkpointing: the aux losses of these layers have no graph yet (see the
        # module docstring). Eager on purpose: the holder is written and read in backward.
        term = torch.cat([aux for _, aux in frozen]).sum() * factor
        term = term.to(device=loss.device, dtype=loss.dtype)
        factor = torch.as_tensor(factor, dtype=torch.float32, device=loss.device)
        self.aux_grad = torch.zeros((), dtype=torch.float32, device=loss.device)
        self.deferred = {layer for layer, _ in frozen}
        return _FrozenAuxTerm.apply(loss, term, factor, self.aux_grad)


@eager_under_compile
def _inject(y: torch.Tensor, aux: torch.Tensor, grad_each: torch.Tensor) -> torch.Tensor:
    return _AuxGradInjector.apply(y, aux, grad_each)
