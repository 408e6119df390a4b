"""Context-PEFT modules: LoRA, BitFit and IA3 with one adapter group per token context.

Each wraps a frozen linear layer and calls one op; which context each token has comes from
``bora_kernels.use_contexts`` (a ``ContextRoute`` set on every layer) or the ``context`` argument
of ``forward``. Without either the layer is its base layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import context_bias, context_lora_delta, context_scale
from ..ops._dispatch import autocast_dtype
from ..ops.context_lora_delta import ContextPlan
from .multi_lora import (
    DerivedBuffers,
    ReadsThroughToBase,
    linear_shape,
    lora_scaling,
    parameter_kwargs,
    plus_delta,
)
from .routing import ContextRoute


class _ContextLayer(ReadsThroughToBase, nn.Module):
    """What the three layers share: the frozen base, the feature sizes and the current context."""

    def __init__(self, base_layer: nn.Module, num_contexts: int, fan_in_fan_out: bool):
        super().__init__()
        if not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be a positive int, got {num_contexts!r}")
        k, n, weight = linear_shape(base_layer, fan_in_fan_out)
        self.base_layer = base_layer.requires_grad_(False)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features, self.num_contexts = k, n, num_contexts
        self.context: ContextRoute | torch.Tensor | ContextPlan | None = None

    def _parameter_kwargs(self, dtype: torch.dtype | None) -> dict:
        """Where this layer's parameters live: ``parameter_kwargs`` of the base weight (of the
        stand-in that ``linear_shape`` gives for an NF4 base, which has no dense weight)."""
        return parameter_kwargs(linear_shape(self.base_layer, self.fan_in_fan_out)[2], dtype)

    def _context(self, x: torch.Tensor, context, grouped: bool):
        """This call's context laid out for ``x`` (a plan when ``grouped``), or None: base only."""
        context = self.context if context is None else context
        if isinstance(context, ContextRoute):
            batch_shape = x.shape[:-1]
            return context.plan(batch_shape, x.device) if grouped else context.vector_context(batch_shape, x.device)
        return context

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, contexts={self.num_contexts}"
                + (", fan_in_fan_out" if self.fan_in_fan_out else ""))


class ContextLoRALinear(DerivedBuffers, _ContextLayer):
    """``base_layer(x) + (alpha / r) * sum_c w_c B_c A_c x``, contexts chosen per token.

    ``lora_A`` is ``[C, r, K]`` and ``lora_B`` ``[C, N, r]``, initialised as PEFT's LoRA (A
    Kaiming-uniform, B zero), so a fresh layer equals its base layer. ``forward(x, context=None)``
    takes ids, weights or a ``ContextPlan`` (see ``bora_kernels.ops.context_lora_delta``).
    """

    def __init__(self, base_layer: nn.Module, num_contexts: int, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, dtype: torch.dtype | None = None, use_rslora: bool = False,
                 fan_in_fan_out: bool = False):
        super().__init__(base_layer, num_contexts, fan_in_fan_out)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        kw = self._parameter_kwargs(dtype)
        self.lora_A = nn.Parameter(torch.empty(num_contexts, r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_contexts, self.out_features, r, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, float(alpha)
        self.scaling_value = lora_scaling(alpha, r, use_rslora)
        # every context scales alike: an fp32 buffer out of state dicts (``DerivedBuffers``)
        self.register_buffer("_scaling", torch.empty(num_contexts, device=kw["device"]), persistent=False)
        self._write_buffers()
        self.reset_lora_parameters()

    def _buffer_values(self) -> dict:
        return {"_scaling": ([self.scaling_value] * self.num_contexts, torch.float32)}

    @torch.no_grad()
    def reset_lora_parameters(self):
        for c in range(self.num_contexts):
            nn.init.kaiming_uniform_(self.lora_A[c], a=math.sqrt(5))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        result = self.base_layer(x)
        context = self._context(x, context, grouped=True)
        if context is None:
            return result
        x = self.lora_dropout(x).to(autocast_dtype(x) or self.lora_A.dtype)  # the op's dtype: no cast in it
        return plus_delta(self.base_layer, result, lambda into: context_lora_delta(
            x, self.lora_A, self.lora_B, context, self._scaling, add_to=into))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, alpha={self.alpha:g}"


class ContextBitFit(_ContextLayer):
    """``base_layer(x) + sum_c w_c b_c``: a trainable bias per context (zeros at first); the base
    layer's own bias stays frozen."""

    def __init__(self, base_layer: nn.Module, num_contexts: int, dtype: torch.dtype | None = None,
                 fan_in_fan_out: bool = False):
        super().__init__(base_layer, num_contexts, fan_in_fan_out)
        self.context_bias = nn.Parameter(torch.zeros(num_contexts, self.out_features,
                                                     **self._parameter_kwargs(dtype)))

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        result = self.base_layer(x)
        context = self._context(x, context, grouped=False)
        return result if context is None else context_bias(result, self.context_bias, context)


class ContextIA3(_ContextLayer):
    """IA3 per context: ``base_layer(x) * l(t)`` (``on="output"``: keys, values) or
    ``base_layer(x * l(t))`` (``on="input"``: the FFN's down projection), ``l(t) = sum_c w_c l_c``
    with every ``l_c`` ones at first. A token without a context (all-zero weights, id -1) gets
    ``l = 0``, as the formula says."""

    def __init__(self, base_layer: nn.Module, num_contexts: int, on: str = "output",
                 dtype: torch.dtype | None = None, fan_in_fan_out: bool = False):
        super().__init__(base_layer, num_contexts, fan_in_fan_out)
        if on not in ("output", "input"):
            raise ValueError(f"on must be 'output' or 'input', got {on!r}")
        self.on = on
        size = self.out_features if on == "output" else self.in_features
        self.context_scale = nn.Parameter(torch.ones(num_contexts, size, **self._parameter_kwargs(dtype)))

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        context = self._context(x, context, grouped=False)
        if context is None:
            return self.base_layer(x)
        if self.on == "input":
            return self.base_layer(context_scale(x, self.context_scale, context))
        return context_scale(self.base_layer(x), self.context_scale, context)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", on={self.on}"


CONTEXT_LAYERS = (ContextLoRALinear, ContextBitFit, ContextIA3)
