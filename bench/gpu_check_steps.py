"""The four steps of ``python -m bench.gpu_check`` (see that module). Each step runs in its own
process, records its checks one by one through a :class:`Recorder` (so a step killed at its time
limit keeps what it finished) and never lets one check's exception stop the next.

Status of a check: ``PASS``, ``FAIL`` (with the figures or the traceback), ``SKIP`` (with the
reason). Benchmarks have no targets here: a measured figure is a ``PASS``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

import graphmoe_fused as gm
from bench import harness
from bench.gpu_check import CONTEXT_LOST, read_json
from bench.harness import BenchContext, Step
from bench.shapes import SHAPES, BenchShape
from graphmoe_fused.backends import GraphMoEParams, RoundOptions, get_backend
from graphmoe_fused.backends.contract import FROZEN_BASE

LLAMA = SHAPES["llama3-8b"]
# Correctness shapes: llama3-8b at a few hundred tokens, and sizes that fit no tile or power of 2.
GPU_CHECK_SHAPES = (dataclasses.replace(LLAMA, name="llama3-8b/256", tokens=256),
                    BenchShape("odd", 4000, 11000, 8, 2, 16, 3, 400, 777, torch.bfloat16))
# --dry-run (CPU, Triton interpreter): the same code at sizes the interpreter runs in seconds.
# T = 2: the interpreter's backward takes seconds, and the code paths are those of T = 3.
DRY_SHAPES = (BenchShape("dry", 32, 48, 4, 2, 4, 2, 3, 8, torch.bfloat16),
              BenchShape("dry-odd", 36, 50, 4, 2, 4, 2, 3, 7, torch.bfloat16))
DRY_BENCH = dataclasses.replace(DRY_SHAPES[0], name="dry-bench")
# Seconds the benchmarks' switch timings need on a GPU, estimated: tuning ~40 kernels of the
# deterministic, recompute and dropout variants, and compiling what the compile_cache check left.
SWITCHES_S = 60
# At most this long (and 40 % of what the benchmarks step has left) for its compile_cache check.
WARM_S = 60
# (dtype, recompute_intermediates, lora_dropout) per shape: both dtypes, recompute both ways,
# dropout both ways for each dtype.
CASES = ((torch.bfloat16, True, 0.0), (torch.bfloat16, False, 0.05),
         (torch.float16, True, 0.05), (torch.float16, False, 0.0))
# Tolerance (norm-wise relative error against the fp32/fp64 truth on the same weights): a fast
# backend may be `factor` × the reference backend's own error in the same dtype, plus a quarter
# ulp (the rule of tests/test_triton_backend.py: rounding-order luck; a wrong term is O(1)).
FACTOR = {"y": 2.0, "probs": 2.0, "grad": {torch.bfloat16: 5.0, torch.float16: 2.0}}
ABS_CAP = 0.05  # and never above this, whatever the reference's error
MIN_AGREE = 0.5  # share of tokens routed alike by every backend and the truth, at least
# Tests: "step:raise", "step:hang", "step.check:..." (a check run in its own process),
# "step.check:lose-context" (a check that fails as an illegal memory access would: the step goes
# on in a new process) or "warm.<index>:..." (a process of the compile_cache check),
# comma-separated.
INJECT_ENV = "GRAPHMOE_GPU_CHECK_INJECT"


class Skip(Exception):
    """A check that cannot run here; the message is the reason."""


class ContextLost(Exception):
    """A failed check left the process's CUDA context unusable; the message is its name."""


def context_lost(device: torch.device | None) -> bool:
    """Whether every further CUDA call in this process will fail: a sticky error (an illegal
    address, a device-side assert) is reported again by any later call, this one included. Not
    so after an out-of-memory error, which leaves the context as it was."""
    if device is None or device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).sum().item()
    except Exception:  # noqa: BLE001 - whatever the error, nothing more runs here
        return True
    return False


class Recorder:
    """Runs checks, records each result and rewrites the step's JSON after every one.

    ``done`` holds the checks an earlier process of the step recorded before its CUDA context
    was lost: they are kept as they are, not run again. A check whose failure loses the
    context is recorded (``context_lost``), then :class:`ContextLost` ends the process.
    """

    def __init__(self, path: str, deadline: float, margin: float, step: str = "",
                 device: torch.device | None = None,
                 done: dict[str, dict[str, Any]] | None = None) -> None:
        self.path, self.deadline, self.margin = path, deadline, margin
        self.step, self.device = step, device
        self.checks: dict[str, dict[str, Any]] = dict(done or {})

    def check(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        if name in self.checks:
            print(f"[check] {name}: {self.checks[name]['status']}, kept from the step's "
                  "process before", flush=True)
            return self.checks[name]
        start = time.perf_counter()
        if time.time() > self.deadline - self.margin:
            entry: dict[str, Any] = {"status": "SKIP", "reason": "the step's time box is spent"}
        else:
            print(f"[check] {name} ...", flush=True)
            lose = "lose-context" in injected(f"{self.step}.{name}")
            try:
                if lose:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered "
                                       f"(injected into {self.step}.{name} by ${INJECT_ENV})")
                entry = dict(fn() or {})
                entry.setdefault("status", "PASS")
            except Skip as skip:
                entry = {"status": "SKIP", "reason": str(skip)}
            except Exception:  # noqa: BLE001 - recorded, the next check runs
                entry = {"status": "FAIL", "traceback": traceback.format_exc()}
                if lose or context_lost(self.device):
                    entry["context_lost"] = True
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.record(name, entry)
        if entry.get("context_lost"):
            raise ContextLost(name)
        return entry

    def record(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        print(f"[check] {name}: {entry['status']} ({entry['seconds']} s)"
              + (f" {entry.get('reason', '')}" if entry["status"] == "SKIP" else ""), flush=True)
        if entry["status"] == "FAIL" and "traceback" in entry:
            print(entry["traceback"], file=sys.stderr, flush=True)
        self.checks[name] = entry
        self.flush()
        return entry

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"checks": self.checks}, f, indent=1, default=str)
        os.replace(tmp, self.path)


@dataclasses.dataclass
class StepContext:
    dry_run: bool
    device: torch.device
    rec: Recorder
    only: str | None = None  # run this one check of the step (a process of run_in_processes)


