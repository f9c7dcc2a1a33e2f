"""``python -m bench.gpu_check``, the one command a GPU loan runs, must not rot while no GPU is
around: its ``--dry-run`` (the same steps on the CPU at tiny shapes, the kernels under the Triton
interpreter) runs here, and a step that raises or hangs is recorded while the others run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_check(out: Path, *args: str, env: dict[str, str] | None = None
              ) -> tuple[subprocess.CompletedProcess, dict, str]:
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out",
                           str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, check=False)
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    return done, json.loads(json_path.read_text()), md_path.read_text()


def test_dry_run_passes_every_step(tmp_path):
    done, results, report = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {Path(f).suffix for f in files} == {".json", ".md", ".log"}
    assert files[0].endswith("-cpu-dryrun.json")
    assert list(results["steps"]) == ["environment", "correctness", "benchmarks", "compile"]
    for name, step in results["steps"].items():
        assert step["status"] == "PASS", (name, step)
        assert step["checks"], name
        for check, entry in step["checks"].items():
            assert entry["status"] in ("PASS", "SKIP"), (name, check, entry)
            if entry["status"] == "SKIP":
                assert entry["reason"], (name, check)
    checks = results["steps"]["correctness"]["checks"]
    assert {"determinism", "hf_training_step"} <= set(checks)
    assert any("rel_err" in c for c in checks.values())
    layer = results["steps"]["benchmarks"]["checks"]["layer"]
    assert {"speedup_vs_reference", "speedup_vs_mixlora", "vs_T_dense"} <= set(
        layer["fwd_bwd"]["triton"])
    floors = results["steps"]["benchmarks"]["checks"]["floors"]
    assert floors["gpu_spec"] == "H100" and all(v > 0 for v in floors["fwd_bwd_ms"].values())
    assert "## Headline" in report
    assert "| `triton` |" in report and "| `mixlora` |" in report
    kernels = results["steps"]["benchmarks"]["checks"]["kernels"]
    assert {"routing_order_speedup", "routing_order_speedup_backward"} <= set(kernels)
    # No device kernels on a CPU: the profile's groups carry the floors of the tiny shape.
    prof = results["steps"]["benchmarks"]["checks"]["kernel_profile"]
    assert prof["kernel_ms"] == 0 and prof["floor_ms"] > 0
    assert {g["name"] for g in prof["groups"]} >= {"_dx_kernel", "_gate_up_wgrad_kernel"}
    assert set(results["steps"]["benchmarks"]["checks"]["switches"]) >= {
        "default", "deterministic", "recompute_intermediates", "lora_dropout=0.05"}
    assert "## triton fwd+bwd by switch" in report
    assert "## One training step's device kernels against the roofline" in report
    assert "| gate_up_wgrad |" in report


def test_device_kernels_counts_the_cuda_events_per_step():
    from types import SimpleNamespace

    import torch

    from bench.gpu_check_steps import device_kernels

    def event(name, device, us):
        span = SimpleNamespace(elapsed_us=lambda: us)
        return SimpleNamespace(name=name, device_type=device, time_range=span)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event("_dx_kernel", cuda, 300), event("_dx_kernel", cuda, 500),
              event("aten::mm", cpu, 9000), event("Memset (Device)", cuda, 2)]
    got = device_kernels(events, steps=2)
    assert got == {"_dx_kernel": (1, pytest.approx(4e-4)), "Memset (Device)": (0.5, 1e-6)}


def test_record_tunings_keeps_every_new_tuning_and_its_config_times():
    from types import SimpleNamespace

    from bench.gpu_check import autotune_lines
    from bench.gpu_check_steps import autotuners, record_tunings

    assert {"expert.backward._dx_tuned", "gru.lowrank_gru._gates_tuned"} <= set(autotuners())

    def tune(key):  # an autotuner's run: a new key is benchmarked, a known one is not
        if key not in tuner.cache:
            tuner.configs_timings = {"cfg-a": [2.0, 1.9, 2.1], "cfg-b": [1.0, 0.9, 1.1]}
            tuner.cache[key] = "cfg-b"
        return key

    tuner = SimpleNamespace(cache={("old",): "cfg-a"})
    tuner.run = tune
    record = record_tunings({"k": tuner})
    assert [tuner.run(k) for k in (("old",), ("new",), ("new",))] == [("old",), ("new",),
                                                                     ("new",)]
    assert record == {"k": [{"key": "('new',)", "chosen": "cfg-b",
                             "ms": {"cfg-a": 2.0, "cfg-b": 1.0}}]}
    assert "| k | `('new',)` | 2 | `cfg-b` | 1 ms | 2× | 2× |" in "\n".join(
        autotune_lines(record))


def test_rotate_configs_runs_the_index_th_of_the_configs_left_after_pruning():
    from types import SimpleNamespace

    from bench.gpu_check_steps import rotate_configs

    tuner = SimpleNamespace(prune_configs=lambda kwargs: ["a", "b", "c"][:kwargs["keep"]])
    ran = rotate_configs({"k": tuner}, index=4)
    assert tuner.prune_configs({"keep": 3}) == ["b"]  # 4 mod 3
    assert tuner.prune_configs({"keep": 2}) == ["a"]  # 4 mod 2
    assert tuner.prune_configs({"keep": 3}) == ["b"]
    assert ran == {"k": ["b", "a"]}
    assert tuner._bench(1, 2, config="b") == [0.0, 0.0, 0.0]  # one config: nothing timed
    tuner = SimpleNamespace(prune_configs=lambda kwargs: ["a", "b", "c"][:kwargs["keep"]])
    ran = rotate_configs({"k": tuner}, index=2, count=2)
    assert tuner.prune_configs({"keep": 3}) == ["c", "a"]
    assert tuner.prune_configs({"keep": 1}) == ["a"]
    assert ran == {"k": ["c", "a"]}
    assert not hasattr(tuner, "_bench")  # two: timed against each other, as users' tuning


def test_rotate_configs_runs_a_real_autotuner_on_one_config_untimed():
    # A triton autotuner under the interpreter: timing a config there would fail (no CUDA
    # events), so running at all shows nothing was timed, whichever triton release is installed.
    import torch
    import triton
    import triton.language as tl

    from bench.gpu_check_steps import rotate_configs

    @triton.autotune(configs=[triton.Config({"B": b}) for b in (2, 4, 8)], key=["n"])
    @triton.jit
    def write_block(out_ptr, n, B: tl.constexpr):
        offsets = tl.arange(0, B)
        tl.store(out_ptr + offsets, tl.full((B,), B, tl.int32), mask=offsets < n)

    ran = rotate_configs({"write_block": write_block}, index=1)
    out = torch.zeros(8, dtype=torch.int32)
    write_block[(1,)](out, 8)
    assert out.tolist() == [4] * 4 + [0] * 4
    assert [c.split(",")[0] for c in ran["write_block"]] == ["B: 4"]


def test_a_correctness_case_fails_a_backend_with_one_wrong_gradient(monkeypatch):
    # What the GPU run's correctness checks are for: a gradient 30 % off, in one backend, fails
    # its case by name (the dry run shows that right answers pass).
    import torch

    from bench import gpu_check_steps as steps

    real = steps.get_backend

    def get_backend(name):
        backend = real(name)
        if name != "torch":
            return backend

        def wrong(x, p, opt):
            if p.lora_B_down.requires_grad:
                p.lora_B_down.register_hook(lambda g: 1.3 * g)
            return backend(x, p, opt)
        return wrong

    monkeypatch.setattr(steps, "get_backend", get_backend)
    sc = steps.StepContext(True, torch.device("cpu"), rec=None)
    result = steps.correctness_case(sc, steps.DRY_SHAPES[0], torch.bfloat16, False, 0.0)
    assert result["status"] == "FAIL"
    assert [f.split(":")[0] for f in result["failures"]] == ["torch grad_lora_B_down"]


def test_a_failing_step_is_recorded_and_the_others_run(tmp_path):
    # --only keeps the order given: the step after the raising and the hanging ones still runs.
    done, results, report = run_check(
        tmp_path, "--only", "correctness", "benchmarks", "environment", "--step-timeout", "15",
        env={"GRAPHMOE_GPU_CHECK_INJECT": "correctness:raise,benchmarks:hang"})
    assert done.returncode == 1
    steps = results["steps"]
    assert list(steps) == ["correctness", "benchmarks", "environment"]
    assert steps["correctness"]["status"] == "FAIL"
    assert "failure injected into step 'correctness'" in steps["correctness"]["traceback"]
    assert steps["benchmarks"]["status"] == "TIMEOUT"
    assert "inject" in steps["benchmarks"]["traceback"]  # the hung step's stack
    assert steps["environment"]["status"] == "PASS"
    assert "## correctness: FAIL" in report and "## benchmarks: TIMEOUT" in report


def test_a_check_that_loses_the_cuda_context_costs_only_itself(tmp_path):
    # After an illegal address every CUDA call in that process fails: the step records the
    # check, then a new process runs the checks after it, keeping (not rerunning) those before.
    done, results, report = run_check(
        tmp_path, "--only", "benchmarks",
        env={"GRAPHMOE_GPU_CHECK_INJECT": "benchmarks.kernels:lose-context"})
    assert done.returncode == 1
    step = results["steps"]["benchmarks"]
    assert step["status"] == "FAIL"
    assert step["context_lost_at"] == ["kernels"] and step["processes"] == 2
    checks = step["checks"]
    assert list(checks) == ["config", "compile_cache", "layer", "floors", "kernels",
                            "kernel_profile", "rounds_T1_to_T5", "memory", "switches", "autotune"]
    assert "illegal memory access" in checks["kernels"]["traceback"]
    assert checks["kernels"]["status"] == "FAIL" and checks["kernels"]["context_lost"]
    assert all(checks[name]["status"] == "PASS" for name in (
        "layer", "floors", "kernel_profile", "rounds_T1_to_T5", "memory", "switches"))
    (log,) = tmp_path.glob("*.log")
    ran = [line for line in log.read_text().splitlines()
           if line.startswith("[check] ") and line.endswith(" ...")]
    assert ran == [f"[check] {name} ..." for name in checks]  # each once
    assert "The CUDA context was lost at `kernels`" in report


def test_a_failing_or_hanging_check_process_is_recorded_and_the_others_run(tmp_path):
    # correctness runs each check in its own process: one raising and one hanging (stopped at
    # the time box, its stack recorded) cost only themselves.
    done, results, _ = run_check(
        tmp_path, "--only", "correctness", "--step-timeout", "30",
        env={"GRAPHMOE_GPU_CHECK_INJECT":
             "correctness.determinism:raise,correctness.hf_training_step:hang"})
    assert done.returncode == 1
    step = results["steps"]["correctness"]
    assert step["status"] == "FAIL" and step["seconds"] < 30
    checks = step["checks"]
    assert "failure injected into step 'correctness.determinism'" in checks["determinism"][
        "traceback"]
    hung = checks["hf_training_step"]
    assert hung["status"] == "FAIL" and "still running" in hung["reason"]
    assert "inject" in hung["traceback"]  # its stack, dumped on SIGTERM
    first = next(iter(checks))
    assert first.startswith("dry/") and checks[first]["status"] == "PASS"


def test_compile_cache_processes_run_the_benchmark_launches_and_failures_are_recorded(
        tmp_path, monkeypatch):
    # The dry run skips this check (the interpreter compiles nothing), so it runs here. Three
    # config indices, three processes: the first raises, the second hangs past the limit, the
    # third runs every launch of the benchmarks (the interpreter's one config per kernel).
    from types import SimpleNamespace

    import torch

    from bench import gpu_check_steps as steps

    monkeypatch.setattr(steps, "autotuners",
                        lambda: {"k": SimpleNamespace(configs=["a", "b", "c"])})
    monkeypatch.setenv(steps.INJECT_ENV, "warm.0:raise,warm.1:hang")
    rec = steps.Recorder(str(tmp_path / "benchmarks.json"), time.time() + 60, margin=0.0)
    result = steps.warm_compile_cache(steps.StepContext(True, torch.device("cpu"), rec), 20.0)
    assert result["status"] == "FAIL" and result["processes"] == 3
    assert result["failed_indices"] == ["0"]
    assert "failure injected into step 'warm.0'" in result["failures"][0]
    assert result["cut_at_limit"] == [1] and 20.0 <= result["wall_s"] < 35.0
    ran = (tmp_path / "warm-2.log").read_text()
    assert [line for line in ran.splitlines() if line.startswith("warm 2:")] == [
        f"warm 2: {name} compiled" for name in
        ("default", "deterministic", "recompute_intermediates", "lora_dropout=0.05")]


def test_a_tool_the_machine_will_not_run_is_skipped_with_its_reason(tmp_path, monkeypatch):
    from bench import gpu_check_steps as steps

    tool = tmp_path / "fake-ncu"
    tool.write_text('#!/bin/sh\necho "caching off: $PYTORCH_NO_CUDA_MEMORY_CACHING"\n'
                    'echo "$FAKE_OUT"\nexit "$FAKE_RC"\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def run(output: str, code: int) -> dict:
        monkeypatch.setenv("FAKE_OUT", output)
        monkeypatch.setenv("FAKE_RC", str(code))
        return steps._tool(["fake-ncu"], 10, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})

    with pytest.raises(steps.Skip, match="fake-ncu cannot run here: ==ERROR== ERR_NVGPUCTRPERM"):
        run("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission", 1)
    failed = run("========= Invalid __global__ write of size 4 bytes", 1)
    assert failed["status"] == "FAIL" and "Invalid __global__ write" in failed["output_tail"]
    passed = run("==PROF== Disconnected", 0)
    assert passed["status"] == "PASS" and "caching off: 1" in passed["output_tail"]
    with pytest.raises(steps.Skip, match="not on PATH"):
        steps._tool(["no-such-tool-on-this-machine"], 1)


def test_results_are_on_disk_after_each_step_even_when_the_report_fails(tmp_path, monkeypatch):
    from bench import gpu_check

    seen: list[list[str]] = []

    def fake_step(step, dry_run, timeout, work, log):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))  # before this step runs
        return {"status": "PASS", "seconds": 0.0, "checks": {step: {"status": "PASS"}}}

    def broken_markdown(results):
        raise ZeroDivisionError("a row with no figures")

    monkeypatch.setattr(gpu_check, "run_step_process", fake_step)
    monkeypatch.setattr(gpu_check, "markdown", broken_markdown)
    assert gpu_check.run_all(str(tmp_path), True, ["environment", "correctness"], None) == 0
    assert not any(name.endswith((".json", ".md")) for name in seen[0])
    stem = next(n for n in seen[1] if n.endswith(".json"))[:-len(".json")]
    assert {stem + ".json", stem + ".md"} <= set(seen[1])  # written after the first step
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert list(results["steps"]) == ["environment", "correctness"]
    report = (tmp_path / f"{stem}.md").read_text()
    assert "failed to render" in report and "ZeroDivisionError" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [stem + ".json", stem + ".md", stem + ".log"])
