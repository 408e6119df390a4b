"""The truth for ``context_lora_delta``, and the two forms users write without our op.

- ``einsum_form``: Algorithm 1 of the Context-PEFT paper, ``einsum('...ld,cdr,crD,...lc->...lD')``
  with a per-token context selector (one-hot in the paper, any float weights here).
- ``masked_concat_form``: the authors' re-implementation: every context's A and B concatenated,
  the rank-``C*R`` intermediate multiplied by a per-token float mask.

Both compute in their inputs' dtype, so the benchmark runs them as the baselines; the reference
calls the einsum in float64 and tests differentiate it with autograd.
"""

from __future__ import annotations

import torch


def one_hot_weights(context_ids, batch_shape, num_contexts: int) -> torch.Tensor:
    """Integer ids (per token, or per sequence ``[B]`` for a ``[B, L]`` batch; -1 = none) as the
    float one-hot selector of Algorithm 1 (an all-zero row for -1). Reference and baselines only:
    the op never builds it."""
    ids = context_ids.long()
    if len(batch_shape) == 2 and tuple(ids.shape) == tuple(batch_shape[:1]):
        ids = ids[:, None].expand(batch_shape)
    hot = torch.nn.functional.one_hot(ids.clamp(min=0), num_contexts).float()
    return hot * (ids >= 0)[..., None]


def as_weights(context, batch_shape, num_contexts: int) -> torch.Tensor:
    """Any accepted ``context_weights`` (float, bool mask, integer ids) as float weights."""
    if context.dtype == torch.bool:
        return context.float()
    if not context.dtype.is_floating_point:
        return one_hot_weights(context, batch_shape, num_contexts)
    return context


def einsum_form(x, lora_a, lora_b, context_weights, scaling=None):
    """``sum_c s_c w_c (x A_c^T) B_c^T`` as Algorithm 1 writes it; dtype of ``x``."""
    weights = context_weights.to(x.dtype)
    if scaling is not None:
        weights = weights * scaling.to(x.dtype)
    # Algorithm 1's layouts: A as [c, d, r], B as [c, r, D]
    return torch.einsum("...ld,cdr,crD,...lc->...lD", x, lora_a.transpose(1, 2), lora_b.transpose(1, 2), weights)


def masked_concat_form(x, lora_a, lora_b, context_weights, scaling=None):
    """Concatenated A ``[C*R, K]`` and B ``[N, C*R]``, the intermediate masked per token."""
    num_contexts, rank, k = lora_a.shape
    weights = context_weights.to(x.dtype)
    if scaling is not None:
        weights = weights * scaling.to(x.dtype)
    h = x @ lora_a.reshape(num_contexts * rank, k).T
    h = h * weights.repeat_interleave(rank, dim=-1)
    return h @ lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_contexts * rank).T


def context_lora_delta_reference(x, lora_a, lora_b, context_weights, scaling=None):
    """Float64 truth with the arguments of ``bora_kernels.ops.context_lora_delta``."""
    context_weights = as_weights(context_weights, x.shape[:-1], lora_a.shape[0])
    return einsum_form(x.double(), lora_a.double(), lora_b.double(), context_weights.double(),
                       None if scaling is None else scaling.double())
