"""The triton backend as two ``torch.library`` custom ops, so ``torch.compile`` can take a model
that runs on it.

* ``graphmoe_fused::triton_rounds``: the T rounds on the kernels (``triton._forward``). Besides
  the backend's outputs it returns what the backward needs of the rounds: the GRU states, the
  non-final outputs and each round's rank-r ``a_mix`` (and base products, when kept).
* ``graphmoe_fused::rounds_backward``: the backward of the T rounds from those. The chain over
  the rounds (``W_g``, the residual) and the router's softmax/top-k are the torch backend's
  (``torch.rounds.rounds_backward``); each round's expert part (the base and LoRA products, the
  SwiGLU backward, the slots' sum and every LoRA gradient) and each GRU cell run on the backward
  kernels (``kernels.expert.expert_round_backward``, ``kernels.gru.lowrank_gru_backward``).

The forward op's gradient formula is registered with ``torch.library.register_autograd`` and its
shapes with ``register_fake``: Dynamo and AOTAutograd see one opaque node each way, with no graph
break and nothing traced inside the kernels (whose launch code Dynamo cannot trace). Both ops take
the activations and the weights already in the compute dtype: the casts (autocast's, or a layer
kept in fp32) stay outside, in ordinary autograd, which also casts the gradients back.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from .contract import GraphMoEParams, RoundOptions, RoutedOutput

# RoundOptions travels as its fields, in this order (a custom op takes only plain types).
OPTION_FIELDS = tuple(f.name for f in fields(RoundOptions))


@torch.library.custom_op("graphmoe_fused::triton_rounds", mutates_args=())
def triton_rounds(
    x: Tensor, params: list[Tensor], options: list[float],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``(y, router_probs, expert_index, states, outputs, a_mixes, bases)`` of the T
    rounds on the kernels (``bases``: each round's ``W_G x, W_U x`` when
    ``recompute_intermediates`` is off, else empty); ``options`` are the RoundOptions fields as
    numbers (see :func:`encode_options`)."""
    from .triton import _forward

    fwd = _forward(x, GraphMoEParams(*params), decode_options(options))
    out = fwd.routed
    # Outputs must be fresh tensors with the strides the fake implementation promises: the
    # GRU kernel returns its state as a view of a row-padded buffer.
    return (out.y, out.router_probs, out.expert_index, [s.contiguous() for s in fwd.states],
            list(fwd.outputs), list(fwd.a_mixes), list(fwd.bases))


@triton_rounds.register_fake
def _(x: Tensor, params: list[Tensor], options: list[float]):
    opt = decode_options(options)
    num_tokens, hidden = x.shape
    num_experts, gru_width = params[3].shape[0], params[14].shape[1]
    lora_cols = num_experts * params[4].shape[1]
    rounds = opt.num_rounds
    return (
        x.new_empty(num_tokens, hidden),
        x.new_empty(rounds, num_tokens, num_experts, dtype=torch.float32),
        x.new_empty(rounds, num_tokens, opt.top_k, dtype=torch.int64),
        [x.new_empty(num_tokens, gru_width) for _ in range(rounds - 1)],
        [x.new_empty(num_tokens, hidden) for _ in range(rounds - 1)],
        [x.new_empty(num_tokens, lora_cols, dtype=torch.float32) for _ in range(rounds)],
        [] if opt.recompute_intermediates else
        [x.new_empty(num_tokens, params[0].shape[0]) for _ in range(2 * rounds)],
    )


@torch.library.custom_op("graphmoe_fused::rounds_backward", mutates_args=())
def rounds_backward(
    x: Tensor, params: list[Tensor], router_probs: Tensor, expert_index: Tensor,
    states: list[Tensor], outputs: list[Tensor], a_mixes: list[Tensor], bases: list[Tensor],
    grad_y: Tensor, grad_probs: Tensor | None, options: list[float],
) -> list[Tensor]:
    """Gradients of ``(x, router, A_G, B_G, A_U, B_U, A_D, B_D, W_z, W_r, W_o, b_o, W_g)``;
    the GRU's are zeros with one round (the caller returns ``None`` for them then)."""
    from ..kernels.gru import gru_project
    from .torch import rounds as torch_rounds

    p = GraphMoEParams(*params)
    # The round inputs, rebuilt by the forward's projection launch: its bits.
    inputs = [x]
    for state in states:
        inputs.append(gru_project(state, inputs[-1], p.gru_weight_g))
    opt = decode_options(options)
    static = torch_rounds.backward_static(x, p, opt, x.dtype)
    grads = torch_rounds.rounds_backward(
        x, p, static, router_probs, expert_index, states, outputs, grad_y, grad_probs, True,
        inputs=inputs, round_backward=_kernel_round_backward(p, a_mixes, bases),
        gru_backward=_kernel_gru_backward(p),
    )
    trainable = (p.router_weight, *p[4:])
    out, storages = [], set()
    for g, like in zip(grads, (x, *trainable), strict=True):
        if g is None:
            g = torch.zeros_like(like)
        elif g.untyped_storage().data_ptr() in storages:
            # A custom op's outputs may not share memory: W_z's and W_r's gradients are two
            # halves of one stacked buffer (small).
            g = g.clone()
        storages.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


