"""How the load-balancing loss's gradient reaches the router of a converted model.

Why the gradient is injected rather than left on a returned tensor: under reentrant activation
checkpointing the first forward runs without autograd, so a loss tensor collected there has no
graph, and under non-reentrant checkpointing the forward runs twice. Instead each layer passes
its output through :class:`AuxLossGradInjector`, which in backward adds ``scale · ∂L/∂θ`` to the
router's gradient (as Megatron-LM does). The recomputed forward builds the graph the injection
uses, so both checkpointing modes give the gradient of plain ``coef · aux``, once; the *value*
is recorded once, in the first forward only (see :class:`RoutingRecorder`).
"""

from __future__ import annotations

import torch


class AuxLossGradInjector(torch.autograd.Function):
    """Identity on ``y``; in backward also sends ``scale`` as the gradient of ``aux``.

    ``loss_grad``, when given, is a 0-d tensor that holds the gradient which reached the model's
    loss (filled in backward by :class:`LossGradTap`, which runs first); the injected gradient is
    multiplied by it, so a loss scaled before ``backward`` (gradient accumulation, AMP loss
    scaling) scales the aux gradient as it scales every other gradient.
    """

    @staticmethod
    def forward(
        ctx, y: torch.Tensor, aux: torch.Tensor, scale: float,
        loss_grad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx.scale, ctx.loss_grad = scale, loss_grad
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_y.device)
        if ctx.loss_grad is not None:
            grad_aux = grad_aux * ctx.loss_grad.to(device=grad_y.device, dtype=ctx.aux_dtype)
        return grad_y, grad_aux, None, None


class LossGradTap(torch.autograd.Function):
    """Identity on the model loss; in backward stores the incoming gradient in ``holder``."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, holder: torch.Tensor) -> torch.Tensor:
        ctx.holder = holder
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        with torch.no_grad():
            ctx.holder.copy_(grad_loss.reshape(ctx.holder.shape))
        return grad_loss, None


class RoutingRecorder:
    """Shared by the GraphMoE layers of one converted model; driven by the model's hooks.

    ``recording`` is on from the model's forward pre-hook to its forward hook, so a forward that
    activation checkpointing re-runs during backward records nothing twice. ``token_mask``,
    ``aux_grad_scale`` and ``loss_grad`` stay set until the next forward, so that re-run sees the
    same ones.
    """

    def __init__(self) -> None:
        self.recording = True
        self.token_mask: torch.Tensor | None = None
        self.aux_grad_scale = 0.0
        self.loss_grad: torch.Tensor | None = None
        self.aux_values: list[torch.Tensor] = []

    def start(
        self, token_mask: torch.Tensor | None, aux_grad_scale: float,
        loss_grad: torch.Tensor | None = None,
    ) -> None:
        self.recording = True
        self.token_mask = None if token_mask is None else token_mask.reshape(-1).bool()
        self.aux_grad_scale = aux_grad_scale
        self.loss_grad = loss_grad
        self.aux_values = []

    def stop(self) -> torch.Tensor | None:
        """Ends recording; returns the mean aux loss over layers and rounds (detached)."""
        self.recording = False
        if not self.aux_values:
            return None
        return torch.cat(self.aux_values).mean()

    def token_mask_for(self, num_tokens: int) -> torch.Tensor | None:
        mask = self.token_mask
        return mask if mask is not None and mask.numel() == num_tokens else None
