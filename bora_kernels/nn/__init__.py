"""Modules that wrap ``nn.Linear`` (and, for LoRA, ``nn.Embedding``) layers; each one calls an op and
holds no kernel code."""

from .context import CONTEXT_LAYERS, ContextBitFit, ContextIA3, ContextLoRALinear
from .lora_embedding import MultiLoRAEmbedding, TiedTokenHead
from .multi_lora import AdapterVectors, MultiLoRALinear
from .nf4_linear import NF4Linear, is_bnb_4bit, nf4_storage
from .routing import AdapterRoute, ContextRoute

__all__ = ["AdapterRoute", "AdapterVectors", "CONTEXT_LAYERS", "ContextBitFit", "ContextIA3", "ContextLoRALinear", "ContextRoute", "NF4Linear",
           "MultiLoRAEmbedding", "TiedTokenHead", "MultiLoRALinear", "is_bnb_4bit", "nf4_storage"]
