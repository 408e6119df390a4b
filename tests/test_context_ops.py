"""Context-PEFT ops against their float64 references: ``context_lora_delta`` (Algorithm 1's einsum
and the masked concatenation), ``context_bias`` (BitFit) and ``context_scale`` (IA3); forward
and every gradient, on every CPU path, outputs poisoned."""

import importlib
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bora_kernels.ops import context_bias, context_lora_delta, context_plan, context_scale
from bora_kernels.ops.context_lora_delta.reference import (context_lora_delta_reference, masked_concat_form,
                                                           one_hot_weights)
from bora_kernels.ops.context_vector.reference import context_bias_reference, context_scale_reference
from conftest import NEEDS_INTERPRETER, capture_cuda_graph, cpu_backends, run_on
from tolerances import assert_close

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def make_context(kind: str, batch_shape, num_contexts: int, gen: torch.Generator):
    """Context weights of one kind for a batch; float kinds require grad."""
    if kind == "ids":
        return torch.randint(-1, num_contexts, batch_shape, generator=gen)
    if kind == "seq_ids":  # one id per sequence, never all -1
        ids = torch.randint(-1, num_contexts, batch_shape[:1], generator=gen)
        ids[0] = num_contexts - 1
        return ids
    shape = (*batch_shape, num_contexts)
    if kind == "one_hot":
        w = one_hot_weights(torch.randint(0, num_contexts, batch_shape, generator=gen), batch_shape, num_contexts)
    elif kind == "soft":
        w = torch.rand(shape, generator=gen).softmax(-1)
    elif kind == "multi_hot":  # overlapping masks with soft values, some tokens with none (dropout)
        w = (torch.rand(shape, generator=gen) < 0.5).float() * torch.rand(shape, generator=gen)
    elif kind == "bool":
        return torch.rand(shape, generator=gen) < 0.5
    else:
        raise ValueError(kind)
    return w.requires_grad_()


KINDS = ["ids", "seq_ids", "one_hot", "soft", "multi_hot", "bool"]
SHAPES = [pytest.param((1, 1), 2, 8, id="B1-L1-C2"), pytest.param((2, 19), 3, 5, id="B2-L19-C3-R5"),
          pytest.param((3, 33), 4, 16, id="B3-L33-C4-R16")]


def _inputs(batch_shape, num_contexts, rank, dtype, gen, k=24, n=40):
    x = torch.randn(*batch_shape, k, generator=gen).to(dtype).requires_grad_()
    a = (torch.randn(num_contexts, rank, k, generator=gen) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(num_contexts, n, rank, generator=gen).to(dtype).requires_grad_()
    scaling = torch.rand(num_contexts, generator=gen) + 0.5
    return x, a, b, scaling


def _check_grads(out, ref, inputs, dtype, gen, names):
    dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.device)
    got = torch.autograd.grad(out, inputs, dy.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, dy)
    for g, w, name in zip(got, want, names):
        assert_close(g, w, dtype, f"d{name}")


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_shape,num_contexts,rank", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_context_lora_delta_matches_algorithm_1(kind, batch_shape, num_contexts, rank, dtype, path, poison_empty):
    # a seed that is the same in every process (str hashes are salted per process)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{batch_shape}".encode()))
    x, a, b, scaling = _inputs(batch_shape, num_contexts, rank, dtype, gen)
    w = make_context(kind, batch_shape, num_contexts, gen)
    ref = context_lora_delta_reference(x, a, b, w, scaling)
    inputs = [x, a, b] + ([w] if w.requires_grad else [])
    with run_on(path):  # backward too: the torch path picks its layout when it runs
        out = context_lora_delta(x, a, b, w, scaling)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, "forward")
        _check_grads(out, ref, inputs, dtype, gen, ["x", "lora_a", "lora_b", "context_weights"])


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("kind", ["soft", "multi_hot"])
def test_context_lora_delta_matches_masked_concatenation(kind, path, poison_empty):
    gen = torch.Generator().manual_seed(7)
    x, a, b, scaling = _inputs((2, 21), 4, 8, torch.float32, gen)
    w = make_context(kind, (2, 21), 4, gen)
    ref = masked_concat_form(x.double(), a.double(), b.double(), w.double(), scaling.double())
    with run_on(path):
        out = context_lora_delta(x, a, b, w, scaling)
        assert_close(out, ref, torch.float32, "forward")
        _check_grads(out, ref, [x, a, b, w], torch.float32, gen, ["x", "lora_a", "lora_b", "context_weights"])