def device_for(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --dry-run for the CPU smoke run)")
    return torch.device("cuda", torch.cuda.current_device())


def injected(target: str) -> list[str]:
    """The failures a test asks of ``target`` through ``$GRAPHMOE_GPU_CHECK_INJECT``."""
    items = (item.partition(":") for item in os.environ.get(INJECT_ENV, "").split(","))
    return [action for name, _, action in items if name == target]


def inject(step: str) -> None:
    """Raises or hangs where a test asks for it."""
    for action in injected(step):
        if action == "raise":
            raise RuntimeError(f"failure injected into step {step!r} by ${INJECT_ENV}")
        if action == "hang":
            time.sleep(10**6)


def bench_context(shape: BenchShape, device: torch.device, dtype: torch.dtype | None = None,
                  **changes: Any) -> BenchContext:
    if dtype is not None:
        shape = dataclasses.replace(shape, dtype=dtype)
    return BenchContext(shape=shape, device=device, budget_s=1.0, min_rounds=1, max_rounds=50,
                        dropout=0.0, **changes)


# --------------------------------------------------------------------------- 1. environment


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def step_environment(sc: StepContext) -> None:
    def versions() -> dict[str, Any]:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # A copy of the working tree without .git (how GPU loans ship it) names its commit
        # in GRAPHMOE_GIT_COMMIT.
        commit = (_run(["git", "-C", repo, "rev-parse", "HEAD"])
                  or os.environ.get("GRAPHMOE_GIT_COMMIT"))
        dirty = _run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"])
        return {
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            **{name: harness.package_version(name) for name in ("triton", "transformers")},
            "graphmoe_fused": gm.__version__,
            "git_commit": commit, "git_dirty": bool(dirty) if commit else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR",
                                                   "CUDA_VISIBLE_DEVICES")},
        }

    def gpu() -> dict[str, Any]:
        if sc.device.type != "cuda":
            raise Skip("no CUDA device (dry run on CPU)")
        props = torch.cuda.get_device_properties(sc.device)
        return {
            "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }

    def smi() -> dict[str, Any]:
        fields = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
                  "power.limit,temperature.gpu,memory.used,memory.total")
        out = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
        if out is None:
            raise Skip("nvidia-smi is not on PATH (or failed)")
        first = out.splitlines()[0]
        return dict(zip(fields.split(","), (v.strip() for v in first.split(",")), strict=False))

    sc.rec.check("versions", versions)
    sc.rec.check("gpu", gpu)
    sc.rec.check("nvidia_smi", smi)


# --------------------------------------------------------------------------- 2. correctness


def trainable(p: GraphMoEParams, dtype: torch.dtype | None = None) -> GraphMoEParams:
    """Fresh leaves (cast to ``dtype``): the base frozen, everything else requiring grad."""
    return GraphMoEParams(*(
        t.detach().to(dtype or t.dtype).requires_grad_(name not in FROZEN_BASE)
        for name, t in zip(GraphMoEParams._fields, p, strict=True)))


def run_with_grads(backend: str, p: GraphMoEParams, x: torch.Tensor, opt: RoundOptions,
                   gy: torch.Tensor, gp: torch.Tensor, dtype: torch.dtype | None = None
                   ) -> tuple[Any, dict[str, torch.Tensor]]:
    """Forward and backward of ``<y, gy> + <probs, gp>``; the output and every gradient."""
    dtype = dtype or x.dtype
    leaves = trainable(p, dtype)
    x = x.detach().to(dtype).requires_grad_(True)
    out = get_backend(backend)(x, leaves, opt)
    torch.autograd.backward((out.y, out.router_probs),
                            (gy.to(out.y.dtype), gp.to(out.router_probs.dtype)))
    grads = {"x": x.grad, **{name: t.grad for name, t in zip(GraphMoEParams._fields, leaves,
                                                               strict=True)
                             if name not in FROZEN_BASE}}
    return out, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def routing_agreement(*indices: torch.Tensor) -> torch.Tensor:
    """``[M]``: tokens every run routed to the same experts, in the same slots, in every round."""
    first = indices[0]
    return torch.stack([(i == first).all(-1).all(0) for i in indices]).all(0)


def _inputs(shape: BenchShape, device: torch.device, tokens: int, n_rounds: int, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, shape.d, generator=gen, device=device)
    gy = torch.randn(tokens, shape.d, generator=gen, device=device)
    gp = torch.randn(n_rounds, tokens, shape.num_experts, generator=gen, device=device)
    return x, gy, gp


