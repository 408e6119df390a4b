"""The ``context`` suite: ``context_lora_delta`` against the two forms users write without it.

- ``einsum``: Algorithm 1 of the Context-PEFT paper (``einsum('...ld,cdr,crD,...lc->...lD')`` with
  a one-hot selector per token);
- ``masked_concat``: the authors' re-implementation (every context's A and B concatenated, the
  rank-``C*R`` intermediate multiplied by a per-token mask).

Every token has one context, laid out in runs as in a real batch: each sequence of 128 tokens is
cut into C runs (image patches then caption for C = 2; roles for more). Ours runs three ways:
with the integer ids (never a one-hot tensor; grouped on every call, except forward without
gradients, which takes the one-launch masked mode when C * R <= 128), with those ids grouped once
beforehand (``ours_plan``: what every layer of a model pays, as ``use_contexts`` shares one plan)
and with the float one-hot weights the baselines take. On CUDA each case also records the peak
memory a call allocates beyond its inputs.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F

from ..ops import context_lora_delta
from ..ops.context_lora_delta import context_plan
from ..ops.context_lora_delta.reference import einsum_form, masked_concat_form, one_hot_weights
from .lora import DTYPES, timed_callables

VARIANTS = {
    "base": "F.linear alone (the frozen base layer, for scale)",
    "ours_ids": "bora_kernels.ops.context_lora_delta with integer context ids",
    "ours_weights": "bora_kernels.ops.context_lora_delta with the float one-hot weights",
    "ours_plan": "context_lora_delta with a ready ContextPlan (the ids grouped once, as a model's layers share it)",
    "einsum": "Algorithm 1's einsum with a one-hot selector",
    "masked_concat": "concatenated A and B, the rank-C*R intermediate masked per token",
}
MODES = ("fwd", "fwd_bwd")
COMPARISONS = (
    ("ours_ids", "einsum", "speed-up over Algorithm 1's einsum"),
    ("ours_ids", "masked_concat", "speed-up over the masked concatenation"),
    ("ours_weights", "einsum", "speed-up over the einsum, float weights"),
    ("ours_plan", "einsum", "speed-up over the einsum, grouping shared by layers"),
)
SEQUENCE = 128


@dataclasses.dataclass(frozen=True)
class ContextCase:
    tokens: int
    contexts: int
    rank: int
    in_features: int
    out_features: int
    dtype: str

    def __str__(self) -> str:
        return f"T{self.tokens}-C{self.contexts}-r{self.rank}-K{self.in_features}-N{self.out_features}-{self.dtype}"


def default_cases(device: torch.device, quick: bool = False) -> list[ContextCase]:
    """C in {2, 4, 8}, tokens up to 8192, rank 16; K = N = 4096 bf16 on a GPU, 1024 fp32 on a CPU."""
    if device.type == "cuda":
        if quick:
            return [ContextCase(8192, 2, 16, 4096, 4096, "bf16"), ContextCase(8192, 8, 16, 4096, 4096, "bf16")]
        return [ContextCase(t, c, 16, 4096, 4096, "bf16") for t, c in itertools.product((1024, 4096, 8192), (2, 4, 8))]
    if quick:
        return [ContextCase(1024, 2, 16, 512, 512, "fp32"), ContextCase(1024, 8, 16, 512, 512, "fp32")]
    return [ContextCase(t, c, 16, 1024, 1024, "fp32") for t, c in itertools.product((1024, 4096, 8192), (2, 4, 8))]


def context_layout(tokens: int, contexts: int) -> torch.Tensor:
    """``[tokens // 128, 128]`` ids: each sequence cut into ``contexts`` equal runs."""
    if tokens % SEQUENCE:
        raise ValueError(f"tokens={tokens} must be a multiple of {SEQUENCE}")
    run = torch.arange(SEQUENCE) * contexts // SEQUENCE
    return run.expand(tokens // SEQUENCE, SEQUENCE).clone()


def build(case: ContextCase, device: torch.device, variants=tuple(VARIANTS)) -> dict:
    """``{(variant, mode): callable}``; every variant holds the same weights and inputs."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    ids = context_layout(case.tokens, case.contexts)
    batch_shape = tuple(ids.shape)
    x = torch.randn(*batch_shape, case.in_features, generator=gen).to(device=device, dtype=dtype)
    lora_a = (torch.randn(case.contexts, case.rank, case.in_features, generator=gen) / case.in_features ** 0.5)
    lora_b = torch.randn(case.contexts, case.out_features, case.rank, generator=gen) * 0.01
    lora_a = lora_a.to(device=device, dtype=dtype).requires_grad_()
    lora_b = lora_b.to(device=device, dtype=dtype).requires_grad_()
    base = torch.randn(case.out_features, case.in_features, generator=gen).to(device=device, dtype=dtype)
    scaling = torch.full((case.contexts,), 2.0, device=device)
    weights = one_hot_weights(ids, batch_shape, case.contexts).to(device=device, dtype=dtype)
    ids = ids.to(device)
    dy = torch.randn(*batch_shape, case.out_features, generator=gen).to(device=device, dtype=dtype)
    plan = context_plan(ids, batch_shape, case.contexts, device=device)
    xg = x.clone().requires_grad_()
    params = [lora_a, lora_b]
    forwards = {
        "base": (lambda inp: F.linear(inp, base), []),
        "ours_ids": (lambda inp: context_lora_delta(inp, lora_a, lora_b, ids, scaling), params),
        "ours_weights": (lambda inp: context_lora_delta(inp, lora_a, lora_b, weights, scaling), params),
        "ours_plan": (lambda inp: context_lora_delta(inp, lora_a, lora_b, plan, scaling), params),
        "einsum": (lambda inp: einsum_form(inp, lora_a, lora_b, weights, scaling), params),
        "masked_concat": (lambda inp: masked_concat_form(inp, lora_a, lora_b, weights, scaling), params),
    }
    return timed_callables(forwards, variants, x, xg, dy)
