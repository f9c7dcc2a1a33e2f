"""Every registered kernel, at every autotune config, compiles for sm_80 and sm_90 without
spills (on sm_80 from triton 3.9: ``compile_report.spill_allowance``), within the architecture's
shared memory, and on tensor cores where it multiplies matrices.

Compiling needs the real ``triton.jit`` objects, which ``TRITON_INTERPRET=1`` (set for the
session when there is no GPU) replaces, so the report runs once, in a subprocess without that
variable; the specs are collected here only for their names and counts.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
from graphmoe_fused.kernels.compile_report import (
    DEFAULT_ARCHS,
    SHARED_LIMIT,
    CompileResult,
    collect_specs,
    format_table,
    spill_allowance,
)

SPECS = collect_specs()
KERNELS = {"routing.router_topk", "gru.project", "expert.lora_in", "expert.a_mix_reduce",
           "expert.down", "expert.backward.project", "expert.backward.dh_base",
           "dropout.keep_rows"}
# The GRU: pass 1 at every combination of h given or zero, candidate x or y, tanh or sigmoid;
# the update at both activations.
GRU_TAGS = ("", "[tanh]", "[cand=x]", "[cand=x,tanh]", "[h=0]", "[h=0,tanh]", "[h=0,cand=x]",
            "[h=0,cand=x,tanh]")
KERNELS |= {f"gru.gates{t}" for t in GRU_TAGS} | {"gru.update", "gru.update[tanh]"}
# The forward gate/up kernel at every combination of dropout, stored base and deterministic
# a_mix (the training variant with dropout and atomics has no tag).
KERNELS |= {"expert.gate_up" + (f"[{t}]" if t else "") for t in (
    "", "save_base", "deterministic", "save_base,deterministic", "no dropout",
    "no dropout,save_base", "no dropout,deterministic", "no dropout,save_base,deterministic")}
# The backward: in bf16 the gate/up kernel at every combination of saved G, U, dropout and
# deterministic reductions, the token-reducing kernels at those of dropout and deterministic;
# fp16 of every kernel and r = 64 (n = 4) of those with a rank constexpr, each in the training
# default beside recomputation (and at r = 64 deterministic).
KERNELS |= {f"expert.backward.gate_up{t}" for t in (
    "", "[saved]", "[deterministic]", "[saved,deterministic]", "[no dropout]",
    "[saved,no dropout]", "[no dropout,deterministic]", "[saved,no dropout,deterministic]",
    "[fp16]", "[fp16,saved]", "[r=64]", "[r=64,saved]", "[r=64,deterministic]")}
KERNELS |= {f"expert.backward.{k}{t}" for k in ("gate_up_wgrad", "dx") for t in (
    "", "[deterministic]", "[no dropout]", "[no dropout,deterministic]", "[fp16]", "[r=64]",
    "[r=64,deterministic]")}
KERNELS |= {"expert.backward.project[fp16]", "expert.backward.dh_base[fp16]"}
# The GRU backward: its gates pass at every combination (and deterministic), in fp16 once;
# the candidate pass at both activations and reductions; the input pass as each candidate
# input launches it; the weight reductions both ways.
KERNELS |= {f"gru_bwd.gates{t}" for t in GRU_TAGS}
KERNELS |= {f"gru_bwd.gates{t[:-1]},deterministic]" if t else "gru_bwd.gates[deterministic]"
            for t in GRU_TAGS}
KERNELS |= {f"gru_bwd.{n}" for n in (
    "gates[fp16]", "candidate", "candidate[tanh]", "candidate[deterministic]",
    "candidate[tanh,deterministic]", "candidate[fp16,tanh,deterministic]", "reset", "input[h]",
    "input[y,cand=y]", "input[x,cand=x]", "input[y,cand=x]", "input[y,h=0,cand=y]",
    "input[y,h=0,cand=x]", "weight", "weight[deterministic]",
    "weight[fp16,deterministic]")}
REPORT = "graphmoe_fused.kernels.compile_report"


def _env_without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_report") / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", REPORT, "--json", str(path)],
        env=_env_without_interpreter(), capture_output=True, text=True, timeout=1500,
    )
    # Exit status 1 only says some row is not ok; the per-kernel tests below say which.
    assert proc.returncode in (0, 1) and path.exists(), proc.stderr[-4000:]
    return json.loads(path.read_text())


def test_registry_has_the_kernels():
    names = {spec.name for spec in SPECS}
    assert names == KERNELS
    assert all(spec.configs for spec in SPECS)


@pytest.mark.parametrize("index", range(len(SPECS)), ids=[s.name for s in SPECS])
def test_kernel_compiles_clean(report, index):
    spec = SPECS[index]
    rows = [r for r in report["results"] if r["kernel"] == spec.name]
    assert len(rows) == len(spec.configs) * len(DEFAULT_ARCHS) * sum(
        s.name == spec.name for s in SPECS
    )
    problems = []
    for r in rows:
        where = f"sm_{r['arch']} {r['config']} w{r['num_warps']} s{r['num_stages']}"
        if r["error"]:
            problems.append(f"{where}: {r['error']}")
            continue
        # Only a spill the spec declares (with its reason) is tolerated, and only up to its size.
        if r["spill_bytes"] > spill_allowance(spec, r["arch"], report["triton"]):
            problems.append(f"{where}: spills {r['spill_bytes']} B/thread")
        # A kernel without a matrix product may need no shared memory at all.
        if not int(spec.tensor_cores) <= r["shared_bytes"] <= SHARED_LIMIT[r["arch"]]:
            problems.append(f"{where}: shared memory {r['shared_bytes']} B")
        if spec.tensor_cores and not r["tensor_core_instructions"]:
            problems.append(f"{where}: no tensor-core instruction")
        if r["registers"] <= 0:
            problems.append(f"{where}: register count not read")
    assert not problems, "\n".join(problems)


def test_report_flags_a_spilling_config():
    """The detector is live: a tile far too large for the register file must show spills."""
    code = (
        "import json, triton\n"
        "from dataclasses import asdict\n"
        f"from {REPORT} import compile_one\n"
        "from graphmoe_fused.kernels.gru.lowrank_gru import COMPILE_SPECS\n"
        "spec = next(s for s in COMPILE_SPECS if s.name == 'gru.update')\n"
        "cfg = triton.Config({'BLOCK_M': 256, 'BLOCK_H': 128, 'BLOCK_K': 32}, num_warps=4,"
        " num_stages=2)\n"
        "print(json.dumps(asdict(compile_one(spec, cfg, 80))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = CompileResult(**json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not row.error
    assert row.spill_bytes > 0 and not row.ok
    assert "FAIL" in format_table([row])


def test_ok_rules():
    good = CompileResult("k", "c", 80, 4, 3, registers=100, spill_bytes=0, shared_bytes=1024,
                         shared_limit=SHARED_LIMIT[80], tensor_core_instructions=["mma.sync"])
    assert good.ok
    for change in ({"shared_bytes": SHARED_LIMIT[80] + 1}, {"spill_bytes": 4},
                   {"tensor_core_instructions": []}, {"error": "boom"}):
        assert not CompileResult(**{**asdict(good), **change}).ok
    assert CompileResult(**{**asdict(good), "tensor_core_instructions": [],
                            "expects_tensor_cores": False}).ok
    known = CompileResult(**{**asdict(good), "spill_bytes": 24, "spill_allowed": 32})
    assert known.ok and "ok (spills)" in format_table([known])
    assert not CompileResult(**{**asdict(known), "spill_bytes": 40}).ok


def test_spill_allowance_by_triton_release():
    spec = SPECS[0]
    assert spill_allowance(spec, 90, "3.6.0") == 0 and spill_allowance(spec, 90, "3.8.0") == 0
    assert spill_allowance(spec, 80, "3.9.1") == 0 and spill_allowance(spec, 80, "3.10.0") == 0
    assert spill_allowance(spec, 80, "3.6.0") == spill_allowance(spec, 80, "3.8.0") == 128


def test_known_spills_are_few_and_explained():
    # A declared spill is a defect on record, not a licence: each names its reason in the note.
    declared = [s for s in SPECS if s.known_spills]
    assert [s.name for s in declared] == []  # none today; a new one must be added here
    assert all("spill" in s.note for s in declared)


def test_cli_leaves_the_interpreter(report):
    """Started under TRITON_INTERPRET=1 the CLI re-runs itself without it (the kernels are
    cached by the report fixture, so this is quick)."""
    env = {**_env_without_interpreter(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", REPORT, "--modules", "routing.router_topk",
                           "--arch", "80", "--jobs", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    routing = next(s for s in SPECS if s.name == "routing.router_topk")
    assert proc.stdout.count("routing.router_topk") == len(routing.configs)
