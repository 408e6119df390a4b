"""Which adapter each sequence or token uses, shared by every adapter layer of a model."""

from __future__ import annotations

import torch

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
