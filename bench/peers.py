"""What users would pick instead of graphmoe_fused, written here from the published algorithms
(our code, not theirs), on the same weights, with the GRU between rounds as ours, so a benchmark
compares the expert MLP implementations and nothing else.

* :class:`MixLoRAStyle`: MixLoRA's / MoE-PEFT's "efficient operator". The router in fp32
  (softmax, top-k, renormalised); the base gate and up products once for all tokens; then a
  Python loop over the experts: each expert takes its tokens' rows of those products, adds its
  LoRA deltas (computed in fp32), applies SwiGLU, and runs the base down projection *and* its
  down LoRA on its own tokens; the results are combined with ``index_add_``. That is ``2 + k``
  base GEMM rows per token per round (ours: 3). Dropout: an independent mask per expert and per
  projection on the LoRA inputs. Autograd does the backward.
* The per-expert literal path (every chosen expert runs the whole MLP on its tokens: ``3k`` base
  GEMM rows, as mLoRA does) is our ``reference`` backend, which has exactly that cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import graphmoe_fused as gm
from graphmoe_fused.backends.reference import lowrank_gru_step


class MixLoRAStyle(nn.Module):
    """The MixLoRA-style layer over the parameters of ``layer`` (shared, not copied).

    ``forward(x)`` returns ``y_T`` of the same shape as ``x``; with dropout 0 it computes the
    same function as ``layer`` (tests/test_peers.py checks it against the reference).
    """

    def __init__(self, layer: gm.GraphMoEMLP) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, cfg = self.layer, self.layer.config
        shape = x.shape
        x_t = x.reshape(-1, layer.hidden_size)
        p = 0.0 if not self.training else cfg.lora_dropout
        gru = layer.gru
        h = x_t.new_zeros(x_t.shape[0], gru.gru_hidden_size)
        for t in range(cfg.num_rounds):
            y = self._moe(x_t, p)
            if t == cfg.num_rounds - 1:
                break
            h = lowrank_gru_step(h, y, x_t, gru.weight_z, gru.weight_r, gru.weight_o,
                                 gru.bias_o, cfg.gru_candidate_input,
                                 cfg.gru_candidate_activation)
            x_t = x_t + F.linear(h, gru.weight_g)
        return y.reshape(shape)

    def _moe(self, x: torch.Tensor, p: float) -> torch.Tensor:
        layer, cfg = self.layer, self.layer.config
        c = cfg.lora_scaling
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 checks
        logits = F.linear(x.to(acc), layer.router.weight.to(acc))
        weights, experts = torch.topk(torch.softmax(logits, -1), cfg.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        gate_base = F.linear(x, layer.gate_proj.weight)
        up_base = F.linear(x, layer.up_proj.weight)
        out = torch.zeros_like(x)
        for e in range(cfg.num_experts):
            tokens, slot = torch.nonzero(experts == e, as_tuple=True)
            if tokens.numel() == 0:
                continue
            xe = x[tokens].to(acc)

            def lora(inp: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return c * F.linear(F.linear(F.dropout(inp, p, self.training), a.to(acc)),
                                    b.to(acc))

            gate = gate_base[tokens] + lora(xe, layer.lora_A_gate[e], layer.lora_B_gate[e]
                                            ).to(x.dtype)
            up = up_base[tokens] + lora(xe, layer.lora_A_up[e], layer.lora_B_up[e]).to(x.dtype)
            act = F.silu(gate) * up
            expert_out = F.linear(act, layer.down_proj.weight) + lora(
                act.to(acc), layer.lora_A_down[e], layer.lora_B_down[e]).to(x.dtype)
            out.index_add_(0, tokens, (weights[tokens, slot, None] * expert_out).to(x.dtype))
        return out
