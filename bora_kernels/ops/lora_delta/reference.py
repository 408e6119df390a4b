"""The truth for ``lora_delta``: plain float64 torch, one obvious line per step.

Slow on purpose (it gathers a weight matrix per token); tests differentiate it with autograd and
compare our kernels' forward and every gradient to it.
"""

from __future__ import annotations

import torch


def lora_delta_reference(x, lora_a, lora_b, adapter_ids, scaling=None, ranks=None):
    """``scaling[id] * (x @ A[id][:r]^T) @ B[id][:, :r]^T`` per token, zero where ``id == -1``.

    Same arguments as ``bora_kernels.ops.lora_delta``; returns float64.
    """
    num_adapters, max_rank, k = lora_a.shape
    n = lora_b.shape[1]
    batch_shape = x.shape[:-1]
    ids = adapter_ids
    if x.dim() == 3 and ids.dim() == 1:  # one id per sequence
        ids = ids[:, None].expand(batch_shape)
    ids = ids.reshape(-1).long()

    a = lora_a.double()
    b = lora_b.double()
    if ranks is not None:  # rank r_d keeps the first r_d rows of A_d and columns of B_d
        keep = (torch.arange(max_rank, device=ranks.device)[None, :] < ranks[:, None]).double()
        a = a * keep[:, :, None].to(a.device)
        b = b * keep[:, None, :].to(b.device)
    scale = torch.ones(num_adapters, dtype=torch.float64, device=x.device)
    if scaling is not None:
        scale = scaling.double().to(x.device)

    used = ids >= 0
    safe = ids.clamp(min=0)
    x2 = x.reshape(-1, k).double()
    h = torch.einsum("tk,trk->tr", x2, a[safe])
    y = torch.einsum("tr,tnr->tn", h, b[safe]) * scale[safe][:, None]
    y = torch.where(used[:, None], y, torch.zeros_like(y))
    return y.reshape(*batch_shape, n)
