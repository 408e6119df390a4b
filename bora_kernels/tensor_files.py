"""Reading one file of named tensors: safetensors, or PyTorch's pickle format (``.bin``, ``.pt``)
read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only and
runs no code the file names. Before torch 2.6 that restriction could be bypassed (CVE-2025-32434),
so there pickle files are refused. Used for model checkpoints (``bnb_io.py``) and PEFT adapters
(``peft_io.py``), with ``hub_snapshot`` to fetch either from the Hugging Face Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SAFE_PICKLE_TORCH = "2.6"

COMMIT = re.compile(r"[0-9a-f]{40}")  # a Hub snapshot's folder name in the cache: its commit


def read_tensor_file(path, device=None, what: str = "") -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the file at ``path``, read onto ``device`` (default: the CPU), each
    tensor in memory of its own (none holds the file mapped). ``what`` opens every error message
    (say ``"adapter 'x': "``); a file that cannot be read, or that holds anything but a flat
    mapping of names to tensors, is a ``ValueError`` naming it."""
    path, device = Path(path), torch.device(device or "cpu")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            try:  # into memory of its own: a tensor kept must not hold the file's mapping (a whole shard) resident
                return load_file(path, device=str(device), backend="pread")
            except TypeError:  # safetensors before 0.8 maps the file: copy what comes out of it
                tensors = load_file(path, device=str(device))
                return {k: v.clone() for k, v in tensors.items()} if device.type == "cpu" else tensors
        except Exception as err:  # safetensors raises its own error type for a corrupt file
            raise ValueError(f"{what}{path} is not a readable safetensors file ({err})") from None
    if torch.torch_version.TorchVersion(torch.__version__) < SAFE_PICKLE_TORCH:
        raise ValueError(f"{what}{path} is a pickle file; reading one safely needs torch >= {SAFE_PICKLE_TORCH} "
                         f"(this is {torch.__version__}). Upgrade torch, or convert the file to safetensors")
    try:
        tensors = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a corrupt file, or one naming a class outside weights_only's allowed set
        raise ValueError(f"{what}{path} is not a readable weights file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{what}{path} holds a {type(tensors).__name__}, not a mapping of names to tensors "
                         f"(a state dict)")
    return tensors


def index_shards(path: Path) -> list[str]:
    """The weight files a sharded checkpoint's ``*.index.json`` names (its ``weight_map``'s
    values), sorted; an index that is not one is a ``ValueError`` naming it."""
    try:
        return sorted(set(json.loads(Path(path).read_text())["weight_map"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint: {path} is not a weights index (a JSON object whose weight_map maps "
                         f"names to files): {type(err).__name__}: {err}") from None


def hub_snapshot(repo_id: str, configs: list[str], weights: list[str], revision: str | None = None,
                 before_weights=None) -> Path:
    """The local folder of the Hub repository ``repo_id`` holding the files ``configs`` match and
    one set of weights: the first of ``weights`` (file names, in order of preference) it has,
    where an ``*.index.json`` stands for the shards it names. Nothing else is fetched: a
    repository that also keeps its weights in another form (a ``consolidated.safetensors`` beside
    the shards, pickles beside safetensors) costs one download, not two. Works offline from the
    cache as ``snapshot_download`` does. ``revision``: a branch, tag or commit (default the main
    branch); the fetches after the first take the commit it resolved to, so a push in between
    cannot mix files of two versions. ``before_weights(folder)`` is called with the folder of the
    config files before any weights are fetched (it raises to stop there)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=configs))
    if COMMIT.fullmatch(folder.name):
        revision = folder.name
    if before_weights is not None:
        before_weights(folder)
    for name in weights:
        if name.endswith(".index.json"):  # (fetched with the configs, or not there)
            if (folder / name).is_file():
                try:
                    shards = index_shards(folder / name)
                except ValueError:  # (reading the folder names the bad index)
                    return folder
                return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*configs, name, *shards]))
        else:
            found = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*configs, name]))
            if (found / name).is_file():
                return found
    return folder
