"""4-bit models from checkpoints: bitsandbytes' 4-bit checkpoints read and written without
bitsandbytes, and dense checkpoints quantized to NF4 while they load.

What ``save_pretrained`` writes for a model loaded with ``load_in_4bit`` (the ``*-bnb-4bit``
models on the Hub) keeps each quantized linear layer ``p`` as ``p.weight`` (the packed NF4 codes)
plus its statistics and ``p.weight.quant_state.bitsandbytes__nf4`` (see
``NF4Tensor.from_bnb_state_dict``); every other tensor is stored as it is. ``load_bnb_4bit`` puts
such a checkpoint into a model of the dense architecture, each quantized layer becoming an
``NF4Linear`` that holds the checkpoint's bytes (nothing is quantized again), and
``from_pretrained_4bit`` does it for a Hugging Face folder without building the dense weights.
``bnb_4bit_state_dict`` and ``save_pretrained_4bit`` write a model's ``NF4Linear`` layers back in
that form, which transformers with bitsandbytes loads as its own. ``from_pretrained_nf4``
quantizes a dense checkpoint while it loads, one shard at a time. PEFT adapters are read and
written by ``peft_io.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .model import _WRAPPERS, _fan_in_fan_out, _replace, find_targets, linear_features
from .nn import NF4Linear
from .quant import NF4Tensor, quantize_nf4
from .quant.nf4 import BNB_WEIGHT_KEYS
from .tensor_files import hub_snapshot, index_shards, read_tensor_file

QUANT_STATE = ".weight.quant_state.bitsandbytes__"
_NONE = object()
GENERATION_CONFIG = "generation_config.json"
# what a Hugging Face folder keeps its weights in, in the order from_pretrained looks for them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_checkpoint(checkpoint, device=None) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint``: a state dict, or the files ``_weight_files`` finds for a
    path, read onto ``device`` (default: the CPU) by ``read_tensor_file`` (safetensors, or
    PyTorch pickles read with ``weights_only=True``)."""
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint)
    tensors = {}
    for path in _weight_files(Path(checkpoint)):
        tensors.update(read_tensor_file(path, device, "checkpoint: "))
    return tensors


def _weight_files(path: Path) -> list[Path]:
    """The files weights are kept in: ``path`` itself, the shards a ``*.index.json`` names, or for
    a folder (a Hugging Face one) the first of ``WEIGHT_FILES`` it holds (an index: its shards)."""
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise ValueError(f"checkpoint: {path} holds none of {', '.join(WEIGHT_FILES)}")
        path = found
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} does not exist")
    if path.name.endswith(".index.json"):
        return [path.parent / f for f in index_shards(path)]
    return [path]


