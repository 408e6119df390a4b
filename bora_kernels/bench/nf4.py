"""The ``nf4`` suite: ``nf4_matmul`` against what a QLoRA user runs otherwise.

- ``ours``: ``bora_kernels.ops.nf4_matmul`` as dispatched (the CUDA GEMV for M <= 16, the
  Triton kernels, or dequantize + cuBLAS from ``DENSE_MIN_M`` rows);
- ``triton``: the Triton kernels whatever M (split-K for M <= 16, tiled above; GPU only);
- ``csrc``: the CUDA C++ GEMV (M <= 16, GPU with the extension only);
- ``dequant``: the weight dequantized by our kernel, then ``F.linear``, every call; with
  ``triton`` it locates the crossover that ``DENSE_MIN_M`` encodes;
- ``bnb``: bitsandbytes' ``matmul_4bit`` on the same NF4 tensors (``to_bnb()``);
- ``dense``: ``F.linear`` on the weight already dequantized (cuBLAS; the large-M yardstick).

Every variant multiplies the same activations by the same NF4 weight (double quantization,
blocksize 64). At M = 1 the floor is the weight's bytes: 4 bits + statistics per weight against
bf16's 16 bits, so at best 16 / 4.13 = 3.9x faster than ``dense``.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F

from ..ops import nf4_matmul
from ..ops.nf4_matmul import _csrc_gemv, nf4_matmul_csrc
from ..quant import quantize_nf4
from .baselines import require
from .lora import DTYPES

VARIANTS = {
    "ours": "bora_kernels.ops.nf4_matmul as dispatched",
    "triton": "the Triton kernels (dequantized in the GEMM's tiles), any M",
    "csrc": "the CUDA C++ GEMV (M <= 16)",
    "dequant": "our dequantize, then F.linear, every call",
    "bnb": "bitsandbytes matmul_4bit on the same NF4 weight",
    "dense": "F.linear on the dequantized weight (cuBLAS on GPU)",
}
MODES = ("fwd",)
BLOCKSIZE = 64  # the weights' quantization blocks, bitsandbytes' default; K must be a multiple
COMPARISONS = (
    ("ours", "dense", "speed-up over the dense weight"),
    ("ours", "bnb", "speed-up over bitsandbytes matmul_4bit"),
    ("csrc", "triton", "CUDA GEMV over the Triton split-K kernel"),
    ("triton", "dequant", "fused Triton over dequantize + cuBLAS (< 1: past the crossover)"),
)


@dataclasses.dataclass(frozen=True)
class NF4Case:
    m: int
    in_features: int
    out_features: int
    dtype: str

    def __str__(self) -> str:
        return f"M{self.m}-K{self.in_features}-N{self.out_features}-{self.dtype}"


def default_cases(device: torch.device, quick: bool = False) -> list[NF4Case]:
    """The issue's grid on a GPU (bf16); a small fp32 grid on a CPU."""
    if device.type == "cuda":
        if quick:
            return [NF4Case(m, 4096, 4096, "bf16") for m in (1, 8, 16, 64, 256, 1024)]  # (64..1024: where DENSE_MIN_M may fall)
        shapes = ((4096, 4096), (4096, 11008), (11008, 4096))
        return [NF4Case(m, k, n, "bf16") for (k, n), m in itertools.product(shapes, (1, 4, 8, 16, 64, 256, 1024, 4096))]
    if quick:
        return [NF4Case(16, 512, 512, "fp32")]
    return [NF4Case(m, 1024, 1024, "fp32") for m in (1, 16, 256)]


def build(case: NF4Case, device: torch.device, variants=tuple(VARIANTS)) -> dict:
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(case.out_features, case.in_features, generator=gen) * 0.02).to(device=device, dtype=dtype)
    weight = quantize_nf4(w, BLOCKSIZE, double_quant=True)
    x = torch.randn(case.m, case.in_features, generator=gen).to(device=device, dtype=dtype)
    fns = {}
    if "ours" in variants:
        fns["ours", "fwd"] = lambda: nf4_matmul(x, weight)
    if device.type == "cuda" and "triton" in variants:  # on CPU the interpreter is never timed
        from ..ops.nf4_matmul.triton import nf4_matmul_forward

        fns["triton", "fwd"] = lambda: nf4_matmul_forward(x, weight, None, (case.m, case.out_features))
    if "csrc" in variants and _csrc_gemv(x, weight, None) is not None:  # fp16/bf16, M <= 16, extension built
        fns["csrc", "fwd"] = lambda: nf4_matmul_csrc(x, weight, None, (case.m, case.out_features))
    if "dequant" in variants:
        fns["dequant", "fwd"] = lambda: F.linear(x, weight.dequantize(dtype))
    if "bnb" in variants:
        bnb = require("bitsandbytes", "bitsandbytes==0.50.2", "nf4", "ours dense")
        packed, state = weight.to_bnb()
        fns["bnb", "fwd"] = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
    if "dense" in variants:
        dense = weight.dequantize(dtype)
        fns["dense", "fwd"] = lambda: F.linear(x, dense)
    return fns
