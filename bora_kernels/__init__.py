"""bora_kernels: GPU kernels and modules for many LoRA adapters at once (BoRA, Context-PEFT,
IVON-LoRA, QLoRA) on top of Hugging Face models."""

from . import abmll, bayes, bora, nn, ops, optim, quant
from .bnb_io import bnb_4bit_state_dict, from_pretrained_4bit, from_pretrained_nf4, load_bnb_4bit, save_pretrained_4bit
from .model import (adapter_names, context_ids, inject, merge_adapter, merge_and_unload, summary,
                    trainable_parameters, unmerge_adapter, use_adapters, use_contexts)
from .peft_io import load_peft_adapters, save_peft_adapter

__version__ = "0.1.0"
__all__ = ["abmll", "adapter_names", "bayes", "bnb_4bit_state_dict", "bora", "context_ids", "from_pretrained_4bit",
           "from_pretrained_nf4", "inject", "load_bnb_4bit", "load_peft_adapters", "merge_adapter",
           "merge_and_unload", "nn", "ops", "optim",
           "quant", "save_peft_adapter", "save_pretrained_4bit", "summary", "trainable_parameters", "unmerge_adapter",
           "use_adapters", "use_contexts"]