def correctness_case(sc: StepContext, shape: BenchShape, dtype: torch.dtype, recompute: bool,
                     dropout: float) -> dict[str, Any]:
    """triton, torch and the reference backend in ``dtype``, forward and every gradient, against
    the reference in fp32 (fp64 on the CPU) on the same weights, on the tokens every run routes
    alike (rerun on those tokens alone: tokens never interact, so their figures are clean)."""
    ctx = bench_context(shape, sc.device, dtype, recompute_intermediates=recompute)
    ctx = dataclasses.replace(ctx, dropout=dropout)
    layer = harness.build_layer(ctx, "reference")
    p, opt = layer.params(), dataclasses.replace(layer.round_options(), dropout_seed=1234)
    truth_dtype = torch.float64 if sc.device.type == "cpu" else torch.float32
    x, gy, gp = _inputs(shape, sc.device, shape.tokens, opt.num_rounds, seed=7)
    impls = ("triton", "torch", "reference")
    with torch.no_grad():
        truth_p = GraphMoEParams(*(t.to(truth_dtype) for t in p))
        index = [get_backend(b)(x.to(dtype), p, opt).expert_index for b in impls]
        index.append(get_backend("reference")(x.to(truth_dtype), truth_p, opt).expert_index)
    keep = routing_agreement(*index)
    share = float(keep.float().mean())
    if not keep.any():
        return {"status": "FAIL", "agree_share": share, "reason": "no token routed alike"}
    x, gy, gp = x[keep], gy[keep], gp[:, keep]
    truth, truth_g = run_with_grads("reference", p, x, opt, gy, gp, truth_dtype)
    runs = {b: run_with_grads(b, p, x, opt, gy, gp, dtype) for b in impls}
    rows = routing_agreement(truth.expert_index, *(out.expert_index for out, _ in runs.values()))
    eps = torch.finfo(dtype).eps
    errors: dict[str, dict[str, float]] = {}
    for b, (out, grads) in runs.items():
        values = {"y": (out.y[rows], truth.y[rows]), "probs": (out.router_probs,
                                                               truth.router_probs),
                  "grad_x": (grads["x"][rows], truth_g["x"][rows])}
        values.update({f"grad_{n}": (g, truth_g[n]) for n, g in grads.items() if n != "x"})
        errors[b] = {name: rel_err(a, t) for name, (a, t) in values.items()}
        errors[b]["finite"] = all(bool(torch.isfinite(a).all()) for a, _ in values.values())
    failures = []
    tolerance = {}
    for name, ref_err in errors["reference"].items():
        if name == "finite":
            continue
        factor = FACTOR[name] if name in FACTOR else FACTOR["grad"][dtype]
        tolerance[name] = min(factor * ref_err + eps / 4, ABS_CAP)
        failures += [f"{b} {name}: {errors[b][name]:.3g} > {tolerance[name]:.3g}"
                     for b in ("triton", "torch") if errors[b][name] > tolerance[name]]
    failures += [f"{b}: non-finite output or gradient" for b in impls if not errors[b]["finite"]]
    if share < MIN_AGREE:
        failures.append(f"only {share:.0%} of the tokens routed alike (< {MIN_AGREE:.0%})")
    return {
        "status": "FAIL" if failures else "PASS", "failures": failures,
        "shape": shape.name, "dtype": str(dtype).removeprefix("torch."), "tokens": shape.tokens,
        "recompute_intermediates": recompute, "lora_dropout": dropout,
        "truth": str(truth_dtype).removeprefix("torch."),
        "agree_share": share, "agree_share_rerun": float(rows.float().mean()),
        "rel_err": errors, "tolerance": tolerance,
    }


def determinism(sc: StepContext, shape: BenchShape) -> dict[str, Any]:
    """triton: ``deterministic=True`` gives the same bits twice; the default's spread and the
    routing of two forwards are recorded (the backward uses the forward's own expert_index)."""
    ctx = bench_context(shape, sc.device, torch.bfloat16)
    layer = harness.build_layer(ctx, "reference")
    p = layer.params()
    x, gy, gp = _inputs(shape, sc.device, shape.tokens, shape.num_rounds, seed=9)
    x = x.to(torch.bfloat16)
    result: dict[str, Any] = {}
    for det in (True, False):
        opt = dataclasses.replace(layer.round_options(), deterministic=det)
        (out1, g1), (out2, g2) = (run_with_grads("triton", p, x, opt, gy, gp) for _ in range(2))
        same = {"y": torch.equal(out1.y, out2.y),
                **{n: torch.equal(g1[n], g2[n]) for n in g1}}
        result["deterministic" if det else "default"] = {
            "bit_identical": same,
            "max_rel_spread": max([rel_err(out1.y, out2.y)]
                                  + [rel_err(g1[n], g2[n]) for n in g1]),
            "same_routing_share": float(routing_agreement(out1.expert_index,
                                                          out2.expert_index).float().mean()),
        }
    ok = all(result["deterministic"]["bit_identical"].values())
    return {"status": "PASS" if ok else "FAIL", **result}


