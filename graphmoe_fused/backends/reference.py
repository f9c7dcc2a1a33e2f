"""The `reference` backend: Algorithm 1 of the paper, written literally. It is the oracle every
fast path is checked against, so it stays readable, is never optimised, and shares no maths with
the backends it judges: its routing (softmax, top-k, renormalisation) and its GRU are written out
here. Only the dropout-mask definition is shared, since every backend must draw the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import GraphMoEParams, RoundOptions, RoutedOutput
from .dropout import apply_dropout, lora_dropout_masks


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs, weights, experts)``: softmax of the router logits in fp32 (or wider when the
    input is), the ``top_k`` most probable experts with ties to the lowest index (a stable
    descending sort: ``torch.topk`` leaves ties unspecified), their probabilities renormalised
    to sum to one (MixLoRA)."""
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights = sorted_probs[..., :top_k]
    return probs, weights / weights.sum(dim=-1, keepdim=True), order[..., :top_k]


def lowrank_gru_step(
    h: torch.Tensor, y: torch.Tensor, x: torch.Tensor, weight_z: torch.Tensor,
    weight_r: torch.Tensor, weight_o: torch.Tensor, bias_o: torch.Tensor,
    candidate_input: str = "y", candidate_activation: str = "sigmoid",
) -> torch.Tensor:
    """One GRU step as Eqs. 6-7 read (reset-before, ``[h, y]`` order); returns the new state.

    ``z = σ(W_z [h, y])``, ``r = σ(W_r [h, y])``, ``ĥ = act(W_o [r ⊙ h, u] + b_o)`` with ``u`` =
    ``y`` (Eq. 6) or the round input ``x`` (Algorithm 1, line 19) and ``act`` sigmoid (as printed)
    or tanh; ``h' = (1 − z) ⊙ h + z ⊙ ĥ``.
    """
    hy = torch.cat([h, y], dim=-1)
    z = torch.sigmoid(F.linear(hy, weight_z))
    r = torch.sigmoid(F.linear(hy, weight_r))
    u = y if candidate_input == "y" else x
    pre = F.linear(torch.cat([r * h, u], dim=-1), weight_o, bias_o)
    h_cand = torch.sigmoid(pre) if candidate_activation == "sigmoid" else torch.tanh(pre)
    return (1 - z) * h + z * h_cand


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
        probs, weights, experts = route(x_t, p.router_weight, opt.top_k)
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
        h = lowrank_gru_step(h, y, x_t, p.gru_weight_z, p.gru_weight_r, p.gru_weight_o,
                             p.gru_bias_o, opt.gru_candidate_input, opt.gru_candidate_activation)
        x_t = x_t + F.linear(h, p.gru_weight_g)
    return RoutedOutput(y, torch.stack(all_probs), torch.stack(all_index))
