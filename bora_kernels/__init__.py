"""bora_kernels: GPU kernels and modules for many LoRA adapters at once (BoRA, Context-PEFT,
IVON-LoRA, QLoRA) on top of Hugging Face models."""

from . import nn, ops
from .model import inject, use_adapters

__version__ = "0.1.0"
__all__ = ["inject", "nn", "ops", "use_adapters"]
