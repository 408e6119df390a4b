"""``nf4_matmul(x, weight, bias=None)``: ``x @ dequant(W)^T + bias`` for an NF4 weight.

On CUDA (and CPU under the interpreter) the Triton kernels dequantize weight tiles in registers
inside the GEMM's K loop (``triton.py``); on CPU otherwise the weight is dequantized once and
``F.linear`` runs (the vectorised torch path). Differentiable in ``x`` and ``bias``; the base
weight is frozen and gets no gradient.

Which kernel, by M (the rows of x after flattening), in ``_path``:

- M <= 16 on CUDA, fp16/bf16: the CUDA C++ GEMV of ``csrc/nf4_gemv`` when the extension is
  available (``bora_kernels._cuda_ext``): CUDA cores below 5 rows, tensor cores (sm_80+) from 5
  (``kNF4GemvMmaMinRows``; the tensor-core kernel multiplies by the weight rounded to x's dtype,
  as dequantize + cuBLAS does, the CUDA-core one by its fp32 value);
- M >= ``DENSE_MIN_M[device type]``: the weight dequantized once, then ``F.linear`` (cuBLAS);
- otherwise Triton: up to 16 rows one 16-row tile with the K reduction split across programs,
  above that the tiled GEMM.

On CUDA ``DENSE_MIN_M`` is 1 for now: measured on an H100 (``bora-bench nf4``, benchmarks/NOTES.md,
2026-11-23) the fused Triton kernels took 0.62 ms at M = 16 and 5.7 ms at M = 1024 on a
4096 x 4096 weight, against 0.05 and 0.07 ms for dequantize + cuBLAS, so every call the GEMV
cannot take goes dense. Their weight tiles have since been rewritten without a memory read per
element (``triton.py``; 2026-12-03, not yet timed on a GPU): the threshold is to be set from the
next ``bora-bench nf4`` run, whose ``triton`` column times them at every M. Under the interpreter
they run below 1024 rows, which is how CI checks them; the GPU tests raise the threshold to
check them compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import autocast_off, backend, follows_autocast, records_grad

CSRC_MAX_M = 16  # csrc/nf4_gemv/nf4_gemv.h: kNF4GemvMaxRows; M = 5..16 unmeasured (NOTES.md)
DENSE_MIN_M = {"cuda": 1, "cpu": 1024}  # by device type; see the module docstring


def _csrc_gemv(x2, weight, bias):
    """The CUDA extension's module when it can run this call, else None."""
    if not (x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16) and x2.shape[0] <= CSRC_MAX_M
            and (bias is None or bias.dtype == x2.dtype) and weight.blocksize >= 32
            and x2.data_ptr() % 16 == 0 and weight.packed.data_ptr() % 16 == 0
            and weight.packed.is_contiguous() and weight.absmax.is_contiguous()):
        return None
    from ..._cuda_ext import extension

    return extension()


def _path(x2, weight, bias, forward: bool):
    """``(path, extension)``: path ``"csrc"`` (with the extension module to launch it),
    ``"triton"`` (tiled or split-K by M, see triton._tiles) or ``"dense"``."""
    ext = _csrc_gemv(x2, weight, bias) if forward else None
    if ext is not None:
        return "csrc", ext
    if x2.shape[0] >= DENSE_MIN_M.get(x2.device.type, DENSE_MIN_M["cpu"]):
        return "dense", None
    return "triton", None


CSRC_KERNELS = {"auto": 0, "cores": 1, "mma": 2}  # csrc/nf4_gemv/nf4_gemv.h: NF4GemvKernel


def nf4_matmul_csrc(x2, weight, bias, out_shape, kernel: str = "auto"):
    """The CUDA GEMV: ``x2 [M <= CSRC_MAX_M, K]`` -> a new ``out_shape`` tensor (``[..., N]``);
    needs the extension and a CUDA device. ``kernel``: ``"auto"`` (by M, as ``nf4_matmul`` does),
    ``"cores"`` (CUDA cores) or ``"mma"`` (tensor cores, compute capability 8.0+), for benchmarks
    and tests that compare the two."""
    if kernel not in CSRC_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(CSRC_KERNELS)}, got {kernel!r}")
    ext = _csrc_gemv(x2, weight, bias)
    if ext is None:
        raise RuntimeError("the CUDA NF4 GEMV cannot run this call (see the log for why the extension is "
                           f"unavailable, or the input is not fp16/bf16 with at most {CSRC_MAX_M} rows)")
    return _gemv(ext, x2, weight, bias, out_shape, CSRC_KERNELS[kernel])


def _gemv(ext, x2, weight, bias, out_shape, kernel=0):
    out = torch.empty(out_shape, device=x2.device, dtype=x2.dtype)
    ext.nf4_gemv(out, x2, weight.packed.view(-1), weight.absmax, weight.nested_absmax, weight.nested_code,
                 weight.offset, bias, weight.shape[0], weight.blocksize, kernel)
    return out


def _forward(x2, bias, weight):
    """``x2 [M, K] @ dequant(W)^T + bias`` -> ``[M, N]`` by the path ``_path`` picks: a fresh
    tensor, never a view (callers add adapter deltas into it in place, and a view made inside an
    autograd Function may not be changed in place; ``nf4_matmul`` shapes it outside)."""
    n = weight.shape[0]
    if backend(x2.device) == "triton":
        x2 = x2.contiguous()
        path, ext = _path(x2, weight, bias, forward=True)
        if path == "csrc":
            return _gemv(ext, x2, weight, bias, (x2.shape[0], n))
        if path == "triton":
            from .triton import nf4_matmul_forward

            return nf4_matmul_forward(x2, weight, bias, (x2.shape[0], n))
    return F.linear(x2, weight.dequantize(x2.dtype), bias)  # 2-D: one addmm with the bias


