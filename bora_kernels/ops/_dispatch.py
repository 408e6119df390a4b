"""The one dispatch rule for every op (see ARCHITECTURE.md).

- CUDA tensors run the Triton kernels.
- CPU tensors run the same Triton kernels when ``TRITON_INTERPRET=1`` was set before ``triton``
  was imported (that is how CI checks the kernels without a GPU).
- CPU tensors otherwise run the op's vectorised torch path.

``use_backend`` overrides the rule inside a ``with`` block (tests use it to check both paths in one
process; users can use it to debug). The float64 ``reference.py`` of each op is never dispatched to.

Under ``torch.autocast`` the ops that multiply matrices (``lora_delta``, ``context_lora_delta``,
``nf4_matmul``) do what ``F.linear`` does there: their float inputs are cast to autocast's dtype
and the product comes out in it (``follows_autocast``). Inside every op,
forward and backward, autocast is off (``autocast_off``): each op fixes its own precision (its
inputs' dtype, fp32 accumulation), which autocast would otherwise change under the torch path's
products, or break (an in-place product into an fp32 buffer).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import warnings

import torch

BACKENDS = ("triton", "torch")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("bora_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run ops inside the block on ``"triton"`` or ``"torch"`` (``None`` restores the rule)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


@functools.lru_cache(maxsize=None)
def triton_interpreted() -> bool:
    """True when our Triton kernels were built by Triton's interpreter (CPU tensors allowed)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from bora_kernels.ops import _common
    except ImportError:
        return False
    if _common.INTERPRETED and not _common.INTERPRETER_SUPPORTED:
        warnings.warn(f"TRITON_INTERPRET=1 needs triton >= 3.8 to run bora_kernels' kernels (found "
                      f"{_common.triton.__version__}); CPU tensors use the torch path instead", stacklevel=2)
        return False
    return _common.INTERPRETED


_AUTOCAST_SOURCES = (torch.float32, torch.float16, torch.bfloat16)


def _any_autocast() -> bool:
    """Whether autocast is on for any device: one C call (~0.25 us on the CPU machine) that every
    op pays, where asking per device type costs ~0.45 us a type; the public calls where the
    private one is missing or torch.compile traces (its tracer knows them)."""
    if torch.compiler.is_compiling() or _IS_ANY_AUTOCAST_ENABLED is None:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    return _IS_ANY_AUTOCAST_ENABLED()


_IS_ANY_AUTOCAST_ENABLED = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype ``torch.autocast`` multiplies matrices in on ``x``'s device inside an enabled
    region; None outside one (and for anything but a CPU or CUDA tensor)."""
    if not _any_autocast() or not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_for_autocast(dtype: torch.dtype, t):
    """``t`` as autocast hands it to ``F.linear``: an fp32, fp16 or bf16 tensor cast to ``dtype``
    (differentiably); anything else (fp64, integers, None, not a tensor) as it is, for the op's
    own checks to name."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_SOURCES else t


def follows_autocast(*names: str):
    """Decorator of an op that multiplies matrices (its first argument a tensor): inside an
    enabled ``torch.autocast`` region the arguments ``names`` are cast to autocast's dtype and the
    op runs with autocast off (see the module docstring); outside, one check."""

    def wrap(op):
        params = list(inspect.signature(op).parameters)
        positions = [(params.index(name), name) for name in names]
        inner = autocast_off(op)

        @functools.wraps(op)
        def run(*args, **kwargs):
            cast = autocast_dtype(args[0] if args else None)
            if cast is None:
                return op(*args, **kwargs)
            args = list(args)
            for i, name in positions:
                if i < len(args):
                    args[i] = _cast_for_autocast(cast, args[i])
                elif name in kwargs:
                    kwargs[name] = _cast_for_autocast(cast, kwargs[name])
            return inner(*args, **kwargs)

        return run

    return wrap


def autocast_off(fn):
    """``fn`` run with ``torch.autocast`` off on CPU and CUDA (see the module docstring); outside
    an autocast region it costs one check."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not _any_autocast():
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return run


def records_grad(*tensors) -> bool:
    """Whether a call must go through its op's autograd Function: grad mode is on and one of
    ``tensors`` (None allowed) requires grad. Otherwise ops launch their kernels directly, with no
    autograd node (host time)."""
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any() over a generator: ~1 us less per call
            if t is not None and t.requires_grad:
                return True
    return False


def recording_graph(device: torch.device) -> bool:
    """True while torch.compile traces or a CUDA graph is captured on ``device``: no host sync
    then (a sync fails the capture), and no tensor made then may be cached (it belongs to the
    graph)."""
    return torch.compiler.is_compiling() or capturing_cuda_graph(device)


def capturing_cuda_graph(device: torch.device) -> bool:
    """True while a CUDA graph is captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@torch.compiler.assume_constant_result  # the tracer cannot read a ContextVar: it calls this once
def backend(device: torch.device) -> str:
    """Which implementation runs tensors on ``device``: ``"triton"`` or ``"torch"``. Under
    ``torch.compile`` the answer is fixed when a graph is traced (a later ``use_backend`` does not
    retrace); the ops' custom ops still ask it when they run."""
    forced = _forced.get()
    if device.type == "cuda":
        return forced or "triton"
    if device.type != "cpu":
        raise ValueError(f"bora_kernels ops run on CUDA or CPU tensors, got device {device}")
    if forced == "triton" and not triton_interpreted():
        raise RuntimeError(
            "the Triton kernels run on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported (triton >= 3.8)"
        )
    if forced:
        return forced
    return "triton" if triton_interpreted() else "torch"
