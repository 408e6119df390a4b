"""Triton helpers shared by every op: interpreter detection, tile dtypes, segment blocks."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel():
    pass


# TRITON_INTERPRET is read when a kernel is decorated, so ask a kernel how it was built.
INTERPRETED = not isinstance(_probe_kernel, triton.runtime.JITFunction)
# Triton's interpreter runs our kernels from 3.8 on; 3.6's cannot loop to a bound loaded from
# memory (it hands numpy a 1-element array). Compiled kernels need only 3.6.
_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
INTERPRETER_SUPPORTED = _VERSION >= (3, 8)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """The tile dtype handed to ``tl.dot`` for inputs of ``dtype``.

    The interpreter's bf16 ``tl.dot`` is wrong (relative error ~1e9), so bf16 tiles are widened to
    fp32 there; on a GPU they stay bf16 and use the tensor cores.
    """
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision() -> str:
    """fp32 dots follow torch's own matmul setting: TF32 only where torch allows it."""
    if INTERPRETED or not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# True only in tests/compile_for_gpu.py, which compiles the kernels for an H100 on a machine
# without one: CPU tensors then get the GPU's tile sizes and SM count.
ASSUME_GPU = False


def gpu_sized(device: torch.device) -> bool:
    """Whether tile sizes are chosen for a GPU (CUDA tensors) or kept small for the interpreter."""
    return device.type == "cuda" or ASSUME_GPU


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small stand-in under the interpreter so that the
    split paths of every kernel run in CPU tests too."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132 if ASSUME_GPU else 4


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code. Newer Tritons (3.9 here) make ``triton.cdiv`` a constexpr
    function that costs ~4 us a call from Python, about 30 us per ``lora_delta`` forward."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1), for host code (see ``cdiv``)."""
    return 1 << max(n - 1, 0).bit_length()


def splits_to_fill(programs: int, device: torch.device, most: int) -> int:
    """How many ways to split a reduction so that ``programs * split`` fills the device twice."""
    want = cdiv(2 * num_sms(device), max(programs, 1))
    return max(1, min(want, most))


def or_unused(tensor, stand_in):
    """``tensor``, or ``stand_in`` when it is None: a pointer argument the kernel never reads
    (its flag is off) still needs a tensor."""
    return stand_in if tensor is None else tensor


@triton.jit
def rounded_for(x, ptr):
    """fp32 ``x`` rounded to nearest-even in ``ptr``'s element type, for storing there. bf16 is
    rounded by hand on the bits: Triton's interpreter truncates fp32 -> bf16 casts (a GPU rounds
    them; the result is the same)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def segment_block(bounds_ptr, num_segs, pid, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Map a program id to one block of ``BLOCK_M`` consecutive rows inside one segment.

    Segment ``s`` holds rows ``[bounds[s], bounds[s + 1])``. Blocks are numbered segment after
    segment, so a grid of ``cdiv(rows, BLOCK_M) + num_segs`` programs covers every row without
    the host knowing the segment sizes (no sync). Returns ``(seg, start, end)``; programs past the
    last block get ``seg >= num_segs`` and must return.
    """
    s = tl.arange(0, BLOCK_S)
    in_range = s < num_segs
    lo = tl.load(bounds_ptr + s, mask=in_range, other=0)
    hi = tl.load(bounds_ptr + s + 1, mask=in_range, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    blocks_through = tl.cumsum(blocks, 0)
    seg = tl.sum((blocks_through <= pid).to(tl.int32), 0)
    here = s == seg
    first_block = tl.sum(tl.where(here, blocks_through - blocks, 0), 0)
    start = tl.sum(tl.where(here, lo, 0), 0) + (pid - first_block) * BLOCK_M
    end = tl.minimum(start + BLOCK_M, tl.sum(tl.where(here, hi, 0), 0))
    return seg, start, end
