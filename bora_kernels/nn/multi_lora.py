"""``MultiLoRALinear``: an ``nn.Linear`` plus D LoRA adapters, each token using its own."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..ops.lora_delta import LoRAPlan, lora_delta
from .routing import AdapterRoute


def _per_adapter(value, num_adapters: int, name: str) -> list:
    values = list(value) if isinstance(value, Sequence) else [value] * num_adapters
    if len(values) != num_adapters:
        raise ValueError(f"{name} must be one value or {num_adapters} values (one per adapter), "
                         f"got {len(values)}")
    return values


class MultiLoRALinear(nn.Module):
    """``base_layer(x) + scaling[d] * B_d A_d x`` with ``d`` chosen per sequence or token.

    Adapters are stacked: ``lora_A`` is ``[D, R, K]`` and ``lora_B`` is ``[D, N, R]`` with R the
    largest rank (smaller ranks zero-padded, never computed with). Initialised as PEFT does (A
    Kaiming-uniform, B zero), so a fresh layer equals its base layer. The base layer is frozen.

    ``forward(x, adapter_ids=None)``: ids per token (``x.shape[:-1]``) or per sequence (``[B]``),
    ``-1`` for none, or a ``LoRAPlan``. Without ids the layer uses ``self.adapter_ids`` (set for a
    whole model by ``bora_kernels.use_adapters``), and when that is None too, the base layer alone.
    """

    def __init__(self, base_layer: nn.Linear, num_adapters: int, r=8, alpha=16, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
        ranks = _per_adapter(r, num_adapters, "r")
        alphas = _per_adapter(alpha, num_adapters, "alpha")
        if any(not isinstance(v, int) or v < 1 for v in ranks):
            raise ValueError(f"r must be positive ints, got {ranks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        weight = base_layer.weight
        dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        n, k = weight.shape
        max_rank = max(ranks)

        self.base_layer = base_layer.requires_grad_(False)
        self.num_adapters = num_adapters
        self.lora_A = nn.Parameter(torch.zeros(num_adapters, max_rank, k, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, n, max_rank, device=weight.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("ranks", torch.tensor(ranks, dtype=torch.int32, device=weight.device))
        self.scaling_values = [a / rk for a, rk in zip(alphas, ranks)]
        self.register_buffer("scaling", torch.tensor(self.scaling_values, device=weight.device), persistent=False)
        self.adapter_ids: AdapterRoute | torch.Tensor | LoRAPlan | None = None
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self):
        """A_d Kaiming-uniform (a=sqrt(5)) on its first r_d rows, as PEFT's ``init_lora_weights``;
        B zero; padded rank zero."""
        self.lora_A.zero_()
        self.lora_B.zero_()
        for d, rank in enumerate(self.ranks.tolist()):
            nn.init.kaiming_uniform_(self.lora_A[d, :rank], a=math.sqrt(5))

    def _apply(self, fn, *args, **kwargs):
        # model.to(torch.bfloat16) must not round alpha / r; keep the scaling exact in fp32
        super()._apply(fn, *args, **kwargs)
        self.scaling = torch.tensor(self.scaling_values, device=self.scaling.device)
        return self

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        result = self.base_layer(x)
        ids = self.adapter_ids if adapter_ids is None else adapter_ids
        if ids is None:
            return result
        if isinstance(ids, AdapterRoute):
            ids = ids.plan(x.shape[:-1], self.num_adapters, x.device)
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        delta = lora_delta(x, self.lora_A, self.lora_B, ids, self.scaling, self.ranks)
        # in place: the base output is a fresh tensor its backward does not need, and add_ casts
        # an fp32 delta into a bf16 result without another copy
        return result.add_(delta)

    def extra_repr(self) -> str:
        ranks = self.ranks.tolist()
        rank_text = str(ranks[0]) if len(set(ranks)) == 1 else str(ranks)
        return f"adapters={self.num_adapters}, r={rank_text}, dtype={self.lora_A.dtype}"
