"""The routing change between rounds that the rounds experiment reports."""

from __future__ import annotations

import torch

from graphmoe_fused.hf.routing_trace import changed_between_rounds, trace_routing

from .tiny_models import batch, converted


def test_a_reordered_slot_is_no_change_and_a_new_expert_is():
    index = torch.tensor([
        [[0, 1], [2, 3], [1, 0], [4, 5]],
        [[1, 0], [2, 4], [1, 0], [4, 5]],   # token 1 swaps expert 3 for 4
        [[5, 6], [2, 4], [0, 1], [5, 4]],   # token 0 moves to {5, 6}
    ])
    assert changed_between_rounds(index).tolist() == [0.25, 0.25]


def test_one_round_has_no_pairs_and_no_tokens_is_zero():
    assert changed_between_rounds(torch.zeros(1, 5, 2, dtype=torch.long)).numel() == 0
    assert changed_between_rounds(torch.zeros(3, 0, 2, dtype=torch.long)).tolist() == [0.0, 0.0]


def test_trace_keeps_the_non_padding_tokens_of_every_layer_and_unhooks():
    model = converted("llama", num_rounds=3)
    ids, mask, _ = batch(batch_size=3, seq_len=7)
    with torch.no_grad(), trace_routing(model) as traces:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(traces) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for (index,) in traces.values():
        assert index.shape == (3, int(mask.sum()), 2)
        assert index.min() >= 0 and index.max() < 4
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert all(len(v) == 1 for v in traces.values())  # hooks removed on exit
