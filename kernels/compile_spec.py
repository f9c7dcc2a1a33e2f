"""What a kernel module tells the compile report about its kernels.

A kernel module lists ``COMPILE_SPECS: list[KernelSpec]``: each spec is one raw ``@triton.jit``
function at a representative shape (the llama3-8b benchmark shape of docs/design.md §4), with the
autotune configs it can run with. ``python -m graphmoe_fused.kernels.compile_report`` compiles
every (spec, config, architecture) without a GPU and reads registers, spills, shared memory and
tensor-core instructions from the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to compile.

    Attributes:
        name: shown in the report, e.g. ``"routing.router_topk"``.
        fn: the raw ``@triton.jit`` function (not the autotuner around it).
        types: triton type of every non-constexpr argument, e.g. ``{"x_ptr": "*bf16",
            "M": "i32"}``.
        constexprs: the constexpr arguments a launch fixes outside the autotune config
            (dtype flags, padded widths, options).
        configs: the autotune configs; each config's ``kwargs`` add constexprs and its
            ``num_warps``/``num_stages`` become compile options.
        aligned: arguments the runtime would specialise as 16-divisible (pointers to
            16-byte-aligned data, strides and sizes that are multiples of 16), so the compiled
            code vectorises as it will at run time.
        tensor_cores: whether the kernel must use tensor-core instructions (``mma.sync`` on
            sm_80, ``wgmma`` or ``mma.sync`` on sm_90); the report test checks it.
        note: one line on the shape or the variant.
        known_spills: ``{arch: bytes}``, a spill the kernel is known to have on that
            architecture, with the reason in ``note``: the report marks it, and the report test
            fails if it grows. Empty for every kernel that compiles clean (all of them today).
    """

    name: str
    fn: Any
    types: dict[str, str]
    constexprs: dict[str, Any]
    configs: list[Any]
    aligned: tuple[str, ...] = ()
    tensor_cores: bool = True
    note: str = ""
    known_spills: dict[int, int] = field(default_factory=dict)


def variant_name(name: str, *tags: str) -> str:
    """A spec's name for one variant: ``variant_name("gru.gates", "h=0", "tanh")`` is
    ``"gru.gates[h=0,tanh]"``; no tags, the name itself."""
    return f"{name}[{','.join(tags)}]" if tags else name
