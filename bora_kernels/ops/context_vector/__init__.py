"""``context_bias`` and ``context_scale``: Context-BitFit and Context-IA3.

    context_bias(u, bias, w)    = u + sum_c w[..., c] * bias[c]      (Context-BitFit)
    context_scale(u, scale, w)  = u * sum_c w[..., c] * scale[c]     (Context-IA3)

``u`` is the base layer's output (or, for IA3 on the FFN's down projection, its input). One op
with two modes, one fused kernel each way (``triton.py``); ``vectorised.py`` is the CPU torch
path. Integer context ids stand for one-hot rows (-1: an all-zero row, so a token without a
context gets bias 0, and scale 0 under IA3).
"""

from __future__ import annotations

import torch

from .._dispatch import autocast_off, backend, records_grad
from ..context_lora_delta import _is_ids
from ..lora_delta import _shape, check_adapter_ids, ids_per_sequence


def _kernels(device: torch.device):
    if backend(device) == "triton":
        from . import triton as kernels
    else:
        from . import vectorised as kernels
    return kernels


class ContextVectorFunction(torch.autograd.Function):
    """Saves u only to multiply (IA3); backward recomputes each row's vector instead of storing it."""

    @staticmethod
    def forward(ctx, u, vectors, weights, ids, rows_per_id, multiply, kernels):
        context = ids if weights is None else weights
        ctx.layout = (weights is None, rows_per_id, multiply, kernels)
        ctx.save_for_backward(u if multiply else None, vectors, context)
        return kernels.context_vector_forward(u, vectors, context, weights is None, rows_per_id, multiply)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off  # backward may be called inside an autocast region
    def backward(ctx, dy):
        u, vectors, context = ctx.saved_tensors
        is_ids, rows_per_id, multiply, kernels = ctx.layout
        needs = ctx.needs_input_grad[:3]
        du, dvec, dw = kernels.context_vector_backward(dy, u, vectors, context, is_ids, rows_per_id, multiply, needs)
        dvec = None if dvec is None else dvec.to(vectors.dtype)
        dw = None if dw is None else dw.to(context.dtype)
        return du, dvec, dw, None, None, None, None


# --- the same op as torch.library custom ops, for torch.compile ----------------------------------
# Eager calls use ContextVectorFunction above. Under torch.compile the op is opaque to the tracer
# through these custom ops and their fake implementations (the tracer cannot follow a launch).


@torch.library.custom_op("bora_kernels::context_vector", mutates_args=())
@autocast_off  # a compiled graph runs it inside the caller's autocast region
def _context_vector_op(u: torch.Tensor, vectors: torch.Tensor, context: torch.Tensor, is_ids: bool,
                       rows_per_id: int, multiply: bool) -> torch.Tensor:
    return _kernels(u.device).context_vector_forward(u, vectors, context, is_ids, rows_per_id, multiply)


@_context_vector_op.register_fake
def _(u, vectors, context, is_ids, rows_per_id, multiply):
    return torch.empty_like(u)


