"""Put adapter modules into a model, route batches through them, merge them into the base.

``inject`` wraps the linear layers whose names match (multi-adapter LoRA, or one of the
Context-PEFT methods), ``use_adapters`` says which adapter each sequence or token uses,
``use_contexts`` which context each token has, ``merge_adapter``/``unmerge_adapter`` fold one
adapter into the base weights. PEFT checkpoints are read and written by ``peft_io.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

from .nn import (CONTEXT_LAYERS, AdapterRoute, ContextBitFit, ContextIA3, ContextLoRALinear, ContextRoute,
                 MultiLoRAEmbedding, MultiLoRALinear, NF4Linear, TiedTokenHead, is_bnb_4bit)
from .quant import quantize_nf4

METHODS = ("lora", "context_lora", "context_bitfit", "context_ia3")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
_WRAPPERS = (MultiLoRALinear, TiedTokenHead, *CONTEXT_LAYERS)


def matches(name: str, patterns) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name
    exactly or as a suffix after a dot."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _fan_in_fan_out(module: nn.Module) -> bool | None:
    """False for an ``nn.Linear`` (or an ``NF4Linear``), True for GPT-2's ``Conv1D`` (weight [in,
    out]), None otherwise."""
    if isinstance(module, (nn.Linear, NF4Linear)):
        return False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and getattr(module, "nf", None) == module.weight.shape[1]:
        return True
    return None


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a layer that can hold adapters (wrapped already or not), else None; for an
    embedding ``(num_embeddings, embedding_dim)``, the shape of its LoRA's A and B as a linear
    layer's (``MultiLoRAEmbedding``)."""
    if isinstance(module, (*_WRAPPERS, NF4Linear)) or is_bnb_4bit(module):  # (a 4-bit weight holds packed codes)
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    fan = _fan_in_fan_out(module)
    if fan is None:
        return None
    k, n = module.weight.shape if fan else module.weight.shape[::-1]
    return k, n


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules of the base model: adapter layers count as one module (their insides, the
    wrapped base layer and dropout, are skipped)."""
    inside = tuple(name + "." for name, m in model.named_modules() if isinstance(m, _WRAPPERS))
    return [(name, m) for name, m in model.named_modules() if name and not name.startswith(inside)]


def adapter_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """The model's adapter layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def context_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Context-PEFT layers (LoRA, BitFit, IA3) by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CONTEXT_LAYERS)}


def _layers_or_raise(model: nn.Module) -> dict[str, MultiLoRALinear]:
    layers = adapter_layers(model)
    if not layers and context_layers(model):
        raise ValueError(f"{type(model).__name__} has Context-PEFT layers, not LoRA adapter layers: route "
                         f"its tokens with bora_kernels.use_contexts")
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers; call bora_kernels.inject "
                         f"or bora_kernels.load_peft_adapters first")
    return layers


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the model's adapters, in slot order."""
    layers = _layers_or_raise(model)
    names = {m.adapter_names for m in layers.values()}
    if len(names) != 1:
        raise ValueError(f"the adapter layers of {type(model).__name__} disagree on adapter names: {names}")
    return names.pop()