def hf_training_step(sc: StepContext) -> dict[str, Any]:
    """A tiny LlamaForCausalLM (built from a config, no download) converted to GraphMoE: one
    training step (loss, backward, SGD) through the triton backend and through the reference,
    same weights; losses and gradients compared."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(sc.device)
    cfg = gm.GraphMoEConfig(num_experts=4, top_k=2, lora_r=4, lora_dropout=0.0, num_rounds=2,
                            backend="reference")
    gm.apply_graphmoe(model, cfg)
    with torch.no_grad():  # non-zero LoRA B and W_g, or the experts and the GRU would do nothing
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "weight_g" in name):
                param.normal_(0, 0.05)
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, gm.GraphMoEMLP):
            module.config = dataclasses.replace(module.config, backend="triton")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1)).to(sc.device)
    losses, grads, finite = {}, {}, True
    for name, m in (("reference", model), ("triton", twin)):
        opt = torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.1)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses[name] = float(out.loss)
        grads[name] = {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}
        opt.step()
        finite &= all(bool(torch.isfinite(q).all()) for q in m.parameters())
    worst = max(rel_err(g, grads["reference"][n]) for n, g in grads["triton"].items())
    loss_err = abs(losses["triton"] - losses["reference"]) / abs(losses["reference"])
    # fp32 both; on a GPU the kernels may take TF32 dots where the reference does not.
    tol = 1e-4 if sc.device.type == "cpu" else 1e-2
    ok = (finite and math.isfinite(losses["triton"]) and worst <= tol and loss_err <= tol
          and grads["triton"].keys() == grads["reference"].keys())
    return {"status": "PASS" if ok else "FAIL", "losses": losses, "max_grad_rel_err": worst,
            "max_loss_rel_err": loss_err, "tolerance": tol, "grads": len(grads["triton"]),
            "params_finite_after_step": finite}


def correctness_plan(sc: StepContext) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """The step's checks, the main shape's first (they matter most if the time box runs out).
    The interpreter is slow (seconds per backward): a dry run takes one case per shape, both
    dtypes and recompute modes between them."""
    main, odd = DRY_SHAPES if sc.dry_run else GPU_CHECK_SHAPES
    cases = {main: [CASES[1]], odd: [CASES[2]]} if sc.dry_run else {main: CASES, odd: CASES}

    def case(shape: BenchShape, dtype: torch.dtype, recompute: bool, dropout: float
             ) -> tuple[str, Callable[[], dict[str, Any]]]:
        name = (f"{shape.name}/{str(dtype).removeprefix('torch.')}/"
                f"recompute={recompute}/dropout={dropout}")
        return name, lambda: correctness_case(sc, shape, dtype, recompute, dropout)

    return ([case(main, *c) for c in cases[main]]
            + [("determinism", lambda: determinism(sc, main)),
               ("hf_training_step", lambda: hf_training_step(sc))]
            + [case(odd, *c) for c in cases[odd]])


def step_correctness(sc: StepContext) -> None:
    if sc.device.type == "cpu" and not harness.triton_runnable(sc.device):
        raise RuntimeError("dry run without TRITON_INTERPRET=1")
    torch.backends.cuda.matmul.allow_tf32 = False
    plan = correctness_plan(sc)
    if sc.only is not None:
        names = [name for name, _ in plan]
        if sc.only not in names:
            raise ValueError(f"no correctness check {sc.only!r}; there are {names}")
        index = names.index(sc.only)
        fn = plan[index][1]
        # The first check tunes (between two configs per kernel: the autotuner's benchmarking
        # and reset hooks run as in users' first calls, at a fraction of the compiles); the
        # others each run one config per kernel, a different one each. The interpreter has one
        # config: nothing to rotate.
        if sc.dry_run:
            sc.rec.check(sc.only, fn)
        else:
            ran = rotate_configs(autotuners(), index, count=1 if index else 2)
            sc.rec.check(sc.only, lambda: {**fn(), "configs": ran})
        return
    workers = 2 if sc.dry_run else max(1, (os.cpu_count() or 1) - 2)
    run_in_processes(sc, "correctness", [name for name, _ in plan], workers)


def run_in_processes(sc: StepContext, step: str, names: list[str], workers: int) -> None:
    """Runs each check of ``step`` in its own process, ``workers`` at a time, and records each
    as its process ends (in ``names``' order once all have); a check still running at the time
    box is stopped (its stack recorded).

    Triton compiles on one core, in the process that launches, and tuning compiles every
    autotune config of every kernel a new dtype, switch or divisibility reaches: about 90 for a
    training step, under a second each, and about 500 for the correctness step's ten checks,
    more than its time box in one process. Spread over the cores, and with one or two configs
    per kernel (``rotate_configs``), they are not. The processes tune under each
    other's load, so their autotune results stay off the disk cache; the compiled kernels are
    shared through it.
    """
    from bench.gpu_check import kill, last_traceback, read_text

    # Stopping takes a few seconds: the stacks, the kill, this process's own exit.
    work, stop = os.path.dirname(sc.rec.path), sc.rec.deadline - sc.rec.margin - 5
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    queue = list(enumerate(names))
    running: dict[str, tuple[subprocess.Popen, str, float]] = {}
    while queue or running:
        while queue and len(running) < workers and time.time() < stop:
            i, name = queue.pop(0)
            path = os.path.join(work, f"{step}-{i}.json")
            cmd = [sys.executable, "-m", "bench.gpu_check", "--step", step, "--check", name,
                   "--result", path, "--deadline", str(sc.rec.deadline)]
            with open(path + ".log", "w", encoding="utf-8") as log:
                proc = subprocess.Popen(cmd + (["--dry-run"] if sc.dry_run else []), cwd=root,
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"[process] {name}: started (pid {proc.pid})", flush=True)
            running[name] = (proc, path, time.perf_counter())
        late = time.time() >= stop
        if late:  # the rest skipped; SIGTERM dumps each running stack (_child), then they go
            for _, name in queue:
                sc.rec.record(name, {"status": "SKIP", "reason": "the step's time box is spent",
                                     "seconds": 0.0})
            queue = []
            for proc, _, _ in running.values():
                proc.terminate()
            time.sleep(2)
        for name, (proc, path, started) in list(running.items()):
            if proc.poll() is None and not late:
                continue
            unfinished = proc.poll() is None
            if unfinished:
                kill(proc)
            else:
                proc.wait()
            del running[name]
            seconds = round(time.perf_counter() - started, 2)
            print(f"{read_text(path + '.log')}\n[process] {name}: exit status "
                  f"{proc.returncode} after {seconds} s", flush=True)
            entry = read_json(path).get("checks", {}).get(name)
            if unfinished:
                entry = {"status": "FAIL", "reason": f"still running at the step's time box, "
                         f"after {seconds} s", "traceback": read_text(path + ".stack")}
            elif entry is None:
                entry = {"status": "FAIL", "traceback": last_traceback(path + ".log", 0)
                         or f"exit status {proc.returncode}"}
            sc.rec.record(name, {"seconds": seconds, **entry, "process_s": seconds})
        time.sleep(0.2)
    sc.rec.checks = {name: sc.rec.checks[name] for name in names}  # in plan order again
    sc.rec.flush()


# --------------------------------------------------------------------------- 3. benchmarks


def interleaved(steps: dict[str, Step], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each step ``warmup`` times (compilation, autotuning, allocator: excluded), then
    ``rounds`` rounds timing every step once, in an order rotating round by round."""
    for step in steps.values():
        for _ in range(warmup):
            harness.timed_call(step)
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(harness.timed_call(steps[name]))
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str, scale: float = 1.0) -> float:
    """Median over rounds of ``times[num] / (scale · times[den])``: paired, so load drifting
    between rounds cancels."""
    return statistics.median(a / (scale * b) for a, b in zip(times[num], times[den],
                                                             strict=True))


def _module(ctx: BenchContext, impl: str, num_rounds: int | None = None) -> torch.nn.Module:
    if impl == "dense":
        return harness.build_dense(ctx)
    if impl == "mixlora":
        return harness.build_mixlora(ctx, num_rounds)
    return harness.build_layer(ctx, impl, num_rounds)


def layer_timings(ctx: BenchContext, rounds: int, warmup: int) -> dict[str, Any]:
    """fwd (dense, torch, triton) and fwd+bwd (all five) interleaved; ratios paired."""
    groups = {"fwd": ("dense", "torch", "triton"),
              "fwd_bwd": ("dense", "reference", "mixlora", "torch", "triton")}
    t_count = ctx.shape.num_rounds
    result: dict[str, Any] = {}
    for mode, impls in groups.items():
        x, grad = harness.layer_input(ctx, requires_grad=mode == "fwd_bwd")
        steps = {i: harness.module_step(ctx, _module(ctx, i), x, grad, mode) for i in impls}
        times = interleaved(steps, rounds, warmup)
        entry: dict[str, Any] = {i: {"median_ms": 1e3 * statistics.median(t)}
                                 for i, t in times.items()}
        for impl in ("torch", "triton"):
            entry[impl]["vs_T_dense"] = paired_ratio(times, impl, "dense", t_count)
            for base in ("reference", "mixlora"):
                if base in times:
                    entry[impl][f"speedup_vs_{base}"] = paired_ratio(times, base, impl)
        result[mode] = entry
        del steps
        _free(ctx)
    return result