@torch.library.custom_op("bora_kernels::context_vector_backward", mutates_args=())
@autocast_off  # a compiled graph runs it inside the caller's autocast region
def _context_vector_backward_op(dy: torch.Tensor, u: torch.Tensor, vectors: torch.Tensor, context: torch.Tensor,
                                is_ids: bool, rows_per_id: int, multiply: bool, needs_du: bool, needs_dvec: bool,
                                needs_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _kernels(dy.device).context_vector_backward(dy, u if multiply else None, vectors, context, is_ids,
                                                        rows_per_id, multiply, (needs_du, needs_dvec, needs_dw))
    # a custom op returns new tensors (never dy itself) of the inputs' dtypes: empty ones for
    # gradients not asked for
    return tuple(like.new_empty(0) if g is None else g.clone() if g is dy else g.to(like.dtype)
                 for g, like in zip(grads, (dy, vectors, context)))


@_context_vector_backward_op.register_fake
def _(dy, u, vectors, context, is_ids, rows_per_id, multiply, needs_du, needs_dvec, needs_dw):
    return tuple(like.new_empty(like.shape if need else (0,))
                 for like, need in ((dy, needs_du), (vectors, needs_dvec), (context, needs_dw)))


def _op_setup_context(ctx, inputs, output):
    u, vectors, context, is_ids, rows_per_id, multiply = inputs
    ctx.save_for_backward(u, vectors, context)
    ctx.layout = (is_ids, rows_per_id, multiply)


def _op_backward(ctx, dy):
    needs = ctx.needs_input_grad[:3]
    grads = _context_vector_backward_op(dy, *ctx.saved_tensors, *ctx.layout, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


_context_vector_op.register_autograd(_op_backward, setup_context=_op_setup_context)


@autocast_off  # an elementwise op: it keeps u's dtype under autocast, computing in fp32 as outside
def _context_vector(u, vectors, context_weights, multiply: bool, name: str):
    if not isinstance(u, torch.Tensor) or u.dim() < 2 or not u.dtype.is_floating_point:
        raise ValueError(f"u must be a float [..., N] tensor with at least one leading dim, got {_shape(u)}"
                         + (f" of {u.dtype}" if isinstance(u, torch.Tensor) else ""))
    n = u.shape[-1]
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != n \
            or not vectors.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float [C, N] tensor with N={n} (from u {_shape(u)}), got {_shape(vectors)}")
    if vectors.device != u.device:
        raise ValueError(f"{name} is on {vectors.device} but u is on {u.device}")
    if not isinstance(context_weights, torch.Tensor):
        raise ValueError(f"context_weights must be a tensor (float weights [..., C] or integer ids), "
                         f"got {type(context_weights).__name__}")
    if context_weights.device != u.device:
        raise ValueError(f"context_weights is on {context_weights.device} but u is on {u.device}")
    num_contexts = vectors.shape[0]
    batch_shape = tuple(u.shape[:-1])
    u2 = u.reshape(-1, n)
    weights = ids = None
    rows_per_id = 1
    if _is_ids(context_weights):
        check_adapter_ids(context_weights, num_contexts, "context_weights")
        if ids_per_sequence(context_weights, batch_shape, "context_weights"):
            rows_per_id = batch_shape[1]
        ids = context_weights.reshape(-1)
    else:
        if tuple(context_weights.shape) != batch_shape + (num_contexts,):
            raise ValueError(f"context_weights has shape {_shape(context_weights)}, expected "
                             f"{batch_shape + (num_contexts,)} (float weights) or {batch_shape} (integer ids)")
        weights = context_weights.reshape(-1, num_contexts)
        if not weights.dtype.is_floating_point:
            weights = weights.float()  # a bool mask
    if u2.shape[0] == 0:
        return u * 1.0 if multiply else u + 0.0
    context = ids if weights is None else weights
    if torch.compiler.is_compiling():
        return _context_vector_op(u2, vectors, context, weights is None, rows_per_id, multiply).reshape(u.shape)
    kernels = _kernels(u.device)
    if records_grad(u, vectors, weights):
        out = ContextVectorFunction.apply(u2, vectors, weights, ids, rows_per_id, multiply, kernels)
    else:
        out = kernels.context_vector_forward(u2, vectors, context, weights is None, rows_per_id, multiply)
    return out.reshape(u.shape)


def context_bias(u, bias, context_weights):
    """Context-BitFit: ``u + sum_c w[..., c] * bias[c]`` in one pass over ``u``.

    Args:
        u: ``[..., N]`` float (the base layer's output).
        bias: ``[C, N]`` float, one bias per context.
        context_weights: float (or bool) ``[..., C]``, or integer ids ``[...]`` (per sequence
            ``[B]`` for a ``[B, L, N]`` u), -1 for none.

    Returns u's shape and dtype (computed in fp32). Differentiable in u, bias and float weights.
    """
    return _context_vector(u, bias, context_weights, multiply=False, name="bias")


def context_scale(u, scale, context_weights):
    """Context-IA3: ``u * sum_c w[..., c] * scale[c]`` in one pass over ``u``; arguments as
    ``context_bias`` with ``scale`` ``[C, N]``. A token whose weights are all zero (or id -1)
    gets scale 0."""
    return _context_vector(u, scale, context_weights, multiply=True, name="scale")
