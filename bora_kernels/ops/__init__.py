"""Ops: one folder each, ``reference.py`` (float64 truth) beside ``triton.py`` (kernels) and the
``__init__.py`` that checks inputs, dispatches (``_dispatch.py``) and holds the autograd Function."""

from ._dispatch import use_backend
from .context_lora_delta import ContextPlan, context_lora_delta, context_plan
from .context_vector import context_bias, context_scale
from .lora_delta import LoRAPlan, lora_delta, lora_expand, lora_plan, lora_shrink
from .nf4_matmul import nf4_matmul

__all__ = ["ContextPlan", "LoRAPlan", "context_bias", "context_lora_delta", "context_plan", "context_scale", "lora_delta", "lora_expand", "lora_plan", "lora_shrink", "nf4_matmul", "use_backend"]
