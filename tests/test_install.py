"""Installing and importing where Triton does not exist (macOS, Windows): the package depends on
triton only on Linux, and everything but the triton backend imports and runs without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement


def test_triton_is_required_on_linux_only():
    reqs = [Requirement(r) for r in requires("graphmoe_fused") or []]
    triton = [r for r in reqs if r.name == "triton"]
    assert len(triton) == 1 and triton[0].marker is not None
    assert triton[0].marker.evaluate({"platform_system": "Linux", "extra": ""})
    for system in ("Darwin", "Windows"):
        assert not triton[0].marker.evaluate({"platform_system": system, "extra": ""})
    torch_req = [r for r in reqs if r.name == "torch"]
    assert len(torch_req) == 1 and torch_req[0].marker is None


def test_train_extra_brings_accelerate():
    reqs = [Requirement(r) for r in requires("graphmoe_fused") or []]
    train = [r.name for r in reqs if r.marker is not None
             and r.marker.evaluate({"extra": "train", "platform_system": "Linux"})
             and not r.marker.evaluate({"extra": "", "platform_system": "Linux"})]
    assert "accelerate" in train


def test_everything_but_the_triton_backend_runs_without_triton():
    # A fresh interpreter in which `import triton` fails, as on a machine without the wheel.
    script = textwrap.dedent("""
        import sys

        sys.modules["triton"] = None  # `import triton` now fails, as where no wheel exists
        import torch
        import graphmoe_fused as gm
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2))
        gm.apply_graphmoe(model, gm.GraphMoEConfig(num_experts=4, lora_r=4, gru_hidden_ratio=0.25))
        ids = torch.randint(0, 32, (2, 5))
        out = model(ids, labels=ids)
        out.loss.backward()
        assert sys.modules["triton"] is None
        layer = gm.GraphMoEMLP(32, 48, gm.GraphMoEConfig(num_experts=4, lora_r=4,
                                                         gru_hidden_ratio=0.25, backend="triton"))
        try:
            layer(torch.randn(3, 32))
        except RuntimeError as err:  # the triton backend says what is missing, in one line
            print("TRITON:", err)
        print("OK", float(out.loss))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    message = proc.stdout.split("TRITON:")[1]
    assert "not installed" in message and "backend torch" in message


def test_a_source_checkout_runs_without_installing():
    """A GPU machine without network cannot ``pip install`` (the build dependencies come from the
    index): run from the checkout's root, ``graphmoe_fused.kernels`` is the checkout's kernels/
    folder, with no install (the editable install's finders removed to show it)."""
    root = Path(__file__).resolve().parents[1]
    script = textwrap.dedent("""
        import sys

        def editable(obj):
            return "__editable__" in (getattr(obj, "__module__", "") or "")

        sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
        sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
        sys.path_importer_cache.clear()
        import graphmoe_fused
        from graphmoe_fused.kernels import compile_spec
        print(graphmoe_fused.__file__, compile_spec.__file__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, kernels = proc.stdout.split()
    assert package == str(root / "graphmoe_fused" / "__init__.py")
    assert kernels == str(root / "kernels" / "compile_spec.py")