@pytest.mark.parametrize("num_contexts,rank,masked", [(2, 8, True), (3, 5, True), (4, 16, False)])
def test_cpu_torch_path_takes_the_masked_form_only_when_it_is_small(num_contexts, rank, masked, monkeypatch):
    """The torch path multiplies by every context's A (``[T, C * R]``) only when C * R fits in K
    and N (here 24 and 40), so ``SHAPES`` above check both of its forms against the reference."""
    module = importlib.import_module("bora_kernels.ops.context_lora_delta")  # (the package, not the op)
    calls = []
    real = module._masked_delta
    monkeypatch.setattr(module, "_masked_delta", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    x, a, b, scaling = _inputs((2, 5), num_contexts, rank, torch.float32, gen)
    for kind in ("ids", "soft"):
        with run_on("torch-looped"):
            context_lora_delta(x, a, b, make_context(kind, (2, 5), num_contexts, gen), scaling).sum().backward()
    assert len(calls) == (2 if masked else 0)


def test_passes_cover_only_nonzero_contexts():
    # token 0: contexts 0 and 2; token 1: context 1; token 2: none
    w = torch.tensor([[0.5, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    plan = context_plan(w, (3,), 3)
    assert len(plan.passes) == 2  # the most non-zero contexts of a token
    first, second = plan.passes
    # pass 0: token 0 -> context 0 (w 0.5), token 1 -> context 1 (w 1), token 2 -> none
    assert first[1].tolist() == [0.5, 1.0, 0.0]
    assert second[1].tolist() == [2.0, 0.0, 0.0]
    routed = [int(p.bounds[-2] - p.bounds[2]) for p, _ in plan.passes]  # tokens with an adapter
    assert routed == [2, 1]


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("kind", ["one_hot", "multi_hot", "bool"])
def test_weights_without_a_host_sync_run_every_pass(kind, path, monkeypatch, poison_empty):
    """Under torch.compile or a CUDA graph's capture the plan cannot read how many contexts a token
    has at most: it runs all C passes (empty ones included), with the same result and gradients."""
    module = importlib.import_module("bora_kernels.ops.context_lora_delta")
    monkeypatch.setattr(module, "recording_graph", lambda device: True)
    gen = torch.Generator().manual_seed(11)
    x, a, b, scaling = _inputs((2, 9), 4, 6, torch.float32, gen)
    w = make_context(kind, (2, 9), 4, gen)
    assert len(context_plan(w, (2, 9), 4).passes) == 4
    ref = context_lora_delta_reference(x, a, b, w, scaling)
    inputs = [x, a, b] + ([w] if w.requires_grad else [])
    with run_on(path):
        out = context_lora_delta(x, a, b, w, scaling)
        assert_close(out, ref, torch.float32, "forward")
        _check_grads(out, ref, inputs, torch.float32, gen, ["x", "lora_a", "lora_b", "context_weights"])


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("extra", [False, True], ids=["one_pass", "two_passes"])
def test_weights_keep_sign_zero_rows_and_nan(extra, path):
    """At most one context per token takes the one-pass plan; either plan keeps a negative weight,
    gives all-zero rows exact zeros and lets a NaN weight show in its row only."""
    w = torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0], [0.0, 0.0, 0.5]])
    if extra:
        w[3, 0] = 1.0  # a second context on token 3
    plan = context_plan(w, (4,), 3)
    assert len(plan.passes) == (2 if extra else 1)
    first = plan.passes[0][1]
    assert first[:2].tolist() == [-2.0, 0.0] and first[2].isnan()
    gen = torch.Generator().manual_seed(5)
    x, a, b, scaling = _inputs((4,), 3, 4, torch.float32, gen)
    with run_on(path), torch.no_grad():
        out = context_lora_delta(x, a, b, w, scaling)
    want = context_lora_delta_reference(x.detach(), a.detach(), b.detach(), torch.nan_to_num(w), scaling)
    assert (out[1] == 0).all() and out[2].isnan().all()
    assert_close(out[[0, 3]], want[[0, 3]], torch.float32, "out")


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("kind", ["ids", "soft", "multi_hot"])
def test_add_to_adds_in_place(kind, path, poison_empty):
    """``add_to`` (a base output in an autograd graph) gets the delta added in place; the result
    and every gradient (the base's, and float weights') match the reference."""
    gen = torch.Generator().manual_seed(6)
    x, a, b, scaling = _inputs((2, 19), 3, 5, torch.float32, gen)
    context = make_context(kind, (2, 19), 3, gen)
    w = torch.randn(40, 24, generator=gen).requires_grad_()
    leaves = [x, a, b, w] + ([context] if context.dtype.is_floating_point else [])
    with run_on(path):
        base = x @ w.T
        out = context_lora_delta(x, a, b, context, scaling, add_to=base)
        assert out.data_ptr() == base.data_ptr()
        dy = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_context = ref_leaves[4] if len(leaves) > 4 else context
    ref = ref_leaves[0] @ ref_leaves[3].T + context_lora_delta_reference(*ref_leaves[:3], ref_context, scaling.double())
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert_close(out, ref, torch.float32, "output")
    for g, r, name in zip(grads, ref_grads, ("dx", "dA", "dB", "dW (the base)", "dweights")):
        assert_close(g, r, torch.float32, name)


def _record_launches(monkeypatch):
    """The ``MASKED`` flag of every shrink-expand launch, and ``context_plan`` made to fail."""
    kernels = importlib.import_module("bora_kernels.ops.lora_delta.triton")
    module = importlib.import_module("bora_kernels.ops.context_lora_delta")  # (the package, not the op)
    real, launches, plans = kernels.launch, [], []
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, *args, **kwargs:
                        launches.append(kwargs.get("MASKED")) or real(kernel, grid, *args, **kwargs))
    real_plan = module.context_plan
    monkeypatch.setattr(module, "context_plan", lambda *args, **kwargs: plans.append(1) or real_plan(*args, **kwargs))
    return launches, plans