def quantized_layers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{layer name: quant type}`` of every bitsandbytes 4-bit layer a state dict holds."""
    return {key[:key.index(QUANT_STATE)]: key.rpartition("__")[2] for key in state_dict if QUANT_STATE in key}


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (an output head tied to the embedding), groups of 2+."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_bnb_4bit(model: nn.Module, checkpoint, strict: bool = True, device=None,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """Load a bitsandbytes 4-bit checkpoint (see ``read_checkpoint``; files are read onto
    ``device``) into ``model``, a model of the dense architecture whose parameters may be on the
    meta device (built without memory). ``dtype``: the checkpoint's floating tensors are cast to
    it and the NF4 layers compute in it (their statistics stay fp32); the model's own buffers
    (rotary tables) are left as they are.

    Each ``nn.Linear`` the checkpoint holds quantized (or GPT-2's ``Conv1D``, whose weight
    bitsandbytes quantizes transposed, or an ``NF4Linear``, loaded anew) becomes an ``NF4Linear``
    holding its bytes, computing in the dtype it was quantized from; every other tensor is loaded
    as ``load_state_dict(..., assign=True)`` does, in the checkpoint's dtype. Tied parameters stay
    tied (a checkpoint holds one of them). With ``strict``, a tensor the model lacks or a
    parameter or buffer the checkpoint lacks is an error. Everything is checked before anything
    changes: on a ``ValueError`` (naming the layer or key) the model is as it was. Inject adapters
    after loading. Returns ``model``."""
    tensors = read_checkpoint(checkpoint, device)
    if any(isinstance(m, _WRAPPERS) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has adapter layers: load the base checkpoint first, then inject")
    layers = {}
    for name, quant_type in quantized_layers(tensors).items():
        if quant_type != "nf4":
            raise ValueError(f"layer {name!r} is quantized as {quant_type!r}; only NF4 is supported "
                             f"(bnb_4bit_quant_type='nf4')")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint's 4-bit layer {name!r} is not a module of {type(model).__name__}") from None
        features = linear_features(module)  # (an NF4Linear is loaded anew)
        if features is None:
            raise ValueError(f"the checkpoint's 4-bit layer {name!r} is a {type(module).__name__} in the model, "
                             f"not an nn.Linear or GPT-2's Conv1D")
        weight = NF4Tensor.from_bnb_state_dict(tensors, name + ".")
        k, n = features  # a Conv1D's [in, out] weight was quantized transposed, as [out, in]
        if tuple(weight.shape) != (n, k):
            raise ValueError(f"layer {name!r}: the checkpoint's weight is {tuple(weight.shape)}, the model's "
                             f"{(n, k)} (out, in)")
        bias = tensors.get(name + ".bias")
        if (bias is None) != (module.bias is None) or bias is not None and bias.shape != module.bias.shape:
            raise ValueError(f"layer {name!r}: the checkpoint's bias {None if bias is None else tuple(bias.shape)} "
                             f"does not fit the model's {None if module.bias is None else tuple(module.bias.shape)}")
        layer = NF4Linear(weight, bias)
        layers[name] = layer if dtype is None else layer.to(dtype)
    used = {f"{name}.weight{part}" for name in layers for part in BNB_WEIGHT_KEYS} | {f"{name}.bias" for name in layers}
    rest = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in tensors.items() if k not in used}

    inside = tuple(name + "." for name in layers)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(inside)}
    for key, value in rest.items():
        _check_shape(key, value, shapes)
    tied = [group for group in _tied_groups(model) if not group[0].startswith(inside)]
    missing, unexpected = _unfilled(shapes, rest, tied), sorted(set(rest) - set(shapes))
    if strict and (missing or unexpected):
        raise _does_not_fit(model, missing, unexpected)

    for name, layer in layers.items():
        _replace(model, name, layer)
    model.load_state_dict({k: v for k, v in rest.items() if k in shapes}, strict=False, assign=True)
    _retie(model, tied, rest)
    return model


def _check_shape(key: str, value: torch.Tensor, shapes: dict) -> None:
    if key in shapes and tuple(value.shape) != shapes[key]:
        raise ValueError(f"{key!r}: the checkpoint's tensor is {tuple(value.shape)}, the model's {shapes[key]}")


def _unfilled(expected, loaded, tied: list[list[str]]) -> list[str]:
    """The expected keys ``loaded`` lacks, a tied group counting as filled by any of its names."""
    covered = {name for group in tied if any(n in loaded for n in group) for name in group}
    return sorted(set(expected) - set(loaded) - covered)


def _does_not_fit(model: nn.Module, missing=(), unexpected=()) -> ValueError:
    def some(keys):
        return f"{list(keys[:8])}{' ...' if len(keys) > 8 else ''}"

    return ValueError(f"checkpoint does not fit {type(model).__name__}: missing {some(missing)}, "
                      f"unexpected {some(unexpected)}")


def _retie(model: nn.Module, tied: list[list[str]], loaded) -> None:
    """Make each group of tied parameter names one parameter again: the one ``loaded`` holds
    (``load_state_dict(..., assign=True)`` put a new tensor under that name only)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for group in tied:
        source = next((n for n in group if n in loaded), None)
        for name in group if source is not None else ():
            if name != source:
                _replace(model, name, parameters[source])


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules made inside build their parameters on the meta device and their buffers (rotary
    tables, made in ``__init__`` and not saved) where they are, as accelerate's
    ``init_empty_weights(include_buffers=False)``."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _quantization(config) -> dict | None:
    """The ``quantization_config`` of a transformers config (or its dict) as a dict, or None."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    return q.to_dict() if hasattr(q, "to_dict") else q if isinstance(q, dict) else None


def _nf4_problem(q: dict | None) -> str | None:
    """Why a ``quantization_config`` is not bitsandbytes' 4-bit NF4, or None when it is."""
    if q is None:
        return "its config has no quantization_config (load it with from_pretrained)"
    if q.get("quant_method") != "bitsandbytes" or not q.get("load_in_4bit", q.get("_load_in_4bit")):
        return (f"its quantization_config is not bitsandbytes' 4-bit (quant_method {q.get('quant_method')!r}, "
                f"load_in_4bit {q.get('load_in_4bit', q.get('_load_in_4bit'))!r})")
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
        return f"its bnb_4bit_quant_type is {q.get('bnb_4bit_quant_type', 'fp4')!r}; only 'nf4' is supported"
    return None


def is_nf4_checkpoint(config) -> bool:
    """Whether a transformers config (or its dict) describes a bitsandbytes 4-bit NF4 checkpoint,
    which ``from_pretrained_4bit`` loads."""
    return _nf4_problem(_quantization(config)) is None


