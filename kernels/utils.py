"""Helpers shared by the kernel files, so each kernel file holds only what is its own:

- interpreter detection, autotune keys and config builders;
- the jit helpers every kernel is built from: program order and tile offsets, tile loads, the
  K loop (``dot_k`` / ``dot_k2``), rounding and rounded stores;
- the host side of every public function: input checks, output buffers, the launch (autotuned or
  with a pinned config) and the guard that launches on the inputs' device.

Nothing here imports from ``graphmoe_fused``; everything takes plain tensors.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

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

    The interpreter holds bf16 as uint16: ``tl.dot`` multiplies the integers and a
    cast from fp32 truncates instead of rounding to nearest even. With the flag on, kernels widen
    bf16 dot operands to fp32 (``mma``) and round through ``cast_rne``, so the bf16 path is
    checked on the CPU with the numerics the GPU has. Compiled kernels get ``False`` and keep
    bf16 tensor-core dots and the hardware's rounding.
    """
    return dtype == torch.bfloat16 and is_interpreter()


# ---------------------------------------------------------------------------------------------
# Autotune configs.
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# jit helpers. Called jit functions are inlined, so a kernel built from them compiles to the
# code it would have written out (the compile report checks registers and spills per kernel).
# ---------------------------------------------------------------------------------------------


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


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(rows, row_ok, cols, col_ok)`` of output tile ``(pid_m, pid_n)``.

    ``rows`` are int64: token · row stride passes 2^31 at LLaMA sizes (8192 tokens × 14336, or
    views of a T-round buffer). ``cols`` stay int32; a kernel widens them where a column times
    a row stride can pass 2^31.
    """
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows.to(tl.int64), rows < M, cols, cols < N


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``tile_offsets`` of this program in grouped order (``tile_ids``): for GEMMs whose weight
    tiles are worth sharing in L2 (the expert kernels' base projections)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)


@triton.jit
def row_major_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``tile_offsets`` of this program in row-major order, column blocks fastest: the programs
    that share a token block (and its activation tiles) run side by side and hit L2. For small
    weights that stay in L2 anyway (the GRU's); a 1-D grid, so no grid-axis limit applies to the
    token count."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    return tile_offsets(pid // num_n, pid % num_n, M, N, BLOCK_M, BLOCK_N)


@triton.jit
def load_tile(ptr, rows, row_ok, stride, cols, N):
    """The ``[rows, cols]`` tile of a row-major matrix with unit column stride, reading zero past
    its last row (``row_ok``) and past column ``N``: padding that adds nothing to a dot."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :],
                   mask=row_ok[:, None] & (cols < N)[None, :], other=0.0)


@triton.jit
def load_tile_t(ptr, rows, row_ok, stride, cols, N):
    """The same tile transposed, ``[cols, rows]``: the ``W^T`` operand of ``x @ W^T`` for a
    weight ``W [out, in]`` stored as torch keeps it (rows = output features, cols = the K
    slice). The address is ``(ptr + rows · stride) + cols``: the loop-invariant part is one
    pointer per weight; several weights with one stride should share an offset tensor instead
    (see the GRU gates kernel)."""
    return tl.load(ptr + rows[None, :] * stride + cols[:, None],
                   mask=(cols < N)[:, None] & row_ok[None, :], other=0.0)


