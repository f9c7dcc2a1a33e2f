"""`GraphMoEMLP`: the drop-in replacement of a LLaMA-style MLP.

The module holds parameters and bookkeeping only; the maths lives in the backends
(``reference``, ``torch``, ``triton``), which share the contract of ``backends.contract``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .backends import get_backend, resolve_backend
from .backends.contract import GraphMoEParams, RoundOptions, RoutedOutput, autocast_enabled
from .config import GraphMoEConfig
from .load_balancing import expert_selection_counts, load_balancing_loss
from .lowrank_gru import LowRankGRU


class RoutingEvent(NamedTuple):
    """What a routing hook (:meth:`GraphMoEMLP.register_routing_hook`) sees of one forward.

    ``routed`` is the backend's output (``router_probs [T, M, n]``, ``expert_index [T, M, k]``);
    ``aux_loss`` is the ``[T]`` per-round load-balancing loss, differentiable whenever autograd
    records (what ``forward(..., return_aux_loss=True)`` averages); ``token_mask`` is the ``[M]``
    bool mask it was computed with (``None``: every token); ``stats_updated`` says whether this
    forward updated ``expert_counts`` and ``last_aux_loss``.
    """

    routed: RoutedOutput
    aux_loss: torch.Tensor
    token_mask: torch.Tensor | None
    stats_updated: bool


RoutingHook = Callable[["GraphMoEMLP", RoutingEvent, torch.Tensor], "torch.Tensor | None"]

def is_silu(act: nn.Module | Callable) -> bool:
    if isinstance(act, nn.SiLU):
        return True
    probe = torch.linspace(-3, 3, 7)
    try:
        return torch.allclose(act(probe), torch.nn.functional.silu(probe))
    except Exception:
        return False


class GraphMoEMLP(nn.Module):
    """GraphMoE over MixLoRA experts in place of a SwiGLU MLP (gate, up and down projections).

    ``forward(x)`` takes and returns ``[..., d]`` like ``LlamaMLP``. The base projections are
    frozen and shared with the MLP it was built from; ``router``, the six ``lora_*`` factors and
    ``gru`` are trained. With the init of docs/design.md §1 (LoRA B = 0, ``W_g`` = 0) a fresh layer
    computes the base MLP.

    Bookkeeping: ``expert_counts`` (``[T, n]``) counts the tokens that chose each expert per round
    since :meth:`reset_routing_stats`; ``last_aux_loss`` is the ``[T]`` load-balancing loss of
    the last forward (detached). ``forward``'s ``token_mask`` leaves padding out of both, and
    ``update_stats=False`` leaves both alone (for a forward that repeats one already counted).

    Observers: :meth:`register_routing_hook`. The layer knows nothing of who observes it: the
    Hugging Face glue (:mod:`graphmoe_fused.hf`) builds the model's load-balancing loss from
    these hooks plus ordinary forward pre-hooks that pass ``token_mask`` and ``update_stats``.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        config: GraphMoEConfig | None = None,
        *,
        gate_proj: nn.Linear | None = None,
        up_proj: nn.Linear | None = None,
        down_proj: nn.Linear | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        config = config or GraphMoEConfig()
        d, dff, n, r = hidden_size, intermediate_size, config.num_experts, config.lora_r
        dh = config.gru_hidden_size(d)
        kw = {"device": device, "dtype": dtype}
        self.config, self.hidden_size, self.intermediate_size = config, d, dff
        self.gate_proj = gate_proj if gate_proj is not None else nn.Linear(d, dff, bias=False, **kw)
        self.up_proj = up_proj if up_proj is not None else nn.Linear(d, dff, bias=False, **kw)
        self.down_proj = down_proj if down_proj is not None else nn.Linear(dff, d, bias=False, **kw)
        for name, proj, shape in (
            ("gate_proj", self.gate_proj, (dff, d)),
            ("up_proj", self.up_proj, (dff, d)),
            ("down_proj", self.down_proj, (d, dff)),
        ):
            if tuple(proj.weight.shape) != shape:
                raise ValueError(
                    f"{name}.weight has shape {tuple(proj.weight.shape)}, expected {shape}"
                )
            if proj.bias is not None:
                raise ValueError(
                    f"{name} has a bias; GraphMoEMLP supports bias-free SwiGLU MLPs only"
                )
            proj.weight.requires_grad_(False)

        self.router = nn.Linear(d, n, bias=False, **kw)
        self.lora_A_gate = nn.Parameter(torch.empty(n, r, d, **kw))
        self.lora_B_gate = nn.Parameter(torch.empty(n, dff, r, **kw))
        self.lora_A_up = nn.Parameter(torch.empty(n, r, d, **kw))
        self.lora_B_up = nn.Parameter(torch.empty(n, dff, r, **kw))
        self.lora_A_down = nn.Parameter(torch.empty(n, r, dff, **kw))
        self.lora_B_down = nn.Parameter(torch.empty(n, d, r, **kw))
        self.gru = LowRankGRU(
            d, dh, config.gru_candidate_input, config.gru_candidate_activation, **kw
        )
        self.register_buffer(
            "expert_counts",
            torch.zeros(config.num_rounds, n, dtype=torch.long, device=device),
            persistent=False,
        )
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()
        self.last_aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    @classmethod
    def from_mlp(cls, mlp: nn.Module, config: GraphMoEConfig | None = None) -> GraphMoEMLP:
        """Builds the layer around ``mlp``'s own projections (shared, not copied)."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Linear):
                raise TypeError(
                    f"{type(mlp).__name__} is not a LLaMA-style MLP: it has no nn.Linear {name!r}"
                )
        act = getattr(mlp, "act_fn", None)
        if act is None or not is_silu(act):
            raise ValueError(
                f"{type(mlp).__name__}.act_fn is {act!r}; GraphMoEMLP needs SiLU (SwiGLU)"
            )
        w = mlp.gate_proj.weight
        return cls(
            mlp.gate_proj.in_features,
            mlp.gate_proj.out_features,
            config,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
            device=w.device,
            dtype=w.dtype,
        )

    def reset_parameters(self) -> None:
        """Router ``N(0, std)``; LoRA A kaiming-uniform(a=√5); LoRA B zeros; GRU as LowRankGRU."""
        nn.init.normal_(self.router.weight, std=self.config.router_init_std)
        for a in (self.lora_A_gate, self.lora_A_up, self.lora_A_down):
            for expert_a in a.data:  # per expert, so fan_in is the expert's input width
                nn.init.kaiming_uniform_(expert_a, a=math.sqrt(5))
        for b in (self.lora_B_gate, self.lora_B_up, self.lora_B_down):
            nn.init.zeros_(b)
        self.gru.reset_parameters()

    def params(self) -> GraphMoEParams:
        g = self.gru
        return GraphMoEParams(
            self.gate_proj.weight,
            self.up_proj.weight,
            self.down_proj.weight,
            self.router.weight,
            self.lora_A_gate,
            self.lora_B_gate,
            self.lora_A_up,
            self.lora_B_up,
            self.lora_A_down,
            self.lora_B_down,
            g.weight_z,
            g.weight_r,
            g.weight_o,
            g.bias_o,
            g.weight_g,
        )

    def round_options(self) -> RoundOptions:
        cfg = self.config
        dropout_p = cfg.lora_dropout if self.training else 0.0
        # The seed comes from the global CPU generator: no device sync, reproducible by manual_seed.
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        return RoundOptions(
            top_k=cfg.top_k,
            lora_scaling=cfg.lora_scaling,
            num_rounds=cfg.num_rounds,
            gru_candidate_input=cfg.gru_candidate_input,
            gru_candidate_activation=cfg.gru_candidate_activation,
            dropout_p=dropout_p,
            dropout_seed=seed,
            recompute_intermediates=cfg.recompute_intermediates,
            deterministic=cfg.deterministic,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        w = self.gate_proj.weight
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"GraphMoEMLP expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"GraphMoEMLP input must be floating point, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"GraphMoEMLP input has shape {tuple(x.shape)}; its last dimension must be "
                f"hidden_size={self.hidden_size}"
            )
        if x.device != w.device:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {w.device}")
        if x.dtype != w.dtype and not autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} does not match the layer's weight dtype {w.dtype} "
                "(cast one of them, or run under torch.autocast)"
            )

    def forward(
        self, x: torch.Tensor, return_aux_loss: bool = False, *,
        token_mask: torch.Tensor | None = None, update_stats: bool = True,
    ):
        """``y = GraphMoE(x)``, same shape as ``x``.

        Args:
            x: ``[..., d]``.
            return_aux_loss: also return ``aux``, the differentiable load-balancing loss averaged
                over rounds (for use outside an HF model).
            token_mask: bool, ``x.shape[:-1]`` (or flattened): ``False`` marks padding tokens,
                which are left out of the load-balancing loss and of ``expert_counts``.
            update_stats: ``False`` leaves ``expert_counts`` and ``last_aux_loss`` untouched.
        Returns:
            ``y``, or ``(y, aux)`` with ``return_aux_loss``. A routing hook may replace ``y``.
        """
        self._check_input(x)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        backend = get_backend(resolve_backend(self.config.backend, x.device, needs_grad))
        out = backend(x.reshape(-1, self.hidden_size), self.params(), self.round_options())

        mask = self._flat_token_mask(token_mask, out.y)
        aux_rounds = load_balancing_loss(out.router_probs, out.expert_index, mask)
        if update_stats:
            with torch.no_grad():
                self.expert_counts += expert_selection_counts(
                    out.expert_index, self.config.num_experts, mask
                )
            self.last_aux_loss = aux_rounds.detach()

        y = out.y
        if self._routing_hooks:
            event = RoutingEvent(out, aux_rounds, mask, update_stats)
            for hook in tuple(self._routing_hooks.values()):
                replaced = hook(self, event, y)
                if replaced is not None:
                    y = replaced
        y = y.view(x.shape)
        return (y, aux_rounds.mean()) if return_aux_loss else y

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Calls ``hook(layer, event, y)`` in every forward, after routing and bookkeeping.

        ``event`` is a :class:`RoutingEvent`; ``y`` is the ``[M, d]`` output so far. The hook
        may return a tensor to use as ``y`` instead (an identity that carries a custom backward,
        say) or ``None``. Hooks run in registration order; ``handle.remove()`` unregisters.
        """
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    @staticmethod
    def _flat_token_mask(token_mask: torch.Tensor | None,
                         y: torch.Tensor) -> torch.Tensor | None:
        if token_mask is None:
            return None
        if token_mask.numel() != y.shape[0]:
            raise ValueError(
                f"token_mask has {token_mask.numel()} elements but the input has {y.shape[0]} "
                "tokens"
            )
        return token_mask.reshape(-1).to(device=y.device, dtype=torch.bool)

    def reset_routing_stats(self) -> None:
        self.expert_counts.zero_()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={c.num_experts}, top_k={c.top_k}, lora_r={c.lora_r}, "
            f"num_rounds={c.num_rounds}, backend={c.backend!r}"
        )
