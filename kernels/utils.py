"""Helpers shared by the kernel files: interpreter detection, autotune keys and config builders,
the jit helpers (dot operands, rounding, program order), output allocation and input checks.

Nothing here imports from ``graphmoe_fused``; everything takes plain tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Matches the truthy spellings triton's own TRITON_INTERPRET knob accepts.
_TRUTHY = ("1", "true", "on", "yes", "y")

# Set to a truthy value to fill every kernel output with NaN (floats) or -1 (integers) before
# the launch: an element a kernel forgets to write then shows up instead of hiding behind
# whatever ``torch.empty`` happened to return. The tests run with it on.
POISON_ENV = "GRAPHMOE_FUSED_POISON_OUTPUTS"

# The largest token bucket autotune tells apart: past it the best block shape no longer
# depends on the token count (the grid is already several waves deep on an H100).
MAX_TOKEN_BUCKET = 16384

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreter() -> bool:
    """Whether Triton kernels run under ``TRITON_INTERPRET=1`` (numpy on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def token_bucket(num_tokens: int) -> int:
    """The token count as autotune should see it: the next power of two, between 16 and
    ``MAX_TOKEN_BUCKET``, so a new batch size re-tunes only when it changes bucket."""
    return min(max(triton.next_power_of_2(max(int(num_tokens), 1)), 16), MAX_TOKEN_BUCKET)


def interpreter_bf16(dtype: torch.dtype) -> bool:
    """Whether the interpreter's bf16 workarounds must be on for operands of this dtype.

    The interpreter holds bf16 as uint16: ``tl.dot`` multiplies the integers (DESIGN §5) and a
    cast from fp32 truncates instead of rounding to nearest even. With the flag on, kernels widen
    bf16 dot operands to fp32 (``mma``) and round through ``cast_rne``, so the bf16 path is
    checked on the CPU with the numerics the GPU has. Compiled kernels get ``False`` and keep
    bf16 tensor-core dots and the hardware's rounding.
    """
    return dtype == torch.bfloat16 and is_interpreter()


@triton.jit
def mma(a, b, acc, INTERP_BF16: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``input_precision="ieee"`` keeps fp32 operands at fp32 precision (no TF32 rounding, like
    torch's default for fp32 matmuls); 16-bit operands still take the tensor cores.
    """
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def cast_rne(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``x.to(dtype)`` rounded to nearest even, also under the interpreter (see
    ``interpreter_bf16``): there the fp32 bits are rounded by hand before the truncating cast."""
    if INTERP_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised kernel output, or a poisoned one when ``POISON_ENV`` is set."""
    if os.environ.get(POISON_ENV, "0").strip().lower() in _TRUTHY:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def ceil_to(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    if is_interpreter():
        if tensor.device.type != "cpu":
            raise ValueError(
                f"{name} is on {tensor.device}; under TRITON_INTERPRET=1 the kernels take CPU "
                "tensors"
            )
    elif tensor.device.type != "cuda":
        raise ValueError(
            f"{name} is on {tensor.device}; the Triton kernels need CUDA tensors (set "
            "TRITON_INTERPRET=1 before importing triton to run them on the CPU)"
        )


def check_float(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Accepts fp16/bf16/fp32, and only ``dtype`` when it is given."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of {FLOAT_DTYPES}")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected {dtype} like the input")


def check_shape(name: str, tensor: torch.Tensor, shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless ``tensor`` has exactly ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}")


def unit_stride_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows are contiguous (any row stride): the kernels take the row
    stride as an argument, so only a non-unit column stride costs a copy."""
    if tensor.stride(-1) != 1 or tensor.stride(0) < tensor.shape[-1]:
        return tensor.contiguous()
    return tensor


# ``triton.jit`` reads TRITON_INTERPRET when a kernel is decorated, so the config lists are
# decided at import too: the interpreter gets one small config (no benchmarking, and several
# blocks even at test sizes).
INTERPRET = is_interpreter()

INTERPRET_CONFIG = triton.Config(
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1
)


def cfg(block_m: int, block_n: int, block_k: int, warps: int, stages: int,
        **extra: int) -> triton.Config:
    """A GPU autotune config (GROUP_M = 8 row tiles share the weight tiles in L2)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          "GROUP_M": 8, **extra}, num_warps=warps, num_stages=stages)


def prune_small_m(configs, named_args, **kwargs):
    """``early_config_prune``: for few tokens, only row tiles that are not mostly padding."""
    bucket = named_args["M_BUCKET"]
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, bucket)]
    return small or list(configs)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles sweep the columns together, so the weight tiles
    they share are still in L2 when the next row tile needs them."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def check_like(name: str, t: torch.Tensor, shape: tuple[int, ...], ref: torch.Tensor,
               dtype: torch.dtype | None = None) -> None:
    """``t`` must be a tensor of ``shape`` on ``ref``'s device, of ``dtype`` when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_shape(name, t, shape)
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device} like the input")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype}")


def check_activation(name: str, x: torch.Tensor) -> None:
    """The 2-D fp16/bf16/fp32 activation a kernel starts from, on a device the kernels run on."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    check_float(name, x)
    check_device(name, x)
