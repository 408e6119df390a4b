"""``MultiLoRAEmbedding``: an embedding layer plus D LoRA adapters, each token using its own
(PEFT's LoRA on ``nn.Embedding``, as when ``target_modules`` names ``embed_tokens``)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops.lora_delta import lora_expand
from .multi_lora import MultiLoRALinear, _per_adapter, plus_delta
from .routing import AdapterRoute


class MultiLoRAEmbedding(MultiLoRALinear):
    """``base_layer(x) + scaling[d] * B_d A_d[:, x]`` for token ids ``x``, ``d`` chosen per
    sequence or token as for ``MultiLoRALinear`` (``use_adapters``, ``adapter_ids``, plans).

    PEFT's layout with K = ``num_embeddings`` (V) and N = ``embedding_dim`` (H): its
    ``lora_embedding_A`` ``[r, V]`` and ``lora_embedding_B`` ``[H, r]`` stack into ``lora_A``
    ``[D, R, V]`` and ``lora_B`` ``[D, H, R]``, so loading, saving, merging (``delta_weight`` is
    ``s (B A)^T``, laid out as the ``[V, H]`` weight), BoRA's prior and IVON treat it as any
    adapter layer. Initialised as PEFT initialises it: A zero, B standard normal.

    The forward reads each token's column of its adapter's A (``[..., R]``, no one-hot and no
    dense delta) and runs the second half of the multi-adapter kernel on it (``lora_expand``),
    added into the base output. As in PEFT: no dropout (``dropout`` is accepted and unused), the
    base layer's ``padding_idx`` gets no gradient in A, and a base layer that scales its output
    (Gemma's ``embed_scale``) scales the adapters' too. Neither DoRA nor ``lora_bias``, and no base
    with ``max_norm`` (it renormalises the looked-up rows in place) or ``scale_grad_by_freq``.
    """

    def __init__(self, base_layer: nn.Module, num_adapters: int, r=8, alpha=16, dropout: float = 0.0,
                 dtype: torch.dtype | None = None, use_rslora=False, adapter_names: Sequence[str] | None = None,
                 use_dora=False, lora_bias=False, fan_in_fan_out: bool = False):
        if not isinstance(base_layer, nn.Embedding):
            raise ValueError(f"base_layer must be an nn.Embedding, got {type(base_layer).__name__}")
        if base_layer.max_norm is not None or base_layer.scale_grad_by_freq:
            raise ValueError("an embedding with max_norm or scale_grad_by_freq cannot take LoRA adapters here "
                             f"(max_norm={base_layer.max_norm}, scale_grad_by_freq={base_layer.scale_grad_by_freq})")
        if isinstance(num_adapters, int) and num_adapters >= 1:
            for flag, value in (("use_dora", use_dora), ("lora_bias", lora_bias)):
                if any(_per_adapter(value, num_adapters, flag)):
                    raise ValueError(f"{flag} is not supported on an embedding layer (LoRA on embeddings is plain "
                                     f"LoRA here), got {flag}={value!r}")
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out does not apply to an embedding layer")
        super().__init__(base_layer, num_adapters, r=r, alpha=alpha, dtype=dtype, use_rslora=use_rslora,
                         adapter_names=adapter_names)

    @staticmethod
    def _base_shape(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int, torch.Tensor]:
        return base_layer.num_embeddings, base_layer.embedding_dim, base_layer.weight

    # what model code reads of an embedding (Hugging Face's ``get_input_embeddings()``)
    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    @torch.no_grad()
    def reset_lora_parameters(self):
        """A zero, B standard normal on its first r_d columns (PEFT's embedding init), padding zero."""
        self.lora_A.zero_()
        self.lora_B.zero_()
        for d, rank in enumerate(self.rank_values):
            if rank:
                nn.init.normal_(self.lora_B[d, :, :rank])

    @torch.no_grad()
    def set_adapter(self, d: int, lora_a, lora_b, alpha: float = 16, use_rslora: bool = False, magnitude=None,
                    bias=None):
        """``MultiLoRALinear.set_adapter`` with PEFT's ``lora_embedding_A`` ``[r, V]`` and
        ``lora_embedding_B`` ``[H, r]``; no DoRA magnitude or ``lora_bias``."""
        if magnitude is not None or bias is not None:
            raise ValueError("an embedding adapter has no DoRA magnitude or lora_bias here")
        super().set_adapter(d, lora_a, lora_b, alpha=alpha, use_rslora=use_rslora)

    def delta_weight(self, d: int) -> torch.Tensor:
        """``scaling_d (B_d A_d)^T``, ``[V, H]`` as the embedding weight, in fp32."""
        return super().delta_weight(d).T

    def _scaling(self) -> torch.Tensor:
        """The adapters' scales, times the base layer's ``embed_scale`` where it has one."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return self.scaling
        scale = torch.as_tensor(scale)
        if scale.numel() != 1:
            raise ValueError(f"the base embedding's embed_scale must be one number, got shape {tuple(scale.shape)}")
        return self.scaling * scale.to(self.scaling.device, torch.float32).reshape(())

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        result = self.base_layer(x)
        given = self._given(adapter_ids)
        if given is None:
            return result
        if x.dim() not in (1, 2):
            raise ValueError(f"an embedding layer with adapters takes token ids [T] or [B, L], got shape {tuple(x.shape)}")
        batch = tuple(x.shape)
        ids = given.plan(batch, self.num_adapters, x.device) if isinstance(given, AdapterRoute) else given
        token_ids = self._token_ids(batch, x.device, given, ids)
        token_ids = token_ids.reshape(token_ids.shape + (1,) * (x.dim() - token_ids.dim())).expand(batch)
        # each token's column of its adapter's A (id -1 reads adapter 0's, which lora_expand leaves unused)
        columns = self.lora_A.transpose(1, 2)[token_ids.clamp(min=0), x]
        if self.padding_idx is not None:  # as F.embedding's padding_idx: no gradient there
            columns = torch.where((x == self.padding_idx)[..., None], columns.detach(), columns)
        scaling = self._scaling()
        return plus_delta(self.base_layer, result,
                          lambda into: lora_expand(columns, self.lora_B, ids, scaling, self.ranks, add_to=into))

    def extra_repr(self) -> str:
        return "embedding, " + super().extra_repr()