def find_targets(model: nn.Module, target_modules, exclude_modules=None,
                 embeddings: bool = False) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, fan_in_fan_out)`` for every module matching as PEFT matches (``"all-linear"``:
    every ``nn.Linear`` and ``Conv1D`` but the model's output head, as PEFT's shorthand); a
    ``ValueError`` lists near names when nothing matches, and names a matched module that is not
    a linear layer (nor, with ``embeddings``, an ``nn.Embedding``)."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        exclude_modules = list(exclude_modules)
    named = base_modules(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        named = [(name, m) for name, m in named
                 if m is not head and linear_features(m) is not None and not isinstance(m, nn.Embedding)]
        hits = [(name, m) for name, m in named if not matches(name, exclude_modules)]
        if not hits:
            raise ValueError(f"target_modules 'all-linear' (exclude_modules {exclude_modules!r}) found no linear "
                             f"layer in {type(model).__name__} but its output head")
    else:
        hits = [(name, m) for name, m in named if matches(name, target_modules) and not matches(name, exclude_modules)]
    if not hits:
        names = [name for name, _ in named]
        wanted = [target_modules] if isinstance(target_modules, str) else target_modules
        leaves = sorted({n.rpartition(".")[2] for n in names})
        # closest first
        near = list(dict.fromkeys(c for t in wanted for c in difflib.get_close_matches(t.rpartition(".")[2], leaves, n=5, cutoff=0.4)))
        raise ValueError(f"target_modules {target_modules!r} (exclude_modules {exclude_modules!r}) matched no "
                         f"module of {type(model).__name__}; near names: {near or leaves[:12]}")
    targets = []
    for name, module in hits:
        if isinstance(module, _WRAPPERS):
            raise ValueError(f"module {name!r} already holds adapters; inject once (load_peft_adapters "
                             f"fills the adapters of an injected model)")
        fan = False if embeddings and isinstance(module, nn.Embedding) else _fan_in_fan_out(module)
        if fan is None:
            raise ValueError(f"module {name!r} matched target_modules but is a {type(module).__name__}; only "
                             f"nn.Linear and GPT-2's Conv1D layers" + (" and nn.Embedding" if embeddings else "")
                             + " can take " + ("LoRA adapters" if embeddings else "these adapters"))
        targets.append((name, module, fan))
    return targets


def lora_layer(module: nn.Module, num_adapters: int, fan_in_fan_out: bool = False, **kwargs) -> MultiLoRALinear:
    """The LoRA adapter layer for ``module``: ``MultiLoRAEmbedding`` for an ``nn.Embedding``, else
    ``MultiLoRALinear``; ``kwargs`` are theirs."""
    if isinstance(module, nn.Embedding):
        return MultiLoRAEmbedding(module, num_adapters, **kwargs)
    return MultiLoRALinear(module, num_adapters, fan_in_fan_out=fan_in_fan_out, **kwargs)


def module_name(model: nn.Module, module: nn.Module) -> str:
    """``module``'s name in ``model`` (the first, where it is held twice)."""
    return next(name for name, m in model.named_modules() if m is module)


def tie_token_head(model: nn.Module) -> None:
    """Wrap ``model``'s output head in a ``TiedTokenHead`` where its weight is the base weight of
    the model's input embedding and that embedding holds adapters (``MultiLoRAEmbedding``), so
    that the logits follow the adapters' trainable tokens as PEFT ties them; else nothing."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(embedding, MultiLoRAEmbedding) and isinstance(head, nn.Linear) and head.bias is None \
            and head.weight is embedding.base_layer.weight:
        _replace(model, module_name(model, head), TiedTokenHead(head, embedding))


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, target_modules: str | Iterable[str], num_adapters: int, r=8, alpha=16,
           dropout: float = 0.0, method: str = "lora", quantize=None, dtype: torch.dtype | None = None,
           exclude_modules: str | Iterable[str] | None = None, use_rslora=False,
           adapter_names: Sequence[str] | None = None, feedforward_modules: str | Iterable[str] | None = None,
           use_dora=False, lora_bias=False, trainable_token_indices=None):
    """Replace every matching linear layer of ``model`` by an adapter layer in place.

    ``method``:

    - ``"lora"``: ``MultiLoRALinear``, ``num_adapters`` LoRA adapters chosen per sequence or token
      by ``use_adapters``. ``r``, ``alpha``, ``use_rslora``, ``use_dora`` (DoRA: a trained
      magnitude per output feature on top, as PEFT's ``use_dora``), ``lora_bias`` (a trained bias
      of B, as PEFT's ``lora_bias``; the base layers need biases): one value or one per adapter;
      ``adapter_names`` (default ``"0"``, ``"1"``, ...) name them for ``use_adapters`` and PEFT
      checkpoints. An ``nn.Embedding`` that matches (``"embed_tokens"``) gets a
      ``MultiLoRAEmbedding``: PEFT's LoRA on embeddings (no DoRA or ``lora_bias`` there, no
      dropout, never quantized). ``trainable_token_indices`` (PEFT's): token ids whose input
      embedding rows each adapter trains as its own (initialised to the base rows), one list for
      all adapters or one per adapter; the input embedding then gets a ``MultiLoRAEmbedding`` for
      them (it may not be a LoRA target too, as in PEFT), and an output head tied to it a
      ``TiedTokenHead``, so that those tokens' logits use the same rows.
    - ``"context_lora"``, ``"context_bitfit"``, ``"context_ia3"``: Context-PEFT's
      ``ContextLoRALinear`` (``r``, ``alpha``, ``dropout``, ``use_rslora``), ``ContextBitFit`` or
      ``ContextIA3`` with ``num_adapters`` contexts, chosen per token by ``use_contexts``. IA3
      scales the output of its layers, or the input of those matching ``feedforward_modules``
      (PEFT's name: the FFN's down projection).

    ``target_modules``, ``exclude_modules`` and ``feedforward_modules``: a list of names (exact, or
    a suffix after a dot) or a regex string (full match), as PEFT; ``target_modules="all-linear"``
    is every linear layer but the output head (``get_output_embeddings()``), as in PEFT.
    ``nn.Linear`` and GPT-2's ``Conv1D`` are wrapped (``Conv1D`` with ``fan_in_fan_out``). ``quantize="nf4"`` first turns each
    targeted base layer into an ``NF4Linear`` (blocksize 64, double quantization): QLoRA, with many
    adapters over one 4-bit base. A bitsandbytes NF4 ``Linear4bit`` (a model loaded with
    ``load_in_4bit``) is adopted as an ``NF4Linear`` as it is, whatever ``quantize`` says: its bytes
    are kept, not quantized again. Freezes the whole base model; only the adapters train. Returns
    ``model``; on a ``ValueError`` the model is left as it was.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if feedforward_modules is not None and method != "context_ia3":
        raise ValueError(f"feedforward_modules applies to method='context_ia3' only, not {method!r}")
    for flag, value in (("use_dora", use_dora), ("lora_bias", lora_bias),
                        ("trainable_token_indices", False if trainable_token_indices is None else True)):
        if value is not False and method != "lora":
            raise ValueError(f"{flag} applies to method='lora' only, not {method!r}")
    if any(isinstance(m, _WRAPPERS) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has adapter layers; inject once")
    targets = find_targets(model, target_modules, exclude_modules, embeddings=method == "lora")
    token_layer, token_ids = _token_targets(model, targets, trainable_token_indices, num_adapters)
    if feedforward_modules is not None and not isinstance(feedforward_modules, str):
        feedforward_modules = list(feedforward_modules)
    if method != "lora" and (not isinstance(num_adapters, int) or num_adapters < 1):
        raise ValueError(f"num_adapters (the number of contexts) must be a positive int, got {num_adapters!r}")

    def make_layer(name, module, fan):
        if name == token_layer:  # trainable tokens alone (rank 0 everywhere)
            layer = MultiLoRAEmbedding(module, num_adapters, r=0, dtype=dtype, adapter_names=adapter_names)
            for d, ids in enumerate(token_ids):
                if ids:
                    layer.set_adapter(d, None, None, tokens=(ids, None))
            return layer
        if quantize == "nf4" and not isinstance(module, (NF4Linear, nn.Embedding)):  # QLoRA: the frozen base in
            # NF4 (a Conv1D's [in, out] weight transposed; embeddings stay as they are, as in QLoRA); a
            # bitsandbytes NF4 layer comes adopted already
            weight = module.weight.detach()
            if weight.is_meta:
                raise ValueError(f"quantize='nf4' quantizes the base weights' values, but {name!r} is on the meta "
                                 f"device: load the base weights first, then inject")
            module = NF4Linear(quantize_nf4(weight.T.contiguous() if fan else weight), module.bias)
            fan = False
        if method == "lora":  # (embeddings are targets of this method only: find_targets)
            return lora_layer(module, num_adapters, fan, r=r, alpha=alpha, dropout=dropout, dtype=dtype,
                              use_rslora=use_rslora, adapter_names=adapter_names, use_dora=use_dora,
                              lora_bias=lora_bias)
        if method == "context_lora":
            return ContextLoRALinear(module, num_adapters, r=r, alpha=alpha, dropout=dropout, dtype=dtype,
                                     use_rslora=use_rslora, fan_in_fan_out=fan)
        if method == "context_bitfit":
            return ContextBitFit(module, num_adapters, dtype=dtype, fan_in_fan_out=fan)
        on = "input" if matches(name, feedforward_modules) else "output"
        return ContextIA3(module, num_adapters, on=on, dtype=dtype, fan_in_fan_out=fan)

    _inject_targets(model, targets if token_layer is None else [*targets, (token_layer, model.get_submodule(
        token_layer), False)], make_layer)
    if method == "lora":
        tie_token_head(model)
    return model


def _token_targets(model: nn.Module, targets: list, indices, num_adapters) -> tuple[str | None, list]:
    """``(name of the input embedding, token ids per adapter)`` for ``inject``'s
    ``trainable_token_indices`` (one list of ids for all adapters, or one per adapter), or
    ``(None, [])`` without them; a ``ValueError`` for ids that are not lists of ints, and for an
    input embedding that is also a LoRA target."""
    if indices is None:
        return None, []
    if not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
    nested = [isinstance(i, (list, tuple)) for i in indices] if isinstance(indices, (list, tuple)) else [None]
    if not indices or len(set(nested)) != 1 or nested[0] is None:
        raise ValueError(f"trainable_token_indices must be a non-empty list of token ids, or one list per adapter, "
                         f"got {indices!r}")
    per_adapter = [list(i) for i in indices] if nested[0] else [list(indices)] * num_adapters
    if len(per_adapter) != num_adapters or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   for ids in per_adapter for i in ids):
        raise ValueError(f"trainable_token_indices must be one list of int token ids, or {num_adapters} lists (one per "
                         f"adapter), got {indices!r}")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"trainable_token_indices needs the model's input embedding (get_input_embeddings()) to be an "
                         f"nn.Embedding, got {type(embedding).__name__}")
    name = module_name(model, embedding)
    if any(target == name for target, _, _ in targets):
        raise ValueError(f"{name!r} is a LoRA target and would hold trainable tokens too; an embedding takes one or "
                         f"the other (as in PEFT)")
    return name, per_adapter


def _adopted(name: str, module: nn.Module) -> nn.Module:
    """``module``, or for a bitsandbytes NF4 ``Linear4bit`` an ``NF4Linear`` holding its bytes
    (our kernels then run it); a ``ValueError`` naming the module for other 4-bit types."""
    if not is_bnb_4bit(module):
        return module
    quant_type = getattr(module.weight, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"module {name!r} is a bitsandbytes 4-bit layer quantized as {quant_type!r}; only NF4 "
                         f"bases take adapters (load with bnb_4bit_quant_type='nf4')")
    return NF4Linear.from_bnb(module)


def _inject_targets(model, targets, make_layer):
    """Freeze ``model`` and replace each ``(name, module, fan_in_fan_out)`` target by
    ``make_layer(name, module, fan_in_fan_out)``, a bitsandbytes NF4 module adopted first
    (``_adopted``). Every new layer is made before any is put in, so that an error in one (a
    shape a quantizer refuses, a 4-bit type we cannot read) leaves the model untouched."""
    layers = [(name, make_layer(name, _adopted(name, module), fan)) for name, module, fan in targets]
    model.requires_grad_(False)
    for name, layer in layers:
        _replace(model, name, layer)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (after ``inject``: the adapters' A and B), for an optimizer."""
    return [p for p in model.parameters() if p.requires_grad]


def summary(model: nn.Module) -> str:
    """One line: adapter layers, adapters and their ranks, trainable and total parameters."""
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    counts = f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
    contexts = context_layers(model)
    if contexts:
        kinds = sorted({type(m).__name__ for m in contexts.values()})
        num = {m.num_contexts for m in contexts.values()}
        return f"{len(contexts)} {'/'.join(kinds)} layers x {'/'.join(map(str, sorted(num)))} contexts; {counts}"
    layers = _layers_or_raise(model)
    names = adapter_names(model)
    ranks = torch.tensor([m.rank_values for m in layers.values()])  # [layers, D]
    per_adapter = []
    for d, name in enumerate(names):
        present = ranks[:, d][ranks[:, d] > 0]
        text = "absent" if not present.numel() else (
            f"r={int(present[0])}" if present.unique().numel() == 1 else f"r={int(present.min())}-{int(present.max())}")
        if any(m.adapter_magnitude(d) is not None for m in layers.values()):
            text += "+DoRA"
        if any(m.adapter_bias(d) is not None for m in layers.values()):
            text += "+bias"
        tokens = sum(len(m.token_indices[d]) for m in layers.values() if isinstance(m, MultiLoRAEmbedding))
        if tokens:
            text = ("" if text == "absent" else text + "+") + f"{tokens} tokens"
        per_adapter.append(f"{name}:{text}")
    used = sum(int(ranks[i].sum()) * (m.in_features + m.out_features) for i, m in enumerate(layers.values()))
    shown = ", ".join(per_adapter[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    return f"{len(layers)} LoRA layers x {len(names)} adapters [{shown}]; {counts}, {used:,} within the ranks"


def _adapter_index(names: Sequence[str], name) -> int:
    if isinstance(name, bool) or not isinstance(name, (int, str)):
        raise ValueError(f"an adapter is named by a str or an int index, got {name!r}")
    if isinstance(name, int):
        if not 0 <= name < len(names):
            raise ValueError(f"adapter index {name} is out of range for {len(names)} adapters")
        return name
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        raise ValueError(f"no adapter named {name!r}; adapters: {list(names)[:20]}"
                         + (f" (did you mean {near}?)" if near else ""))
    return names.index(name)


def resolve_adapter_ids(names: Sequence[str], adapter_ids):
    """Ids as a tensor (or None): ints, names and None (base model) in nested lists, one id for
    everything, or an integer tensor."""
    if adapter_ids is None or isinstance(adapter_ids, torch.Tensor):
        return adapter_ids
    if isinstance(adapter_ids, (str, int)) and not isinstance(adapter_ids, bool):
        return torch.tensor(-1 if adapter_ids == -1 else _adapter_index(names, adapter_ids))

    def convert(item):
        if isinstance(item, (list, tuple)):
            return [convert(i) for i in item]
        if item is None or (isinstance(item, int) and item == -1):
            return -1
        return _adapter_index(names, item)

    if not isinstance(adapter_ids, (list, tuple)):
        raise ValueError(f"adapter_ids must be a tensor, a list of ids/names/None, one id or name, or None; "
                         f"got {type(adapter_ids).__name__}")
    try:
        return torch.tensor(convert(adapter_ids), dtype=torch.int64)
    except ValueError as err:
        if "adapter" in str(err):
            raise
        raise ValueError(f"adapter_ids must be a rectangular list ([B] or [B, L]): {err}") from None


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapter_ids):
    """Inside the block every adapter layer of ``model`` uses ``adapter_ids``.

    ``adapter_ids``: one id or name for the whole batch; per sequence (``[B]``) or per token
    (``[B, L]``) as an integer tensor or (nested) lists of ints, names and None; ``-1`` or None
    for the base model; None alone runs the base model; or an ``nn.AdapterRoute``, whose
    groupings (one per batch shape) then carry over to later blocks that pass the same route (a
    server's decode steps). Works for ``model(...)``, ``loss.backward()`` (inside the block or
    after it; under Hugging Face's gradient checkpointing the recomputation sees the ids of its
    own forward, ``_RouteKeepingCheckpoint``; with ``torch.utils.checkpoint`` calls of your own
    around routed layers, run it inside) and ``model.generate(...)``, where per-sequence ids hold
    through prefill and every decode step. The grouping of tokens is built once per
    batch shape and shared by all layers. Nested blocks restore the outer ids on exit, also after
    an exception.

    Not thread-safe: the ids are stored on the model's layers, so two threads must not route the
    same model at once (serve one batch at a time per model).
    """
    layers = list(_layers_or_raise(model).values()) + [m for m in model.modules() if isinstance(m, TiedTokenHead)]
    if isinstance(adapter_ids, AdapterRoute):  # kept by the caller: its groupings carry over between blocks
        route = adapter_ids
    else:
        names = adapter_names(model)
        ids = resolve_adapter_ids(names, adapter_ids)
        route = None if ids is None else AdapterRoute(ids, len(names))
    _keep_routes_through_checkpointing(model)
    with _routed(layers, route):
        yield model


def _routed(layers, route):
    """Every layer's route (``_ROUTES``) set to ``route`` inside the block; the old ones restored on
    exit, also after an exception."""
    return _restored([(m, _ROUTES[type(m)], route) for m in layers])


@contextlib.contextmanager
def _restored(settings):
    """Each ``(layer, attribute, value)`` set inside the block, the old values back on exit."""
    saved = [(m, attribute, getattr(m, attribute)) for m, attribute, _ in settings]
    for m, attribute, value in settings:
        setattr(m, attribute, value)
    try:
        yield
    finally:
        for m, attribute, old in saved:
            setattr(m, attribute, old)


_ROUTES = {MultiLoRALinear: "adapter_ids", MultiLoRAEmbedding: "adapter_ids", TiedTokenHead: "adapter_ids",
           **{cls: "context" for cls in CONTEXT_LAYERS}}  # where a layer keeps its route


class _RouteKeepingCheckpoint:
    """A module's gradient-checkpointing function, as Hugging Face models call it
    (``module._gradient_checkpointing_func(forward, *args)``), wrapped so that the forward's
    recomputation during backward sees the routes its first run saw. ``loss.backward()`` may
    then run after the ``use_adapters``/``use_contexts`` block that routed the forward has ended
    (as HF's Trainer does, and as it may without checkpointing), and one backward through several
    forwards with different routes recomputes each with its own."""

    def __init__(self, checkpoint, layers):
        self.checkpoint, self.layers = checkpoint, layers

    def __call__(self, forward, *args, **kwargs):
        routes = [(m, _ROUTES[type(m)], getattr(m, _ROUTES[type(m)])) for m in self.layers]

        def rerun(*a, **k):
            with _restored(routes):
                return forward(*a, **k)

        return self.checkpoint(rerun, *args, **kwargs)


def _keep_routes_through_checkpointing(model: nn.Module):
    """Wrap the gradient-checkpointing function of every module of ``model`` that has one and
    holds adapter or context layers (``_RouteKeepingCheckpoint``); once per function set (HF's
    ``gradient_checkpointing_enable`` sets a new one). Only in training with grad on, where HF's
    layers checkpoint: inference and serving skip the walk."""
    if not (model.training and torch.is_grad_enabled()):
        return
    for module in model.modules():
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is None or isinstance(checkpoint, _RouteKeepingCheckpoint):
            continue
        layers = [m for m in module.modules() if type(m) in _ROUTES]
        if layers:
            module._gradient_checkpointing_func = _RouteKeepingCheckpoint(checkpoint, layers)


def merge_adapter(model: nn.Module, name) -> nn.Module:
    """Fold adapter ``name`` into the base weights of every layer it touches, for serving that
    one adapter at base-model cost. Each merged layer keeps a copy of its base weight, so
    ``unmerge_adapter`` restores it bit for bit. Routing adapters while merged is an error. An
    NF4 base is merged as PEFT merges into 4-bit layers: dequantized, the delta added, quantized
    again (outputs move by that rounding; a warning says so); bitsandbytes' 8-bit codes are
    refused, and so is a layer whose base weight is tied to another module's (an embedding and
    the output head under ``tie_word_embeddings``): the merge would change both."""
    layers = _layers_or_raise(model)
    d = _adapter_index(adapter_names(model), name)
    merged = [m for m in layers.values() if m.merged is not None]
    if merged:
        raise RuntimeError(f"adapter {merged[0].adapter_names[merged[0].merged[0]]!r} is already merged; "
                           f"call unmerge_adapter first")
    holders: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(key)
    for layer_name, m in layers.items():
        weight = getattr(m.base_layer, "weight", None)
        tied = [k.replace(".base_layer.", ".") for k in holders.get(id(weight), [])
                if k != f"{layer_name}.base_layer.weight"]
        if m.touches(d) and tied:
            raise ValueError(f"cannot merge adapter {m.adapter_names[d]!r}: the base weight of {layer_name!r} is "
                             f"tied to {tied} (tie_word_embeddings), so the merge would change that too; serve it "
                             f"unmerged (use_adapters)")
    requantized = False
    for m in layers.values():
        if m.touches(d):
            m.merge(d)
            requantized |= isinstance(m.base_layer, NF4Linear)
    if requantized:
        warnings.warn("merging an adapter into an NF4 base weight quantizes the sum again: outputs differ from the "
                      "unmerged adapter's by 4-bit rounding (unmerge_adapter restores the base exactly)", stacklevel=2)
    return model


def merge_and_unload(model: nn.Module, name) -> nn.Module:
    """``merge_adapter(model, name)``, then every adapter layer replaced by its base layer, which
    now holds the merged weight: the plain model with that adapter built in, as PEFT's
    ``merge_and_unload`` gives, to save (``save_pretrained``, or ``save_pretrained_4bit`` for an
    NF4 base) or serve alone. The other adapters are dropped; there is no unmerging."""
    merge_adapter(model, name)
    for layer_name, layer in adapter_layers(model).items():
        _replace(model, layer_name, layer.base_layer)
    for layer_name, head in [(n, m) for n, m in model.named_modules() if isinstance(m, TiedTokenHead)]:
        _replace(model, layer_name, head.base_layer)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Put back the base weights saved by ``merge_adapter``."""
    for m in _layers_or_raise(model).values():
        m.unmerge()
    return model


@contextlib.contextmanager
def use_contexts(model: nn.Module, context, decode_context=None):
    """Inside the block every Context-PEFT layer of ``model`` uses ``context``.

    ``context``: integer context ids (one for every token, e.g. ``0`` for the context-agnostic
    baseline; per sequence ``[B]``; per token ``[B, L]``, e.g. from ``context_ids``; -1 for none)
    as a tensor or nested lists, or float/bool weights per token ``[B, L, C]`` (soft or
    overlapping contexts, masks with contexts dropped) or ``[C]`` for every token; None runs the
    base model. Per-token ids are grouped once per batch and shared by every layer, and never
    become a one-hot tensor.

    ``decode_context`` serves ``generate``: decode steps feed inputs shorter than per-token
    contexts and use ``"last"`` (each sequence keeps its last token's context) or this id.
    Works for forward, ``loss.backward()`` (inside the block or after it, as in ``use_adapters``)
    and ``generate``. Nested blocks restore the outer context, also after an exception. Not
    thread-safe, like ``use_adapters``.
    """
    layers = list(context_layers(model).values())
    if not layers and adapter_layers(model):
        raise ValueError(f"{type(model).__name__} has LoRA adapter layers, not Context-PEFT layers: route "
                         f"its sequences or tokens with bora_kernels.use_adapters")
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Context-PEFT layers; call bora_kernels.inject with "
                         f"method='context_lora', 'context_bitfit' or 'context_ia3' first")
    counts = {m.num_contexts for m in layers}
    if len(counts) != 1:
        raise ValueError(f"the context layers of {type(model).__name__} disagree on the number of contexts: {counts}")
    if context is not None and not isinstance(context, torch.Tensor):
        try:
            context = torch.tensor(context)
        except (TypeError, ValueError) as err:
            raise ValueError(f"context must be ids or weights as a tensor or (nested) lists, got "
                             f"{type(context).__name__}: {err}") from None
    route = None if context is None else ContextRoute(context, counts.pop(), decode_context)
    _keep_routes_through_checkpointing(model)
    with _routed(layers, route):
        yield model


def context_ids(layout: Sequence[tuple[int, int]], batch_size: int | None = None, agnostic: bool = False,
                device=None) -> torch.Tensor:
    """Per-token context ids from a token-type layout, for ``use_contexts``.

    ``layout`` lists ``(context, count)`` runs in sequence order: ``[(0, 1), (1, 64), (0, 63)]`` is
    a [BOS] text token, 64 image embeddings and 63 caption tokens. Returns ``[L]`` ids, or
    ``[batch_size, L]``; ``agnostic=True`` gives every token context 0 (the context-agnostic
    baseline with the same shapes).
    """
    runs = list(layout)
    for run in runs:
        if not (isinstance(run, (tuple, list)) and len(run) == 2 and all(isinstance(v, int) for v in run)
                and run[0] >= -1 and run[1] >= 0):
            raise ValueError(f"layout must list (context, count) pairs of ints (context >= -1, count >= 0), "
                             f"got {run!r}")
    ids = torch.cat([torch.full((count,), -1 if ctx == -1 else (0 if agnostic else ctx), dtype=torch.int64)
                     for ctx, count in runs]) if runs else torch.zeros(0, dtype=torch.int64)
    if batch_size is not None:
        ids = ids.expand(batch_size, -1).clone()
    return ids.to(device) if device is not None else ids
