"""Test set-up: kernels run under Triton's interpreter on machines without CUDA, and outputs
allocated with ``torch.empty`` are poisoned so that an element a kernel forgets to write fails."""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    # must happen before triton is imported anywhere: it decides how kernels are built
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bora_kernels.ops._dispatch import triton_interpreted, use_backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with `pytest -m gpu`)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


NEEDS_INTERPRETER = pytest.mark.skipif(not triton_interpreted(),
                                       reason="Triton interpreter unavailable (TRITON_INTERPRET unset, or triton < 3.8)")
# the two CPU paths of ops with a single torch layout: the Triton kernels (interpreted) and torch
KERNEL_AND_TORCH = [pytest.param("triton", marks=NEEDS_INTERPRETER), "torch"]


def cpu_backends():
    """The CPU paths to check: the Triton kernels under the interpreter, and both layouts of the
    torch path (padded bmm and the loop over adapters; see ops/lora_delta/grouped.py)."""
    return [pytest.param("triton", id="triton", marks=NEEDS_INTERPRETER),
            pytest.param("torch-padded", id="torch-padded"),
            pytest.param("torch-looped", id="torch-looped")]


@contextlib.contextmanager
def run_on(path: str):
    """Run ops on one of ``cpu_backends()`` inside the block."""
    from bora_kernels.ops.lora_delta import grouped

    limits = {"torch-padded": float("inf"), "torch-looped": 0.0}
    saved = grouped.PADDING_LIMIT
    grouped.PADDING_LIMIT = limits.get(path, saved)
    try:
        with use_backend("triton" if path == "triton" else "torch"):
            yield
    finally:
        grouped.PADDING_LIMIT = saved


ROUTINGS = ["per_token", "per_sequence", "plan", "route"]


def routed_forward(layer, x, token_ids, sequence_ids, how: str, batch_shape):
    """``(out, ids per token)``: ``layer(x)`` routed ``how`` (one of ``ROUTINGS``): ids per token
    (``token_ids`` ``[B, L]``) or per sequence (``sequence_ids`` ``[B]``) given to the forward, a
    ``lora_plan`` of the per-token ids, or an ``AdapterRoute`` set on the layer (and unset after)."""
    from bora_kernels.nn import AdapterRoute
    from bora_kernels.ops import lora_plan

    ids = sequence_ids if how == "per_sequence" else token_ids
    per_token = ids[:, None].expand(batch_shape) if how == "per_sequence" else ids
    if how == "plan":
        return layer(x, lora_plan(ids, batch_shape, layer.num_adapters)), per_token
    if how != "route":
        return layer(x, ids), per_token
    layer.adapter_ids = AdapterRoute(ids, layer.num_adapters)
    try:
        return layer(x), per_token
    finally:
        layer.adapter_ids = None


def assert_equals_peft_per_sequence(layer, x, ids, backend: str):
    """``layer`` (a ``MultiLoRALinear``) on a batch mixing its adapters by sequence (``ids`` ``[B]``,
    -1 for none) on ``backend`` equals PEFT's layer with the same adapters, run one sequence at a
    time (PEFT cannot mix DoRA adapters, or any with others in one batch, through ``set_adapter``)."""
    from bora_kernels.bench.baselines import peft_lora_linear
    from tests.tolerances import assert_close

    peft_layer, names = peft_lora_linear(layer)
    with run_on(backend), torch.no_grad():
        ours = layer(x, ids)
    for i, d in enumerate(ids.tolist()):
        with torch.no_grad():
            if d < 0:
                theirs = peft_layer.base_layer(x[i])
            else:
                peft_layer.set_adapter(names[d])
                theirs = peft_layer(x[i])
        assert_close(ours[i], theirs, torch.float32, f"sequence {i} (adapter {d})")


_POISON_INT = -0x5A5A5A5


