"""``nf4_matmul(x, weight, bias=None)``: ``x @ dequant(W)^T + bias`` for an NF4 weight.

On CUDA (and CPU under the interpreter) the Triton kernels dequantize weight tiles in registers
inside the GEMM's K loop (``triton.py``); on CPU otherwise the weight is dequantized once and
``F.linear`` runs (the vectorised torch path). Differentiable in ``x`` and ``bias``; the base
weight is frozen and gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import backend


class NF4MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight):
        n, k = weight.shape
        ctx.weight, ctx.x_shape = weight, x.shape
        # outputs are fresh tensors, never views: callers add adapter deltas into them in place
        if backend(x.device) == "triton":
            from .triton import nf4_matmul_forward

            return nf4_matmul_forward(x.reshape(-1, k).contiguous(), weight, bias, (*x.shape[:-1], n))
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        weight = ctx.weight
        n, k = weight.shape
        dy2 = dy.reshape(-1, n)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            if backend(dy.device) == "triton":
                from .triton import nf4_matmul_dx

                dx = nf4_matmul_dx(dy2.contiguous(), weight, ctx.x_shape)
            else:
                dx = (dy2 @ weight.dequantize(dy.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dbias = dy2.sum(0)
        return dx, dbias, None


def nf4_matmul(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(weight)^T + bias`` -> ``[..., N]``; ``weight`` a 2-D ``NF4Tensor``
    ``[N, K]`` with K a multiple of its blocksize. x is fp32, fp16 or bf16; the result has its dtype."""
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
    return NF4MatmulFunction.apply(x, bias, weight)


__all__ = ["NF4MatmulFunction", "nf4_matmul"]