@NEEDS_INTERPRETER
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_contexts,rank,k,n", [(3, 5, 24, 40), (8, 16, 128, 136)], ids=["C3-R5", "C8-R16"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_is_one_masked_launch(kind, num_contexts, rank, k, n, dtype, monkeypatch, poison_empty):
    """The Triton path without gradients: ids or weights given as they are take the masked form,
    one launch of the shrink-expand kernel's MASKED mode and no grouping, up to C * R = 128 (the
    second case); rows without a context are exact zeros."""
    launches, plans = _record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{num_contexts}".encode()))
    x, a, b, scaling = _inputs((2, 19), num_contexts, rank, dtype, gen, k=k, n=n)
    w = make_context(kind, (2, 19), num_contexts, gen)
    ref = context_lora_delta_reference(x, a, b, w, scaling)
    with run_on("triton"), torch.no_grad():
        out = context_lora_delta(x, a, b, w, scaling)
    assert launches == [True] and not plans
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "forward")
    if kind in ("ids", "seq_ids"):
        ids = w if kind == "ids" else w[:, None].expand(2, 19)
        assert (out[ids == -1] == 0).all()


@NEEDS_INTERPRETER
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("kind", ["ids", "multi_hot"])
def test_inference_masked_form_adds_to(kind, contiguous, monkeypatch, poison_empty):
    """``add_to`` without gradients: the masked launch adds into a contiguous one in place (and
    into a strided one through a fresh output); NaN weights show in their rows only."""
    launches, _ = _record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(11)
    x, a, b, scaling = _inputs((2, 19), 3, 5, torch.float32, gen)
    w = make_context(kind, (2, 19), 3, gen)
    if kind == "multi_hot":
        w = w.detach().clone()
        w[1, 4, 2] = float("nan")
    base = torch.randn(40, 2, 19, generator=gen).permute(1, 2, 0)
    base = base.contiguous() if contiguous else base
    want = base.double() + context_lora_delta_reference(x.detach(), a.detach(), b.detach(), torch.nan_to_num(w),
                                                        scaling)
    with run_on("triton"), torch.no_grad():
        out = context_lora_delta(x, a, b, w, scaling, add_to=base)
    assert out is base and launches == [True]
    finite = torch.ones(2, 19, dtype=torch.bool)
    if kind == "multi_hot":
        finite[1, 4] = False
        assert out[1, 4].isnan().all()
    assert_close(out[finite], want[finite], torch.float32, "add_to")


