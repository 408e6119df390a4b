"""``read_tensor_file``: safetensors and PyTorch pickle files read alike; a pickle that would run
code, or holds anything but a state dict, or that this torch cannot read safely, is refused by
name (``tensor_files.py``)."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from bora_kernels.tensor_files import read_tensor_file

TENSORS = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.bfloat16),
           "codes": torch.randint(0, 255, (7,), dtype=torch.uint8)}


def test_both_formats_read_the_same_tensors(tmp_path):
    save_file(TENSORS, tmp_path / "w.safetensors")
    torch.save(TENSORS, tmp_path / "w.bin")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.bin"):
        read = read_tensor_file(path)
        assert read.keys() == TENSORS.keys(), path
        assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in TENSORS.items()), path


class _Planted:
    """Unpickling this would create ``path``: what a malicious checkpoint does with a command."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return type(self.path).touch, (self.path,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_that_are_not_state_dicts_are_refused(tmp_path, monkeypatch):
    planted = tmp_path / "ran"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"a.weight": torch.zeros(2), "x": _Planted(planted)}))
    torch.save({"a.weight": torch.zeros(2), "x": _Planted(planted)}, tmp_path / "evil_zip.bin")
    planted.unlink(missing_ok=True)  # (torch.save pickles it, which runs nothing; to be sure)
    for name in ("evil.bin", "evil_zip.bin"):
        with pytest.raises(ValueError, match=rf"adapter 'x': .*{name} is not a readable weights file"):
            read_tensor_file(tmp_path / name, what="adapter 'x': ")
    assert not planted.exists(), "reading a weights file must not run code it names"

    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    torch.save({"a": torch.zeros(2), "nested": {"b": torch.zeros(1)}}, tmp_path / "nested.bin")
    for name, kind in (("list.bin", "list"), ("nested.bin", "dict")):
        with pytest.raises(ValueError, match=rf"{name} holds a {kind}, not a mapping of names to tensors"):
            read_tensor_file(tmp_path / name)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"junk.bin is not a readable weights file \(UnpicklingError"):
        read_tensor_file(tmp_path / "junk.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        read_tensor_file(tmp_path / "junk.safetensors")

    torch.save(TENSORS, tmp_path / "w.bin")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(ValueError, match=r"w.bin is a pickle file; reading one safely needs torch >= 2.6 \(this is 2.5.1"):
        read_tensor_file(tmp_path / "w.bin")
