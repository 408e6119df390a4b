"""Which adapter each sequence or token uses, shared by every adapter layer of a model."""

from __future__ import annotations

import torch

from ..ops.lora_delta import LoRAPlan, lora_plan


class AdapterRoute:
    """Adapter ids for one batch. Every layer asks it for the grouping of its input, and the
    grouping is built once per (batch shape, adapters, device) rather than once per layer: one
    sort per batch instead of one per projection. Decode steps reuse the plan of the first step.
    Not shared between threads.
    """

    def __init__(self, adapter_ids: torch.Tensor):
        if not isinstance(adapter_ids, torch.Tensor):
            adapter_ids = torch.as_tensor(adapter_ids, dtype=torch.int64)
        self.adapter_ids = adapter_ids
        self._plans: dict = {}

    def plan(self, batch_shape, num_adapters: int, device: torch.device) -> LoRAPlan:
        key = (tuple(batch_shape), num_adapters, torch.device(device))
        if key not in self._plans:
            self._plans[key] = lora_plan(self.adapter_ids, batch_shape, num_adapters, device=device)
        return self._plans[key]
