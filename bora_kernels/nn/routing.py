"""Which adapter each sequence or token uses, shared by every adapter layer of a model."""

from __future__ import annotations

import torch

from ..ops.context_lora_delta import _is_ids, context_plan
from ..ops.lora_delta import LoRAPlan, check_adapter_ids, lora_plan


class AdapterRoute:
    """Adapter ids for one batch: one id for everything (0-dim), one per sequence (``[B]``) or one
    per token (``[B, L]``), ``-1`` for the base model. Every layer asks it for the grouping of its
    input, and the grouping is built once per (batch shape, adapters, device) rather than once
    per layer: one sort per batch instead of one per projection. Decode steps reuse the plan of
    the first step.

    Per-sequence ids also fit a batch that repeats each sequence ``m`` times in a row (what
    ``generate`` does for ``num_return_sequences`` or beams), and ids of a ``[B, L]`` batch fit
    layers that see it flattened to ``[B * L]`` tokens (OPT's MLP). Not shared between threads.
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
        ids, batch_shape = self.adapter_ids, tuple(batch_shape)
        if ids.dim() == 0:
            return ids.expand(batch_shape[:1] if len(batch_shape) == 2 else batch_shape)
        rows = batch_shape[0]  # sequences of a [B, L] input; tokens of a flattened [B * L] one
        if ids.dim() == 1 and rows != ids.shape[0] and ids.shape[0] and rows % ids.shape[0] == 0:
            return ids.repeat_interleave(rows // ids.shape[0])
        if ids.dim() == 2 and len(batch_shape) == 1 and ids.numel() == rows:
            return ids.reshape(-1)
        if ids.dim() == 2 and len(batch_shape) == 2 and tuple(ids.shape) != batch_shape:
            raise ValueError(
                f"per-token adapter_ids of shape {tuple(ids.shape)} do not fit an input of batch "
                f"{batch_shape}; decode steps (generate) need per-sequence ids [B]")
        return ids

    def plan(self, batch_shape, num_adapters: int, device: torch.device) -> LoRAPlan:
        key = (tuple(batch_shape), num_adapters, torch.device(device))
        compiling = torch.compiler.is_compiling()  # traced plans stay out of the cache, both ways
        plan = None if compiling else self._plans.get(key)
        if plan is None:
            plan = lora_plan(self.ids_for(batch_shape), key[0], num_adapters, device=device)
            if not compiling:
                self._plans[key] = plan
        return plan


class ContextRoute:
    """Context ids or weights for one batch, shared by every context layer of a model.

    ``context``: integer ids (one for everything, per sequence ``[B]`` or per token ``[B, L]``, -1
    for none) or float/bool weights (``[C]`` for everything, or per token ``[B, L, C]``). Like
    ``AdapterRoute`` it fits batches that repeat each sequence (beams) and layers that see a
    ``[B, L]`` batch flattened, and builds the grouping once per batch shape.

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

    def context_for(self, batch_shape) -> torch.Tensor:
        """The ids or weights laid out for an input whose leading dims are ``batch_shape``."""
        ctx, batch_shape = self.context, tuple(batch_shape)
        tail = () if self.is_ids else (self.num_contexts,)
        lead = tuple(ctx.shape[:ctx.dim() - len(tail)])
        if not lead:
            return ctx.expand(batch_shape + tail)
        if lead == batch_shape or (self.is_ids and len(batch_shape) == 2 and lead == batch_shape[:1]):
            return ctx
        rows = batch_shape[0]
        if len(lead) == 2 and len(batch_shape) == 1 and lead[0] * lead[1] == rows:  # a flattened [B, L]
            return ctx.reshape(rows, *tail)
        if len(lead) == 2 and len(batch_shape) == 2 and batch_shape[1] != lead[1]:  # a decode step
            if self.decode_context is None:
                raise ValueError(f"per-token context of shape {tuple(ctx.shape)} does not fit an input of batch "
                                 f"{batch_shape}; for generate, pass decode_context='last' or a context id")
            if self.decode_context == "last":
                ctx = ctx[:, -1:]
            elif self.is_ids:
                ctx = torch.full(lead[:1] + (1,), self.decode_context, dtype=ctx.dtype, device=ctx.device)
            else:  # the id's one-hot row (all zero for -1)
                ctx = torch.zeros(lead[:1] + (1,) + tail, dtype=ctx.dtype, device=ctx.device)
                if self.decode_context >= 0:
                    ctx[..., self.decode_context] = 1
            lead = (lead[0], 1)
        if lead[0] != rows and rows % lead[0] == 0:  # beams / num_return_sequences repeat sequences
            ctx = ctx.repeat_interleave(rows // lead[0], dim=0)
        if len(lead) == 2 and len(batch_shape) == 2:
            ctx = ctx.expand(batch_shape + tail) if ctx.shape[1] == 1 else ctx
        elif len(lead) == 1 and len(batch_shape) == 2 and not self.is_ids:
            ctx = ctx[:, None].expand(batch_shape + tail)
        return ctx

    def plan(self, batch_shape, device: torch.device):
        key = (tuple(batch_shape), torch.device(device))
        compiling = torch.compiler.is_compiling()
        plan = None if compiling else self._plans.get(key)
        if plan is None:
            context = self.context_for(batch_shape).to(device)
            plan = context_plan(context, key[0], self.num_contexts, device=device)
            if not compiling:
                self._plans[key] = plan
        return plan

    def vector_context(self, batch_shape, device: torch.device) -> torch.Tensor:
        """The context laid out for ``context_bias`` / ``context_scale`` (no grouping needed)."""
        return self.context_for(batch_shape).to(device)