def from_pretrained_4bit(name_or_folder, model_class=None, dtype: torch.dtype | None = None,
                         device=None, revision: str | None = None) -> nn.Module:
    """A Hugging Face model from a bitsandbytes 4-bit NF4 checkpoint (a folder, or a Hub id such
    as a ``*-bnb-4bit`` model: its ``config.json`` says ``quant_method: bitsandbytes``,
    ``load_in_4bit``), built without bitsandbytes and without making the dense weights: its
    quantized layers are ``NF4Linear`` (our kernels run them, on CPU or GPU), the rest in the
    checkpoint's dtype, or ``dtype`` (then the NF4 layers compute in it too), on ``device``
    (default: the CPU; the weights are read straight onto it). ``model_class``
    defaults to ``AutoModelForCausalLM``. ``revision``: a Hub id's branch, tag or commit. The
    model's config holds no ``quantization_config``: write the model back with ``save_pretrained_4bit``."""
    def check(config):
        problem = _nf4_problem(_quantization(config))
        if problem is not None:
            raise ValueError(f"{name_or_folder} is not a bitsandbytes 4-bit NF4 checkpoint: {problem}")

    config, folder = _checkpoint(name_or_folder, revision, check)
    del config.quantization_config
    model = _empty_model(config, model_class, folder)
    load_bnb_4bit(model, folder, device=device, dtype=dtype)
    return model.to(device or "cpu").eval()  # (the buffers made on the CPU)


def _checkpoint(name_or_folder, revision: str | None = None, check=None) -> tuple:
    """``(config, folder)`` of a checkpoint: a local folder, or a Hub id's files (at
    ``revision``) as ``from_pretrained`` would fetch them: its JSON files, then, once
    ``check(config)`` has passed (it raises to refuse the checkpoint), one set of weights,
    safetensors before PyTorch pickles, of the same commit (``hub_snapshot``)."""
    from transformers import AutoConfig

    read = {}

    def config_of(folder: Path) -> None:
        read["config"] = AutoConfig.from_pretrained(folder)
        if check is not None:
            check(read["config"])

    folder = Path(name_or_folder)
    if folder.is_dir():
        config_of(folder)
        return read["config"], folder
    safetensors, safetensors_index, pickle, pickle_index = WEIGHT_FILES
    folder = hub_snapshot(str(name_or_folder), ["*.json"], [safetensors_index, safetensors, pickle_index, pickle],
                          revision, before_weights=config_of)
    return read["config"], folder