def switch_layers(ctx: BenchContext) -> dict[str, tuple[BenchContext, torch.nn.Module]]:
    """The default triton layer and one with each switch a user flips, on the same weights."""
    switches = {"default": (ctx, {}), "deterministic": (ctx, {"deterministic": True}),
                "recompute_intermediates": (
                    dataclasses.replace(ctx, recompute_intermediates=True), {}),
                "lora_dropout=0.05": (dataclasses.replace(ctx, dropout=0.05), {})}
    layers = {}
    for name, (c, changes) in switches.items():
        layer = harness.build_layer(c, "triton")
        layer.config = dataclasses.replace(layer.config, **changes)
        layers[name] = (c, layer)
    return layers


def switch_timings(ctx: BenchContext, rounds: int, warmup: int) -> dict[str, Any]:
    """triton fwd+bwd with each switch a user flips, interleaved with the default on the same
    weights: what deterministic gradients (two-pass reductions instead of fp32 atomics),
    recomputing the base products and LoRA dropout 0.05 (the paper's training setting) cost."""
    x, grad = harness.layer_input(ctx, requires_grad=True)
    steps = {name: harness.module_step(c, layer, x, grad, "fwd_bwd")
             for name, (c, layer) in switch_layers(ctx).items()}
    times = interleaved(steps, rounds, warmup)
    del steps
    _free(ctx)
    return {name: {"median_ms": 1e3 * statistics.median(t),
                   "vs_default": paired_ratio(times, name, "default")}
            for name, t in times.items()}


def round_timings(ctx: BenchContext, rounds: int, warmup: int) -> dict[str, Any]:
    """triton inference forward at T = 1..5, same weights; each relative to T = 1."""
    x, grad = harness.layer_input(ctx, requires_grad=False)
    steps = {f"T={t}": harness.module_step(ctx, _module(ctx, "triton", t), x, grad, "fwd")
             for t in range(1, 6)}
    times = interleaved(steps, rounds, warmup)
    return {name: {"median_ms": 1e3 * statistics.median(t),
                   "vs_T1": paired_ratio(times, name, "T=1")} for name, t in times.items()}


def kernel_timings(ctx: BenchContext, rounds: int, warmup: int) -> dict[str, Any]:
    """The raw kernels of one round, forward, as the triton backend calls them; the GRU share of
    a non-final round = GRU / (router + gate_up + down + GRU); and what visiting the tokens in
    routing order saves: gate_up and the experts' backward (``expert_round_backward``, the base
    products saved, as training runs it) with the tokens in their order (``sort_tokens=False``)
    against routing order."""
    from graphmoe_fused.kernels.expert import (
        expert_down,
        expert_gate_up,
        expert_lora_layout,
        expert_round_backward,
    )
    from graphmoe_fused.kernels.gru import fused_lowrank_gru
    from graphmoe_fused.kernels.routing import fused_router_topk

    s = ctx.shape
    layer = harness.build_layer(ctx, "reference", num_rounds=2)
    p, c = layer.params(), layer.config.lora_scaling
    x, _ = harness.layer_input(ctx, requires_grad=False)
    with torch.no_grad():
        lora = expert_lora_layout(p.lora_A_gate, p.lora_B_gate, p.lora_A_up, p.lora_B_up,
                                  p.lora_A_down, p.lora_B_down)
        _, weights, experts = fused_router_topk(x, p.router_weight, s.top_k)
        base = (torch.empty(s.tokens, s.intermediate, dtype=x.dtype, device=x.device),
                torch.empty(s.tokens, s.intermediate, dtype=x.dtype, device=x.device))
        h_mix, a_mix = expert_gate_up(x, p.gate_weight, p.up_weight, lora, weights, experts, c,
                                      base_out=base)
        y = expert_down(h_mix, p.down_weight, lora, a_mix, c)
        h = harness.make_tensor(ctx, s.tokens, s.dh, seed=5)
        grad_y = harness.make_tensor(ctx, s.tokens, s.d, seed=6)

    def backward(sort_tokens: bool) -> Any:
        return expert_round_backward(x, grad_y, p.gate_weight, p.up_weight, p.down_weight, lora,
                                     weights, experts, a_mix, c, saved_gate_up=base,
                                     sort_tokens=sort_tokens)
    calls = {
        "router": lambda: fused_router_topk(x, p.router_weight, s.top_k),
        "gate_up": lambda: expert_gate_up(x, p.gate_weight, p.up_weight, lora, weights,
                                          experts, c),
        # What visiting the tokens in routing order saves (kernels/expert/token_order.py).
        "gate_up_unsorted": lambda: expert_gate_up(x, p.gate_weight, p.up_weight, lora, weights,
                                                   experts, c, sort_tokens=False),
        "down": lambda: expert_down(h_mix, p.down_weight, lora, a_mix, c),
        "gru": lambda: fused_lowrank_gru(h, y, x, p.gru_weight_z, p.gru_weight_r,
                                         p.gru_weight_o, p.gru_bias_o, p.gru_weight_g),
        "experts_backward": lambda: backward(True),
        "experts_backward_unsorted": lambda: backward(False),
    }
    steps = {n: harness.function_step(ctx, fn, None, []) for n, fn in calls.items()}
    times = interleaved(steps, rounds, warmup)
    medians = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    round_ms = sum(medians[n] for n in ("router", "gate_up", "down", "gru"))
    return {"median_ms": medians, "round_ms": round_ms, "gru_share": medians["gru"] / round_ms,
            "routing_order_speedup": paired_ratio(times, "gate_up_unsorted", "gate_up"),
            "routing_order_speedup_backward": paired_ratio(times, "experts_backward_unsorted",
                                                           "experts_backward")}


