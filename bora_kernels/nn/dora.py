"""DoRA (Liu et al., 2024, "Weight-Decomposed Low-Rank Adaptation") on a multi-adapter layer:
the pieces ``MultiLoRALinear`` composes. No kernel of its own: one GEMM for the norms and the
per-token scale of ``context_scale``.

An adapter ``d`` with DoRA computes

    y = bias + m_d / ||W + s_d B_d A_d||_row * (W x + s_d B_d A_d x)

with ``m_d`` a trained magnitude per output feature and the norm taken over each output row of
the merged weight, a constant in backward (DoRA's section 4.3; PEFT does the same). With
``z = W x + bias + s_d B_d A_d x``, the plain LoRA layer's output, this is one more elementwise
pass, ``y = z + t_d * (z - bias)`` with ``t_d = m_d / norm_d - 1`` gathered per token; adapters
without DoRA, and tokens without an adapter, have ``t = 0``. So a batch mixes DoRA and LoRA
adapters freely.

The norms never build ``B A``: row by row,
``||W + s B A||^2 = ||W||^2 + 2 s <W A^T, B> + s^2 <B (A A^T), B>``, from one GEMM of every
adapter's A against the base weight (an NF4 base through ``nf4_matmul``) and ``[R, R]`` Gram
matrices; ``||W||^2`` is the frozen base's and computed once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops._dispatch import autocast_off
from ..ops.nf4_matmul import nf4_matmul
from .nf4_linear import NF4Linear, is_bnb_4bit


def check_dora_base(base_layer: nn.Module) -> None:
    """A ``ValueError`` unless DoRA can read ``base_layer``'s weight values: a float weight or an
    ``NF4Linear``, or a bitsandbytes 4-bit layer, which becomes one (bitsandbytes' 8-bit codes
    are not values)."""
    if isinstance(base_layer, NF4Linear) or is_bnb_4bit(base_layer):
        return
    weight = getattr(base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        kind = getattr(weight, "dtype", type(weight).__name__)
        raise ValueError(f"use_dora needs the base weight's values, but {type(base_layer).__name__} holds a {kind} "
                         f"weight; DoRA works over float and NF4 bases")


def base_key(base_layer: nn.Module) -> tuple:
    """Changes whenever the base weight's values may have (a new tensor, or one written in place)."""
    weight = base_layer.packed if isinstance(base_layer, NF4Linear) else base_layer.weight
    return weight.data_ptr(), weight._version, weight.dtype, weight.device


@torch.no_grad()
def base_row_norms_sq(base_layer: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """``||W[n, :]||^2`` for every output feature ``n`` of the base weight, fp32 ``[N]``."""
    if isinstance(base_layer, NF4Linear):
        weight, dim = base_layer.nf4_weight().dequantize(), 1
    else:
        weight, dim = base_layer.weight.detach(), 0 if fan_in_fan_out else 1
    return torch.linalg.vector_norm(weight, dim=dim, dtype=torch.float32).square()


def _times_base(base_layer: nn.Module, rows: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``rows @ W^T`` (``[M, K] -> [M, N]``) however the base weight is stored."""
    if isinstance(base_layer, NF4Linear):
        return nf4_matmul(rows.to(base_layer.compute_dtype), base_layer.nf4_weight())
    weight = base_layer.weight.detach()
    return rows.to(weight.dtype) @ (weight if fan_in_fan_out else weight.T)


@torch.no_grad()
@autocast_off  # the norms scale whole output rows: in the weights' own precision, never autocast's bf16
def dora_norms(base_layer: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
               ranks: torch.Tensor, row_norms_sq: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``||W + scaling[d] B_d A_d||`` per output row for every adapter, fp32 ``[D, N]``, without
    building ``B_d A_d``. ``lora_a`` ``[D, R, K]``, ``lora_b`` ``[D, N, R]``, of which adapter
    ``d`` uses the first ``ranks[d]`` (the rest is read as zero, as ``lora_delta`` does, whatever
    it holds: IVON's samples put noise there), ``scaling`` ``[D]``, ``row_norms_sq`` from
    ``base_row_norms_sq``."""
    num, rank, k = lora_a.shape
    used = torch.arange(rank, device=ranks.device) < ranks[:, None]  # [D, R]
    a = lora_a.detach() * used[:, :, None].to(lora_a.dtype)
    b = (lora_b.detach() * used[:, None, :].to(lora_b.dtype)).float()
    wa = _times_base(base_layer, a.reshape(num * rank, k), fan_in_fan_out).float()
    a = a.float()
    cross = torch.einsum("dnr,drn->dn", b, wa.reshape(num, rank, -1))  # <W A_d^T, B_d> per row
    quad = ((b @ (a @ a.transpose(1, 2))) * b).sum(-1)  # <B_d (A_d A_d^T), B_d> per row
    s = scaling.float()[:, None]
    return (row_norms_sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()
