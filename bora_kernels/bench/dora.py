"""The ``dora`` suite: ``MultiLoRALinear`` with DoRA adapters against PEFT's DoRA layer.

PEFT refuses a mixed batch of DoRA adapters (``adapter_names`` raises "Cannot pass
`adapter_names` when DoRA is enabled"), so its users run one adapter at a time over that
adapter's sequences; that loop is the baseline, beside PEFT with one DoRA adapter for the whole
batch (the lower bound) and our plain LoRA layer (what DoRA costs on top). Cases, batches and
modes are the ``lora`` suite's. ``fwd`` runs in eval mode without grad, where our layer keeps each
adapter's norms between calls (serving); ``fwd_bwd`` recomputes them at every call, as training
does (and as PEFT does at every call in both modes).
"""

from __future__ import annotations

import itertools

import torch

from .baselines import peft_lora_linear
from .lora import MODES, LoraCase, adapter_layer, case_inputs, timed_callables

VARIANTS = {
    "multi_lora": "bora_kernels MultiLoRALinear, plain LoRA adapters (base + LoRA)",
    "multi_dora": "bora_kernels MultiLoRALinear, DoRA adapters, one mixed batch (base + DoRA)",
    "peft_dora_loop": "PEFT lora.Linear with DoRA, one call per adapter over its sequences (base + DoRA)",
    "peft_dora_single": "PEFT lora.Linear with DoRA, one adapter for the whole batch (the lower bound)",
}
COMPARISONS = (
    ("multi_dora", "peft_dora_loop", "DoRA layer speed-up over PEFT one adapter at a time"),
    ("multi_dora", "peft_dora_single", "DoRA layer speed-up over PEFT single DoRA adapter"),
    ("multi_dora", "multi_lora", "DoRA's speed relative to plain LoRA (ours; below 1: slower)"),
)


def default_cases(device: torch.device, quick: bool = False) -> list[LoraCase]:
    """Tokens 16..4096 and adapters 1..32 at rank 16: K = N = 4096 in bf16 on a GPU, 1024 in
    fp32 on a CPU. ``quick`` keeps the headline case."""
    if device.type == "cuda":
        if quick:
            return [LoraCase(4096, 32, 16, 4096, 4096, "bf16"), LoraCase(16, 16, 16, 4096, 4096, "bf16")]
        return [LoraCase(t, d, 16, 4096, 4096, "bf16") for t, d in itertools.product((16, 256, 4096), (1, 8, 32))]
    if quick:
        return [LoraCase(256, 16, 16, 512, 512, "fp32")]
    return [LoraCase(t, d, 16, 1024, 1024, "fp32") for t, d in itertools.product((16, 256, 1024), (1, 4, 16))]


def _peft_loop(peft_layer, names: list[str], ids: torch.Tensor, out_features: int):
    """PEFT's layer over each adapter's sequences in turn. The active adapter is switched through
    ``_active_adapter``: PEFT's ``set_adapter`` also freezes the other adapters' weights, which
    would take them out of the backward."""
    groups = [(names[d], rows) for d in range(len(names)) if (rows := (ids == d).nonzero().squeeze(1)).numel()]

    def forward(inp):
        out = inp.new_empty(*inp.shape[:-1], out_features)
        for name, rows in groups:
            peft_layer._active_adapter = name
            out[rows] = peft_layer(inp[rows])
        return out
    return forward


def build(case: LoraCase, device: torch.device, variants=tuple(VARIANTS)) -> dict:
    """``{(variant, mode): callable}`` for ``case``; all variants hold the same weights and inputs."""
    base, gen, x, ids, dy = case_inputs(case, device)
    dora, lora = adapter_layer(case, base, gen, use_dora=True), adapter_layer(case, base, gen)
    xg = x.clone().requires_grad_()

    forwards = {
        "multi_lora": (lambda inp: lora(inp, ids), [lora.lora_A, lora.lora_B]),
        "multi_dora": (lambda inp: dora(inp, ids), [dora.lora_A, dora.lora_B, dora.lora_magnitude]),
    }
    if any(v.startswith("peft") for v in variants):
        loop, names = peft_lora_linear(dora)
        for name, p in loop.named_parameters():
            p.requires_grad_(name.startswith("lora_"))  # every adapter trains, as ours do
        forwards["peft_dora_loop"] = (_peft_loop(loop, names, ids, case.out_features),
                                      [p for p in loop.parameters() if p.requires_grad])
        single, names = peft_lora_linear(dora)
        single.set_adapter(names[0])
        forwards["peft_dora_single"] = (single, [p for p in single.parameters() if p.requires_grad])
    return timed_callables(forwards, [v for v in variants if v in forwards], x, xg, dy)


__all__ = ["COMPARISONS", "MODES", "VARIANTS", "build", "default_cases"]