def device_kernels(events: Any, steps: int) -> dict[str, tuple[float, float]]:
    """``kernel name → (calls, seconds)`` per step from a profiler's events over ``steps``
    steps: the device (CUDA) ones only, each its own duration."""
    found: dict[str, list[float]] = {}
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            found.setdefault(event.name, []).append(event.time_range.elapsed_us() / 1e6)
    return {name: (len(t) / steps, sum(t) / steps) for name, t in found.items()}


def kernel_profile(ctx: BenchContext, warmup: int) -> dict[str, Any]:
    """Every device kernel of one triton fwd+bwd step (``torch.profiler``, CUDA activity), and
    the kernels grouped by the roofline rows that name them against those rows' floor on this
    GPU (``bench.roofline.compare_kernels``): which kernel is how far from its floor. A CPU
    has no device kernels; the groups then show the H100's floors without measurements."""
    from torch.profiler import ProfilerActivity, profile

    from bench.roofline import compare_kernels, gpu_spec, graphmoe_round, step_floor

    cuda = ctx.device.type == "cuda"
    layer = _module(ctx, "triton")
    x, grad = harness.layer_input(ctx, requires_grad=True)
    step = harness.module_step(ctx, layer, x, grad, "fwd_bwd")
    for _ in range(max(warmup, 1) if cuda else 0):  # CUDA: out of the profile, the autotuning
        harness.timed_call(step)
    timed, profiled = (3, 2) if cuda else (1, 1)  # the interpreter takes seconds per step
    step_ms = 1e3 * statistics.median(harness.timed_call(step) for _ in range(timed))
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            harness.timed_call(step)
    measured = device_kernels(prof.events(), profiled)
    spec = gpu_spec(torch.cuda.get_device_name(ctx.device)) if cuda else "H100"
    result: dict[str, Any] = {
        "step_ms": step_ms, "gpu_spec": spec,
        "kernels": {n: {"calls": c, "ms": 1e3 * t} for n, (c, t) in
                    sorted(measured.items(), key=lambda kv: -kv[1][1])},
        "kernel_ms": 1e3 * sum(t for _, t in measured.values()),
    }
    if spec is not None:
        rows = graphmoe_round(ctx.shape, ctx.recompute_intermediates)
        t = ctx.shape.num_rounds
        result["floor_ms"] = 1e3 * step_floor(rows, spec, t)
        result["groups"] = [{**dataclasses.asdict(g), "ratio": g.ratio}
                            for g in compare_kernels(rows, spec, t, measured)]
    return result


def floors(ctx: BenchContext) -> dict[str, Any]:
    """Each implementation's fwd+bwd floor on this GPU, what ``layer``'s times are set against:
    the dense MLP and the torch backend as eager PyTorch launches them (``bench.op_count``,
    counted on the meta device), the triton kernels from ``bench.roofline``. A CPU (dry run)
    gets the H100's."""
    from bench.op_count import count_step, floor
    from bench.roofline import gpu_spec, graphmoe_round, step_floor

    s = ctx.shape
    cuda = ctx.device.type == "cuda"
    spec = gpu_spec(torch.cuda.get_device_name(ctx.device)) if cuda else "H100"
    if spec is None:
        raise Skip("no data-sheet figures for this GPU (bench.roofline.ALL_GPUS)")
    dense = count_step(s, "dense").ops
    torch_step = count_step(s, "torch", ctx.dropout, ctx.recompute_intermediates).ops
    kernels = graphmoe_round(s, ctx.recompute_intermediates)
    return {"gpu_spec": spec, "fwd_bwd_ms": {
        "dense": 1e3 * floor(dense, spec), "torch": 1e3 * floor(torch_step, spec),
        "triton": 1e3 * step_floor(kernels, spec, s.num_rounds)}}


def memory(ctx: BenchContext) -> dict[str, Any]:
    """Saved-for-backward bytes per token and CUDA peak of one fwd+bwd, per implementation."""
    result = {}
    for impl in ("dense", "reference", "mixlora", "torch", "triton"):
        module = _module(ctx, impl)
        x, grad = harness.layer_input(ctx, requires_grad=True)

        def forward(module: torch.nn.Module = module, x: torch.Tensor = x,
                    grad: torch.Tensor = grad) -> tuple[tuple, tuple]:
            return (module(x),), (grad,)

        if ctx.device.type == "cuda":  # warm-up: workspaces and compilation out of the peak
            torch.autograd.backward(*forward())
            module.zero_grad(set_to_none=True)
            x.grad = None
        result[impl] = harness.measure_memory(ctx, forward, exclude=module.parameters())
        del module, x, grad
        _free(ctx)
    return result


