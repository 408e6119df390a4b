"""PEFT LoRA checkpoints, both ways: ``save_pretrained`` folders (``adapter_config.json`` and
``adapter_model.safetensors``, or an older ``adapter_model.bin``) are stacked into a model's
adapter slots, and one slot is written back as a folder that ``PeftModel.from_pretrained`` loads."""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
from torch import nn

from .model import (_adapter_index, _fan_in_fan_out, _inject_targets, _layers_or_raise, adapter_layers,
                    adapter_names, base_modules, linear_features, lora_layer, matches, tie_token_head)
from .nn import MultiLoRAEmbedding
from .nn.dora import check_dora_base
from .nn.multi_lora import check_lora_bias_base
from .tensor_files import hub_snapshot, read_tensor_file

CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/repo, as the Hugging Face Hub names repositories
# a module's lora_A / lora_B weight, its lora_B bias (``lora_bias``), its DoRA magnitude (part
# M; with or without the adapter name and ``.weight`` that older PEFT versions wrote), or an
# embedding's lora_embedding_A / lora_embedding_B or its trainable tokens' rows
_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<part>[AB])(?:\.[^.]+)?\.weight|lora_B(?:\.[^.]+)?\.(?P<bias>bias)"
                  r"|lora_(?P<magnitude>magnitude)_vector(?:\.[^.]+)?(?:\.weight)?"
                  r"|lora_embedding_(?P<embedding>[AB])(?:\.[^.]+)?"
                  r"|token_adapter\.(?P<tokens>trainable_tokens_delta)(?:\.[^.]+)?)$")
