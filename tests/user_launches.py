"""Records the kernel launches of layer configurations other than the benchmark's (run by
``test_compile_launches.py`` as ``python -m tests.user_launches DIR``, with
``TRITON_INTERPRET=1``).

Each configuration runs a training step (forward, backward) and an inference forward of a tiny
layer on the triton backend under ``launch_record.record_launches``. ``DIR/launches.json`` gets
the launches the compile report does not already compile at the benchmark shape;
``DIR/summary.json`` every configuration's launches, how many of them the report already
compiles, and the launched kernels no ``COMPILE_SPECS`` entry registers.

To compile a configuration of your own by hand, add it to ``USER_CONFIGS`` and run::

    TRITON_INTERPRET=1 python -m tests.user_launches /tmp/launches
    python -m graphmoe_fused.kernels.compile_report --launches /tmp/launches/launches.json
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import asdict

import torch
from graphmoe_fused.kernels.compile_report import collect_specs
from graphmoe_fused.kernels.launch_record import LaunchRecord, record_launches, write_launches

from tests.helpers import make_layer

# What users pick besides n = 8, r = 16, k = 2 in bf16, each a set of constexprs no
# benchmark-shape compile covers: two rank-8 experts per 16-column LoRA chunk and 32 padded
# router columns; a single expert per token and n·r at the masked-dense limit; k = n, a rank
# padded to 8, k not a power of two. Between them every switch a launcher turns (dropout or
# not, stored or recomputed intermediates, atomic or deterministic reductions, both GRU
# options, the zero and non-zero GRU state), and fp16.
USER_CONFIGS = {
    "32 experts of rank 8, fp16": (dict(num_experts=32, top_k=2, lora_r=8, lora_dropout=0.05,
                                        num_rounds=3), torch.float16),
    "top-1, rank 64, deterministic, recompute, candidate x, tanh": (
        dict(num_experts=4, top_k=1, lora_r=64, lora_dropout=0.05, num_rounds=3,
             deterministic=True, recompute_intermediates=True, gru_candidate_input="x",
             gru_candidate_activation="tanh"), torch.bfloat16),
    "k = n = 3, odd rank 5, no dropout": (dict(num_experts=3, top_k=3, lora_r=5,
                                               lora_dropout=0.0, num_rounds=2), torch.bfloat16),
}
HIDDEN, INTERMEDIATE, TOKENS = 32, 48, 7


def _run(config: dict, dtype: torch.dtype) -> None:
    layer = make_layer(HIDDEN, INTERMEDIATE, dtype=dtype, backend="triton", **config).train()
    x = torch.randn(TOKENS, HIDDEN, dtype=dtype, requires_grad=True)
    layer(x).float().square().sum().backward()
    with torch.no_grad():
        layer.eval()(x)


def _registered(record: LaunchRecord, specs: list) -> tuple[bool, bool]:
    """Whether the record's kernel has a spec, and whether a spec compiles this very launch
    (same argument types and constexprs, the interpreter's switch off as on a GPU)."""
    fn = getattr(importlib.import_module(record.module), record.kernel)
    constexprs = record.gpu_constexprs()
    same_fn = [s for s in specs if s.fn is fn]
    covered = any(s.types == dict(record.types) and s.constexprs == constexprs for s in same_fn)
    return bool(same_fn), covered


def main(out_dir: str) -> int:
    torch.manual_seed(0)
    specs = collect_specs()
    summary: dict = {"configs": {}, "unregistered": [], "already_compiled": 0}
    new: list[LaunchRecord] = []
    for label, (config, dtype) in USER_CONFIGS.items():
        with record_launches() as records:
            _run(config, dtype)
        summary["configs"][label] = [asdict(r) for r in records]
        for r in records:
            has_spec, covered = _registered(r, specs)
            if not has_spec and r.name not in summary["unregistered"]:
                summary["unregistered"].append(r.name)
            if covered:
                summary["already_compiled"] += 1
            elif r not in new:
                new.append(r)
    write_launches(os.path.join(out_dir, "launches.json"), new)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
