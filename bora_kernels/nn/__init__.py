"""Modules that wrap ``nn.Linear`` layers; each one calls an op and holds no kernel code."""

from .multi_lora import MultiLoRALinear
from .routing import AdapterRoute

__all__ = ["AdapterRoute", "MultiLoRALinear"]