@rounds_backward.register_fake
def _(x, params, router_probs, expert_index, states, outputs, a_mixes, bases, grad_y,
      grad_probs, options):
    return [torch.empty_like(t) for t in (x, params[3], *params[4:])]


def _kernel_round_backward(p: GraphMoEParams, a_mixes: list[Tensor], bases: list[Tensor]):
    """The backward of one round's MoE part on the kernels, in the form
    ``torch.rounds.rounds_backward`` takes (``_round_backward``'s signature)."""
    from ..kernels.expert import expert_lora_layout, expert_round_backward
    from .torch.rounds import renormalised_weights, routing_backward

    # The LoRA factors in the kernels' layout, once for all rounds (as the forward).
    lora = expert_lora_layout(p.lora_A_gate, p.lora_B_gate, p.lora_A_up, p.lora_B_up,
                              p.lora_A_down, p.lora_B_down)

    def round_backward(x_t, grad_y, grad_probs, probs, experts, _a_gate_up, _a_down, _base, w,
                       router_acc, st, t, grads, need_grad_x):
        opt, cd = st.opt, st.compute_dtype
        r = w.rank
        weights = renormalised_weights(probs, experts)
        xc = x_t.to(cd)
        kb = expert_round_backward(
            xc, grad_y.to(cd), w.gate, w.up, w.down, lora, weights, experts, a_mixes[t],
            opt.lora_scaling, dropout_p=opt.dropout_p, dropout_seed=opt.dropout_seed,
            round_index=t, deterministic=opt.deterministic,
            saved_gate_up=tuple(bases[2 * t:2 * t + 2]) or None,
        )
        # Into the torch backward's accumulators (its layouts: A_G and A_U stacked, B rank-major).
        grads.a_gate_up[:, :r] += kb.grad_lora_A_gate
        grads.a_gate_up[:, r:] += kb.grad_lora_A_up
        grads.bt_gate += kb.grad_lora_B_gate.transpose(1, 2)
        grads.bt_up += kb.grad_lora_B_up.transpose(1, 2)
        grads.a_down += kb.grad_lora_A_down
        grads.bt_down += kb.grad_lora_B_down.transpose(1, 2)
        grad_logits = routing_backward(kb.grad_weights, probs, experts, weights, grad_probs, xc,
                                       grads)
        if not need_grad_x:
            return None
        return kb.grad_x.to(router_acc.dtype).addmm_(grad_logits, router_acc)

    return round_backward


def _kernel_gru_backward(p: GraphMoEParams):
    """The backward of one GRU step on the kernels (``kernels.gru.lowrank_gru_backward``), in
    the form ``torch.rounds.rounds_backward`` takes for ``gru_backward``."""
    from ..kernels.gru import lowrank_gru_backward
    from .torch.gru import GRUGrads

    def gru_backward(grad_h_new, h, y_t, x_t, _w, st):
        opt, cd = st.opt, st.compute_dtype
        # rounds_backward widens the states to fp32; the forward kernels stored them in the
        # compute dtype, so narrowing them back is exact.
        kb = lowrank_gru_backward(
            grad_h_new, None if h is None else h.to(cd), y_t.to(cd), x_t.to(cd),
            p.gru_weight_z.to(cd), p.gru_weight_r.to(cd), p.gru_weight_o.to(cd),
            p.gru_bias_o.to(cd), opt.gru_candidate_input, opt.gru_candidate_activation,
            deterministic=opt.deterministic,
        )
        zr = torch.cat([kb.grad_weight_z, kb.grad_weight_r], 0)
        return GRUGrads(kb.grad_h, kb.grad_y, kb.grad_x, zr, kb.grad_weight_o, kb.grad_bias_o)

    return gru_backward


