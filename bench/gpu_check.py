"""Everything a short GPU loan should bring back, in one command:

    python3 -m bench.gpu_check --out bench/results      # from the checkout's root, no install

Four steps, in order, each in its own process with its own time box, so that one failing or
hanging step does not eat the others; a check whose CUDA error poisons its process (an illegal
address) costs only itself, the step's later checks running in a new process:

1. ``environment``: GPU, capability, memory, clocks, driver, versions, git commit;
2. ``correctness``: triton vs torch vs reference at ``llama3-8b`` (256 tokens) and at odd sizes
   (d = 4000, D' = 11000, 777 tokens), bf16 and fp16, forward and every gradient against the
   reference in fp32, recompute both ways, dropout on and off, outputs poisoned with NaN;
   determinism; a tiny HF model's training step on the triton backend; each check in its own
   process, several at once (their Triton compiles spread over the cores);
3. ``benchmarks``: ``llama3-8b``, bf16, T = 3, 8192 tokens, its triton kernels first compiled
   in parallel processes: dense, reference, MixLoRA-style, torch, triton, interleaved; each
   round kernel; every kernel of a profiled training step against its roofline floor;
   T = 1..5; GRU share; memory; the switches;
4. ``compile``: the compile report for the device's architecture; compute-sanitizer and ncu on
   one small round where they are on PATH.

Writes ``<date>-<gpu>.json`` (every figure), ``<date>-<gpu>.md`` (the report) and
``<date>-<gpu>.log`` to ``--out``: three files. ``--dry-run`` runs the same steps on the CPU at
tiny shapes, the kernels under ``TRITON_INTERPRET=1`` (about a minute on two cores;
tests/test_gpu_check.py).
Exit status 0 when no step failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

# Seconds per step on a GPU (the total stays under 8 minutes); --step-timeout overrides.
# The environment step imports torch, transformers and triton and starts CUDA on a machine that
# has just booted: 40 s, not less.
STEP_TIMEOUTS = {"environment": 40, "correctness": 160, "benchmarks": 160, "compile": 110}
TOTAL_BUDGET = 470
MIN_STEP = 20  # kept back for each later step when an earlier one runs long
# A step process's exit status once a check has left its CUDA context unusable.
CONTEXT_LOST = 75
RESUME_MIN_S = 15  # a step's process after a lost CUDA context: imports, CUDA, a check or two
DRY_TIMEOUT = 120


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results", help="results folder (3 files)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, Triton interpreter: the code paths in a minute")
    parser.add_argument("--only", nargs="+", choices=sorted(STEP_TIMEOUTS), metavar="STEP",
                        help="run these steps, in this order (default: all four)")
    parser.add_argument("--step-timeout", type=float, help="seconds per step (all steps)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # child: run one step
    parser.add_argument("--check", help=argparse.SUPPRESS)  # ... or only this check of it
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=int, help=argparse.SUPPRESS)  # compile_cache's process
    args = parser.parse_args(argv)
    if args.probe:
        from bench.gpu_check_steps import probe

        probe()
        return 0
    if args.warm is not None:
        from bench.gpu_check_steps import warm

        warm(args.warm, args.dry_run)
        return 0
    if args.step:
        return _child(args)
    return run_all(args.out, args.dry_run, args.only or list(STEP_TIMEOUTS), args.step_timeout)


def _child(args: argparse.Namespace) -> int:
    import faulthandler
    import signal

    # Where a step hangs: its stacks, a few seconds before the parent kills it, or when a
    # parent running its checks in processes stops one (SIGTERM, then SIGKILL).
    stack = open(args.result + ".stack", "w", encoding="utf-8")  # noqa: SIM115 - lives on
    faulthandler.dump_traceback_later(max(1.0, args.deadline - time.time() - 3), file=stack)
    faulthandler.register(signal.SIGTERM, file=stack, chain=False)
    from bench.gpu_check_steps import run_step

    budget = args.deadline - time.time()
    code = run_step(args.step, args.dry_run, args.result, args.deadline, margin=0.1 * budget,
                    only=args.check, resume=args.resume)
    if code == CONTEXT_LOST:  # no CUDA teardown in a context that fails every call
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def child_env(step: str, dry_run: bool, cache: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TRITON_CACHE_DIR", cache)  # autotune results too: a rerun skips tuning
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if step == "correctness":
        env["GRAPHMOE_FUSED_POISON_OUTPUTS"] = "1"  # unwritten outputs show up as NaN
    if dry_run and step != "compile":  # the interpreter, set before triton is imported
        env["TRITON_INTERPRET"] = "1"
    elif step == "compile":  # compile_report cannot compile interpreter objects
        env.pop("TRITON_INTERPRET", None)
    return env


def run_step_process(step: str, dry_run: bool, timeout: float, work: str, log: Any
                     ) -> dict[str, Any]:
    """Runs one step in a child process; its checks, status and (on failure) traceback.

    A check that loses the CUDA context (an illegal address: every later call in that process
    fails) ends the process after recording itself; a new one then runs the step's remaining
    checks within the same time box, keeping those recorded (``context_lost_at``)."""
    result = os.path.join(work, f"{step}.json")
    deadline = time.time() + timeout
    cmd = [sys.executable, "-m", "bench.gpu_check", "--step", step, "--result", result,
           "--deadline", str(deadline)] + (["--dry-run"] if dry_run else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = child_env(step, dry_run, os.path.join(tempfile.gettempdir(),
                                                 "graphmoe-gpu-check-triton-cache"))
    start, log_start = time.perf_counter(), log.tell()
    processes = 0
    while True:
        proc = subprocess.Popen(cmd + (["--resume"] if processes else []), cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        processes += 1
        try:
            code: int | None = proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill(proc, group=True)  # the step and anything it started (ncu, ptxas workers)
            code = None
        if code != CONTEXT_LOST or deadline - time.time() < RESUME_MIN_S:
            break
        _say(log, f"== step {step}: a check lost the CUDA context; the rest in a new process")
    entry: dict[str, Any] = {"checks": {}, **read_json(result)}
    entry["seconds"] = round(time.perf_counter() - start, 1)
    entry["timeout_s"] = round(timeout)
    lost = [name for name, c in entry["checks"].items() if c.get("context_lost")]
    if lost:
        entry["context_lost_at"] = lost
        entry["processes"] = processes
    statuses = [c["status"] for c in entry["checks"].values()]
    if code is None:
        entry["status"] = "TIMEOUT"
        entry["traceback"] = read_text(result + ".stack") or f"killed after {timeout:.0f} s"
    elif code not in (0, CONTEXT_LOST):
        entry["status"] = "FAIL"
        entry["traceback"] = last_traceback(log.name, log_start) or f"exit status {code}"
    else:
        entry["status"] = "FAIL" if "FAIL" in statuses or code else "PASS"
    return entry


def kill(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGKILL ``proc`` (its whole process group with ``group``) and reap it, waiting at most
    15 s: a process stuck in the GPU driver may outlive SIGKILL for a while."""
    try:
        if group:
            os.killpg(proc.pid, 9)
        else:
            proc.kill()
    except ProcessLookupError:  # it exited meanwhile
        pass
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass


