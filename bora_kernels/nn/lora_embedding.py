"""``MultiLoRAEmbedding``: an embedding layer plus D LoRA adapters, each token using its own
(PEFT's LoRA on ``nn.Embedding``, as when ``target_modules`` names ``embed_tokens``), and PEFT's
trainable tokens (``trainable_token_indices``: an adapter's own rows for a few token ids);
``TiedTokenHead``: the output head tied to that embedding, whose logits follow those rows."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops.lora_delta import lora_expand, lora_shrink
from .multi_lora import AdapterVectors, MultiLoRALinear, ReadsThroughToBase, _per_adapter, plus_delta
from .routing import AdapterRoute


def _routed(given, batch: tuple, num_adapters: int, device: torch.device) -> tuple:
    """``(what lora_delta runs by, each token's id laid out as batch)`` for the ids a forward got
    (a route, a tensor per sequence or token, or a plan)."""
    ids = given.plan(batch, num_adapters, device) if isinstance(given, AdapterRoute) else given
    token_ids = MultiLoRALinear._token_ids(batch, device, given, ids)
    return ids, token_ids.reshape(token_ids.shape + (1,) * (len(batch) - token_ids.dim())).expand(batch)


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

    Trainable tokens (``set_adapter(..., tokens=(ids, rows))``, PEFT's ``trainable_token_indices``):
    adapter ``d``'s tokens ``ids`` embed as its own ``rows`` instead of the base's, ``token_values``
    (``[D, T_max, H]``, a parameter once some adapter has tokens, trained with the adapters) and
    the ids in ``token_columns`` (``[D, T_max]``, -1 past an adapter's own). Each token compares its
    id with its adapter's few (no ``[D, V]`` table). As in PEFT, an adapter has either LoRA or
    trainable tokens on an embedding, not both; a ``TiedTokenHead`` makes a tied output head follow.
    """

    _LEAST_RANK = 0  # rank 0 everywhere: a layer for trainable tokens alone

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
        if self.lora_A.shape[1] == 0:  # (no LoRA here: nothing to train but trainable tokens)
            self.lora_A.requires_grad_(False)
            self.lora_B.requires_grad_(False)
        self.token_indices: list[tuple[int, ...]] = [()] * num_adapters
        self.register_buffer("token_columns", torch.empty(0), persistent=False)
        self.register_buffer("token_counts", torch.empty(0), persistent=False)
        self.register_parameter("token_values", None)
        self._write_buffers()

    def _buffer_values(self) -> dict:
        values = super()._buffer_values()
        indices = getattr(self, "token_indices", None)  # (None while MultiLoRALinear's __init__ runs)
        if indices is not None:
            width = max(map(len, indices))
            values["token_columns"] = ([list(i) + [-1] * (width - len(i)) for i in indices], torch.int64)
            values["token_counts"] = ([len(i) for i in indices], torch.int32)
        return values

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
                    bias=None, tokens: tuple | None = None):
        """``MultiLoRALinear.set_adapter`` with PEFT's ``lora_embedding_A`` ``[r, V]`` and
        ``lora_embedding_B`` ``[H, r]``; no DoRA magnitude or ``lora_bias``. ``tokens``: ``(ids,
        rows)``, the adapter's trainable tokens (distinct ids in ``[0, V)``; ``rows`` ``[len(ids), H]``,
        or None for the base's rows, PEFT's initialisation) instead of LoRA (give A and B as None);
        a layer without trainable tokens gets its ``token_values`` parameter then (give an
        optimizer the parameters after)."""
        if magnitude is not None or bias is not None:
            raise ValueError("an embedding adapter has no DoRA magnitude or lora_bias here")
        if tokens is not None:
            tokens = self._checked_tokens(tokens)
            if lora_a is not None or lora_b is not None:
                raise ValueError("an adapter has either LoRA or trainable tokens on an embedding, not both (as in PEFT)")
        super().set_adapter(d, lora_a, lora_b, alpha=alpha, use_rslora=use_rslora)
        ids, rows = tokens if tokens is not None else ((), None)
        if len(ids) > (0 if self.token_values is None else self.token_values.shape[1]):
            grown = AdapterVectors(self.lora_A.new_zeros(self.num_adapters, len(ids), self.out_features))
            if self.token_values is not None:
                grown[:, :self.token_values.shape[1]] = self.token_values
            self.token_values = grown
        if self.token_values is not None:
            self.token_values[d].zero_()
            if ids:
                self.token_values[d, :len(ids)] = rows.to(self.token_values)
        self.token_indices[d] = tuple(ids)
        self._write_buffers()

    def _checked_tokens(self, tokens) -> tuple[tuple[int, ...], torch.Tensor]:
        """``(ids, rows)`` of ``set_adapter``'s ``tokens``, checked; rows of None read from the base."""
        if not isinstance(tokens, tuple) or len(tokens) != 2:
            raise ValueError(f"tokens must be (ids, rows), got {type(tokens).__name__}")
        ids, rows = tokens
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.num_embeddings:
            raise ValueError(f"trainable token ids must be distinct ints in [0, {self.num_embeddings}), "
                             f"at least one, got {ids[:20]}")
        if rows is None:
            rows = self.base_layer.weight.detach()[ids]
        if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (len(ids), self.out_features):
            raise ValueError(f"trainable token rows must be [{len(ids)}, {self.out_features}] (one per id), got "
                             f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}")
        return tuple(ids), rows

    def adapter_tokens(self, d: int) -> tuple[list[int], torch.Tensor] | None:
        """Adapter ``d``'s trainable tokens as PEFT stores them, ``(ids, rows [len(ids), H])``, or None."""
        ids = self.token_indices[d]
        return (list(ids), self.token_values[d, :len(ids)].detach()) if ids else None

    def touches(self, d: int) -> bool:
        return super().touches(d) or bool(self.token_indices[d])

    def _merged_weight(self, d: int, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with adapter ``d``'s LoRA added, or its trainable tokens' rows put in."""
        tokens = self.adapter_tokens(d)
        if tokens is None:
            return super()._merged_weight(d, weight)
        index = torch.tensor(tokens[0], device=weight.device)
        return weight.index_copy(0, index, tokens[1].to(weight))

    def delta_weight(self, d: int) -> torch.Tensor:
        """``scaling_d (B_d A_d)^T``, ``[V, H]`` as the embedding weight, in fp32."""
        return super().delta_weight(d).T

    def _embed_scale(self) -> torch.Tensor | None:
        """The base layer's ``embed_scale`` (Gemma's scaled embeddings) as a 0-dim fp32 tensor on the
        adapters' device, or None where it has none."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        scale = torch.as_tensor(scale)
        if scale.numel() != 1:
            raise ValueError(f"the base embedding's embed_scale must be one number, got shape {tuple(scale.shape)}")
        return scale.to(self.scaling.device, torch.float32).reshape(())

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        result = self.base_layer(x)
        given = self._given(adapter_ids)
        if given is None:
            return result
        if x.dim() not in (1, 2):
            raise ValueError(f"an embedding layer with adapters takes token ids [T] or [B, L], got shape {tuple(x.shape)}")
        ids, token_ids = _routed(given, tuple(x.shape), self.num_adapters, x.device)
        if any(self.rank_values):
            # each token's column of its adapter's A (id -1 reads adapter 0's, which lora_expand leaves unused)
            columns = self.lora_A.transpose(1, 2)[token_ids.clamp(min=0), x]
            if self.padding_idx is not None:  # as F.embedding's padding_idx: no gradient there
                columns = torch.where((x == self.padding_idx)[..., None], columns.detach(), columns)
            scale = self._embed_scale()
            scaling = self.scaling if scale is None else self.scaling * scale
            result = plus_delta(self.base_layer, result,
                                lambda into: lora_expand(columns, self.lora_B, ids, scaling, self.ranks, add_to=into))
        if self.has_tokens():
            result = self._with_token_rows(result, x, token_ids)
        return result

    def has_tokens(self) -> bool:
        """Whether some adapter has trainable tokens here."""
        return any(self.token_indices)

    def token_slots(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[..., T_max]``: the ids of each token's adapter's trainable tokens, -1 where it has none
        (past its own, and for id -1)."""
        columns = self.token_columns[token_ids.clamp(min=0)]
        return torch.where((token_ids >= 0)[..., None], columns, -1)

    def _with_token_rows(self, result: torch.Tensor, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``result`` with each token that is one of its adapter's trainable tokens embedded as its
        row of ``token_values`` (times ``embed_scale``)."""
        hits = self.token_slots(token_ids) == x[..., None]
        rows = self.token_values[token_ids.clamp(min=0), hits.int().argmax(-1)]
        scale = self._embed_scale()
        rows = rows if scale is None else rows * scale.to(rows)
        return torch.where(hits.any(-1)[..., None], rows.to(result.dtype), result)

    def extra_repr(self) -> str:
        tokens = {d: len(i) for d, i in enumerate(self.token_indices) if i}
        return "embedding, " + super().extra_repr() + (f", trainable tokens={tokens}" if tokens else "")


class TiedTokenHead(ReadsThroughToBase, nn.Module):
    """The output head of a model whose head weight is its input embedding's (``tie_word_embeddings``),
    wrapped so that an adapter's trainable tokens (``MultiLoRAEmbedding``) are its logits' rows too,
    as PEFT ties them: the logit of such a token is ``h . row`` for the sequence's adapter, the
    base head's elsewhere. One product of every token's hidden state with its adapter's rows
    (``lora_shrink``, ``[..., T_max]``) and one scatter into the logits; routed like every adapter
    layer (``use_adapters``). The embedding layer is referenced, not held (its parameters stay its own)."""

    def __init__(self, base_layer: nn.Linear, embedding: MultiLoRAEmbedding):
        super().__init__()
        if not isinstance(base_layer, nn.Linear) or base_layer.bias is not None:
            raise ValueError(f"base_layer must be an nn.Linear without a bias, got {base_layer!r}")
        if base_layer.weight is not embedding.base_layer.weight:
            raise ValueError("the head's weight is not the embedding's: it is not tied, and needs no TiedTokenHead")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._embedding = (embedding,)  # a tuple: not a submodule
        self.adapter_ids = None

    @property
    def embedding(self) -> MultiLoRAEmbedding:
        return self._embedding[0]

    def forward(self, h: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        logits = self.base_layer(h)
        given = self.adapter_ids if adapter_ids is None else adapter_ids
        embedding = self.embedding
        if given is None or not embedding.has_tokens():
            return logits
        batch = tuple(h.shape[:-1])
        ids, token_ids = _routed(given, batch, embedding.num_adapters, h.device)
        values = embedding.token_values
        dots = lora_shrink(h.to(values.dtype), values, ids, ranks=embedding.token_counts)  # [..., T_max]
        columns = embedding.token_slots(token_ids)
        columns = torch.where(columns >= 0, columns, self.out_features)  # nothing to put: a spare column
        spare = torch.cat([logits, logits.new_zeros(*batch, 1)], -1)
        return spare.scatter(-1, columns, dots.to(logits.dtype))[..., :self.out_features]
