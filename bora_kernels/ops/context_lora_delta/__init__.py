"""``context_lora_delta``: Context-PEFT's LoRA, one adapter group per token context.

    y[t] = sum_c w[t, c] * s_c * (x[t] @ A_c^T) @ B_c^T

without building ``B_c A_c``, a ``[T, C, R]`` intermediate or a one-hot selector. It runs on the
kernels of ``lora_delta`` (contexts are its adapters), which take a per-token weight and can add
into their output:

- one context per token (integer ids, -1 = none): exactly ``lora_delta``, one pass;
- float weights ``[..., C]`` (one-hot, soft or multi-hot, e.g. after adaptor dropout): token ``t``'s
  non-zero contexts are listed in order, and pass ``k`` runs every token's ``k``-th one with its
  weight, adding into the output. The passes number the most non-zero contexts of any token, so
  only non-zero (token, context) pairs are computed and extra memory stays O(T * R) per pass.

When every context's rank columns together are few (on the CPU's torch path: they fit in the
input and output widths, ``C * R <= min(K, N, MASKED_MAX_COLUMNS)``), the delta is computed in the
masked concatenation form instead: one product with every context's A (``[T, C * R]``), each
token's columns weighted by its context weights, one product with every B. On the CPU's torch
path that intermediate is then no larger than ``x`` or ``y``, and the form needs none of the
grouping's copies of ``x`` and ``y``, which cost more than the small products themselves on a
CPU. On the Triton path (where only ``C * R <= MASKED_MAX_COLUMNS`` counts: the intermediate stays
in registers) it is one launch, the ``MASKED`` mode of ``lora_delta``'s shrink-expand kernel, with
no grouping at all, for integer ids or float weights given directly when nothing needs a
gradient (inference): the grouping and the passes cost more host time than the extra products
(``C`` times the rank) cost the device. With a ready ``ContextPlan`` (what a model's layers
share) or in training, the Triton path groups.

The gradient of float weights needs ``dy . (x A_c^T) B_c^T`` for every (token, context) pair,
zero weights included, so it is computed for all of them (two GEMMs, a ``[T, C * R]``
intermediate) only when the weights require grad.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .._dispatch import autocast_off, backend, follows_autocast, recording_graph, records_grad
from ..lora_delta import (LoRAPlan, _check_inputs, _kernels, _shape, apply_delta, check_add_to, check_adapter_ids,
                          full_ranks, ids_per_sequence, lora_plan, plan_ids, unit_scaling)

MASKED_MAX_COLUMNS = 128  # the CPU path's masked form: C * R at most this (and at most K and N)


class ContextPlan(NamedTuple):
    """The passes of one batch (see the module docstring), built once and shareable by every layer.

    ``passes`` holds ``(LoRAPlan, row_weight)`` pairs: the plan groups tokens by their ``k``-th
    context (-1 for tokens with fewer), ``row_weight`` is that context's fp32 weight per token in
    the original order, or None for integer ids. ``weights`` is the float ``[T, C]`` tensor the
    passes came from (None for ids), kept so that its gradient can flow.
    """

    passes: tuple
    batch_shape: tuple
    num_contexts: int
    weights: torch.Tensor | None


def _is_ids(context) -> bool:
    return isinstance(context, torch.Tensor) and not context.dtype.is_floating_point \
        and context.dtype != torch.bool and not context.dtype.is_complex


def context_plan(context_weights, batch_shape: Sequence[int], num_contexts: int,
                 device: torch.device | None = None) -> ContextPlan:
    """Passes for ``context_weights`` of a batch whose leading dims are ``batch_shape``.

    ``context_weights``: integer ids per token (``batch_shape``) or per sequence (``[B]`` of a
    ``[B, L]`` batch), -1 for none; or float (or bool) weights ``batch_shape + (C,)``. Float
    weights cost one host sync (the most non-zero contexts of a token) except under
    ``torch.compile`` or while a CUDA graph is captured, where every one of the C passes runs
    (a token's k-th non-zero context, or none, in pass k: the same sum).
    """
    batch_shape = tuple(batch_shape)
    if not isinstance(context_weights, torch.Tensor):
        raise ValueError(f"context_weights must be a tensor (float weights [..., C] or integer ids), "
                         f"got {type(context_weights).__name__}")
    device = context_weights.device if device is None else torch.device(device)
    if _is_ids(context_weights):
        plan = lora_plan(context_weights, batch_shape, num_contexts, device=device, name="context_weights")
        return ContextPlan(((plan, None),), batch_shape, num_contexts, None)
    if tuple(context_weights.shape) != batch_shape + (num_contexts,):
        raise ValueError(f"context_weights has shape {_shape(context_weights)}, expected "
                         f"{batch_shape + (num_contexts,)} (float weights per token) or integer ids "
                         f"of shape {batch_shape}")
    if context_weights.dtype.is_complex:
        raise ValueError(f"context_weights must be float, bool or integer, got {context_weights.dtype}")
    weights = context_weights.to(device).reshape(-1, num_contexts)
    if not weights.dtype.is_floating_point:  # a bool mask: weight 1 where set
        weights = weights.float()
    values = weights.detach().float()
    nonzero = values != 0
    if recording_graph(values.device):
        num_passes = num_contexts
    else:
        num_passes = max(1, int(nonzero.sum(-1).max())) if values.shape[0] else 1
    if num_passes == 1:  # at most one context per token (one-hot): its place is the largest |w|
        largest = values.abs().max(dim=-1)
        ids = torch.where(largest.values != 0, largest.indices, -1)[:, None]  # NaN kept: it must show
        row_weights = values.gather(1, largest.indices[:, None])  # 0 where the row is all zeros
    else:  # each token's non-zero contexts first, in context order; C marks "no more"
        contexts = torch.arange(num_contexts, device=device).expand_as(values)
        listed = torch.where(nonzero, contexts, num_contexts).sort(dim=-1).values[:, :num_passes]
        present = listed < num_contexts
        ids = torch.where(present, listed, -1)
        row_weights = torch.where(present, values.gather(1, listed.clamp(max=num_contexts - 1)), 0.0)
    passes = tuple((lora_plan(ids[:, k], (values.shape[0],), num_contexts, device=device),
                    row_weights[:, k].contiguous()) for k in range(num_passes))
    return ContextPlan(passes, batch_shape, num_contexts, weights)


def _weights_grad(dy, x, lora_a, lora_b, scaling):
    """``d out / d w[t, c] = s_c * dy[t] . (x[t] A_c^T) B_c^T`` for every pair, in fp32."""
    num_contexts, rank, k = lora_a.shape
    h = x.float() @ lora_a.reshape(num_contexts * rank, k).float().T
    g = dy.float() @ lora_b.float().permute(1, 0, 2).reshape(lora_b.shape[1], num_contexts * rank)
    return (h * g).view(-1, num_contexts, rank).sum(-1) * scaling


class ContextLoRADeltaFunction(torch.autograd.Function):
    """Forward keeps h = x @ A^T per pass ([T, R] fp32 each); backward runs the passes again.
    With ``add_to`` (the first input, as in ``LoRADeltaFunction``) the passes add into it in
    place (its gradient is dy itself)."""

    @staticmethod
    def forward(ctx, add_to, x, lora_a, lora_b, weights, scaling, ranks, plan, kernels):
        needs_grad = any(ctx.needs_input_grad[1:4])
        out, saved_h = None if add_to is None else add_to.view(x.shape[0], lora_b.shape[1]), []
        for pass_plan, row_weight in plan.passes:
            out, h = kernels.lora_delta_forward(x, lora_a, lora_b, pass_plan, scaling, ranks, save_h=needs_grad,
                                                row_weight=row_weight, out=out)
            saved_h.append(h)
        ctx.kernels, ctx.plan = kernels, plan
        ctx.save_for_backward(x, lora_a, lora_b, scaling, ranks, *saved_h)
        if add_to is not None:
            ctx.mark_dirty(add_to)
            return add_to
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off  # backward may be called inside an autocast region
    def backward(ctx, dy):
        x, lora_a, lora_b, scaling, ranks, *saved_h = ctx.saved_tensors
        d_add_to, dy = dy, dy.reshape(x.shape[0], -1)
        needs = ctx.needs_input_grad[1:4]
        dx = da = db = None
        if any(needs):
            for (pass_plan, row_weight), h in zip(ctx.plan.passes, saved_h):
                dx, da_k, db_k = ctx.kernels.lora_delta_backward(
                    dy, x, lora_a, lora_b, h, pass_plan, scaling, ranks, needs, row_weight=row_weight, dx=dx)
                da = da_k if da is None else da.add_(da_k)
                db = db_k if db is None else db.add_(db_k)
        dw = None
        if ctx.needs_input_grad[4]:
            dw = _weights_grad(dy, x, lora_a, lora_b, scaling).to(ctx.plan.weights.dtype)
        return (d_add_to if ctx.needs_input_grad[0] else None), dx, da, db, dw, None, None, None, None


@torch.compiler.disable  # the passes are data-dependent Python objects: run eagerly under compile
def _weighted_delta(x2, lora_a, lora_b, plan, scaling, add_to=None):
    """The passes of a float-weights plan; with ``add_to`` (contiguous) they add into it and it is
    returned as it was shaped."""
    num_contexts, max_rank, _ = lora_a.shape
    ranks = full_ranks(num_contexts, max_rank, x2.device)
    kernels = _kernels(x2.device)
    weights = plan.weights
    if records_grad(x2, lora_a, lora_b, weights, add_to):
        tracked = weights is not None and weights.requires_grad
        return ContextLoRADeltaFunction.apply(add_to, x2, lora_a, lora_b, weights if tracked else None, scaling,
                                              ranks, plan, kernels)
    out = None if add_to is None else add_to.view(x2.shape[0], lora_b.shape[1])
    for pass_plan, row_weight in plan.passes:
        out, _ = kernels.lora_delta_forward(x2, lora_a, lora_b, pass_plan, scaling, ranks, save_h=False,
                                            row_weight=row_weight, out=out)
    return out if add_to is None else add_to


def _token_weights(plan: ContextPlan, num_tokens: int) -> torch.Tensor:
    """``[T, C]`` fp32: each token's weight per context (one-hot rows for integer ids, derived
    from the plan's grouping once and kept in it)."""
    if plan.weights is not None:
        return plan.weights.float()
    context = plan_ids(plan.passes[0][0]).reshape(num_tokens)
    return (context[:, None] == torch.arange(plan.num_contexts, device=context.device)).float()


def _masked_context(context_weights, batch_shape, num_contexts: int, rank: int):
    """``(context, per_row)`` for the Triton path's masked launch (see the module docstring): ids
    (one per ``per_row`` rows) or float weights ``[T, C]`` as given; None when it does not apply
    (a plan, C * R above MASKED_MAX_COLUMNS, or weights ``context_plan`` will refuse)."""
    if not isinstance(context_weights, torch.Tensor) or num_contexts * rank > MASKED_MAX_COLUMNS:
        return None
    if _is_ids(context_weights):
        check_adapter_ids(context_weights, num_contexts, "context_weights")
        per_sequence = ids_per_sequence(context_weights, batch_shape, "context_weights")
        return context_weights.reshape(-1), batch_shape[1] if per_sequence else 1
    if tuple(context_weights.shape) != batch_shape + (num_contexts,) or context_weights.dtype.is_complex:
        return None  # context_plan names what is wrong
    return context_weights.reshape(-1, num_contexts), 1


def _masked_delta(x2, lora_a, lora_b, weights):
    """``sum_c w[t, c] (x A_c^T) B_c^T`` as two products through ``[T, C * R]`` (fp32, autograd)."""
    num_contexts, rank, k = lora_a.shape
    h = x2.float() @ lora_a.reshape(num_contexts * rank, k).float().T
    h = (h.view(-1, num_contexts, rank) * weights[:, :, None]).view(-1, num_contexts * rank)
    return (h @ lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], -1).float().T).to(x2.dtype)