def read_text(path: str, offset: int = 0) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read().strip()
    except OSError:
        return ""


def read_json(path: str) -> dict[str, Any]:
    """A step's or check's result file; empty where its process never wrote one."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def last_traceback(log_path: str, offset: int) -> str:
    """The last traceback the step's process wrote to the log (from ``offset`` on)."""
    text = read_text(log_path, offset)
    at = text.rfind("Traceback (most recent call last)")
    return text[at:].strip()[-6000:] if at >= 0 else ""


def run_all(out: str, dry_run: bool, steps: list[str], step_timeout: float | None) -> int:
    os.makedirs(out, exist_ok=True)
    started = time.time()
    log_path = os.path.join(out, "gpu_check-running.log")
    results: dict[str, Any] = {"dry_run": dry_run, "started": _now(), "steps": {}}
    stem = ""
    with tempfile.TemporaryDirectory() as work, open(log_path, "w", encoding="utf-8") as log:
        for i, step in enumerate(steps):
            left = TOTAL_BUDGET - (time.time() - started) - MIN_STEP * (len(steps) - i - 1)
            timeout = step_timeout or (DRY_TIMEOUT if dry_run else
                                       max(MIN_STEP, min(STEP_TIMEOUTS[step], left)))
            _say(log, f"== step {step} (time box {timeout:.0f} s)")
            entry = run_step_process(step, dry_run, timeout, work, log)
            results["steps"][step] = entry
            _say(log, f"== step {step}: {entry['status']} in {entry['seconds']} s")
            # Named once the GPU is known, and rewritten after every step: a run killed from
            # outside (a loan's own time limit) still leaves every finished step's figures.
            stem = stem or os.path.join(
                out, f"{datetime.date.today().isoformat()}-{device_slug(results)}")
            results["wall_s"] = round(time.time() - started, 1)
            report = write_results(stem, results)
        print(report, flush=True)
        _say(log, f"wrote {stem}.json, {stem}.md, {stem}.log ({results['wall_s']} s)")
    os.replace(log_path, stem + ".log")
    return 0 if all(s["status"] == "PASS" for s in results["steps"].values()) else 1


