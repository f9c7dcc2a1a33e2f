"""Compile every registered kernel for A100 (sm_80) and H100 (sm_90) without a GPU and report
registers, spills, shared memory and tensor-core instructions per autotune config.

    python -m graphmoe_fused.kernels.compile_report [--json PATH] [--arch 80 90] [--jobs N]
                                                   [--modules routing.router_topk ...]
                                                   [--launches FILE]

Kernel modules register by listing ``COMPILE_SPECS`` (see ``compile_spec.KernelSpec``); the report
collects them from ``DEFAULT_MODULES``. Each (spec, config, architecture) goes through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; registers and local
memory (where ptxas puts spills) come from the cubin, through the ``cuobjdump
--dump-resource-usage`` that triton ships; tensor-core instructions from the PTX (``mma.sync``,
``wgmma.mma_async``: ptxas turns them into HMMA / HGMMA, never into anything else). Shared
memory is triton's dynamic allocation plus any static shared memory.

``--launches FILE`` compiles the launches a run recorded instead (``launch_record``: the
kernels a configuration other than the benchmark's really launches, at every GPU config of their
autotuners); there only a compile error or shared memory past the limit is a failure, a spill is
shown (the autotuner times a spilling config like any other).

``triton.jit`` under ``TRITON_INTERPRET=1`` returns interpreter objects that cannot be
compiled, so ``main`` re-runs itself without that variable when it is set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from .compile_spec import KernelSpec

DEFAULT_MODULES = ("routing.router_topk", "gru.lowrank_gru", "expert.gate_up", "expert.down",
                   "expert.backward", "gru.lowrank_gru_backward", "dropout")
DEFAULT_ARCHS = (80, 90)
# Largest shared memory one block may opt into: A100 163 KB, H100 227 KB (CUDA guide, table of
# compute-capability limits).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Every config compiles spill-free on sm_90 with each supported triton (3.6-3.9) and on sm_80
# with triton 3.9. Triton 3.6-3.8 (3.6 and 3.7: what torch 2.11 and 2.12 install) spill some
# register-heavy sm_80 configs of the expert kernels, up to 112 B per thread (23 configs with
# 3.6 before the kernels took the tokens in routing order; of the 632 compiles since, 5 with
# 3.6: dh_base's 128×256 tile 32 B, deterministic dx and the r = 64 weight-gradient kernel's
# 16×32 tile 8 B; 3 with 3.8: the weight-gradient kernel's 16×64 tile 16 B, dx's 64×64 at
# r = 64 8 B): with those releases a spill up to this bound counts as known. The autotuner times
# such configs like any other, and leaving them out would leave the A100 the small tiles only.
SPILL_FREE_SM80_SINCE = (3, 9)
OLD_TRITON_SM80_SPILL = 128


def spill_allowance(spec: KernelSpec, arch: int, triton_version: str | None = None) -> int:
    """Bytes per thread a config of ``spec`` may spill on ``sm_{arch}`` with this triton: the
    spec's known spill, or the older releases' sm_80 bound."""
    from .utils import triton_release

    allowed = spec.known_spills.get(arch, 0)
    if arch == 80 and triton_release(triton_version) < SPILL_FREE_SM80_SINCE:
        allowed = max(allowed, OLD_TRITON_SM80_SPILL)
    return allowed


_PTX_TENSOR_CORE = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class CompileResult:
    """One compiled (kernel, config, architecture)."""

    kernel: str
    config: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_bytes: int = -1  # per-thread local memory and stack (ptxas puts spills there)
    shared_bytes: int = -1
    shared_limit: int = 0
    tensor_core_instructions: list[str] = field(default_factory=list)
    expects_tensor_cores: bool = True
    spill_allowed: int = 0  # spill_allowance(spec, arch): a known spill (bytes)
    seconds: float = 0.0
    note: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """No error, no spill beyond a known one, shared memory within the limit, tensor cores
        where expected."""
        return (
            not self.error
            and 0 <= self.spill_bytes <= self.spill_allowed
            and 0 <= self.shared_bytes <= self.shared_limit
            and (bool(self.tensor_core_instructions) or not self.expects_tensor_cores)
        )


def _collect(modules: Iterable[str]) -> list[tuple[str, int, KernelSpec]]:
    package = __package__ or "graphmoe_fused.kernels"
    entries: list[tuple[str, int, KernelSpec]] = []
    for name in modules:
        full = f"{package}.{name}"
        specs = getattr(importlib.import_module(full), "COMPILE_SPECS", [])
        entries.extend((full, i, spec) for i, spec in enumerate(specs))
    return entries


def collect_specs(modules: Iterable[str] = DEFAULT_MODULES) -> list[KernelSpec]:
    """``COMPILE_SPECS`` of the named kernel modules (names relative to this package)."""
    return [spec for _, _, spec in _collect(modules)]


def _cuobjdump() -> str:
    try:
        import triton.knobs

        return triton.knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "cuobjdump")
        return bundled if os.path.exists(bundled) else (shutil.which("cuobjdump") or bundled)


def _ast_source(spec: KernelSpec, constexprs: dict[str, Any], target: Any) -> Any:
    """The ``ASTSource`` a launch with these arguments would build (signature in argument
    order, constexprs marked, 16-divisibility hints on ``spec.aligned``)."""
    import triton
    from triton.compiler import make_backend

    names = list(spec.fn.arg_names)
    unknown = (set(constexprs) | set(spec.types)) - set(names)
    if unknown:
        raise ValueError(f"{spec.name}: unknown arguments {sorted(unknown)}")
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in spec.types:
            signature[name] = spec.types[name]
        else:
            raise ValueError(f"{spec.name}: no type or constexpr value for argument {name!r}")
    attrs = {}
    parse_attr = getattr(make_backend(target), "parse_attr", None)
    if parse_attr is not None:
        aligned = parse_attr("D")
        attrs = {(names.index(name),): aligned for name in spec.aligned}
    return triton.compiler.ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs,
                                     attrs=attrs)


def compile_one(spec: KernelSpec, config: Any, arch: int) -> CompileResult:
    """Compiles one config of ``spec`` for ``sm_{arch}`` and reads its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    kwargs = dict(config.kwargs)
    result = CompileResult(
        kernel=spec.name,
        config=" ".join(f"{k}={v}" for k, v in kwargs.items()),
        arch=arch,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        shared_limit=SHARED_LIMIT[arch],
        expects_tensor_cores=spec.tensor_cores,
        spill_allowed=spill_allowance(spec, arch),
        note=spec.note,
    )
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        src = _ast_source(spec, {**spec.constexprs, **kwargs}, target)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages,
                   # Triton's default for both supported versions; naming it silences 3.9's
                   # warning that the default will change.
                   "enable_fp_fusion": True}
        compiled = triton.compile(src, target=target, options=options)
        static_shared = _read_cubin(compiled.asm["cubin"], result)
        result.shared_bytes = int(compiled.metadata.shared) + static_shared
        found = set(_PTX_TENSOR_CORE.findall(compiled.asm["ptx"]))
        result.tensor_core_instructions = sorted(i.split(".")[0] for i in found)
    except Exception as err:  # noqa: BLE001 - reported per row, the report goes on
        result.error = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
    result.seconds = time.perf_counter() - start
    return result