@triton.jit
def dot_k(acc, a_ptr, rows, row_ok, stride_a, w_ptr, w_rows, w_ok, stride_w, K_A, K_W,
          BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr):
    """The K loop the kernels' GEMMs share (router, lora_in, down, GRU update and project):
    ``acc + A[rows, :K] @ W[w_rows, :K]^T``, both operands row-major with unit column stride.

    ``A`` reads as zero past column ``K_A``; the loop runs to ``K_W`` ≥ ``K_A``, which is more
    when ``W``'s rows are zero-padded to an aligned width (the GRU's weights): its loads then
    keep masks that are uniform across a vectorised load.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K_W, BLOCK_K):
        k = k0 + offs_k
        a = load_tile(a_ptr, rows, row_ok, stride_a, k, K_A)
        acc = mma(a, load_tile_t(w_ptr, w_rows, w_ok, stride_w, k, K_W), acc, INTERP_BF16)
    return acc


@triton.jit
def dot_k2(acc1, acc2, a_ptr, rows, row_ok, stride_a, w1_ptr, stride_w1, w2_ptr, stride_w2,
           w_rows, w_ok, K_A, K_W, BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``dot_k`` against two weights at once, each ``A`` tile loaded once for both (gate and up;
    the GRU's z and r). Both weight tiles are loaded before either product: issued the other way
    round, ptxas spills the GRU gates kernel on sm_80 (compile report)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K_W, BLOCK_K):
        k = k0 + offs_k
        a = load_tile(a_ptr, rows, row_ok, stride_a, k, K_A)
        w1 = load_tile_t(w1_ptr, w_rows, w_ok, stride_w1, k, K_W)
        w2 = load_tile_t(w2_ptr, w_rows, w_ok, stride_w2, k, K_W)
        acc1 = mma(a, w1, acc1, INTERP_BF16)
        acc2 = mma(a, w2, acc2, INTERP_BF16)
    return acc1, acc2


@triton.jit
def store_rounded(ptr, value, rows, row_ok, stride, cols, col_ok, INTERP_BF16: tl.constexpr):
    """Stores an fp32 tile into a row-major output of a float dtype, rounded once to nearest
    even (also under the interpreter: ``cast_rne``)."""
    tl.store(ptr + rows[:, None] * stride + cols[None, :],
             cast_rne(value, ptr.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side: outputs, input checks, launches, the device guard.
# ---------------------------------------------------------------------------------------------


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised kernel output, or a poisoned one when ``POISON_ENV`` is set."""
    if os.environ.get(POISON_ENV, "0").strip().lower() in _TRUTHY:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def ceil_to(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def unit_stride_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows are contiguous (any row stride): the kernels take the row
    stride as an argument, so only a non-unit column stride costs a copy."""
    if tensor.stride(-1) != 1 or tensor.stride(0) < tensor.shape[-1]:
        return tensor.contiguous()
    return tensor


def triton_release(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version``, by default the installed triton's."""
    major, minor = (version or triton.__version__).split(".")[:2]
    return int(major), int(minor)


@functools.cache
def interpreter_incompatibility() -> str | None:
    """Why this triton's interpreter cannot run here, or ``None``. Triton 3.6's interpreter
    turns loop bounds into ints with ``int(array)`` on 1-element arrays, which numpy 2.4
    refuses; every kernel would fail in ``range(...)`` (triton 3.7 fixed it)."""
    import numpy

    if triton_release() >= (3, 7):
        return None
    try:
        with warnings.catch_warnings():  # numpy 1.25-2.3 only warn
            warnings.simplefilter("ignore", DeprecationWarning)
            int(numpy.zeros(1))
    except TypeError:
        return (f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) does not run "
                f"with numpy {numpy.__version__}: install numpy<2.4 or triton>=3.7")
    return None


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    if is_interpreter():
        if (problem := interpreter_incompatibility()) is not None:
            raise RuntimeError(problem)
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


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> tuple[int, ...]:
    """``t`` must be a tensor with ``ndim`` dimensions; returns its shape, from which the caller
    reads the sizes the other arguments are checked against. ``layout`` names the dimensions in
    the message (``"[d, D']"``): a wrong rank usually means arguments in the wrong order."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    return tuple(t.shape)


def check_activation(name: str, x: torch.Tensor, layout: str = "[tokens, features]"
                     ) -> tuple[int, int]:
    """The 2-D fp16/bf16/fp32 activation a kernel starts from, on a device the kernels run on;
    every other argument is then checked against it (``check_like``). Returns its shape."""
    shape = check_ndim(name, x, 2, layout)
    check_float(name, x)
    check_device(name, x)
    return shape


def check_like(name: str, t: torch.Tensor, shape: Sequence[int], ref: torch.Tensor,
               dtype: torch.dtype | None = None) -> None:
    """``t`` must be a tensor of ``shape`` on ``ref``'s device, of ``dtype`` when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_shape(name, t, shape)
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device} like the input")
    if dtype is not None and t.dtype != dtype:
        like = " like the input" if dtype == ref.dtype else ""
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype}{like}")


