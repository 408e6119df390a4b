"""The ``lora`` suite: ``lora_delta`` and ``MultiLoRALinear`` against PEFT and ``F.linear``.

One definition of every case serves ``bora-bench lora`` and the pytest-benchmark suite in
``benchmarks/``. A batch is ``[B, L, K]`` with one adapter per sequence, drawn so that every
adapter appears about equally often (a uniform mix), because PEFT's mixed batches
(``adapter_names``) are per sequence.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import MultiLoRALinear
from ..ops import lora_delta
from .baselines import peft_lora_linear

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = {
    "base": "F.linear alone (the frozen base layer)",
    "lora_delta": "bora_kernels.ops.lora_delta (the LoRA part only, grouping included)",
    "multi_lora": "bora_kernels MultiLoRALinear (base + LoRA)",
    "peft_mixed": "PEFT lora.Linear with adapter_names (base + LoRA)",
    "peft_mixed_lora": "PEFT mixed batch with its base replaced by zeros (the LoRA part only)",
    "peft_single": "PEFT lora.Linear, one adapter for the whole batch (the lower bound)",
}
MODES = ("fwd", "fwd_bwd")
# (ours, baseline, what the ratio baseline / ours says)
COMPARISONS = (
    ("lora_delta", "base", "LoRA cost as a fraction of the base layer (ours / base)"),
    ("multi_lora", "peft_mixed", "layer speed-up over PEFT mixed batch"),
    ("lora_delta", "peft_mixed_lora", "LoRA-part speed-up over PEFT mixed batch"),
    ("multi_lora", "peft_single", "layer speed-up over PEFT single adapter"),
)


@dataclasses.dataclass(frozen=True)
class LoraCase:
    tokens: int
    adapters: int
    rank: int
    in_features: int
    out_features: int
    dtype: str

    @property
    def sequences(self) -> int:
        return min(self.tokens, 64)

    def __str__(self) -> str:
        return (f"T{self.tokens}-D{self.adapters}-r{self.rank}-"
                f"K{self.in_features}-N{self.out_features}-{self.dtype}")


def default_cases(device: torch.device, quick: bool = False) -> list[LoraCase]:
    """The default grid: tokens 16..8192, adapters 1..64, ranks 16 and 64; K = N = 4096 in bf16 on
    a GPU, 1024 in fp32 on a CPU. ``quick`` keeps the headline cases only."""
    if device.type == "cuda":
        if quick:
            return [LoraCase(4096, 32, 16, 4096, 4096, "bf16"), LoraCase(16, 16, 16, 4096, 4096, "bf16")]
        grid = [LoraCase(t, d, 16, 4096, 4096, "bf16")
                for t, d in itertools.product((16, 256, 4096, 8192), (1, 8, 32, 64))]
        return grid + [LoraCase(4096, 32, 64, 4096, 4096, "bf16"), LoraCase(4096, 32, 8, 4096, 4096, "bf16")]
    if quick:
        return [LoraCase(256, 16, 16, 512, 512, "fp32")]
    return [LoraCase(t, d, r, 1024, 1024, "fp32")
            for t, d, r in itertools.product((16, 256, 1024), (1, 4, 16), (8, 16))]


def _batch_shape(case: LoraCase) -> tuple[int, int]:
    if case.tokens % case.sequences:
        raise ValueError(f"tokens={case.tokens} must be a multiple of {case.sequences} sequences")
    return case.sequences, case.tokens // case.sequences


def case_inputs(case: LoraCase, device: torch.device):
    """``(base, gen, x, ids, dy)``: the frozen base layer, the generator the adapters' weights come
    from, and the batch: x ``[B, L, K]``, one adapter id per sequence, the output gradient."""
    dtype = DTYPES[case.dtype]
    batches, length = _batch_shape(case)
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(case.in_features, case.out_features, bias=False).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    x = torch.randn(batches, length, case.in_features, generator=gen).to(device=device, dtype=dtype)
    # a uniform mix: adapter d for sequences d, d + D, ... in a shuffled order
    ids = (torch.arange(batches)[torch.randperm(batches, generator=gen)] % case.adapters).to(device)
    dy = torch.randn(batches, length, case.out_features, generator=gen).to(device=device, dtype=dtype)
    return base, gen, x, ids, dy


def adapter_layer(case: LoraCase, base: nn.Linear, gen: torch.Generator, use_dora: bool = False) -> MultiLoRALinear:
    """``case.adapters`` adapters of rank ``case.rank`` over ``base``, in eval mode."""
    layer = MultiLoRALinear(base, case.adapters, r=case.rank, alpha=2 * case.rank, use_dora=use_dora)
    with torch.no_grad():  # B is zero at init; fill it (and move the magnitudes) so no path can skip work
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
        if use_dora:
            jitter = torch.rand(layer.lora_magnitude.shape, generator=gen).to(layer.lora_magnitude.device)
            layer.lora_magnitude.mul_(1.0 + 0.1 * jitter)
    return layer.eval()


def build(case: LoraCase, device: torch.device, variants=tuple(VARIANTS)) -> dict:
    """``{(variant, mode): callable}`` for ``case``; all variants hold the same weights and inputs."""
    base, gen, x, ids, dy = case_inputs(case, device)
    layer = adapter_layer(case, base, gen)
    xg = x.clone().requires_grad_()

    forwards = {
        "base": (lambda inp: F.linear(inp, base.weight), []),
        "lora_delta": (lambda inp: lora_delta(inp, layer.lora_A, layer.lora_B, ids, layer.scaling, layer.ranks),
                       [layer.lora_A, layer.lora_B]),
        "multi_lora": (lambda inp: layer(inp, ids), [layer.lora_A, layer.lora_B]),
    }
    wanted_peft = [v for v in variants if v.startswith("peft")]
    if wanted_peft:
        peft_layer, names = peft_lora_linear(layer)
        lora_params = [p for p in peft_layer.parameters() if p.requires_grad]
        per_sequence = [names[i] for i in ids.tolist()]
        forwards["peft_mixed"] = (lambda inp: peft_layer(inp, adapter_names=per_sequence), lora_params)
        peft_layer_only, _ = peft_lora_linear(layer)
        peft_layer_only.base_layer = _Zeros(case.out_features)
        lora_only_params = [p for p in peft_layer_only.parameters() if p.requires_grad]
        forwards["peft_mixed_lora"] = (lambda inp: peft_layer_only(inp, adapter_names=per_sequence),
                                       lora_only_params)
        single, _ = peft_lora_linear(layer)
        single.set_adapter(names[0])
        forwards["peft_single"] = (single, [p for p in single.parameters() if p.requires_grad])

    return timed_callables(forwards, variants, x, xg, dy)


def timed_callables(forwards: dict, variants, x, xg, dy) -> dict:
    """``{(variant, mode): callable}`` from ``{variant: (forward, params)}``: ``fwd`` runs the
    forward without grad on ``x``; ``fwd_bwd`` forward and the gradients of ``xg`` and ``params``
    for ``dy``."""
    fns = {}
    for variant in variants:
        forward, params = forwards[variant]
        fns[variant, "fwd"] = _forward_only(forward, x)
        fns[variant, "fwd_bwd"] = _forward_backward(forward, xg, params, dy)
    return fns


class _Zeros(nn.Module):
    """Stands in for PEFT's base layer so that only PEFT's LoRA work is timed."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _forward_only(forward, x):
    def run():
        with torch.no_grad():
            return forward(x)
    return run


def _forward_backward(forward, x, params, dy):
    inputs = [x, *params]

    def run():
        return torch.autograd.grad(forward(x), inputs, dy)
    return run