def _setup_context(ctx, inputs, output) -> None:
    x, params, options = inputs
    _, probs, index, states, outs, a_mixes, bases = output
    ctx.options = options
    ctx.num_params = len(params)
    # No gradient arrives on the outputs kept for backward only (states, outputs, a_mixes,
    # bases): without this autograd would fill a zero tensor for each, ~1.7 GB of
    # memset and transient memory per step at llama3-8b (bench.op_count counted them).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, *params, probs, index, *states, *outs, *a_mixes, *bases)


def _backward(ctx, grad_y, grad_probs, _grad_index, _grad_states, _grad_outputs,
              _grad_a_mixes, _grad_bases):
    # The states and outputs are for the backward only: the layer never returns them,
    # so no gradient arrives on them.
    opt = decode_options(ctx.options)
    saved = ctx.saved_tensors
    count = opt.num_rounds - 1
    x, params = saved[0], list(saved[1:1 + ctx.num_params])
    probs, index = saved[1 + ctx.num_params:3 + ctx.num_params]
    rest = saved[3 + ctx.num_params:]
    states, outs = rest[:count], rest[count:2 * count]
    a_mixes = rest[2 * count:2 * count + opt.num_rounds]
    bases = rest[2 * count + opt.num_rounds:]
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    grads = torch.ops.graphmoe_fused.rounds_backward(
        x, params, probs, index, list(states), list(outs), list(a_mixes), list(bases),
        grad_y.contiguous(),
        None if grad_probs is None else grad_probs.contiguous(), ctx.options,
    )
    gru = opt.num_rounds > 1  # with one round the GRU is unused: no gradient, as the reference
    param_grads = [None, None, None, grads[1], *grads[2:8],
                   *(grads[8:] if gru else [None] * 5)]
    return grads[0], param_grads, None


triton_rounds.register_autograd(_backward, setup_context=_setup_context)


def encode_options(opt: RoundOptions) -> list[float]:
    """RoundOptions as a list of floats for the ops' schema (strings by index, the seed split in
    exact 31-bit halves: a float holds integers up to 2^53 exactly)."""
    from ..config import GRU_CANDIDATE_ACTIVATIONS, GRU_CANDIDATE_INPUTS

    values = []
    for name in OPTION_FIELDS:
        value = getattr(opt, name)
        if name == "gru_candidate_input":
            value = GRU_CANDIDATE_INPUTS.index(value)
        elif name == "gru_candidate_activation":
            value = GRU_CANDIDATE_ACTIVATIONS.index(value)
        if name == "dropout_seed":
            values += [float(value & 0x7FFFFFFF), float(value >> 31)]
        else:
            values.append(float(value))
    return values


def decode_options(values: list[float]) -> RoundOptions:
    """The inverse of :func:`encode_options`."""
    from ..config import GRU_CANDIDATE_ACTIVATIONS, GRU_CANDIDATE_INPUTS

    values = list(values)
    kwargs = {}
    for name in OPTION_FIELDS:
        default = next(f.default for f in fields(RoundOptions) if f.name == name)
        if name == "dropout_seed":
            lo, hi = values.pop(0), values.pop(0)
            kwargs[name] = int(lo) | (int(hi) << 31)
            continue
        value = values.pop(0)
        if name == "gru_candidate_input":
            kwargs[name] = GRU_CANDIDATE_INPUTS[int(value)]
        elif name == "gru_candidate_activation":
            kwargs[name] = GRU_CANDIDATE_ACTIVATIONS[int(value)]
        elif isinstance(default, bool):
            kwargs[name] = bool(value)
        elif name in ("top_k", "num_rounds"):
            kwargs[name] = int(value)
        else:
            kwargs[name] = value
    return RoundOptions(**kwargs)


def run_rounds(x: Tensor, p: GraphMoEParams, opt: RoundOptions) -> RoutedOutput:
    """The backend's outputs through the ops, for ``x`` and ``p`` already in one compute dtype."""
    y, probs, index, *_ = torch.ops.graphmoe_fused.triton_rounds(x, list(p), encode_options(opt))
    return RoutedOutput(y, probs, index)