@NEEDS_INTERPRETER
@pytest.mark.parametrize("case", ["grad", "plan", "wide"])
def test_masked_form_only_for_inference_without_a_plan(case, monkeypatch):
    """The Triton path groups (no MASKED launch) when a gradient is needed, when a ContextPlan is
    given (a model's layers share its grouping) and when C * R > 128."""
    launches, _ = _record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(12)
    num_contexts, rank = (9, 16) if case == "wide" else (3, 5)
    x, a, b, scaling = _inputs((2, 19), num_contexts, rank, torch.float32, gen, k=160, n=160)
    ids = make_context("ids", (2, 19), num_contexts, gen)
    context = context_plan(ids, (2, 19), num_contexts) if case == "plan" else ids
    with run_on("triton"), torch.set_grad_enabled(case == "grad"):
        out = context_lora_delta(x, a, b, context, scaling)
    assert launches and not any(launches)
    assert_close(out, context_lora_delta_reference(x, a, b, ids, scaling), torch.float32, "forward")


def test_ids_equal_one_hot_weights():
    gen = torch.Generator().manual_seed(3)
    x, a, b, scaling = _inputs((2, 9), 3, 4, torch.float32, gen)
    ids = torch.randint(-1, 3, (2, 9), generator=gen)
    with torch.no_grad():
        by_ids = context_lora_delta(x, a, b, ids, scaling)
        by_weights = context_lora_delta(x, a, b, one_hot_weights(ids, (2, 9), 3), scaling)
    assert torch.allclose(by_ids, by_weights, atol=1e-6)
    assert (by_ids[ids == -1] == 0).all()


