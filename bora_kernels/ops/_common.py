"""Triton helpers shared by every op: interpreter detection, tile dtypes, segment blocks."""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime import driver as _driver


@triton.jit
def _probe_kernel():
    pass


# TRITON_INTERPRET is read when a kernel is decorated, so ask a kernel how it was built.
INTERPRETED = not isinstance(_probe_kernel, triton.runtime.JITFunction)
# Triton's interpreter runs our kernels from 3.8 on; 3.6's cannot loop to a bound loaded from
# memory (it hands numpy a 1-element array). Compiled kernels need only 3.6.
_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
INTERPRETER_SUPPORTED = _VERSION >= (3, 8)
# ``launch``'s direct path calls a compiled kernel's launcher as Triton 3.6 to 3.9 do (checked in
# their sources); other versions, or one without launch hook chains, keep Triton's own launch.
# Set it False to send every launch through Triton's own path (benchmarks/host_time.py and
# profile_lora.py time both).
DIRECT_LAUNCH = (3, 6) <= _VERSION < (3, 10) and hasattr(getattr(triton, "knobs", None), "runtime") \
    and hasattr(triton.knobs.runtime.launch_enter_hook, "calls")

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


_LAUNCH_CACHE_SIZE = 4096  # compiled variants remembered per kernel before starting over
_launch_caches: dict = {}  # id(kernel) -> _LaunchCache
_OPTIONS = frozenset(("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg", "debug"))


class _LaunchCache:
    """One kernel's compiled variants for ``launch``: argument key -> (compiled kernel, names of the
    constexprs, passed by keyword, in signature order)."""

    __slots__ = ("kernel", "entries", "not_specialized")

    def __init__(self, kernel):
        self.kernel = kernel  # held, so that its id (the cache's key) is never reused by another
        self.entries = {}
        self.not_specialized = tuple(p.num for p in kernel.params if p.do_not_specialize and not p.is_constexpr)

    @staticmethod
    def entry(kernel, compiled, args, kwargs):
        """The entry for a call, or None when the direct path cannot make it: its key must hold
        only constexprs and options by keyword, and every parameter must be given."""
        tail = kernel.arg_names[len(args):]
        direct = all(not p.is_constexpr for p in kernel.params[:len(args)]) \
            and all(p.is_constexpr for p in kernel.params[len(args):]) and set(tail) == set(kwargs) - _OPTIONS
        return (compiled, tail) if direct else None


def _int_type(value: int) -> str:
    """The type Triton gives an integer argument it does not specialise: only its range counts."""
    if -2 ** 31 <= value < 2 ** 31:
        return "i32"
    return "i64" if value < 2 ** 63 else "u64"


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with Triton's per-call work done once per argument key.

    Every Triton launch binds and specialises each argument, builds its cache key and launch
    metadata and calls the launch hooks before the C launcher runs: ~18 us of CPU time per launch
    on the 2-core CPU machine (Triton 3.6 and 3.9, kernels compiled for an H100, launch skipped),
    ~40-60 us on the H100 machine's host, where small calls of our ops are bound by host time
    (benchmarks/NOTES.md). Here the first call with a key goes through Triton (compiling if
    needed) and the compiled kernel it returns is kept; later calls with that key go straight to
    the compiled kernel's launcher (~9 us on the CPU machine, half of it the key).

    Non-constexpr arguments are passed by position, constexprs and launch options by keyword. The
    key holds at least what Triton specialises on, so one key never stands for two compiled
    kernels: the device, Triton's debug flag, the keyword arguments as given (Triton keys
    constexprs by value too), every integer argument's exact value (only its range for
    ``do_not_specialize`` ones, as Triton), a float's type (Triton does not specialise
    non-constexpr floats), each tensor's dtype and its address modulo 16 (Triton: aligned or not).
    Kernel globals are checked by Triton when a key is first seen. Launch hooks (profilers), the
    interpreter, Triton versions outside 3.6-3.9, calls that pass arguments otherwise and
    ``DIRECT_LAUNCH = False`` take Triton's own path every call (nothing is kept for them); a
    launcher that refuses the direct call's arguments (a TypeError, raised before anything runs)
    turns the direct path off with a warning. ``tests/compile_for_gpu.py`` checks, without a GPU,
    that both paths hand the launcher the same compiled kernel, grid and arguments for every
    launch of every op; ``tests/test_launch.py`` checks the key against Triton's own
    specialisation.
    """
    runtime = triton.knobs.runtime if DIRECT_LAUNCH else None
    if INTERPRETED or runtime is None or runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls:
        return kernel[grid](*args, **kwargs)
    cache = _launch_caches.get(id(kernel))
    if cache is None:
        cache = _launch_caches[id(kernel)] = _LaunchCache(kernel)
    keyed = args
    if cache.not_specialized:
        keyed = list(args)
        for i in cache.not_specialized:
            if i < len(keyed) and keyed[i].__class__ is int:
                keyed[i] = _int_type(keyed[i])
    active = _driver.active
    device = active.get_current_device()
    key = (device, runtime.debug, *kwargs.items(),
           *[a if a.__class__ is int else (a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor)
             else (a.__class__, None if a.__class__ is float else a) for a in keyed])
    entry = cache.entries.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        entry = _LaunchCache.entry(kernel, compiled, args, kwargs)
        if entry is not None:
            if len(cache.entries) >= _LAUNCH_CACHE_SIZE:
                cache.entries.clear()
            cache.entries[key] = entry
        return compiled
    compiled, tail = entry
    try:
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     active.get_current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *[kwargs[name] for name in tail])
    except TypeError as error:  # a launcher that takes its arguments otherwise refuses them before launching
        _stop_direct_launch(error)
        return kernel[grid](*args, **kwargs)
    return compiled


def _stop_direct_launch(error: Exception) -> None:
    global DIRECT_LAUNCH
    DIRECT_LAUNCH = False
    warnings.warn(f"bora_kernels: this Triton ({triton.__version__})'s launcher refused a direct launch ({error}); "
                  f"every kernel now launches through Triton's own path", RuntimeWarning, stacklevel=3)


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
