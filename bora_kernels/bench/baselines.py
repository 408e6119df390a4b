"""What a user would otherwise run: PEFT's LoRA layer holding the same adapters as ours, and the
optional baseline libraries (ivon-opt, bitsandbytes) the suites import through ``require``."""

from __future__ import annotations

import torch
from torch import nn


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def adapter_names(num_adapters: int) -> list[str]:
    return [f"task{d}" for d in range(num_adapters)]


def peft_lora_linear(ours, base: nn.Linear | None = None, dropout: float = 0.0):
    """A PEFT ``lora.Linear`` around ``base`` (default: ``ours.base_layer``) with the adapters of
    ``ours`` (a ``MultiLoRALinear``): same ranks, alphas, DoRA, lora_bias and weights, named
    ``task0 ...``."""
    from peft import LoraConfig, get_peft_model

    base = ours.base_layer if base is None else base
    names = adapter_names(ours.num_adapters)
    ranks = ours.ranks.tolist()
    model = None
    for d, name in enumerate(names):
        config = LoraConfig(r=ranks[d], lora_alpha=ours.scaling_values[d] * ranks[d],
                            target_modules=["proj"], lora_dropout=dropout, use_dora=ours.use_dora[d],
                            **({"lora_bias": True} if ours.use_lora_bias[d] else {}))  # (PEFT >= 0.14)
        if model is None:
            model = get_peft_model(_Holder(base), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for d, name in enumerate(names):
            r = ranks[d]
            layer.lora_A[name].weight.data = ours.lora_A[d, :r].detach().clone()
            layer.lora_B[name].weight.data = ours.lora_B[d, :, :r].detach().clone()
            if ours.use_dora[d]:
                layer.lora_magnitude_vector[name].weight.data = ours.lora_magnitude[d].detach().clone()
            if ours.use_lora_bias[d]:
                layer.lora_B[name].bias.data = ours.lora_bias_vector[d].detach().clone()
    return layer.eval(), names


def require(module: str, pip_spec: str, suite: str, without: str):
    """Import an optional baseline library, or stop ``bora-bench`` saying how to get it or skip it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(f"bora-bench {suite}: this baseline needs {pip_spec} (pip install {pip_spec}), "
                         f"or leave it out with --variants {without}") from err
