"""``torch.autocast``: the ops that multiply matrices (``lora_delta``, ``context_lora_delta``,
``nf4_matmul``) cast their float inputs to autocast's dtype, as ``F.linear`` does, and every op
keeps its own precision inside, forward and backward (a backward run inside an autocast region
included); on both CPU paths and, with ``-m gpu``, on CUDA. Models: LoRA against PEFT and QLoRA
against its dequantized model under autocast are in test_peft_interop and test_nf4_modules."""

import contextlib

import pytest
import torch

import bora_kernels as bk
from bora_kernels.ops import context_bias, context_lora_delta, context_scale, lora_delta, nf4_matmul
from bora_kernels.quant import quantize_nf4
from tests.conftest import cpu_backends, eager_and_compiled, run_on
from tests.tolerances import assert_close, rel_rms

transformers = pytest.importorskip("transformers")

AMP_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
PLACES = [*cpu_backends(), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _case(name: str, device: str):
    """``(call, leaves, cast)``: the op as a function of its differentiable inputs, those inputs
    (leaves), and how many of the first ones autocast casts."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    ids = torch.tensor([1, -1, 0, 2], device=device)
    scaling = torch.tensor([0.5, 2.0, 1.0], device=device)
    soft = torch.rand(4, 5, 3, generator=g).mul_(torch.rand(4, 5, 3, generator=g) > 0.4).to(device)
    if name == "lora_delta":
        return (lambda x, a, b: lora_delta(x, a, b, ids, scaling)), [rand(4, 5, 40), rand(3, 8, 40), rand(3, 24, 8)], 3
    if name == "lora_delta-add_to":  # add_to keeps its own dtype (fp32 here)
        return ((lambda x, a, b, u: lora_delta(x, a, b, ids, scaling, add_to=u * 1.0)),
                [rand(4, 5, 40), rand(3, 8, 40), rand(3, 24, 8), rand(4, 5, 24)], 3)
    if name == "context_lora_delta-ids":
        return ((lambda x, a, b: context_lora_delta(x, a, b, ids, scaling)),
                [rand(4, 5, 40), rand(3, 8, 40), rand(3, 24, 8)], 3)
    if name == "context_lora_delta-weights":  # multi-hot weights, differentiable too (not cast)
        return ((lambda x, a, b, w: context_lora_delta(x, a, b, w, scaling)),
                [rand(4, 5, 40), rand(3, 8, 40), rand(3, 24, 8), soft.clone().requires_grad_()], 3)
    if name == "nf4_matmul":
        weight = quantize_nf4(torch.randn(24, 128, generator=g).to(device), blocksize=64)
        return (lambda x, bias: nf4_matmul(x, weight, bias)), [rand(4, 5, 128), rand(24)], 2
    vectors = 1.0 + 0.1 * torch.randn(3, 24, generator=g)  # an elementwise op: nothing is cast
    op = context_bias if name == "context_bias" else context_scale
    return ((lambda u, v, w: op(u, v, w)),
            [rand(4, 5, 24, dtype=torch.bfloat16), vectors.to(device).requires_grad_(), soft.clone().requires_grad_()], 0)


OPS = ["lora_delta", "lora_delta-add_to", "context_lora_delta-ids", "context_lora_delta-weights", "nf4_matmul",
       "context_bias", "context_scale"]


def _on(place: str):
    """Ops run on one of ``cpu_backends()``, or on CUDA (its one path)."""
    return run_on(place) if place != "cuda" else contextlib.nullcontext()


def _grads(out, leaves, dy, amp=None):
    with torch.autocast(out.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return torch.autograd.grad(out, leaves, dy, retain_graph=True)


def _assert_equal(got, want, what, rounded_to=None):
    """Equal tensors, or within ``rounded_to``'s tolerance (see below)."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, f"{what} [{i}]: {g.dtype} != {w.dtype}"
        if rounded_to is None:
            assert torch.equal(g, w), f"{what} [{i}]: relative RMS {rel_rms(g, w):.1e}"
        else:
            assert_close(g, w, rounded_to, f"{what} [{i}]")


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("name", OPS)
def test_op_follows_autocast(poison_empty, place, amp, name):
    device = "cuda" if place == "cuda" else "cpu"
    call, leaves, cast = _case(name, device)
    with _on(place):
        with torch.autocast(device, dtype=amp):
            got = call(*leaves)
        want = call(*[t.to(amp) for t in leaves[:cast]], *leaves[cast:])  # cast by hand, no autocast
        # the product in autocast's dtype; add_to and an elementwise op's input keep theirs
        assert got.dtype == want.dtype == (leaves[-1].dtype if "add_to" in name else amp if cast else leaves[0].dtype)
        assert torch.equal(got, want), f"output: relative RMS {rel_rms(got, want):.1e}"
        dy = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(got)
        want_grads = _grads(want, leaves, dy)
        assert all(g.dtype == t.dtype for g, t in zip(want_grads, leaves))  # fp32 leaves get fp32 gradients
        _assert_equal(_grads(got, leaves, dy), want_grads, "gradients")
        # The torch path's masked Context-PEFT form differentiates through torch's own products,
        # which a backward run inside an autocast region rounds to its dtype, as in any torch model
        # (torch advises against such a backward); every other path's backward is ours and exact.
        rounded = amp if name.startswith("context_lora_delta") and place.startswith("torch") else None
        _assert_equal(_grads(got, leaves, dy, amp), want_grads, "gradients, backward inside autocast", rounded)
        # outside autocast the op runs in its inputs' dtype; a backward inside a region keeps it
        plain = call(*leaves)
        dy = dy.to(plain.dtype)
        _assert_equal(_grads(plain, leaves, dy, amp), _grads(plain, leaves, dy), "fp32 call, backward inside autocast",
                      rounded)


CONTEXT_METHODS = [
    pytest.param(dict(method="context_lora", r=4, alpha=8), id="lora"),
    pytest.param(dict(method="context_bitfit"), id="bitfit"),
    pytest.param(dict(method="context_ia3", target_modules=["k_proj", "v_proj", "down_proj"],
                      feedforward_modules=["down_proj"]), id="ia3"),
]


def _llama(device="cpu"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(device).eval()


def _context_model(kwargs, device="cpu"):
    model = bk.inject(_llama(device), kwargs.get("target_modules", "all-linear"), 2,
                      **{k: v for k, v in kwargs.items() if k != "target_modules"})
    gen = torch.Generator().manual_seed(1)
    for p in bk.trainable_parameters(model):  # away from the identity, as after training
        p.data.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.device))
    return model


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kwargs", CONTEXT_METHODS)
def test_context_peft_model_trains_under_autocast(kwargs, place):
    """A Context-PEFT Llama under bf16 autocast: logits in bf16, and logits and every trainable
    gradient (fp32) near the fp32 run's, at bf16's rounding."""
    device = "cuda" if place == "cuda" else "cpu"
    model = _context_model(kwargs, device)
    input_ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2)).to(device)
    context = bk.context_ids([(0, 1), (1, 4), (0, 4)], batch_size=2).to(device)
    runs = []
    for amp in (False, True):
        model.zero_grad()
        with _on(place), bk.use_contexts(model, context), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids).logits
        logits.float().logsumexp(-1).mean().backward()
        runs.append((logits, [p.grad.clone() for p in bk.trainable_parameters(model)]))
    (want, want_grads), (got, grads) = runs
    assert got.dtype == torch.bfloat16
    assert rel_rms(got, want) < 2e-2
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == torch.float32 and rel_rms(g, w) < 5e-2, f"gradient {i}: {rel_rms(g, w):.1e}"


def test_compiles_under_autocast():
    """``torch.compile(fullgraph=True)`` of a QLoRA model (``lora_delta`` over ``nf4_matmul``)
    traced inside an autocast region: the ops' casts and autocast-free insides trace, and the
    compiled run equals the eager one up to the adds the compiled graph does separately (one bf16
    rounding more)."""
    model = bk.inject(_llama(), "all-linear", 3, r=4, quantize="nf4")
    for p in bk.trainable_parameters(model):
        p.data.normal_(0.0, 0.1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    input_ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(3))

    def route():
        return bk.use_adapters(model, torch.tensor([0, 2, -1, 1]))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        (eager, eager_grads), (comp, comp_grads) = eager_and_compiled(model, compiled, route, input_ids=input_ids)
    assert eager.dtype == comp.dtype == torch.bfloat16
    assert rel_rms(comp, eager) < 3e-2
    for g, w in zip(comp_grads, eager_grads):
        assert g.dtype == torch.float32 and rel_rms(g, w) < 5e-2
