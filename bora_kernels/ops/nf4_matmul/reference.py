"""The truth for ``nf4_matmul``: float64 torch on the dequantized weight."""

from __future__ import annotations

import torch


def nf4_matmul_reference(x, weight, bias=None):
    """``x @ dequant(W)^T + bias`` in float64, ``dequant`` being the fp32 weight bitsandbytes computes."""
    out = x.double() @ weight.dequantize(torch.float32).double().T
    return out if bias is None else out + bias.double()
