"""Quantized base weights: NF4 in bitsandbytes' format (``nf4.py``)."""

from .nf4 import NF4_CODE, NF4Tensor, quantize_nf4

__all__ = ["NF4_CODE", "NF4Tensor", "quantize_nf4"]
