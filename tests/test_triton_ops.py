"""The triton backend's custom ops (``graphmoe_fused::triton_rounds`` and
``graphmoe_fused::rounds_backward``) pass ``torch.library.opcheck``: schema, fake (meta)
implementation, autograd registration and AOTAutograd dispatch, so ``torch.compile`` can take a
model on the triton backend without tracing into the kernels. Under the interpreter on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graphmoe_fused.backends.triton_ops import decode_options, encode_options

from .helpers import make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer_and_input(rounds: int, dropout: float):
    layer = make_layer(backend="triton", num_experts=4, lora_r=4, num_rounds=rounds,
                       lora_dropout=dropout, device=DEVICE).train(dropout > 0)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(rounds)).to(DEVICE)
    return layer, x


def test_options_round_trip_exactly():
    layer, _ = _layer_and_input(3, 0.2)
    opt = dataclasses.replace(layer.round_options(), dropout_seed=2**62 - 12345,
                              gru_candidate_input="x", gru_candidate_activation="tanh",
                              deterministic=True, recompute_intermediates=False)
    assert decode_options(encode_options(opt)) == opt


@pytest.mark.parametrize(("rounds", "dropout"), [(1, 0.0), (3, 0.2)])
def test_forward_op_passes_opcheck(rounds, dropout):
    layer, x = _layer_and_input(rounds, dropout)
    params = [p.detach().clone().requires_grad_(p.requires_grad) for p in layer.params()]
    args = (x.clone().requires_grad_(), params, encode_options(layer.round_options()))
    torch.library.opcheck(torch.ops.graphmoe_fused.triton_rounds.default, args)


@pytest.mark.parametrize("recompute", [True, False])
def test_backward_op_passes_opcheck(recompute):
    layer, x = _layer_and_input(3, 0.2)
    params = [p.detach() for p in layer.params()]
    opt = dataclasses.replace(layer.round_options(), recompute_intermediates=recompute)
    options = encode_options(opt)
    y, probs, index, states, outputs, a_mixes, bases = (
        torch.ops.graphmoe_fused.triton_rounds(x, params, options))
    grad_y = torch.randn_like(y)
    grad_probs = torch.randn_like(probs)
    args = (x, params, probs, index, states, outputs, a_mixes, bases, grad_y,
            grad_probs, options)
    torch.library.opcheck(torch.ops.graphmoe_fused.rounds_backward.default, args)
