"""``NF4Linear``: a frozen linear layer whose weight is stored in NF4 (bitsandbytes' format) and
multiplied by ``ops.nf4_matmul`` without materialising the dense weight."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import nf4_matmul
from ..ops._dispatch import autocast_dtype
from ..quant import NF4Tensor, quantize_nf4

_PARTS = ("packed", "absmax", "offset", "nested_absmax", "nested_code")


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer (``Linear4bit``, as ``from_pretrained`` with ``load_in_4bit``
    makes): an ``nn.Linear`` whose weight holds packed 4-bit codes, not a dense ``[out, in]``
    matrix. Told apart without importing bitsandbytes."""
    return isinstance(module, nn.Linear) and type(getattr(module, "weight", None)).__name__ == "Params4bit"


class NF4Linear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with W in NF4. The quantized parts are buffers (they move with
    ``.to(device)`` and live in ``state_dict``); the bias, if any, is a frozen parameter. Inputs are
    cast to ``compute_dtype`` (the dtype the weight was quantized from, then the dtype the layer is
    cast to by ``.to(dtype)``, ``.half()``...) and outputs come back in it; inside ``torch.autocast``,
    in autocast's dtype instead, as ``nn.Linear``."""

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
            raise ValueError(f"weight must be a 2-D NF4Tensor, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        if self.in_features % weight.blocksize:
            raise ValueError(f"in_features={self.in_features} must be a multiple of the blocksize {weight.blocksize}")
        self.blocksize, self.compute_dtype, self.shape = weight.blocksize, weight.dtype, weight.shape
        for part in _PARTS:
            self.register_buffer(part, getattr(weight, part))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant), linear.bias)

    @classmethod
    def from_bnb(cls, linear4bit) -> "NF4Linear":
        """Adopt a bitsandbytes ``Linear4bit`` (``quant_type="nf4"``) without re-quantizing."""
        state = getattr(linear4bit.weight, "quant_state", None)
        if state is None:
            raise ValueError("linear4bit's weight is not quantized yet (move it to its device first)")
        return cls(NF4Tensor.from_bnb(linear4bit.weight.data, state), linear4bit.bias)

    def _apply(self, fn, *args, **kwargs):
        # model.to(torch.bfloat16) must move the quantized statistics, never round them; the layer
        # then computes in the new dtype, as the rest of the model does
        saved = {part: getattr(self, part) for part in _PARTS}
        super()._apply(fn, *args, **kwargs)
        for part, old in saved.items():
            new = getattr(self, part)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[part] = old.to(new.device)
        self.compute_dtype = fn(self.packed.new_empty(0, dtype=self.compute_dtype)).dtype
        return self

    def nf4_weight(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax, self.shape, self.compute_dtype, self.blocksize, self.offset,
                         self.nested_absmax, self.nested_code)

    def set_nf4_weight(self, weight: NF4Tensor) -> None:
        """Hold ``weight`` (quantized as this layer's: shape, blocksize, double quantization) in
        place of the current codes, on the layer's device; the compute dtype and bias stay."""
        double_quant = self.offset is not None
        if tuple(weight.shape) != tuple(self.shape) or weight.blocksize != self.blocksize \
                or weight.double_quant != double_quant:
            raise ValueError(f"weight is {tuple(weight.shape)} in blocks of {weight.blocksize} (double_quant="
                             f"{weight.double_quant}); this layer holds {tuple(self.shape)} in blocks of "
                             f"{self.blocksize} (double_quant={double_quant})")
        for part in _PARTS:
            value = getattr(weight, part)
            self._buffers[part] = None if value is None else value.to(self.packed.device)

    @property
    def weight(self) -> NF4Tensor:
        """The quantized weight (not a ``torch.Tensor``; its ``dtype`` is the compute dtype), for
        model code that reads a layer's ``weight.dtype``, ``shape`` or ``device``."""
        return self.nf4_weight()

    def base_bytes(self) -> int:
        """Bytes the quantized weight and its statistics take."""
        return self.nf4_weight().nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_matmul(x.to(autocast_dtype(x) or self.compute_dtype), self.nf4_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.offset is not None}, compute_dtype={self.compute_dtype}")


def nf4_storage(model: nn.Module) -> tuple[int, int]:
    """``(bytes, weights)`` over every ``NF4Linear`` of ``model``: the bytes its 4-bit weights
    and their statistics take, and how many weights they hold (bytes per weight = the ratio)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.base_bytes() for m in layers), sum(m.in_features * m.out_features for m in layers)
