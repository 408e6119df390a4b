"""Which adapter each sequence or token uses, shared by every adapter layer of a model."""

from __future__ import annotations

import torch

from ..ops.context_lora_delta import _is_ids, context_plan
from ..ops.lora_delta import LoRAPlan, check_adapter_ids, lora_plan


def fit_to_batch(values: torch.Tensor, batch_shape: tuple, tail: tuple = (), decode=None, hint: str = "",
                 name: str = "ids") -> torch.Tensor:
    """``values`` (leading dims: none, ``[B]`` or ``[B, L]``, then ``tail``) laid out for an input
    whose leading dims are ``batch_shape``.

    One value serves every token (ids: every sequence, cheaper to group); per-sequence values
    also fit a batch that repeats each sequence ``m`` times in a row (``generate`` with beams or
    ``num_return_sequences``); ``[B, L]`` values fit layers that see the batch flattened to
    ``[B * L]`` tokens (OPT's MLP). A ``[B, L']`` input with ``L' != L`` (a decode step), or its
    flattened ``[B * L']``, takes ``decode(values)`` (``[B, 1, *tail]``) for each new token;
    without ``decode`` it is a ``ValueError`` ending in ``hint``.
    """
    lead = tuple(values.shape[:values.dim() - len(tail)])
    per_sequence = len(batch_shape) == 2 and not tail  # ids [B] of a [B, L] batch stay per sequence
    if not lead:
        return values.expand((batch_shape[:1] if per_sequence else batch_shape) + tail)
    if lead == batch_shape or (per_sequence and lead == batch_shape[:1]):
        return values
    rows = batch_shape[0]  # sequences of a [B, L] input; tokens of a flattened [B * L] one
    if len(lead) == 2 and len(batch_shape) == 1 and lead[0] * lead[1] == rows:
        return values.reshape(rows, *tail)
    flat = len(batch_shape) == 1
    if len(lead) == 2 and (flat or batch_shape[1] != lead[1]):  # a decode step (flattened in OPT's MLP)
        if decode is None:
            raise ValueError(f"per-token {name} of shape {tuple(values.shape)} do not fit an input of batch "
                             f"{batch_shape}; {hint}")
        values, lead = decode(values), (lead[0], 1)
        if flat:  # one value per sequence, repeated below for its tokens (and beams) in a row
            values, lead = values[:, 0], lead[:1]
    if lead[0] != rows and lead[0] and rows % lead[0] == 0:
        values = values.repeat_interleave(rows // lead[0], dim=0)
    if len(batch_shape) == 2 and (len(lead) == 2 or tail):
        values = (values if len(lead) == 2 else values[:, None]).expand(batch_shape + tail)
    return values


def cached_plan(plans: dict, key, build):
    """``plans[key]``, built by ``build()`` once; traced plans (torch.compile) stay out of the
    cache, both ways."""
    compiling = torch.compiler.is_compiling()
    plan = None if compiling else plans.get(key)
    if plan is None:
        plan = build()
        if not compiling:
            plans[key] = plan
    return plan


class AdapterRoute:
    """Adapter ids for one batch: one id for everything (0-dim), one per sequence (``[B]``) or one
    per token (``[B, L]``), ``-1`` for the base model. Every layer asks it for the grouping of its
    input, and the grouping is built once per (batch shape, adapters, device) rather than once
    per layer: one sort per batch instead of one per projection. Decode steps reuse the plan of
    the first step. Ids fit batches as ``fit_to_batch`` says. Not shared between threads.
    """

    def __init__(self, adapter_ids: torch.Tensor, num_adapters: int):
        if not isinstance(adapter_ids, torch.Tensor):
            adapter_ids = torch.as_tensor(adapter_ids, dtype=torch.int64)
        check_adapter_ids(adapter_ids, num_adapters)
        if adapter_ids.dim() > 2:
            raise ValueError(f"adapter_ids must be one id, [B] or [B, L], got shape {tuple(adapter_ids.shape)}")
        self.adapter_ids = adapter_ids
        self._plans: dict = {}

    def ids_for(self, batch_shape) -> torch.Tensor:
        """The ids laid out for an input whose leading dims are ``batch_shape``."""
        return fit_to_batch(self.adapter_ids, tuple(batch_shape), name="adapter_ids",
                            hint="decode steps (generate) need per-sequence ids [B]")

    def plan(self, batch_shape, num_adapters: int, device: torch.device) -> LoRAPlan:
        key = (tuple(batch_shape), num_adapters, torch.device(device))
        return cached_plan(self._plans, key, lambda: lora_plan(self.ids_for(key[0]), key[0], num_adapters,
                                                               device=device))

    def ids(self, batch_shape, device: torch.device) -> torch.Tensor:
        """``ids_for(batch_shape)`` on ``device``, copied there once per batch shape."""
        key = ("ids", tuple(batch_shape), torch.device(device))
        return cached_plan(self._plans, key, lambda: self.ids_for(key[1]).to(device))


class ContextRoute:
    """Context ids or weights for one batch, shared by every context layer of a model.

    ``context``: integer ids (one for everything, per sequence ``[B]`` or per token ``[B, L]``, -1
    for none) or float/bool weights (``[C]`` for everything, or per token ``[B, L, C]``). It fits
    batches as ``fit_to_batch`` says and builds the grouping once per batch shape.

    Decode steps of ``generate`` feed inputs shorter than the per-token contexts; they use
    ``decode_context``: ``"last"`` (each sequence continues its last token's context) or one id
    for every new token. Without it such an input is an error, never a silent guess.
    """

    def __init__(self, context, num_contexts: int, decode_context=None):
        if not isinstance(context, torch.Tensor):
            context = torch.as_tensor(context)
        self.is_ids = _is_ids(context)
        if self.is_ids:
            check_adapter_ids(context, num_contexts, "context")
        elif context.dtype.is_complex or (context.dim() and context.shape[-1] != num_contexts):
            raise ValueError(f"context weights must be float or bool [..., {num_contexts}] (one per context), "
                             f"got shape {tuple(context.shape)} of {context.dtype}")
        lead = context.dim() - (0 if self.is_ids else 1)
        if lead > 2 or lead < 0:
            raise ValueError(f"context must be one id, [B] or [B, L] ids, or [C] or [B, L, C] weights, "
                             f"got shape {tuple(context.shape)}")
        if decode_context is not None and decode_context != "last" and not (
                isinstance(decode_context, int) and -1 <= decode_context < num_contexts):
            raise ValueError(f"decode_context must be None, 'last' or a context id in [-1, {num_contexts}), "
                             f"got {decode_context!r}")
        self.context, self.num_contexts, self.decode_context = context, num_contexts, decode_context
        self._plans: dict = {}

    def _decode(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, 1, ...]``: the context of every new token of a decode step."""
        if self.decode_context == "last":
            return context[:, -1:]
        if self.is_ids:
            return torch.full((context.shape[0], 1), self.decode_context, dtype=context.dtype, device=context.device)
        row = torch.zeros((context.shape[0], 1, self.num_contexts), dtype=context.dtype, device=context.device)
        if self.decode_context >= 0:  # the id's one-hot row (all zero for -1)
            row[..., self.decode_context] = 1
        return row

    def context_for(self, batch_shape) -> torch.Tensor:
        """The ids or weights laid out for an input whose leading dims are ``batch_shape``."""
        return fit_to_batch(self.context, tuple(batch_shape), () if self.is_ids else (self.num_contexts,),
                            decode=None if self.decode_context is None else self._decode, name="context",
                            hint="for generate, pass decode_context='last' or a context id")

    def plan(self, batch_shape, device: torch.device):
        key = (tuple(batch_shape), torch.device(device))
        return cached_plan(self._plans, key, lambda: context_plan(self.context_for(key[0]).to(device), key[0],
                                                                  self.num_contexts, device=device))

    def vector_context(self, batch_shape, device: torch.device) -> torch.Tensor:
        """The context laid out for ``context_bias`` / ``context_scale`` (no grouping needed)."""
        return self.context_for(batch_shape).to(device)
