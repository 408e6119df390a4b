"""Ops: one folder each, ``reference.py`` (float64 truth) beside ``triton.py`` (kernels) and the
``__init__.py`` that checks inputs, dispatches (``_dispatch.py``) and holds the autograd Function."""

from ._dispatch import use_backend
from .lora_delta import LoRAPlan, lora_delta, lora_plan

__all__ = ["LoRAPlan", "lora_delta", "lora_plan", "use_backend"]
