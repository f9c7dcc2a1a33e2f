"""The benchmarks' peer baseline (``bench/peers.py``, MixLoRA's operator written from its
algorithm) computes the layer's function: same output and gradients as the reference on the same
weights, so a benchmark against it compares implementations of one function."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from bench.peers import MixLoRAStyle

from .helpers import make_layer
from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize(("rounds", "top_k"), [(1, 2), (3, 2), (2, 4)])
def test_mixlora_style_matches_the_reference(rounds, top_k):
    layer = make_layer(dtype=torch.float64, backend="reference", num_experts=4, top_k=top_k,
                       lora_r=4, num_rounds=rounds)
    peer = MixLoRAStyle(layer)
    x = torch.randn(3, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probe = torch.randn_like(x)
    results = []
    for module in (layer, peer):
        xr = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = module(xr)
        (y * probe).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()
                 if p.requires_grad and p.grad is not None}
        results.append((y.detach(), xr.grad, grads))
    (y_ref, gx_ref, g_ref), (y, gx, g) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    # The router's gradient reaches it through the weights only here (no aux loss).
    assert g.keys() == g_ref.keys() and "lora_B_down" in g
    for name, want in g_ref.items():
        torch.testing.assert_close(g[name], want, rtol=1e-10, atol=1e-12, msg=name)


def test_dropout_draws_per_expert_masks_in_training_only():
    layer = make_layer(backend="reference", num_experts=4, lora_r=4, num_rounds=2,
                       lora_dropout=0.3)
    peer = MixLoRAStyle(layer)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    peer.eval()
    layer.eval()
    torch.testing.assert_close(peer(x), layer(x), rtol=1e-5, atol=1e-5)
    peer.train()
    torch.manual_seed(0)
    first = peer(x)
    torch.manual_seed(1)
    assert not torch.allclose(first, peer(x))  # fresh masks each call


def test_peers_report_reads_the_committed_runs(tmp_path):
    from bench.peers_report import main

    results = pathlib.Path(__file__).parents[1] / "bench" / "results"
    runs = sorted(results.glob("*-peers-*T1-dropout0.json"))
    assert runs, "no committed peer runs to read"
    out = tmp_path / "table.md"
    assert main([str(p) for p in runs] + ["--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines()[2:] if line.startswith("| 1 | 0 |")]
    assert len(rows) == len(runs)
    data = json.loads(runs[0].read_text())
    paired = next(b["extra_info"]["paired"] for b in data["benchmarks"]
                  if b["extra_info"]["kind"] == "paired")
    assert f"{paired['torch']['speedup_vs_mixlora']:.2f}×" in rows[0]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main([str(bad)]) == 1