def _read_cubin(cubin: bytes, result: CompileResult) -> int:
    """Fills registers and spills; returns the static shared memory in bytes."""
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
    match = _RESOURCE.search(usage)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump resource usage:\n{usage}")
    regs, stack, shared, local = (int(g) for g in match.groups())
    result.registers = regs
    result.spill_bytes = local + stack
    return shared


# The specs of recorded launches (``run_launches``), set before the workers fork.
_launch_specs: list[KernelSpec] = []


def _compile_task(task: tuple[str | None, int, int, int]) -> CompileResult:
    # Runs in a worker: specs hold jit functions, which do not pickle, so they are looked up
    # again by (module, index); module None: a recorded launch.
    module, spec_index, config_index, arch = task
    spec = (_launch_specs if module is None
            else importlib.import_module(module).COMPILE_SPECS)[spec_index]
    return compile_one(spec, spec.configs[config_index], arch)


def _run_tasks(tasks: list[tuple[str | None, int, int, int]], jobs: int) -> list[CompileResult]:
    if jobs <= 1 or len(tasks) <= 1:
        return [_compile_task(t) for t in tasks]
    # fork: the workers inherit the imported kernel modules instead of importing them again.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(_compile_task, tasks))


def run_report(
    modules: Iterable[str] = DEFAULT_MODULES, archs: Sequence[int] = DEFAULT_ARCHS, jobs: int = 1
) -> list[CompileResult]:
    """Compiles every config of every collected spec for every architecture, in ``jobs``
    processes (compiling is single-threaded Python plus ptxas)."""
    return _run_tasks([(module, i, c, arch) for module, i, spec in _collect(modules)
                       for c in range(len(spec.configs)) for arch in archs], jobs)