def output_buffer(name: str, out: torch.Tensor | None, shape: Sequence[int], ref: torch.Tensor,
                  dtype: torch.dtype, *, contiguous: bool = False) -> torch.Tensor:
    """The caller's ``out`` once checked, or a new (poisonable, ``new_output``) buffer.

    A given buffer needs ``shape``, ``dtype`` and ``ref``'s device, and a unit column stride
    (the kernels take the row stride as an argument), or full contiguity when the kernel
    addresses it with a fixed row length (``contiguous``).
    """
    if out is None:
        return new_output(shape, dtype, ref.device)
    check_like(name, out, shape, ref, dtype)
    if contiguous:
        if not out.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    elif shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{name} must have unit column stride")
    return out


def tile_grid(num_rows: int, num_cols: int = 1,
              col_block: str | None = None) -> Callable[[dict[str, Any]], tuple[int]]:
    """The 1-D launch grid of (token blocks × column blocks) every kernel here uses, as a
    function of the block sizes (``BLOCK_M`` and ``col_block`` of the config)."""

    def grid(meta: dict[str, Any]) -> tuple[int]:
        blocks = triton.cdiv(num_rows, meta["BLOCK_M"])
        if col_block is not None:
            blocks *= triton.cdiv(num_cols, meta[col_block])
        return (blocks,)

    return grid


def launch(tuned: Any, kernel: Any, grid: Callable[[dict[str, Any]], tuple[int]],
           args: Sequence[Any], meta: dict[str, Any],
           config: triton.Config | None = None) -> None:
    """Launches the autotuner ``tuned``, or the raw ``kernel`` with one pinned ``config``.

    Pinning skips tuning (and the autotuner's pruning and reset hooks: the launchers zero their
    atomic outputs themselves); tests use it to cover block shapes the single interpreter config
    does not, and the config must then name every block constexpr the kernel takes.
    """
    if config is None:
        tuned[grid](*args, **meta)
    else:
        kernel[grid(config.kwargs)](
            *args, **meta, **config.kwargs,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )


def pinned_configs(configs: dict[str, triton.Config] | None,
                   launches: Sequence[str]) -> dict[str, triton.Config]:
    """A public function's per-launch ``configs`` (see ``launch``), keyed by launch name; a
    name that is not one of ``launches`` is an error rather than a silently autotuned launch."""
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(launches))
    if unknown:
        raise ValueError(f"configs names unknown launches {unknown}; expected some of "
                         f"{list(launches)}")
    return configs


def on_device_of(arg: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for public kernel entries: runs the function with argument ``arg``'s CUDA
    device current.

    A Triton launch (and the autotuner's benchmarking, and triton's stream lookup) goes to the
    *current* CUDA device, whatever device the pointers live on; with layers spread over GPUs
    (``device_map="auto"``) the inputs are often on another one, and the launch would read
    foreign memory. ``torch.cuda.device`` makes the input's device current for the call and
    restores the previous one. CPU tensors (the interpreter) and a missing ``arg`` need no
    guard: the function runs as it is. The wrapper records ``arg`` as ``device_arg``, so tests
    can check that every public entry has the guard.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        position = list(inspect.signature(fn).parameters).index(arg)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            t = args[position] if position < len(args) else kwargs.get(arg)
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                with torch.cuda.device(t.device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        guarded.device_arg = arg
        return guarded

    return decorate