def write_results(stem: str, results: dict[str, Any]) -> str:
    """Writes ``stem.json`` and ``stem.md`` (each replaced whole, never half-written); returns
    the report. A report that fails to render says so; the JSON holds the figures anyway."""
    try:
        report = markdown(results)
    except Exception:  # noqa: BLE001 - the figures must reach the disk whatever the report does
        report = "# GPU check\n\nThe report failed to render; the figures are in the JSON.\n\n" \
                 f"```\n{traceback.format_exc()}```\n"
    for suffix, text in ((".json", json.dumps(results, indent=1, default=str)), (".md", report)):
        with open(stem + suffix + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(stem + suffix + ".tmp", stem + suffix)
    return report


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _say(log: Any, line: str) -> None:
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def device_slug(results: dict[str, Any]) -> str:
    """``h200``, ``h100-80gb-hbm3``... from the GPU's name; ``cpu-dryrun`` for a dry run."""
    if results["dry_run"]:
        return "cpu-dryrun"
    gpu = results["steps"].get("environment", {}).get("checks", {}).get("gpu", {})
    name = re.sub(r"^nvidia\s+", "", str(gpu.get("name", "gpu")).lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


# --------------------------------------------------------------------------- report


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def headline(bench: dict[str, Any]) -> list[str]:
    """The per-implementation table: times, speed-ups (paired), saved bytes, CUDA peak."""
    layer = bench.get("layer", {})
    mem = bench.get("memory", {})
    floor_ms = bench.get("floors", {}).get("fwd_bwd_ms", {})
    fwd, fb = layer.get("fwd", {}), layer.get("fwd_bwd", {})
    rows = []
    for impl in ("dense", "reference", "mixlora", "torch", "triton"):
        f, b, m = fwd.get(impl, {}), fb.get(impl, {}), mem.get(impl, {})
        peak = m.get("cuda_peak_fwd_bwd_bytes")
        of_floor = (b["median_ms"] / floor_ms[impl]
                    if impl in floor_ms and "median_ms" in b else None)
        rows.append((f"`{impl}`", _fmt(f.get("median_ms"), " ms"), _fmt(b.get("median_ms"), " ms"),
                     _fmt(of_floor, "×"),
                     _fmt(b.get("speedup_vs_reference"), "×"),
                     _fmt(b.get("speedup_vs_mixlora"), "×"),
                     _fmt(f.get("vs_T_dense"), "×"), _fmt(b.get("vs_T_dense"), "×"),
                     _fmt(m.get("saved_bytes_per_token") and m["saved_bytes_per_token"] / 1024,
                          " KiB"),
                     _fmt(peak and peak / 2**20, " MiB")))
    return ["## Headline (fwd+bwd speed-ups paired, interleaved rounds)", ""] + _table(
        ("impl", "fwd", "fwd+bwd", "fwd+bwd ÷ its floor (`floors`)", "× vs reference (fwd+bwd)",
         "× vs MixLoRA-style (fwd+bwd)",
         "fwd / (T × dense)", "fwd+bwd / (T × dense)", "saved for bwd / token",
         "CUDA peak fwd+bwd"), rows)


def markdown(results: dict[str, Any]) -> str:
    steps = results["steps"]
    env = steps.get("environment", {}).get("checks", {})
    versions, gpu, smi = (env.get(k, {}) for k in ("versions", "gpu", "nvidia_smi"))
    title = "dry run (CPU, Triton interpreter)" if results["dry_run"] else gpu.get("name", "GPU")
    lines = [f"# GPU check — {title}", "",
             f"Started {results['started']}, {results['wall_s']} s in all. Produced by "
             f"`python -m bench.gpu_check{' --dry-run' if results['dry_run'] else ''}`; commit "
             "this file and the JSON beside it as `bench/results/<date>-<gpu>.{json,md}`.", "",
             f"- GPU: {_fmt(gpu.get('name'))}, sm {_fmt(gpu.get('capability'))}, "
             f"{_fmt(gpu.get('memory_gib'))} GiB; driver {_fmt(smi.get('driver_version'))}, "
             f"clocks SM {_fmt(smi.get('clocks.sm'))} (max {_fmt(smi.get('clocks.max.sm'))})",
             f"- torch {_fmt(versions.get('torch'))} (CUDA {_fmt(versions.get('cuda_runtime'))}), "
             f"triton {_fmt(versions.get('triton'))}, transformers "
             f"{_fmt(versions.get('transformers'))}, graphmoe_fused "
             f"{_fmt(versions.get('graphmoe_fused'))}, commit {_fmt(versions.get('git_commit'))}"
             f"{' (dirty)' if versions.get('git_dirty') else ''}", "",
             "## Steps", ""]
    lines += _table(("step", "status", "seconds", "checks"), [
        (name, f"**{s['status']}**", s["seconds"],
         ", ".join(f"{c}: {v['status']}" for c, v in s["checks"].items()))
        for name, s in steps.items()])
    bench = steps.get("benchmarks", {}).get("checks", {})
    lines += [""] + headline(bench) + [""]
    shape = bench.get("config", {}).get("shape")
    if shape:
        lines += [f"Shape `{shape['name']}`: d = {shape['d']}, D' = {shape['intermediate']}, "
                  f"n = {shape['num_experts']}, k = {shape['top_k']}, r = {shape['lora_r']}, "
                  f"T = {shape['num_rounds']}, {shape['tokens']} tokens, {shape['dtype']}; "
                  "medians of interleaved rounds, warm-up (compilation, autotuning) excluded; "
                  "speed-ups are medians of per-round ratios. `dense` is one frozen SwiGLU "
                  "MLP, T × dense the floor of T rounds."
                  + (" Dry run: the interpreter's times mean nothing." if results["dry_run"]
                     else ""), ""]
    kernels = bench.get("kernels", {})
    if "median_ms" in kernels:
        lines += ["## One round's kernels (forward; the experts' backward beside them)",
                  ""] + _table(
            (*kernels["median_ms"], "forward round", "GRU share",
             "routing order speed-up (gate_up)", "routing order speed-up (experts' backward)"),
            [(*(_fmt(v, " ms") for v in kernels["median_ms"].values()),
              _fmt(kernels["round_ms"], " ms"), _fmt(100 * kernels["gru_share"], " %"),
              _fmt(kernels.get("routing_order_speedup"), "×"),
              _fmt(kernels.get("routing_order_speedup_backward"), "×"))]) + [""]
    lines += profile_lines(bench.get("kernel_profile", {}), results["dry_run"])
    sweep = {k: v for k, v in bench.get("rounds_T1_to_T5", {}).items() if k.startswith("T=")}
    if sweep:
        lines += ["## triton inference latency, T = 1..5", ""] + _table(
            tuple(sweep), [tuple(f"{_fmt(v['median_ms'], ' ms')} ({_fmt(v['vs_T1'], '×')})"
                                 for v in sweep.values())]) + [""]
    switches = {k: v for k, v in bench.get("switches", {}).items() if isinstance(v, dict)}
    if switches:
        lines += ["## triton fwd+bwd by switch (interleaved, paired with the default)",
                  ""] + _table(tuple(switches), [tuple(
                      f"{_fmt(v['median_ms'], ' ms')} ({_fmt(v['vs_default'], '×')})"
                      for v in switches.values())]) + [""]
    lines += correctness_lines(steps.get("correctness", {}).get("checks", {}))
    lines += autotune_lines(bench.get("autotune", {}).get("tunings", {}))
    compiled = steps.get("compile", {}).get("checks", {}).get("compile_report", {})
    if "compiles" in compiled:
        lines += [f"## Compile report (sm_{compiled['arch']})", "",
                  f"{compiled['compiles']} compiles, {len(compiled['not_ok'])} not ok, at most "
                  f"{compiled['max_registers']} registers; spills: "
                  f"{compiled['spills'] or 'none'}. Per config: the JSON's `rows`.", ""]
    for name, s in steps.items():
        problems = [(c, v) for c, v in s["checks"].items() if v["status"] != "PASS"]
        if s.get("traceback") or problems:
            lines += [f"## {name}: {s['status']}", ""]
            if s.get("traceback"):
                lines += ["```", s["traceback"][-3000:], "```", ""]
            if s.get("context_lost_at"):
                lines += [f"The CUDA context was lost at `{'`, `'.join(s['context_lost_at'])}`; "
                          f"each time the checks after it ran in a new process "
                          f"({s['processes']} processes).", ""]
            for c, v in problems:
                detail = v.get("reason") or "; ".join(v.get("failures", [])) or v.get(
                    "traceback", "")[-2000:]
                lines += [f"- `{c}` {v['status']}: {detail}"]
            lines.append("")
    return "\n".join(lines) + "\n"


def profile_lines(prof: dict[str, Any], dry_run: bool) -> list[str]:
    """The profiled training step: each kernel group's device time against its roofline floor."""
    if "groups" not in prof:
        return []

    def short(name: str) -> str:  # "_dx_kernel + ..." → "dx + ..."
        return re.sub(r"\b_(\w+?)_kernel\b", r"\1", name)

    rows = [(short(g["name"]), "; ".join(g["rows"]), g["calls"], _fmt(1e3 * g["measured_s"], " ms"),
             _fmt(1e3 * g["floor_s"], " ms"), _fmt(g["ratio"], "×"),
             _fmt(g["atomics"] / 1e6, " MB") if g["atomics"] else "") for g in prof["groups"]]
    return [f"## One training step's device kernels against the roofline ({prof['gpu_spec']} "
            "floors)", "",
            f"triton fwd+bwd, `torch.profiler` (CUDA activity), per step: kernels "
            f"{_fmt(prof['kernel_ms'], ' ms')} of a {_fmt(prof['step_ms'], ' ms')} step "
            f"(unprofiled; the rest is launch gaps and host work), floor "
            f"{_fmt(prof['floor_ms'], ' ms')} (`bench/roofline.py`, data-sheet peaks)."
            + (" Dry run: no device kernels, the floors of the tiny shape." if dry_run else ""),
            ""] + _table(("kernels", "roofline rows", "calls", "device time", "floor",
                          "× floor", "fp32 atomics (L2, outside the floor)"), rows) + [""]


def autotune_lines(tunings: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each tuning of the benchmarks step: the config chosen and how far the others were."""
    rows = []
    for kernel, entries in tunings.items():
        for e in entries:
            ms = sorted(e["ms"].values())
            rows.append((kernel, f"`{e['key']}`", len(ms), f"`{e['chosen']}`",
                         _fmt(ms[0] if ms else None, " ms"),
                         _fmt(ms[1] / ms[0] if len(ms) > 1 else None, "×"),
                         _fmt(ms[-1] / ms[0] if len(ms) > 1 else None, "×")))
    if not rows:
        return []
    return ["## Autotuning in the benchmarks step", "",
            "Per kernel and tuning key: the configs timed, the one chosen, the next best and the "
            "worst relative to it (every config's time: the JSON's `autotune`).", ""] + _table(
        ("kernel", "key", "configs", "chosen", "time", "next best", "worst"), rows) + [""]


def correctness_lines(checks: dict[str, Any]) -> list[str]:
    cases = {n: c for n, c in checks.items() if "rel_err" in c}
    if not cases:
        return []
    rows = []
    for name, c in cases.items():
        err = c["rel_err"]

        def worst(impl: str, err: dict[str, Any] = err) -> float:
            return max(v for k, v in err[impl].items() if k.startswith("grad_"))

        rows.append((f"`{name}`", c["status"], _fmt(100 * c["agree_share"], " %"),
                     *(_fmt(err[b]["y"]) for b in ("triton", "torch", "reference")),
                     *(_fmt(worst(b)) for b in ("triton", "torch", "reference"))))
    return ["## Correctness (norm-wise relative error vs the reference in fp32, fp64 on CPU)", "",
            "On the tokens every run routed alike (their share in column 3), rerun alone. "
            "Tolerance per output and gradient: 2× (bf16 gradients 5×) the reference backend's "
            "own error in the same dtype, plus a quarter ulp, at most 0.05.", ""] + _table(
        ("case", "status", "routed alike", "y triton", "y torch", "y reference",
         "worst grad triton", "worst grad torch", "worst grad reference"), rows) + [""]


if __name__ == "__main__":
    sys.exit(main())