def _dx(dy2, weight):
    """``dy2 [M, N] @ dequant(W)`` -> ``[M, K]``."""
    if backend(dy2.device) == "triton" and _path(dy2, weight, None, forward=False)[0] == "triton":
        from .triton import nf4_matmul_dx

        return nf4_matmul_dx(dy2.contiguous(), weight, (dy2.shape[0], weight.shape[1]))
    return dy2 @ weight.dequantize(dy2.dtype)


class NF4MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight = weight
        return _forward(x, bias, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off  # backward may be called inside an autocast region
    def backward(ctx, dy):
        dy2 = dy.reshape(-1, ctx.weight.shape[0])
        dx = _dx(dy2, ctx.weight) if ctx.needs_input_grad[0] else None
        dbias = dy2.sum(0) if ctx.needs_input_grad[1] else None
        return dx, dbias, None


# --- the same op as torch.library custom ops, for torch.compile ----------------------------------
# Eager calls use NF4MatmulFunction above. Under torch.compile the op is opaque to the tracer
# through these custom ops (the NF4 weight passed as its tensors) and their fake implementations.


def _op_weight(packed, absmax, offset, nested_absmax, nested_code, n: int, k: int, blocksize: int, dtype):
    from ...quant import NF4Tensor

    return NF4Tensor(packed, absmax, torch.Size((n, k)), dtype, blocksize, offset, nested_absmax, nested_code)


@torch.library.custom_op("bora_kernels::nf4_matmul", mutates_args=())
@autocast_off  # a compiled graph runs it inside the caller's autocast region
def _nf4_matmul_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, offset: torch.Tensor | None,
                   nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, bias: torch.Tensor | None,
                   n: int, blocksize: int) -> torch.Tensor:
    weight = _op_weight(packed, absmax, offset, nested_absmax, nested_code, n, x.shape[1], blocksize, x.dtype)
    return _forward(x, bias, weight)


@_nf4_matmul_op.register_fake
def _(x, packed, absmax, offset, nested_absmax, nested_code, bias, n, blocksize):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("bora_kernels::nf4_matmul_dx", mutates_args=())
@autocast_off  # a compiled graph runs it inside the caller's autocast region
def _nf4_matmul_dx_op(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, offset: torch.Tensor | None,
                      nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, k: int,
                      blocksize: int) -> torch.Tensor:
    weight = _op_weight(packed, absmax, offset, nested_absmax, nested_code, dy.shape[1], k, blocksize, dy.dtype)
    return _dx(dy, weight)


@_nf4_matmul_dx_op.register_fake
def _(dy, packed, absmax, offset, nested_absmax, nested_code, k, blocksize):
    return dy.new_empty((dy.shape[0], k))


def _op_setup_context(ctx, inputs, output):
    x, weight_parts, blocksize = inputs[0], inputs[1:6], inputs[8]  # (bias and n: not needed)
    ctx.save_for_backward(*weight_parts)
    ctx.k, ctx.blocksize = x.shape[1], blocksize


def _op_backward(ctx, dy):
    dx = _nf4_matmul_dx_op(dy, *ctx.saved_tensors, ctx.k, ctx.blocksize) if ctx.needs_input_grad[0] else None
    dbias = dy.sum(0) if ctx.needs_input_grad[6] else None
    return dx, None, None, None, None, None, dbias, None, None


_nf4_matmul_op.register_autograd(_op_backward, setup_context=_op_setup_context)


@follows_autocast("x", "bias")
def nf4_matmul(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(weight)^T + bias`` -> ``[..., N]``; ``weight`` a 2-D ``NF4Tensor``
    ``[N, K]`` with K a multiple of its blocksize. x is fp32, fp16 or bf16; the result has its dtype.
    Inside ``torch.autocast``, x and the bias are cast to its dtype first, as ``F.linear``'s are (the
    weight is dequantized to it)."""
    from ...quant import NF4Tensor

    if not isinstance(weight, NF4Tensor):
        raise ValueError(f"weight must be a bora_kernels.quant.NF4Tensor, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % weight.blocksize:
        raise ValueError(f"weight's K={k} must be a multiple of its blocksize {weight.blocksize} "
                         f"(shape {tuple(weight.shape)}): a block may not straddle two rows")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be a [..., {k}] tensor for weight {tuple(weight.shape)}, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)
                             or bias.device != x.device):
        raise ValueError(f"bias must be a [{n}] tensor on {x.device}, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    x2 = x.reshape(-1, k)
    if torch.compiler.is_compiling():
        out = _nf4_matmul_op(x2, weight.packed, weight.absmax, weight.offset, weight.nested_absmax,
                             weight.nested_code, bias, n, weight.blocksize)
    elif records_grad(x, bias):
        out = NF4MatmulFunction.apply(x2, bias, weight)
    else:
        out = _forward(x2, bias, weight)  # nothing to differentiate: no autograd node (host time)
    return out.view(*x.shape[:-1], n)


__all__ = ["NF4MatmulFunction", "nf4_matmul", "nf4_matmul_csrc"]