class _Allocations(TorchDispatchMode):
    """Shapes of every tensor a torch op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((func.__name__, tuple(t.shape)))
        return out


@pytest.mark.parametrize("path", [p for p in cpu_backends() if p.id != "triton"])
def test_one_context_per_token_builds_no_per_context_tensor(path):
    """Ids never become a one-hot [T, C] tensor, and nothing of [T, C * R] elements is built, in
    forward or backward (K, N < C * R, so a [T, C*R] tensor would be the largest here)."""
    num_tokens, num_contexts, rank, k, n = 40, 4, 8, 24, 24
    gen = torch.Generator().manual_seed(0)
    x, a, b, scaling = _inputs((num_tokens,), num_contexts, rank, torch.float32, gen, k=k, n=n)
    ids = torch.arange(num_tokens) % num_contexts  # even: the padded layout adds only 2 rows
    with run_on(path), _Allocations() as seen:
        context_lora_delta(x, a, b, ids, scaling).sum().backward()
    largest = max((torch.Size(s).numel(), name, s) for name, s in seen.shapes if len(s) >= 1)
    assert largest[0] <= (num_tokens + 2) * max(k, n, 16) < num_tokens * num_contexts * rank, largest
    assert not [s for _, s in seen.shapes if s[-1:] == (num_contexts,) and s[:1] == (num_tokens,)]


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["ids", "seq_ids", "soft", "multi_hot", "bool"])
@pytest.mark.parametrize("mode", ["bias", "scale"])
def test_context_bias_and_scale(mode, kind, dtype, path, poison_empty):
    gen = torch.Generator().manual_seed(11)
    batch_shape, num_contexts, n = (3, 17), 3, 45
    u = torch.randn(*batch_shape, n, generator=gen).to(dtype).requires_grad_()
    vectors = (1 + torch.randn(num_contexts, n, generator=gen) / 4).requires_grad_()
    w = make_context(kind, batch_shape, num_contexts, gen)
    op, reference = (context_bias, context_bias_reference) if mode == "bias" else (context_scale, context_scale_reference)
    ref = reference(u, vectors, w)
    inputs = [u, vectors] + ([w] if w.requires_grad else [])
    with run_on(path):
        out = op(u, vectors, w)
        assert out.dtype == dtype and out.shape == u.shape
        assert_close(out, ref, dtype, "forward")
        _check_grads(out, ref, inputs, dtype, gen, ["u", mode, "context_weights"])


@pytest.mark.parametrize("call,message", [
    (lambda x, a, b: context_lora_delta(x, a, b, torch.zeros(2, 5, 4)), "context_weights has shape"),
    (lambda x, a, b: context_lora_delta(x, a, b, torch.full((2, 5), 3)), "context_weights must lie in"),
    (lambda x, a, b: context_lora_delta(x, a, b, torch.zeros(2, 4, dtype=torch.long)), "context_weights has shape"),
    (lambda x, a, b: context_lora_delta(x, a, b, [0, 1]), "context_weights must be a tensor"),
    (lambda x, a, b: context_lora_delta(x[0, 0], a, b, torch.zeros(1)), "x must be"),
    (lambda x, a, b: context_lora_delta(x, a[:, :, :3], b, torch.zeros(2, 5, 3)), "lora_a must be"),
    (lambda x, a, b: context_bias(x, torch.zeros(3, 7), torch.zeros(2, 5, 3)), "bias must be"),
    (lambda x, a, b: context_scale(x, torch.zeros(3, 6), torch.zeros(2, 5, 2)), "context_weights has shape"),
    (lambda x, a, b: context_scale(x, torch.zeros(3, 6), torch.full((2, 5), -2)), "context_weights must lie in"),
], ids=["weights-shape", "ids-range", "ids-shape", "not-tensor", "x-dims", "a-shape", "bias-shape",
        "scale-weights-shape", "scale-ids-range"])
def test_errors_name_the_argument(call, message):
    x = torch.randn(2, 5, 6)
    a, b = torch.randn(3, 4, 6), torch.randn(3, 8, 4)
    with pytest.raises(ValueError, match=message):
        call(x, a, b)


@pytest.mark.gpu
def test_inference_on_gpu_poisons_unchecked_ids():
    """CUDA ids are not checked (a host sync); in the masked launch an id outside [-1, C) gives a
    NaN row, -1 exact zeros, and the other rows their delta."""
    gen = torch.Generator().manual_seed(14)
    x, a, b, scaling = (t.detach().cuda() for t in _inputs((40,), 4, 16, torch.bfloat16, gen, k=256, n=384))
    ids = torch.randint(0, 4, (40,), generator=gen)
    ids[[3, 7, 11]] = torch.tensor([4, -2, -1])
    with torch.no_grad():
        out = context_lora_delta(x, a, b, ids.cuda(), scaling)
    assert out[3].isnan().all() and out[7].isnan().all() and (out[11] == 0).all()
    good = torch.ones(40, dtype=torch.bool)
    good[[3, 7]] = False
    ref = context_lora_delta_reference(x[good.cuda()], a, b, ids[good].cuda(), scaling)
    assert_close(out[good.cuda()], ref, torch.bfloat16, "valid rows")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["ids", "seq_ids", "soft", "multi_hot"])
def test_compiled_kernels_on_gpu(kind, dtype):
    """The compiled Triton kernels (bf16 included) against the references, every op, on CUDA."""
    gen = torch.Generator().manual_seed(13)
    batch_shape, num_contexts, rank = (4, 300), 4, 16
    x, a, b, scaling = (t.detach().cuda() for t in _inputs(batch_shape, num_contexts, rank, dtype, gen, k=256, n=384))
    x, a, b = x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    w = make_context(kind, batch_shape, num_contexts, gen)
    w = w.detach().cuda().requires_grad_(w.requires_grad)
    out = context_lora_delta(x, a, b, w, scaling)
    ref = context_lora_delta_reference(x, a, b, w, scaling)
    assert_close(out, ref, dtype, "forward")
    _check_grads(out, ref, [x, a, b] + ([w] if w.requires_grad else []), dtype, gen,
                 ["x", "lora_a", "lora_b", "context_weights"])
    with torch.no_grad():  # inference: the masked launch
        assert_close(context_lora_delta(x, a, b, w, scaling), ref, dtype, "forward, inference")
    u = torch.randn(*batch_shape, 384, generator=gen).to(dtype).cuda().requires_grad_()
    vectors = (1 + torch.randn(num_contexts, 384, generator=gen) / 4).cuda().requires_grad_()
    for op, reference in ((context_bias, context_bias_reference), (context_scale, context_scale_reference)):
        out = op(u, vectors, w)
        ref = reference(u, vectors, w)
        assert_close(out, ref, dtype, f"{op.__name__} forward")
        _check_grads(out, ref, [u, vectors] + ([w] if w.requires_grad else []), dtype, gen,
                     ["u", "vectors", "context_weights"])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ids", "multi_hot"])
def test_training_step_in_a_cuda_graph(kind):
    """Forward and backward captured in one CUDA graph: no host sync on CUDA, float weights
    included (the plan then runs every context's pass). Replays follow new contents of the
    captured inputs, and match the reference each time."""
    gen = torch.Generator().manual_seed(15)
    batch_shape, num_contexts = (4, 64), 3
    x, a, b, scaling = (t.detach().cuda() for t in _inputs(batch_shape, num_contexts, 16, torch.float16, gen,
                                                           k=256, n=192))
    x, a, b = x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    w = make_context(kind, batch_shape, num_contexts, gen)
    w = w.detach().cuda().requires_grad_(w.requires_grad)
    inputs = [x, a, b] + ([w] if w.requires_grad else [])
    dy = torch.randn(*batch_shape, 192, generator=gen).cuda()

    def step():
        out = context_lora_delta(x, a, b, w, scaling)
        return (out, *torch.autograd.grad(out, inputs, dy.half()))

    graph, captured = capture_cuda_graph(step)
    for seed in range(3):
        new = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, generator=new))
            w.copy_(make_context(kind, batch_shape, num_contexts, new))
        graph.replay()
        torch.cuda.synchronize()
        ref = context_lora_delta_reference(x, a, b, w, scaling)
        want = (ref, *torch.autograd.grad(ref, inputs, dy.double()))
        for got, expected, name in zip(captured, want, ["forward", "dx", "dlora_a", "dlora_b", "dcontext_weights"]):
            assert_close(got, expected, torch.float16, f"replay {seed}: {name}")


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("multiply", [False, True], ids=["bias", "scale"])
@pytest.mark.parametrize("kind", ["ids", "weights"])
def test_context_vector_custom_ops_pass_opcheck(kind, multiply, path):
    """Under torch.compile ``context_bias`` and ``context_scale`` run as the custom ops
    ``bora_kernels::context_vector`` and ``context_vector_backward``."""
    from bora_kernels.ops.context_vector import _context_vector_backward_op, _context_vector_op

    gen = torch.Generator().manual_seed(9)
    u = torch.randn(6, 10, generator=gen, requires_grad=True)
    vectors = torch.randn(3, 10, generator=gen, requires_grad=True)
    context = torch.tensor([0, 2, -1]) if kind == "ids" else torch.rand(6, 3, generator=gen).requires_grad_()
    rows = 2 if kind == "ids" else 1
    with run_on(path):
        torch.library.opcheck(_context_vector_op, (u, vectors, context, kind == "ids", rows, multiply))
        dy = torch.randn(6, 10, generator=gen)
        torch.library.opcheck(_context_vector_backward_op, (dy, u.detach(), vectors.detach(), context.detach(),
                                                            kind == "ids", rows, multiply, True, True, kind != "ids"))


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("kind", ["ids", "weights"])
@pytest.mark.parametrize("op,reference", [(context_bias, context_bias_reference),
                                          (context_scale, context_scale_reference)], ids=["bias", "scale"])
def test_context_vector_takes_any_layout(op, reference, kind, path, poison_empty):
    """``u`` whose columns are strided, vectors stored transposed, and the incoming gradient of a
    ``.sum()`` (expanded: stride 0): the kernels read one stride per row, so these are laid out
    for them first (they read past the elements before)."""
    gen = torch.Generator().manual_seed(10)
    u = torch.randn(2, 3, 16, generator=gen)[..., ::2].requires_grad_()
    vectors = torch.randn(8, 2, generator=gen).T.requires_grad_()
    context = torch.tensor([[0, 1, -1], [1, 1, 0]]) if kind == "ids" else torch.rand(2, 3, 2, generator=gen)
    weights = one_hot_weights(context, (2, 3), 2) if kind == "ids" else context
    leaves = [u, vectors] + ([context.requires_grad_()] if kind == "weights" else [])
    with run_on(path):
        out = op(u, vectors, context)
        grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (u, vectors, weights)]
    ref = reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves[:len(leaves)])
    assert_close(out, ref, torch.float32, "output")
    for got, want, name in zip(grads, ref_grads, ["du", "dvectors", "dweights"]):
        assert_close(got, want, torch.float32, name)
