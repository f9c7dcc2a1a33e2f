"""The kernels that layer configurations other than the benchmark's really launch compile for
sm_80 and sm_90 (``kernels/launch_record.py``).

``tests/user_launches.py`` runs each configuration of its ``USER_CONFIGS`` (a training step and
an inference forward) under the interpreter and records every launch: kernel, constexprs,
argument types and alignment, as the launchers chose them. The compile report then compiles
each launch it does not already compile at the benchmark shape, at every GPU config the
launch may use. A compile error or a block past the architecture's shared memory fails; a
spill is only listed (the autotuner times a spilling config like any other).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPORT = "graphmoe_fused.kernels.compile_report"


def _run(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("launches")
    proc = _run(["tests.user_launches", str(out)], {**os.environ, "TRITON_INTERPRET": "1"}, 900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def compiled(recorded):
    out, _ = recorded
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _run([REPORT, "--launches", str(out / "launches.json"), "--json",
                 str(out / "report.json")], env, 1500)
    # Exit status 1 only says some row failed; test_recorded_launches_compile says which.
    assert proc.returncode in (0, 1) and (out / "report.json").exists(), proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def _launches(summary: dict, label: str, kernel: str) -> list[dict]:
    return [r for r in summary["configs"][label] if r["kernel"] == kernel]


def test_every_launched_kernel_is_registered(recorded):
    _, summary = recorded
    assert summary["configs"] and summary["unregistered"] == []


def test_the_configurations_reach_their_constexprs(recorded):
    """The recording sees what each configuration makes the launchers choose (so the compiles
    below are of those kernels), and block sizes are left to the GPU configs."""
    _, summary = recorded
    routers = _launches(summary, "32 experts of rank 8, fp16", "_router_topk_kernel")
    assert routers and all(
        dict(r["constexprs"]) == {"TOP_K": 2, "N_PAD": 32, "K_PAD": 2, "INTERP_BF16": False}
        and dict(r["types"])["x_ptr"] == "*fp16" for r in routers)
    gate_up = _launches(summary, "k = n = 3, odd rank 5, no dropout", "_expert_gate_up_kernel")
    assert {(c["NUM_EXPERTS"], c["RANK"], c["R_PAD"], c["TOP_K"], c["HAS_DROPOUT"])
            for c in (dict(r["constexprs"]) for r in gate_up)} == {(3, 5, 8, 3, False)}
    assert {dict(r["constexprs"])["SAVE_BASE"] for r in gate_up} == {True, False}
    label = "top-1, rank 64, deterministic, recompute, candidate x, tanh"
    # Launches that differ only in alignment (a view's offset) are recorded apart, as triton
    # compiles them apart.
    assert {tuple((k, v) for k, v in r["constexprs"] if k != "INTERP_BF16")
            for r in _launches(summary, label, "_dx_kernel")} == {(
        ("DETERMINISTIC", True), ("HAS_DROPOUT", True), ("NUM_EXPERTS", 4), ("RANK", 64),
        ("R_PAD", 64), ("TOP_K", 1))}
    assert {dict(r["constexprs"])["RECOMPUTE"]
            for r in _launches(summary, label, "_gate_up_backward_kernel")} == {True}
    assert {dict(r["constexprs"])["CAND_X"] for r in _launches(summary, label,
                                                                "_gru_gates_kernel")} == {True}
    for records in summary["configs"].values():
        assert all(not k.startswith("BLOCK_") for r in records for k, _ in r["constexprs"])


def test_recorded_launches_compile(recorded, compiled):
    out, summary = recorded
    launches = json.loads((out / "launches.json").read_text())
    rows = compiled["results"]
    # Each new launch at two architectures and at least one config: nothing was left out.
    assert launches and len(rows) >= 2 * len(launches)
    problems = [
        f"{r['kernel']} [{r['note']}] sm_{r['arch']} {r['config']} w{r['num_warps']} "
        f"s{r['num_stages']}: " + (r["error"] or f"shared memory {r['shared_bytes']} B")
        for r in rows if r["error"] or not 0 <= r["shared_bytes"] <= r["shared_limit"]
    ]
    assert not problems, "\n".join(problems)
    assert all(r["registers"] > 0 for r in rows)
