"""The `reference` backend: Algorithm 1 of the paper, written literally. It is the oracle every
fast path is checked against, so it stays readable and is never optimised.

Imports no kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import apply_dropout, lora_dropout_masks
from .gru import lowrank_gru_reference
from .params import GraphMoEParams, RoundOptions, RoutedOutput
from .routing import router_probabilities, select_experts


def lora_linear(x: torch.Tensor, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, x_lora: torch.Tensor) -> torch.Tensor:
    """``W x + c · B (A x_lora)``: a frozen projection plus one expert's low-rank delta."""
    return F.linear(x, base) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


def graphmoe_reference(x: torch.Tensor, p: GraphMoEParams, opt: RoundOptions) -> RoutedOutput:
    """T rounds of router → top-k → per-expert LoRA SwiGLU → weighted sum → low-rank GRU.

    Args:
        x: ``[M, d]`` round-1 input (the post-attention-layernorm hidden states, flattened).
        p: the layer's weights.
        opt: rounds, top-k, LoRA scaling, GRU options and dropout.
    Returns:
        ``y_T``, and per round the router probabilities and the chosen experts.
    """
    num_tokens, hidden = x.shape
    num_experts = p.router_weight.shape[0]
    c = opt.lora_scaling
    h = x.new_zeros(num_tokens, p.gru_weight_g.shape[1])
    x_t = x
    all_probs, all_index = [], []
    for t in range(opt.num_rounds):
        # MoE forward (Algorithm 1, lines 5-14).
        probs = router_probabilities(F.linear(x_t, p.router_weight))
        weights, experts = select_experts(probs, opt.top_k)
        all_probs.append(probs)
        all_index.append(experts)

        x_lora, keep_h = x_t, None
        if opt.dropout_p > 0:
            keep_x, keep_h = lora_dropout_masks(
                opt.dropout_seed, t, num_tokens, hidden, opt.top_k,
                p.gate_weight.shape[0], opt.dropout_p, x.device,
            )
            x_lora = apply_dropout(x_t, keep_x, opt.dropout_p)

        y = torch.zeros(num_tokens, hidden, dtype=probs.dtype, device=x.device)
        for e in range(num_experts):
            tokens, slot = torch.nonzero(experts == e, as_tuple=True)
            if tokens.numel() == 0:
                continue
            xe = x_t[tokens]
            gate = lora_linear(xe, p.gate_weight, p.lora_A_gate[e], p.lora_B_gate[e], c,
                               x_lora[tokens])
            up = lora_linear(xe, p.up_weight, p.lora_A_up[e], p.lora_B_up[e], c, x_lora[tokens])
            act = F.silu(gate) * up
            act_lora = act if keep_h is None else apply_dropout(act, keep_h[tokens, slot],
                                                                opt.dropout_p)
            expert_out = lora_linear(act, p.down_weight, p.lora_A_down[e], p.lora_B_down[e], c,
                                     act_lora)
            y = y.index_add(0, tokens, weights[tokens, slot, None] * expert_out)
        y = y.to(x.dtype)
        if t == opt.num_rounds - 1:
            break

        # Low-rank GRU and the residual into the next round's input (lines 16-24).
        h = lowrank_gru_reference(h, y, x_t, p.gru_weight_z, p.gru_weight_r, p.gru_weight_o,
                                  p.gru_bias_o, opt.gru_candidate_input,
                                  opt.gru_candidate_activation)
        x_t = x_t + F.linear(h, p.gru_weight_g)
    return RoutedOutput(y, torch.stack(all_probs), torch.stack(all_index))