@follows_autocast("x", "lora_a", "lora_b")
def context_lora_delta(x, lora_a, lora_b, context_weights, scaling=None, add_to=None):
    """Context-PEFT's LoRA delta: ``sum_c w[..., c] * s_c * (x @ A_c^T) @ B_c^T``.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32.
        lora_a: ``[C, R, K]``, one A per context.
        lora_b: ``[C, N, R]``, one B per context.
        context_weights: float (or bool) ``[..., C]``: one-hot, soft or multi-hot, zeros skipped;
            or integer context ids ``[...]`` (per sequence ``[B]`` for ``x`` of ``[B, L, K]``), -1
            for none, which never builds a one-hot tensor; or a ``ContextPlan`` from
            ``context_plan`` to share one grouping between layers.
        scaling: ``None`` (1.0) or ``[C]`` float, e.g. ``alpha / r``.
        add_to: optional ``x.shape[:-1] + (N,)`` float tensor (the base layer's output) that the
            delta is added into in place, by the kernels themselves on the GPU path; returned.

    Returns ``x.shape[:-1] + (N,)`` in x's dtype, accumulated in fp32 (or ``add_to`` plus the
    delta). Differentiable in x, lora_a, lora_b, float context weights and ``add_to``. Inside
    ``torch.autocast``, x, lora_a and lora_b are cast to its dtype first, as in ``lora_delta``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a [..., K] tensor with at least one leading dim, got shape {_shape(x)}")
    batch_shape = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    _check_inputs(x2, lora_a, lora_b, scaling, None)
    (num_contexts, rank, k), n = lora_a.shape, lora_b.shape[1]
    if isinstance(context_weights, ContextPlan):
        plan = context_weights
        if plan.batch_shape != batch_shape or plan.num_contexts != num_contexts:
            raise ValueError(f"context_weights is a plan for batch {plan.batch_shape} and {plan.num_contexts} "
                             f"contexts, but x is {_shape(x)} and lora_a holds {num_contexts} contexts")
    elif isinstance(context_weights, torch.Tensor) and context_weights.device != x.device:
        raise ValueError(f"context_weights is on {context_weights.device} but x is on {x.device}")
    scaling = unit_scaling(num_contexts, x.device) if scaling is None else scaling.to(device=x.device,
                                                                                       dtype=torch.float32)
    check_add_to(add_to, x, n)
    masked = None
    if backend(x.device) == "triton" and x2.shape[0] and not records_grad(
            x2, lora_a, lora_b, context_weights if isinstance(context_weights, torch.Tensor) else None, add_to):
        masked = _masked_context(context_weights, batch_shape, num_contexts, rank)
    if masked is None:
        if not isinstance(context_weights, ContextPlan):
            plan = context_plan(context_weights, batch_shape, num_contexts, device=x.device)
        if plan.passes[0][0].perm.device != x.device:
            raise ValueError(f"context_weights plan is on {plan.passes[0][0].perm.device} but x is on {x.device}")

    if masked is not None:  # one launch, no grouping; into add_to itself when it is contiguous
        from ..lora_delta.triton import context_masked_delta

        into = add_to is not None and add_to.is_contiguous()
        target = add_to.view(x2.shape[0], n) if into else torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
        out = context_masked_delta(x2, lora_a, lora_b, *masked, scaling, target, accumulate=into)
        if into:
            return add_to
    elif backend(x.device) == "torch" and num_contexts * rank <= min(k, n, MASKED_MAX_COLUMNS):
        out = _masked_delta(x2, lora_a, lora_b, _token_weights(plan, x2.shape[0]) * scaling)
    elif plan.weights is None:  # one context per token: the multi-adapter op itself
        ids_plan = plan.passes[0][0]
        flat = LoRAPlan(ids_plan.perm, ids_plan.bounds, (x2.shape[0],), num_contexts, ids_plan.derived)
        return apply_delta(x2, lora_a, lora_b, flat, scaling, full_ranks(num_contexts, rank, x.device), batch_shape,
                           add_to)
    elif x2.shape[0] == 0:
        out = x2 @ lora_a[0].T @ lora_b[0].T
    elif add_to is not None and add_to.is_contiguous():  # the passes add into it
        return _weighted_delta(x2, lora_a, lora_b, plan, scaling, add_to)
    else:
        out = _weighted_delta(x2, lora_a, lora_b, plan, scaling)
    out = out.reshape(*batch_shape, n)
    return out if add_to is None else add_to.add_(out)
