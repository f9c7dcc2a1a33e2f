"""The Triton launches a computation makes, recorded under the interpreter and compiled for the
GPUs without one.

The compile report compiles each kernel at the benchmark shape (n = 8, r = 16, k = 2, bf16). A
user who picks another configuration (r = 8, top-1, k = n, an odd rank, fp16) makes the
launchers choose other constexprs (``NUM_EXPERTS``, ``R_PAD``, ``TOP_K``, ``N_PAD``, ``NR``...)
and argument types: kernels ptxas has never seen. A run under ``TRITON_INTERPRET=1`` records
every launch (:func:`record_launches`: the kernel, its constexprs, the type of every other
argument); a process without the interpreter compiles each record (``python -m
graphmoe_fused.kernels.compile_report --launches FILE``, through :func:`launch_spec`), so the
kernels a configuration really launches are known to compile for sm_80 and sm_90 before a GPU
runs them.

Block sizes are not taken from the run (the interpreter's are tiny): a record compiles at every
config a GPU launch of its kernel may use (:func:`kernel_configs`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .compile_spec import KernelSpec

_TORCH_TO_TRITON = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}
# Launch options the autotuner and launchers pass beside the kernel's own arguments.
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


@dataclass(frozen=True)
class LaunchRecord:
    """One distinct launch.

    Attributes:
        module: the module that defines the kernel.
        kernel: the ``@triton.jit`` function's name in it.
        types: triton type of every non-constexpr argument (``"*bf16"``, ``"i32"``...).
        constexprs: every constexpr argument but the block sizes of its GPU configs.
        aligned: the arguments a launch specialises as 16-divisible (a 16-byte aligned pointer,
            an integer multiple of 16), as triton's runtime does: the code vectorises, and
            allocates registers, as at run time.
    """

    module: str
    kernel: str
    types: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    aligned: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.kernel.strip('_')}"

    def gpu_constexprs(self) -> dict[str, Any]:
        """The constexprs as a GPU launch passes them: ``INTERP_BF16``, the interpreter's own
        switch, off."""
        constexprs = dict(self.constexprs)
        if "INTERP_BF16" in constexprs:
            constexprs["INTERP_BF16"] = False
        return constexprs


def _is_constexpr(annotation: Any) -> bool:
    # A module with ``from __future__ import annotations`` leaves the annotation a string.
    import triton.language as tl

    return annotation is tl.constexpr or (isinstance(annotation, str)
                                          and annotation.split(".")[-1] == "constexpr")


def _arg_type(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name!r}: cannot type a {type(value).__name__} for compiling")


def _divisible_by_16(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def _autotuner_of(fn: Any) -> Any:
    from triton.runtime.autotuner import Autotuner

    module = importlib.import_module(fn.fn.__module__)
    return next((v for v in vars(module).values() if isinstance(v, Autotuner) and v.fn is fn),
                None)


def kernel_configs(fn: Any) -> list[Any]:
    """The configs a launch of the jit function ``fn`` may run with: those of the autotuner
    around it in its module (a deterministic launch pins one of them; under the interpreter its
    one small config), else those the compile report gives it (a kernel launched at fixed
    block sizes)."""
    from .compile_report import collect_specs

    tuner = _autotuner_of(fn)
    if tuner is not None:
        return list(tuner.configs)
    configs = [c for spec in collect_specs() if spec.fn is fn for c in spec.configs]
    if not configs:
        raise LookupError(f"{fn.fn.__module__}.{fn.fn.__name__}: no autotuner and no "
                          "COMPILE_SPECS entry says which block sizes a GPU launch uses")
    return list({(str(c.kwargs), c.num_warps, c.num_stages): c for c in configs}.values())


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Records every distinct kernel launch made inside the block (interpreter only) into the
    list it yields, in the order first seen."""
    from triton.runtime.interpreter import InterpretedFunction

    from .utils import is_interpreter

    if not is_interpreter():
        raise RuntimeError("record_launches needs TRITON_INTERPRET=1 set before triton is "
                           "imported: compiled launches cannot be intercepted before they run")
    records: list[LaunchRecord] = []
    run_kernel = InterpretedFunction.run

    def record(fn: InterpretedFunction, args: tuple, kwargs: dict) -> None:
        params = inspect.signature(fn.fn).parameters
        block_keys = set(kernel_configs(fn)[0].kwargs)
        unspecialised = set(fn.kwargs.get("do_not_specialize") or ())
        types, constexprs, aligned = [], [], []
        for name, value in {**dict(zip(fn.arg_names, args, strict=False)), **kwargs}.items():
            if name in _OPTIONS or name in block_keys:
                continue
            if name not in params:
                raise TypeError(f"{fn.__name__}: unknown launch argument {name!r}")
            if _is_constexpr(params[name].annotation) or value is None:
                constexprs.append((name, value))
                continue
            types.append((name, _arg_type(name, value)))
            if name not in unspecialised and _divisible_by_16(value):
                aligned.append(name)
        entry = LaunchRecord(module=fn.fn.__module__, kernel=fn.fn.__name__, types=tuple(types),
                             constexprs=tuple(sorted(constexprs)), aligned=tuple(aligned))
        if entry not in records:
            records.append(entry)

    def kernel_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            record(self, args, kwargs)
        return run_kernel(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = kernel_run
    try:
        yield records
    finally:
        InterpretedFunction.run = run_kernel


def write_launches(path: str, records: Sequence[LaunchRecord]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(r) for r in records], f, indent=1)


def read_launches(path: str) -> list[LaunchRecord]:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [LaunchRecord(module=row["module"], kernel=row["kernel"],
                         types=tuple(map(tuple, row["types"])),
                         constexprs=tuple(map(tuple, row["constexprs"])),
                         aligned=tuple(row["aligned"])) for row in rows]


def launch_spec(record: LaunchRecord) -> KernelSpec:
    """The compile report's spec of a recorded launch (outside the interpreter): the real jit
    function at each of its GPU configs (:func:`kernel_configs`)."""
    import triton

    fn = getattr(importlib.import_module(record.module), record.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{record.module}.{record.kernel} is not a jit function here (is "
                        "TRITON_INTERPRET still set?)")
    # Tensor cores are not asserted here: the compile report checks them at the benchmark shape.
    constexprs = record.gpu_constexprs()
    return KernelSpec(name=record.name, fn=fn, types=dict(record.types), constexprs=constexprs,
                      configs=kernel_configs(fn), aligned=record.aligned, tensor_cores=False,
                      note=" ".join(f"{k}={v}" for k, v in constexprs.items()))