def run_launches(path: str, archs: Sequence[int] = DEFAULT_ARCHS,
                 jobs: int = 1) -> list[CompileResult]:
    """Compiles every launch recorded in ``path`` (``launch_record.write_launches``) at every
    config it may run with, for every architecture."""
    from .launch_record import launch_spec, read_launches

    _launch_specs[:] = [launch_spec(r) for r in read_launches(path)]
    return _run_tasks([(None, i, c, arch) for i, spec in enumerate(_launch_specs)
                       for c in range(len(spec.configs)) for arch in archs], jobs)


def launch_ok(result: CompileResult) -> bool:
    """A recorded launch's row passes when it compiles within the shared memory limit."""
    return not result.error and 0 <= result.shared_bytes <= result.shared_limit


def format_table(results: Sequence[CompileResult],
                 ok: Callable[[CompileResult], bool] = CompileResult.ok.fget) -> str:
    """A fixed-width table, one row per (kernel, config, architecture); ``ok`` judges a row."""
    header = ("kernel", "config", "w", "s", "sm", "regs", "spill", "smem KB", "tensor cores",
              "s/compile", "")
    rows = [header]
    for r in results:
        tc = ",".join(r.tensor_core_instructions) or ("-" if not r.expects_tensor_cores else "NONE")
        rows.append((
            r.kernel, r.config, str(r.num_warps), str(r.num_stages), str(r.arch),
            str(r.registers), str(r.spill_bytes), f"{r.shared_bytes / 1024:.1f}", tc,
            f"{r.seconds:.1f}",
            ("ok (spills)" if r.spill_bytes else "ok") if ok(r)
            else ("ERROR " + r.error if r.error else "FAIL"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 when every row is ok, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="python -m graphmoe_fused.kernels.compile_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        choices=sorted(SHARED_LIMIT), help="compute capabilities (80, 90)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compile in this many processes (default: up to 4 cores)")
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES),
                        help="kernel modules to collect COMPILE_SPECS from")
    parser.add_argument("--launches", metavar="FILE",
                        help="compile the launches recorded in FILE (launch_record) instead")
    args = parser.parse_args(argv)

    from .utils import is_interpreter

    if is_interpreter():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "graphmoe_fused.kernels.compile_report",
               *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env, check=False).returncode

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # keep compiler chatter off the table
        results = (run_launches(args.launches, args.arch, args.jobs) if args.launches
                   else run_report(args.modules, args.arch, args.jobs))
    ok = launch_ok if args.launches else CompileResult.ok.fget
    print(format_table(results, ok))
    bad = [r for r in results if not ok(r)]
    print(f"\n{len(results)} compiles, {len(bad)} not ok, "
          f"{time.perf_counter() - start:.0f} s; shared limits: "
          + ", ".join(f"sm_{a} {SHARED_LIMIT[a] // 1024} KB" for a in args.arch))
    if args.json:
        import triton

        payload = {
            "triton": triton.__version__,
            "shared_limit": {str(a): SHARED_LIMIT[a] for a in args.arch},
            "results": [{**asdict(r), "ok": r.ok} for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