def _poisoned(fn):
    def make(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xA5)
        elif t.dtype != torch.bool and not t.is_complex():
            t.fill_(_POISON_INT)
        return t
    return make


@pytest.fixture
def poison_empty(monkeypatch):
    """``torch.empty``, ``empty_like`` and ``new_empty`` return NaN (float) or a sentinel (int), and
    so do the CPU torch path's work buffers, kept between calls."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    from bora_kernels.ops.lora_delta import grouped

    monkeypatch.setattr(grouped, "POISON_WORK", True)  # the torch path's kept work buffers too


def eager_and_compiled(model, compiled, route, **inputs):
    """``[(logits, grads)]`` of one forward and backward (loss: the logits' mean square) inside
    ``route()``, with ``model`` and then with ``compiled`` (``torch.compile`` of it); ``grads``
    are those of the parameters that require grad."""
    results = []
    for fn in (model, compiled):
        model.zero_grad()
        with route():
            logits = fn(**inputs).logits
            logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    return results


def capture_cuda_graph(fn):
    """``(graph, outputs)``: ``fn()`` run once on a side stream (Triton compiles, caches fill and
    autograd settles outside the capture), then captured; ``graph.replay()`` reruns it into
    ``outputs``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@pytest.fixture(scope="session")
def serve_demo(tmp_path_factory):
    """The serving demo (tiny Llama, character tokenizer, 8 adapters), trained briefly."""
    pytest.importorskip("transformers")
    from bora_kernels.serve import demo

    return demo.build(tmp_path_factory.mktemp("serve_demo"), steps=80)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The Hugging Face Hub stood in for by a folder: ``fake_hub.repos / "owner/name"`` is a
    repository's main branch, ``fake_hub.revisions[("owner/name", "v1")]`` a folder holding its
    revision ``v1``, and ``huggingface_hub.snapshot_download(repo_id, revision, allow_patterns)``
    copies the files the patterns match into a cache folder of its own per call, named (as the
    Hub's cache names snapshots) by the revision's commit, which ``revision`` may also name (a
    missing repository or revision raises as the Hub's 404 does). ``fake_hub.asked`` lists
    ``(repo_id, allow_patterns)`` per call, ``fake_hub.asked_revisions`` the revisions."""
    import fnmatch
    import hashlib
    import shutil
    import tempfile
    import types
    from pathlib import Path

    huggingface_hub = pytest.importorskip("huggingface_hub")
    hub = types.SimpleNamespace(repos=tmp_path / "hub", asked=[], revisions={}, asked_revisions=[])

    def commit(folder: Path) -> str:
        return hashlib.sha1(str(folder).encode()).hexdigest()

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        hub.asked.append((repo_id, allow_patterns))
        hub.asked_revisions.append(revision)
        if not (hub.repos / repo_id).is_dir():
            raise FileNotFoundError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/{repo_id}")
        versions = {None: hub.repos / repo_id, "main": hub.repos / repo_id,
                    **{rev: folder for (repo, rev), folder in hub.revisions.items() if repo == repo_id}}
        versions.update({commit(folder): folder for folder in list(versions.values())})
        if revision not in versions:
            raise FileNotFoundError(f"404 Client Error. Revision Not Found for url: "
                                    f"https://huggingface.co/api/models/{repo_id}/revision/{revision}")
        repo = versions[revision]
        (tmp_path / "hub_cache").mkdir(exist_ok=True)
        out = Path(tempfile.mkdtemp(dir=tmp_path / "hub_cache")) / commit(repo)
        out.mkdir()
        for path in repo.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, out)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return hub


def byte_level_bpe(corpus: list[str], vocab_size: int, *, split_words: bool = True, eos: str | None = None):
    """A byte-level BPE tokenizer (GPT-2's kind: every byte a token, leading spaces folded into
    tokens) trained on ``corpus``, as a transformers tokenizer. ``split_words=False`` lets tokens
    span punctuation and words; ``eos`` adds that special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos] if eos else [],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)
