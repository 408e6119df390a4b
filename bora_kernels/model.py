"""Put adapter modules into a model and route batches through them.

The first cut: ``inject`` wraps ``nn.Linear`` layers whose names match (exact name or ``.name``
suffix, or a regex string), ``use_adapters`` routes integer ids. PEFT checkpoint interop, adapter
names, Conv1D and the other methods build on these (see the model-integration issue).
"""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Iterable

import torch
from torch import nn

from .nn import AdapterRoute, MultiLoRALinear


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: nn.Module, target_modules: str | Iterable[str], num_adapters: int, r=8, alpha=16,
           dropout: float = 0.0, method: str = "lora", quantize=None, dtype: torch.dtype | None = None):
    """Replace every matching ``nn.Linear`` of ``model`` by a ``MultiLoRALinear`` in place.

    ``target_modules``: a list of names (exact, or a suffix after a dot, as PEFT) or a regex string
    (full match). Freezes the whole base model; only the adapters train. Returns ``model``.
    """
    if method != "lora":
        raise ValueError(f"method {method!r} is not available yet; this version supports 'lora'")
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} is not available yet; this version supports None")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    named = [(name, m) for name, m in model.named_modules() if name]
    hits = [(name, m) for name, m in named if _matches(name, target_modules)]
    if not hits:
        names = [name for name, _ in named]
        wanted = [target_modules] if isinstance(target_modules, str) else target_modules
        near = sorted({c for t in wanted for c in difflib.get_close_matches(t, names, n=5, cutoff=0.4)})
        raise ValueError(f"target_modules {target_modules!r} matched no module of "
                         f"{type(model).__name__}; near names: {near or names[:10]}")
    model.requires_grad_(False)
    for name, module in hits:
        if isinstance(module, MultiLoRALinear):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module {name!r} matched target_modules but is a "
                             f"{type(module).__name__}, not an nn.Linear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiLoRALinear(module, num_adapters, r=r, alpha=alpha,
                                               dropout=dropout, dtype=dtype))
    return model


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapter_ids):
    """Inside the block every adapter layer of ``model`` uses ``adapter_ids``.

    Ids per sequence (``[B]``) or per token (``[B, L]``), ``-1`` for the base model; ``None`` runs
    the base model. The grouping of tokens is built once per batch shape and shared by all
    layers. Nested blocks restore the outer ids on exit, also after an exception. Not shared
    between threads.
    """
    route = None if adapter_ids is None else AdapterRoute(adapter_ids)
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers; call bora_kernels.inject first")
    saved = [m.adapter_ids for m in layers]
    for m in layers:
        m.adapter_ids = route
    try:
        yield model
    finally:
        for m, ids in zip(layers, saved):
            m.adapter_ids = ids