def _free(ctx: BenchContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


def autotuners() -> dict[str, Any]:
    """Every autotuned kernel launcher of the package, by ``module.attribute``."""
    import importlib
    import pkgutil

    import graphmoe_fused.kernels as package
    from triton.runtime.autotuner import Autotuner

    found = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for attr, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{info.name.removeprefix(package.__name__ + '.')}.{attr}"] = value
    return found


def record_tunings(tuners: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Wraps each autotuner's ``run`` so that every tuning it does from now on in this process is
    recorded: the key, each config's median time and the config chosen. What the next pruning of
    the config lists (fewer compiles on a user's first step) goes by."""
    record: dict[str, list[dict[str, Any]]] = {}
    for name, tuner in tuners.items():
        def run(*args: Any, _name: str = name, _tuner: Any = tuner, _run: Any = tuner.run,
                **kwargs: Any) -> Any:
            known = set(_tuner.cache)
            out = _run(*args, **kwargs)
            timings = getattr(_tuner, "configs_timings", None)
            for key in set(_tuner.cache) - known:
                ms = ({str(c): float(t[0] if isinstance(t, (list, tuple)) else t)
                       for c, t in timings.items()} if isinstance(timings, dict) else {})
                record.setdefault(_name, []).append(
                    {"key": str(key), "chosen": str(_tuner.cache[key]), "ms": ms})
            return out

        tuner.run = run
    return record


def rotate_configs(tuners: dict[str, Any], index: int, count: int = 1
                   ) -> dict[str, list[str]]:
    """Makes each autotuner time only ``count`` configs, from the ``index``-th on (cyclically)
    of those it would time for the launch, instead of all; returns which it kept, per autotuner.
    With one config kept nothing is timed (triton 3.6 would benchmark it alone).

    The correctness checks run with different indices, so between them they check most configs'
    results on the GPU (autotuning checks only the winner's) and compile a fraction of what
    tuning would. Autotune results of these processes are not cached on disk
    (``run_in_processes``)."""
    ran: dict[str, list[str]] = {}
    for name, tuner in tuners.items():
        def prune(kwargs: dict[str, Any], _name: str = name, _prune: Any = tuner.prune_configs
                  ) -> list[Any]:
            pruned = _prune(kwargs)
            kept = [pruned[(index + i) % len(pruned)] for i in range(min(count, len(pruned)))]
            ran.setdefault(_name, []).extend(
                str(c) for c in kept if str(c) not in ran[_name])
            return kept

        tuner.prune_configs = prune
        if count == 1:  # nothing to time it against; triton < 3.9 would time it anyway
            tuner._bench = _untimed
    return ran


def _untimed(*args: Any, config: Any, **kwargs: Any) -> list[float]:
    """An autotuner's ``_bench`` that launches nothing: the one config left is chosen untimed
    and compiled at its launch."""
    return [0.0, 0.0, 0.0]


def step_benchmarks(sc: StepContext) -> None:
    shape = DRY_BENCH if sc.dry_run else LLAMA
    ctx = bench_context(shape, sc.device)
    rounds, warmup = (1, 0) if sc.dry_run else (10, 3)
    # The interpreter has one config per kernel and tunes nothing: a dry run records no tuning.
    tunings = record_tunings(autotuners())
    sc.rec.check("config", lambda: {"shape": shape.as_info(), "timed_rounds": rounds,
                                    "warmup_calls": warmup, "device": str(sc.device),
                                    "timing": "interleaved, synchronize + perf_counter"})
    left = sc.rec.deadline - sc.rec.margin - time.time()

    def compile_cache() -> dict[str, Any]:
        if sc.dry_run:  # its processes run in tests/test_gpu_check.py, not in the minute
            raise Skip("the interpreter compiles nothing")
        return warm_compile_cache(sc, min(WARM_S, 0.4 * left))

    sc.rec.check("compile_cache", compile_cache)
    sc.rec.check("layer", lambda: layer_timings(ctx, rounds, warmup))
    sc.rec.check("floors", lambda: floors(ctx))
    sc.rec.check("kernels", lambda: kernel_timings(ctx, rounds, warmup))
    sc.rec.check("kernel_profile", lambda: kernel_profile(ctx, warmup))
    sc.rec.check("rounds_T1_to_T5", lambda: round_timings(ctx, rounds, warmup))
    sc.rec.check("memory", lambda: memory(ctx))
    # A dry run times the switches at T = 1: the same code, half the interpreter's seconds.
    switch_ctx = (dataclasses.replace(ctx, shape=dataclasses.replace(shape, num_rounds=1))
                  if sc.dry_run else ctx)

    def switches() -> dict[str, Any]:
        left = sc.rec.deadline - sc.rec.margin - time.time()
        if not sc.dry_run and left < SWITCHES_S:  # its compiles and tuning would outlast it
            raise Skip(f"{left:.0f} s left in the step, under the {SWITCHES_S} s it needs")
        return switch_timings(switch_ctx, rounds, warmup)

    sc.rec.check("switches", switches)
    sc.rec.check("autotune", lambda: {"tunings": tunings})


def warm(index: int, dry_run: bool) -> None:
    """One process of the benchmarks step's ``compile_cache`` check: the triton launches the
    step times (fwd+bwd and inference forward, then fwd+bwd with each switch), every kernel run
    with only the ``index``-th of its autotune configs, so that it lands in Triton's disk cache."""
    inject(f"warm.{index}")
    rotate_configs(autotuners(), index)
    ctx = bench_context(DRY_BENCH if dry_run else LLAMA, device_for(dry_run))
    if dry_run:  # the interpreter's seconds (tests/test_gpu_check.py): T = 1
        ctx = dataclasses.replace(ctx, shape=dataclasses.replace(ctx.shape, num_rounds=1))
    for name, (c, layer) in switch_layers(ctx).items():
        for mode in ("fwd_bwd", "fwd") if name == "default" else ("fwd_bwd",):
            x, grad = harness.layer_input(c, requires_grad=mode == "fwd_bwd")
            harness.module_step(c, layer, x, grad, mode).run()
        print(f"warm {index}: {name} compiled", flush=True)


def warm_compile_cache(sc: StepContext, seconds: float) -> dict[str, Any]:
    """Compiles the benchmarks' kernels in parallel before they are timed.

    Tuning compiles every autotune config of every kernel a launch reaches, one after another in
    the process that launches: about 90 for a training step and as many again for the switches,
    at a second or more each on a GPU machine, most of the step's time box. Here one process per
    config index (as many as the longest config list) runs the step's launches with that config
    of each kernel, all at once, for at most ``seconds``; the step's own tuning then loads them
    from the disk cache. Their autotune results (one config each) are not cached. A process cut
    at the limit leaves what it compiled; the tuning compiles the rest."""
    from bench.gpu_check import kill, last_traceback

    count = max((len(t.configs) for t in autotuners().values()), default=1)
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = os.path.dirname(sc.rec.path)
    start, procs = time.time(), []
    for i in range(count):
        log = os.path.join(work, f"warm-{i}.log")
        with open(log, "w", encoding="utf-8") as f:
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "bench.gpu_check", "--warm", str(i)]
                + (["--dry-run"] if sc.dry_run else []),
                cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    cut, failures = [], {}
    for i, (proc, log) in enumerate(procs):
        try:
            proc.wait(max(0.1, start + seconds - time.time()))
        except subprocess.TimeoutExpired:
            kill(proc)
            cut.append(i)
            continue
        if proc.returncode != 0:
            failures[str(i)] = last_traceback(log, 0) or f"exit status {proc.returncode}"
    return {"status": "FAIL" if failures else "PASS", "processes": count,
            "limit_s": round(seconds, 1), "wall_s": round(time.time() - start, 1),
            "cut_at_limit": cut, "failures": list(failures.values()),
            "failed_indices": list(failures)}


# --------------------------------------------------------------------------- 4. compile, tools


PROBE_SHAPE = BenchShape("probe", 512, 1408, 8, 2, 16, 2, 51, 256, torch.bfloat16)


def probe() -> None:
    """One small triton fwd+bwd (two rounds): what compute-sanitizer and ncu run. Each kernel
    runs its first autotune config only: a tool sees the round, no tuning, and the probe compiles
    about a quarter of what tuning would."""
    rotate_configs(autotuners(), 0)
    ctx = bench_context(PROBE_SHAPE, device_for(False))
    layer = harness.build_layer(ctx, "triton")
    x, grad = harness.layer_input(ctx, requires_grad=True)
    harness.module_step(ctx, layer, x, grad, "fwd_bwd").run()
    print("probe done", flush=True)


# What ncu and compute-sanitizer print where the machine will not let them run (no access to
# the performance counters, a device or driver they do not support): a reason to skip, not a
# failure of the kernels.
TOOL_CANNOT_RUN = re.compile(r"ERR_NVGPUCTRPERM|does not have permission|not supported on this "
                             r"(device|platform)|Device not supported|unsupported (GPU|driver)",
                             re.IGNORECASE)


def _tool(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    if shutil.which(cmd[0]) is None:
        raise Skip(f"{cmd[0]} is not on PATH")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired as err:
        tail = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        return {"status": "FAIL", "reason": f"timed out after {timeout:.0f} s",
                "output_tail": tail[-3000:]}
    tail = (done.stdout + done.stderr)[-4000:]
    cannot = TOOL_CANNOT_RUN.search(tail) if done.returncode != 0 else None
    if cannot:
        line = next(ln for ln in tail.splitlines() if cannot.group(0) in ln)
        raise Skip(f"{cmd[0]} cannot run here: {line.strip()[:300]}")
    return {"status": "PASS" if done.returncode == 0 else "FAIL", "returncode": done.returncode,
            "command": " ".join(cmd), "output_tail": tail}


def step_compile(sc: StepContext) -> None:
    from graphmoe_fused.kernels import compile_report

    def report() -> dict[str, Any]:
        if sc.dry_run:  # one module for the Hopper target: the code path, in seconds
            modules, arch = ("routing.router_topk",), 90
        else:
            major, minor = torch.cuda.get_device_capability(sc.device)
            modules, arch = compile_report.DEFAULT_MODULES, 10 * major + minor
        if arch not in compile_report.SHARED_LIMIT:
            raise Skip(f"the compile report knows sm_80 and sm_90, not sm_{arch}")
        # Its own process (its CLI): it forks compile workers, which must not inherit this
        # process's CUDA context.
        path = os.path.join(os.path.dirname(sc.rec.path), "compile_report.json")
        run = _tool([sys.executable, "-m", "graphmoe_fused.kernels.compile_report", "--arch",
                     str(arch), "--jobs", "1" if sc.dry_run else str(min(16, os.cpu_count() or 1)),
                     "--json", path,
                     "--modules", *modules], timeout=0.6 * (sc.rec.deadline - time.time()))
        if not os.path.exists(path):
            return run
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)["results"]
        return {"status": run["status"], "arch": arch, "compiles": len(rows),
                "not_ok": [f"{r['kernel']} {r['config']}: {r['error'] or 'spill/shared/TC'}"
                           for r in rows if not r["ok"]],
                "max_registers": max(r["registers"] for r in rows),
                "spills": {f"{r['kernel']} {r['config']}": r["spill_bytes"] for r in rows
                           if r["spill_bytes"] > 0},
                "rows": [{k: r[k] for k in ("kernel", "config", "num_warps", "num_stages",
                                            "registers", "spill_bytes", "shared_bytes", "ok")}
                         for r in rows],
                "output_tail": run["output_tail"][-2000:]}

    probe_cmd = [sys.executable, "-m", "bench.gpu_check", "--probe"]

    def tool(cmd: list[str], share: float, env: dict[str, str] | None = None
             ) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            if sc.device.type != "cuda":
                raise Skip("no CUDA device (dry run on CPU)")
            left = sc.rec.deadline - time.time() - 3
            return _tool(cmd + probe_cmd, timeout=max(5.0, share * left), env=env)

        return run

    sc.rec.check("compile_report", report)
    # The probe alone first: it compiles its kernels into the disk cache, so the tools below
    # see the round and no compilation.
    sc.rec.check("probe", tool([], 0.3))
    # Without torch's caching allocator every tensor is its own cudaMalloc: a write past a
    # tensor's end inside a pooled block would go unseen by memcheck.
    sc.rec.check("compute_sanitizer", tool(
        ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
         "--print-limit", "20"], 0.5, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    sc.rec.check("ncu", tool(
        ["ncu", "--clock-control", "none", "--section", "SpeedOfLight", "--kernel-name",
         "regex:expert", "--launch-count", "4"], 1.0))


STEPS: dict[str, Callable[[StepContext], None]] = {
    "environment": step_environment,
    "correctness": step_correctness,
    "benchmarks": step_benchmarks,
    "compile": step_compile,
}


def run_step(name: str, dry_run: bool, result_path: str, deadline: float, margin: float,
             only: str | None = None, resume: bool = False) -> int:
    """The child's side: runs step ``name`` (or only its check ``only``), its checks recorded
    in ``result_path``; with ``resume``, after the checks an earlier process recorded there.
    Returns 0, or :data:`CONTEXT_LOST` when a check left the CUDA context unusable."""
    device = device_for(dry_run)
    done = read_json(result_path).get("checks", {}) if resume else {}
    rec = Recorder(result_path, deadline, margin, step=name, device=device, done=done)
    rec.flush()
    inject(name if only is None else f"{name}.{only}")
    try:
        STEPS[name](StepContext(dry_run, device, rec, only))
    except ContextLost as lost:
        print(f"[check] {lost}: the CUDA context is lost; nothing more runs in this process",
              flush=True)
        return CONTEXT_LOST
    return 0