def _empty_model(config, model_class=None, folder: Path | None = None) -> nn.Module:
    """The model of ``config`` (``model_class``, default ``AutoModelForCausalLM``) with its
    parameters on the meta device and its buffers made; its generation config read from
    ``folder``'s ``generation_config.json`` where there is one, as ``from_pretrained`` reads it
    (stop tokens, sampling defaults)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    with _parameters_on_meta():
        model = model_class.from_config(config)
    if folder is not None and (folder / GENERATION_CONFIG).is_file() \
            and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _trim_heap() -> None:
    """Hand the memory freed so far back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). Without it a shard's dense weights, freed once quantized, stay in the process's
    heap, and the next shard's land beside them rather than in their place."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def from_pretrained_nf4(name_or_folder, target_modules="all-linear", exclude_modules=None, blocksize: int = 64,
                        double_quant: bool = True, model_class=None, dtype: torch.dtype | None = None,
                        device=None, revision: str | None = None) -> nn.Module:
    """A Hugging Face model from a dense checkpoint (a folder or a Hub id) with the base weights
    of ``target_modules`` quantized to NF4 while they load, one weight file (shard) at a time: the
    dense model is never held whole. Peak memory is the quantized model plus a shard, where
    ``from_pretrained`` then ``inject(..., quantize="nf4")`` (which gives the same bytes) peaks at
    the dense model. ``target_modules`` and ``exclude_modules`` match as ``inject``'s (default
    ``"all-linear"``: every linear layer but the output head); ``dtype`` (default: the
    checkpoint's) is the dtype the weights are quantized from and the model computes in;
    ``device`` is where the weights are read and quantized (a GPU quantizes with the Triton
    kernels). ``revision``: a Hub id's branch, tag or commit. Then ``inject`` puts adapters over
    the NF4 layers. A bitsandbytes 4-bit checkpoint is refused: ``from_pretrained_4bit`` reads it."""
    def check(config):
        if _quantization(config) is not None:
            raise ValueError(f"{name_or_folder} is quantized already (quantization_config "
                             f"{_quantization(config).get('quant_method')!r}); from_pretrained_4bit reads bitsandbytes' "
                             f"4-bit checkpoints")

    config, folder = _checkpoint(name_or_folder, revision, check)
    model = _empty_model(config, model_class, folder)
    targets = {name: fan for name, _, fan in find_targets(model, target_modules, exclude_modules)}
    tied, shapes = _tied_groups(model), {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded, biases = set(), {}
    for path in _weight_files(folder):
        dense = {}
        for key, value in read_checkpoint(path, device).items():
            _check_shape(key, value, shapes)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            module, _, leaf = key.rpartition(".")
            if module in targets and leaf == "weight":  # quantized now, the dense weight dropped
                weight = value.T.contiguous() if targets[module] else value  # (a Conv1D's is [in, out])
                _replace(model, module, NF4Linear(quantize_nf4(weight, blocksize, double_quant)))
            elif module in targets and leaf == "bias":
                biases[module] = value
            else:
                dense[key] = value
            loaded.add(key)
        unexpected = sorted(set(dense) - set(shapes))
        if unexpected:
            raise _does_not_fit(model, unexpected=unexpected)
        model.load_state_dict(dense, strict=False, assign=True)
        del dense
        _trim_heap()
    missing = _unfilled(shapes, loaded, tied)
    if missing:
        raise _does_not_fit(model, missing)
    for module, bias in biases.items():
        layer = model.get_submodule(module)
        layer.bias = nn.Parameter(bias.to(layer.compute_dtype), requires_grad=False)
    _retie(model, tied, loaded)
    return model.to(device or "cpu").eval()


def _base_name(name: str, wrappers) -> str | None:
    """The base model's name of a module or tensor named ``name`` in an injected model (an adapter
    layer's ``base_layer`` goes by the adapter layer's name), or None for an adapter's own part."""
    owner = next((w for w in wrappers if name.startswith(w + ".")), None)
    if owner is None:
        return name
    inner = name[len(owner) + 1:]
    if inner == "base_layer" or inner.startswith("base_layer."):
        return owner + inner[len("base_layer"):]
    return None


def bnb_4bit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s base weights as bitsandbytes 4-bit checkpoints hold them: each ``NF4Linear``
    as ``Linear4bit`` saves it, every other tensor as ``state_dict()`` has it, under the base
    model's names (an adapter layer's base by the adapter layer's name). Adapters are left out
    (``save_peft_adapter`` writes them); a tensor tied to an earlier one (an output head tied to
    the embedding) is left out too, as ``save_pretrained`` does."""
    wrappers = [name for name, m in model.named_modules() if isinstance(m, _WRAPPERS)]
    if any(getattr(m, "merged", None) is not None for m in model.modules()):
        raise ValueError("an adapter is merged into the base weights; call bora_kernels.unmerge_adapter first, or "
                         "bora_kernels.merge_and_unload to save the merged model")
    nf4 = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    out, written, stored = {}, set(), set()
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]  # (an NF4Linear's tensors are its own, no submodule's)
        module = module if module in nf4 else None
        if module is not None and module not in written:
            written.add(module)
            out.update(nf4[module].nf4_weight().bnb_state_dict(_base_name(module, wrappers) + "."))
        name = _base_name(key, wrappers)
        if name is None or module is not None and key != module + ".bias":
            continue
        storage = (value.data_ptr(), tuple(value.shape), value.dtype)
        if value.is_meta:
            raise ValueError(f"{key!r} is on the meta device: load the weights before saving them")
        if storage not in stored or not value.numel():
            stored.add(storage)
            out[name] = value
    return out


def save_pretrained_4bit(model: nn.Module, folder) -> Path:
    """Write a Hugging Face model whose base holds ``NF4Linear`` layers (``inject(...,
    quantize="nf4")``, ``from_pretrained_4bit``) as a bitsandbytes 4-bit checkpoint:
    ``config.json`` with bitsandbytes' ``quantization_config`` (the linear layers left dense
    named in ``llm_int8_skip_modules``) and ``model.safetensors`` (``bnb_4bit_state_dict``).
    transformers with bitsandbytes loads it as a model it quantized itself; ``from_pretrained_4bit``
    loads it without. Adapters are not written. Returns the folder."""
    from safetensors.torch import save_file

    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no NF4 layers; save it with save_pretrained, or quantize "
                         f"it first (inject(..., quantize='nf4'))")
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model (no config); save "
                         f"bnb_4bit_state_dict(model) yourself")
    wrappers = [name for name, m in model.named_modules() if isinstance(m, _WRAPPERS)]
    dense = sorted(_base_name(name, wrappers) for name, m in model.named_modules()
                   if _fan_in_fan_out(m) is not None and not isinstance(m, NF4Linear)
                   and _base_name(name, wrappers) is not None)
    dtypes = {m.compute_dtype for m in layers}
    tensors = {k: v.detach().contiguous().cpu() for k, v in bnb_4bit_state_dict(model).items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    had = model.config.__dict__.get("quantization_config", _NONE)
    model.config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": all(m.offset is not None for m in layers),
        "bnb_4bit_compute_dtype": str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": dense or None}
    try:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:  # (as save_pretrained writes it)
            model.generation_config.save_pretrained(folder)
    finally:
        if had is _NONE:
            del model.config.quantization_config
        else:
            model.config.quantization_config = had
    return folder