# a whole weight of a base module: PEFT saves the base embedding beside an embedding adapter (and
# embeddings or the output head after the vocabulary was resized)
_FULL_WEIGHT = re.compile(r"^(?P<module>.+?)\.(?:base_layer\.)?weight$")
# config fields whose non-default values change the computation in ways this runtime does not do
# (a replicated layer stack, adapters active only after invocation tokens, pooled inputs, sampled
# or routed adapters, a changed base weight...); VeLoRA changes only the backward pass, so loads
_UNSUPPORTED = {"modules_to_save": None,
                "target_parameters": None, "layer_replication": None,
                "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
                "kasa_config": None, "use_bdlora": None, "arrow_config": None}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_folder(name: str, folder, revision: str | None = None) -> Path:
    """``folder`` if it is a local path; else, for a Hugging Face Hub id (``"owner/repo"``), the
    folder of its adapter files fetched from the Hub (``adapter_config.json`` and the safetensors
    weights, or the pickle ones where it has none) at ``revision`` (a branch, tag or commit;
    default the main branch), as ``PeftModel.from_pretrained`` takes."""
    path = Path(folder)
    if path.exists() or not HUB_ID.match(str(folder)):
        return path
    try:
        return hub_snapshot(str(folder), [CONFIG_FILE], [WEIGHTS_FILE, PICKLE_FILE], revision)
    except Exception as err:  # no network, no such repository, no access: huggingface_hub's own errors
        raise ValueError(f"adapter {name!r}: {str(folder)!r} is not a folder here, and fetching it as a Hugging Face "
                         f"Hub repository failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                         ) from None


def _read(name: str, folder, revision: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = adapter_folder(name, folder, revision)
    if not folder.is_dir():
        raise ValueError(f"adapter {name!r}: {str(folder)!r} is not a folder (expected a PEFT save_pretrained folder "
                         f"or a Hugging Face Hub id)")
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"adapter {name!r}: {folder} has no {CONFIG_FILE}")
    weights = next((folder / f for f in (WEIGHTS_FILE, PICKLE_FILE) if (folder / f).is_file()), None)
    if weights is None:
        raise ValueError(f"adapter {name!r}: {folder} has no {WEIGHTS_FILE} (or {PICKLE_FILE})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"adapter {name!r}: {folder / CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"adapter {name!r}: {folder / CONFIG_FILE} holds no JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type is {config.get('peft_type')!r}; only LORA adapters load")
    for field, default in _UNSUPPORTED.items():
        if config.get(field, default) not in (default, [], {}, None, False):
            raise ValueError(f"adapter {name!r}: {field}={config[field]!r} is not supported (only plain LoRA "
                             f"on linear layers: {field} must be {default!r})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {name!r}: bias={config['bias']!r} is not supported (trained biases); "
                         f"only bias='none' loads")
    return config, read_tensor_file(weights, what=f"adapter {name!r}: ")


class ModuleAdapter(NamedTuple):
    """One adapter's weights at one module, PEFT's layout: A ``[r, K]``, B ``[N, r]``, for DoRA
    the magnitude ``[N]``, and under ``lora_bias`` B's bias ``[N]`` (else None); ``embedding``: the
    module is an embedding (K its vocabulary, N its width), whose trainable tokens are ``tokens``,
    ``(ids, rows [len(ids), N])``, instead of A and B (None, rank 0)."""
    a: torch.Tensor | None
    b: torch.Tensor | None
    rank: int
    alpha: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    embedding: bool = False
    tokens: tuple[list[int], torch.Tensor] | None = None


def _same_base_weight(name: str, key: str, tensor: torch.Tensor, model: nn.Module) -> bool:
    """True when ``key`` (no prefix) is a whole weight of one of ``model``'s modules
    (``_FULL_WEIGHT``) equal to the model's own, which loading can pass over; a ``ValueError``
    naming the key when it differs (the adapter was trained over another base or vocabulary);
    False when it names no module's weight."""
    match = _FULL_WEIGHT.match(key)
    try:
        weight = getattr(model.get_submodule(match["module"]), "weight", None) if match else None
    except AttributeError:
        weight = None
    if not isinstance(weight, torch.Tensor):
        return False
    what = f"adapter {name!r}: {key!r} is a whole weight of module {match['module']!r} (PEFT saves the base embedding " \
           f"beside an embedding adapter, and embeddings after their vocabulary was resized)"
    if not weight.dtype.is_floating_point or weight.is_meta:
        raise ValueError(f"{what}, and the model's {weight.dtype} weight there"
                         f"{' (on the meta device)' if weight.is_meta else ''} cannot be compared with it")
    if tuple(tensor.shape) != tuple(weight.shape) or not torch.equal(
            tensor.to(device=weight.device, dtype=weight.dtype), weight.detach()):
        raise ValueError(f"{what}, and it differs from the model's ({tuple(tensor.shape)} against "
                         f"{tuple(weight.shape)}{', other values' if tensor.shape == weight.shape else ''}): the adapter was "
                         f"trained over another base (a resized vocabulary?); load that base model first")
    return True


def _embedding_modules(model: nn.Module) -> set[str]:
    """Names of the model's embedding layers (with adapters or not)."""
    return {name for name, m in base_modules(model) if isinstance(m, (nn.Embedding, MultiLoRAEmbedding))}


def _module_weights(name: str, config: dict, tensors: dict, model: nn.Module, modules: dict) -> dict:
    """``{module: ModuleAdapter}`` for one adapter, every shape checked."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    dora, biased = bool(config.get("use_dora", False)), bool(config.get("lora_bias", False))
    if dora and biased:
        raise ValueError(f"adapter {name!r}: use_dora and lora_bias are both set, which PEFT does not allow")
    embeddings = _embedding_modules(model)
    for key, tensor in tensors.items():
        short = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _KEY.match(short)
        if match is None and _same_base_weight(name, short, tensor, model):
            continue
        if match is None or (match["magnitude"] and not dora) or (match["bias"] and not biased):
            raise ValueError(f"adapter {name!r}: key {key!r} is not a LoRA A/B weight of a linear or embedding layer "
                             f"(only lora_A/lora_B and lora_embedding_A/lora_embedding_B weights load"
                             + (", lora_magnitude_vector with use_dora and lora_B.bias with lora_bias" if match else "")
                             + ")")
        module = match["module"]
        if module not in modules:
            near = difflib.get_close_matches(module, list(modules), n=3, cutoff=0.5)
            raise ValueError(f"adapter {name!r}: key {key!r} names module {module!r}, which is not a linear "
                             f"or embedding layer of {type(model).__name__}" + (f"; near: {near}" if near else ""))
        if bool(match["embedding"] or match["tokens"]) != (module in embeddings):
            raise ValueError(f"adapter {name!r}: key {key!r} is " + ("an embedding's weight, but module "
                             f"{module!r} is a linear layer" if match["embedding"] or match["tokens"] else
                             f"a linear layer's LoRA weight, but module {module!r} is an embedding"))
        if match["embedding"] and (dora or biased):
            raise ValueError(f"adapter {name!r}: {'use_dora' if dora else 'lora_bias'} is set, and embedding "
                             f"{module!r} has LoRA weights: embeddings take plain LoRA only here")
        part = match["part"] or match["embedding"] or match["tokens"] or ("bias" if match["bias"] else "M")
        pairs.setdefault(module, {})[part] = (key, tensor)
    out = {}
    for module, parts in pairs.items():
        if "trainable_tokens_delta" in parts:
            out[module] = _token_adapter(name, config, module, parts, modules[module][1], model)
            continue
        if not {"A", "B"} <= set(parts):
            raise ValueError(f"adapter {name!r}: module {module!r} has lora_{''.join(sorted(set(parts) & {'A', 'B'}))} "
                             f"but not both A and B")
        if dora and "M" not in parts:
            raise ValueError(f"adapter {name!r}: use_dora is set, but module {module!r} has no lora_magnitude_vector")
        if biased and "bias" not in parts:
            raise ValueError(f"adapter {name!r}: lora_bias is set, but module {module!r} has no lora_B bias")
        (key_a, a), (key_b, b) = parts["A"], parts["B"]
        rank = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        k, n = modules[module]
        if tuple(a.shape) != (rank, k):
            raise ValueError(f"adapter {name!r}: {key_a} has shape {tuple(a.shape)}, but module {module!r} "
                             f"takes {k} inputs and the config gives rank {rank}: expected {(rank, k)}")
        if tuple(b.shape) != (n, rank):
            raise ValueError(f"adapter {name!r}: {key_b} has shape {tuple(b.shape)}, but module {module!r} "
                             f"has {n} outputs and the config gives rank {rank}: expected {(n, rank)}")
        for part in ("M", "bias"):  # DoRA's magnitude, B's bias: one value per output
            if part in parts and tuple(parts[part][1].shape) != (n,):
                raise ValueError(f"adapter {name!r}: {parts[part][0]} has shape {tuple(parts[part][1].shape)}, but "
                                 f"module {module!r} has {n} outputs: expected {(n,)}")
        out[module] = ModuleAdapter(a, b, rank, alpha, parts.get("M", (None, None))[1],
                                    parts.get("bias", (None, None))[1], module in embeddings)
    if not out:
        raise ValueError(f"adapter {name!r}: the weights file holds no LoRA weights")
    if config.get("trainable_token_indices") and not any(w.tokens for w in out.values()):
        raise ValueError(f"adapter {name!r}: trainable_token_indices is set, but the weights file holds no "
                         f"token_adapter.trainable_tokens_delta")
    return out


def _token_adapter(name: str, config: dict, module: str, parts: dict, width: int, model: nn.Module) -> ModuleAdapter:
    """The ``ModuleAdapter`` of embedding ``module``'s trainable tokens: their ids from the
    config's ``trainable_token_indices`` (a list: the input embedding's; a dict: by module name,
    as ``target_modules`` match), their rows from the weights."""
    key, rows = parts.pop("trainable_tokens_delta")
    if parts:
        raise ValueError(f"adapter {name!r}: embedding {module!r} has trainable tokens and LoRA weights "
                         f"({sorted(k for k, _ in parts.values())}); PEFT gives an embedding one or the other")
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        ids = next((v for k, v in spec.items() if matches(module, [k])), None)
    else:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        ids = spec if embedding is not None and embedding is model.get_submodule(module) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"adapter {name!r}: {key!r} holds trainable tokens, but the config's trainable_token_indices "
                         f"({spec!r}) gives no list of token ids for module {module!r}")
    if tuple(rows.shape) != (len(ids), width):
        raise ValueError(f"adapter {name!r}: {key} has shape {tuple(rows.shape)}, but trainable_token_indices lists "
                         f"{len(ids)} tokens and module {module!r} is {width} wide: expected {(len(ids), width)}")
    return ModuleAdapter(None, None, 0, float(config.get("lora_alpha", 8)), embedding=True, tokens=(ids, rows))


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` for every layer that can hold adapters (injected or not)."""
    return {name: shape for name, m in base_modules(model) if (shape := linear_features(m)) is not None}


def read_peft_adapter(model: nn.Module, name: str, folder, revision: str | None = None) -> tuple[dict, dict]:
    """Read one PEFT adapter (a folder or a Hub id) and check every tensor's shape against ``model``'s linear
    layers, and (a model with adapter layers) that it fits their slots' rank; changes nothing.
    Returns ``(config, {module: ModuleAdapter})`` for ``set_peft_adapter``. Raises
    ``ValueError`` naming the adapter and what is wrong."""
    config, tensors = _read(name, folder, revision)
    weights = _module_weights(name, config, tensors, model, _linear_shapes(model))
    layers = adapter_layers(model)
    if layers:
        _check_fits(name, weights, layers)
    else:  # (injected later, around these modules)
        _check_bases(name, weights, {module: model.get_submodule(module) for module in weights})
    return config, weights


def _check_fits(name: str, weights: dict, layers: dict) -> None:
    for module, weight in weights.items():
        rank = weight.rank
        if module not in layers:
            raise ValueError(f"adapter {name!r} targets {module!r}, which has no adapter layer in this "
                             f"model; inject it too, or load into a model without adapters"
                             + (" (an embedding: bora-serve takes --embedding-adapters)"
                                if weight.embedding else ""))
        if rank > layers[module].lora_A.shape[1]:
            raise ValueError(f"adapter {name!r} has rank {rank} at {module!r}, more than the injected "
                             f"rank {layers[module].lora_A.shape[1]}; inject with a larger r")
    _check_bases(name, weights, {module: layers[module].base_layer for module in weights})


def _check_bases(name: str, weights: dict, bases: dict) -> None:
    """What DoRA and ``lora_bias`` need of each targeted base layer, a ``ValueError`` naming the
    adapter and the module otherwise."""
    for module, weight in weights.items():
        for what, needed, check in (("is a DoRA adapter", weight.magnitude, check_dora_base),
                                    ("has a lora_bias", weight.bias, check_lora_bias_base)):
            if needed is not None:
                try:
                    check(bases[module])
                except ValueError as err:
                    raise ValueError(f"adapter {name!r} {what}, and at {module!r}: {err}") from None


def _write(layers: dict, d: int, config: dict, weights: dict) -> None:
    use_rslora = bool(config.get("use_rslora", False))
    for module, layer in layers.items():
        weight = weights.get(module)
        if weight is None:
            layer.set_adapter(d, None, None, alpha=8, use_rslora=use_rslora)
        else:
            tokens = {} if weight.tokens is None else {"tokens": weight.tokens}
            layer.set_adapter(d, weight.a, weight.b, alpha=weight.alpha, use_rslora=use_rslora,
                              magnitude=weight.magnitude, bias=weight.bias, **tokens)


def set_peft_adapter(model: nn.Module, slot, adapter: tuple[dict, dict], name: str = "adapter") -> None:
    """Put an adapter from ``read_peft_adapter`` into ``slot`` (an index or a slot name) of a
    model with adapter layers; layers it does not target get rank 0 there. Every check runs
    before anything is written, so a misfit leaves the model as it was."""
    layers = _layers_or_raise(model)
    d = _adapter_index(adapter_names(model), slot)
    config, weights = adapter
    _check_fits(name, weights, layers)
    _write(layers, d, config, weights)


def load_peft_adapters(model: nn.Module, adapters: Mapping[str, str | Path], dtype: torch.dtype | None = None,
                       revision: str | Mapping[str, str] | None = None):
    """Load PEFT LoRA adapters, stacked in the given order: ``{"name": folder, ...}``, each a
    ``save_pretrained`` folder or a Hugging Face Hub id (``"owner/repo"``, fetched).

    A model without adapter layers is injected first: every module some adapter targets gets a
    ``MultiLoRALinear`` (``MultiLoRAEmbedding`` for an embedding) whose slots are these adapters
    (rank 0, contributing nothing, where an adapter does not target the module). A model that already has adapter layers (from
    ``inject(..., adapter_names=...)``) has the named slots filled; their ranks must fit.
    Adapters may differ in rank, alpha, ``use_rslora``, ``use_dora`` (DoRA adapters keep their
    magnitudes), ``lora_bias``, patterns and target modules. Weights are
    read from ``adapter_model.safetensors``, else ``adapter_model.bin`` (``weights_only=True``,
    torch >= 2.6); every tensor's shape is checked against its module. ``dtype``:
    the adapters' dtype on injection (default: each base weight's). ``revision``: the branch,
    tag or commit of the Hub ids, one for all or ``{name: revision}``. Returns ``model``.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters must be a non-empty {name: folder} mapping")
    revisions = revision if isinstance(revision, Mapping) else dict.fromkeys(adapters, revision)
    if set(revisions) - set(adapters):
        raise ValueError(f"revision names adapters that are not loaded here: {sorted(set(revisions) - set(adapters))}")
    loaded = {name: read_peft_adapter(model, name, folder, revisions.get(name)) for name, folder in adapters.items()}

    layers = adapter_layers(model)
    if not layers:
        names = list(adapters)
        targets = sorted({m for _, weights in loaded.values() for m in weights})
        ranks = {m: [loaded[a][1][m].rank if m in loaded[a][1] else 0 for a in names] for m in targets}
        dora = {m: [m in loaded[a][1] and loaded[a][1][m].magnitude is not None for a in names] for m in targets}
        biased = {m: [m in loaded[a][1] and loaded[a][1][m].bias is not None for a in names] for m in targets}
        dropout = max(float(config.get("lora_dropout", 0.0)) for config, _ in loaded.values())
        modules = dict(model.named_modules())
        _inject_targets(model, [(m, modules[m], _fan_in_fan_out(modules[m])) for m in targets],
                        lambda m, module, fan: lora_layer(module, len(names), fan, r=ranks[m], dropout=dropout,
                                                          dtype=dtype, adapter_names=names, use_dora=dora[m],
                                                          lora_bias=biased[m]))
        tie_token_head(model)
        layers = adapter_layers(model)
    else:
        slots = adapter_names(model)
        for name, (_, weights) in loaded.items():
            _adapter_index(slots, name)
            _check_fits(name, weights, layers)
    slots = adapter_names(model)
    for name, (config, weights) in loaded.items():
        _write(layers, slots.index(name), config, weights)
    return model


def save_peft_adapter(model: nn.Module, name, folder) -> Path:
    """Write adapter ``name`` as a PEFT ``save_pretrained`` folder; returns the folder."""
    layers = _layers_or_raise(model)
    slots = adapter_names(model)
    d = _adapter_index(slots, name)
    present = {m: layer for m, layer in layers.items() if layer.rank_values[d]}
    tokens = {m: layer.adapter_tokens(d) for m, layer in layers.items()
              if isinstance(layer, MultiLoRAEmbedding) and layer.adapter_tokens(d) is not None}
    if not present:
        raise ValueError(f"adapter {slots[d]!r} has rank 0 in every layer; nothing to save"
                         + (" (a PEFT LoRA checkpoint needs LoRA weights beside its trainable tokens)" if tokens else ""))
    first = next(iter(present.values()))
    use_rslora = first.use_rslora[d]
    dora = {m: layer.adapter_magnitude(d) is not None for m, layer in present.items()}
    if len(set(dora.values())) > 1:
        raise ValueError(f"adapter {slots[d]!r} is DoRA at {[m for m, u in dora.items() if u]} but plain LoRA at "
                         f"{[m for m, u in dora.items() if not u]}; a PEFT checkpoint has one use_dora per adapter")
    biased = {m: layer.adapter_bias(d) is not None for m, layer in present.items()}
    if len(set(biased.values())) > 1:
        raise ValueError(f"adapter {slots[d]!r} has a lora_bias at {[m for m, u in biased.items() if u]} but not at "
                         f"{[m for m, u in biased.items() if not u]}; a PEFT checkpoint has one lora_bias per adapter")
    rank0 = first.rank_values[d]
    alpha0 = first.scaling_values[d] * (math.sqrt(rank0) if use_rslora else rank0)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for module, layer in present.items():
        a, b = layer.adapter_weights(d)
        names = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, MultiLoRAEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{names[0]}"] = a.contiguous().clone()
        tensors[f"{PREFIX}{module}.{names[1]}"] = b.contiguous().clone()
        if dora[module]:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = layer.adapter_magnitude(d).contiguous().clone()
        if biased[module]:
            tensors[f"{PREFIX}{module}.lora_B.bias"] = layer.adapter_bias(d).contiguous().clone()
        rank = a.shape[0]
        # one rsLoRA flag per adapter: an alpha that gives this layer's exact scale under it
        alpha = layer.scaling_values[d] * (math.sqrt(rank) if use_rslora else rank)
        key = re.escape(module)
        if rank != rank0:
            rank_pattern[key] = rank
        if not math.isclose(alpha, alpha0, rel_tol=1e-12):
            alpha_pattern[key] = alpha
    for module, (ids, rows) in tokens.items():
        tensors[f"{PREFIX}{module}.token_adapter.trainable_tokens_delta"] = rows.contiguous().clone()
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    token_spec = None if not tokens else next(iter(tokens.values()))[0] if list(tokens) == [
        m for m, layer in layers.items() if layer is embedding] else {m: ids for m, (ids, _) in tokens.items()}
    fan = any(layer.fan_in_fan_out for layer in present.values())
    model_config = getattr(model, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "r": rank0,
        "lora_alpha": int(alpha0) if float(alpha0).is_integer() else alpha0,
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(present),
        "lora_dropout": max((float(getattr(l.lora_dropout, "p", 0.0)) for l in present.values()), default=0.0),
        "fan_in_fan_out": fan,
        "bias": "none",
        "use_dora": any(dora.values()),
        "lora_bias": any(biased.values()),
        "modules_to_save": None,
        "trainable_token_indices": token_spec,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
