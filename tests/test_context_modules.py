"""Context-PEFT modules and model use: ContextLoRALinear, ContextBitFit and ContextIA3 against the
op references, ``inject(method=...)``, ``use_contexts`` (ids, weights, generate) and
``context_ids`` on tiny Hugging Face models built from configs."""

import contextlib
import importlib

import pytest
import torch
from torch import nn

import bora_kernels as bk
from bora_kernels.nn import ContextBitFit, ContextIA3, ContextLoRALinear, ContextRoute
from bora_kernels.ops.context_lora_delta.reference import context_lora_delta_reference, one_hot_weights
from bora_kernels.ops.context_vector.reference import context_bias_reference, context_scale_reference
from tests.conftest import cpu_backends, eager_and_compiled, run_on
from tests.tolerances import assert_close, rel_rms

transformers = pytest.importorskip("transformers")

LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = LLAMA_ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def _perturbed(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    """Trained-looking adapter parameters (fresh ones make the layer equal its base)."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return layer


def _layer_reference(layer, x, context):
    """The layer's output from the float64 op references."""
    base = layer.base_layer
    if isinstance(layer, ContextLoRALinear):
        scaling = torch.full((layer.num_contexts,), layer.scaling_value)
        return base(x).double() + context_lora_delta_reference(x, layer.lora_A, layer.lora_B, context, scaling)
    if isinstance(layer, ContextBitFit):
        return context_bias_reference(base(x), layer.context_bias, context)
    if layer.on == "input":
        scaled = context_scale_reference(x, layer.context_scale, context)
        return scaled @ base.weight.double().T + base.bias.double()
    return context_scale_reference(base(x), layer.context_scale, context)


LAYERS = [
    pytest.param(lambda base: ContextLoRALinear(base, 3, r=4, alpha=8), id="lora"),
    pytest.param(lambda base: ContextBitFit(base, 3), id="bitfit"),
    pytest.param(lambda base: ContextIA3(base, 3, on="output"), id="ia3-output"),
    pytest.param(lambda base: ContextIA3(base, 3, on="input"), id="ia3-input"),
]


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("context_kind", ["ids", "weights"])
@pytest.mark.parametrize("make", LAYERS)
def test_layer_matches_reference(make, context_kind, path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    layer = _perturbed(make(nn.Linear(20, 28)), gen)
    x = torch.randn(2, 11, 20, generator=gen, requires_grad=True)
    if context_kind == "ids":
        context = torch.randint(-1, 3, (2, 11), generator=gen)
    else:
        context = (torch.rand(2, 11, 3, generator=gen) < 0.6) * torch.rand(2, 11, 3, generator=gen)
    params = [p for p in layer.parameters() if p.requires_grad]
    with run_on(path):
        out = layer(x, context=context)
        ref = _layer_reference(layer, x, context)
        assert_close(out, ref, torch.float32, "forward")
        dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(out, [x, *params], dy.float())
        want = torch.autograd.grad(ref, [x, *params], dy)
    for g, w, name in zip(got, want, ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]):
        assert_close(g, w, torch.float32, f"d{name}")


@pytest.mark.parametrize("make", LAYERS)
def test_fresh_layer_equals_base_and_trains_only_adapters(make):
    base = nn.Linear(12, 10)
    layer = make(base)
    x = torch.randn(3, 12)
    ids = torch.tensor([0, 1, 2])
    assert torch.allclose(layer(x, context=ids), base(x), atol=1e-6)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert all(p.requires_grad for n, p in layer.named_parameters() if not n.startswith("base_layer"))
    assert layer.weight is base.weight and layer.bias is base.bias  # read through, as PEFT's layers


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_made_on_the_meta_device_then_loaded(how):
    """Big-model loading (see ``test_multi_lora_linear.py``): a layer made on the meta device
    gives the trained layer's output after ``to_empty`` + ``load_state_dict``, or after
    ``load_state_dict(assign=True)``; its scales (no state-dict entry) come back either way."""
    trained = _perturbed(ContextLoRALinear(nn.Linear(12, 10), 3, r=4), torch.Generator().manual_seed(0))
    with torch.device("meta"):
        layer = ContextLoRALinear(nn.Linear(12, 10), 3, r=4)
    if how == "to_empty":
        layer.to_empty(device="cpu").load_state_dict(trained.state_dict())
    else:
        layer.load_state_dict(trained.state_dict(), assign=True)
    x, ids = torch.randn(4, 12), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(layer(x, context=ids), trained(x, context=ids), rtol=0, atol=0)


@pytest.mark.parametrize("path", cpu_backends())
def test_evaluated_in_inference_mode_after_a_move_then_trains(path):
    """A layer moved to its device (here from the meta device, as ``.cuda()`` moves one), run
    first under ``torch.inference_mode()`` (an evaluation before training), then trained: no
    tensor made in inference mode is saved for backward."""
    with torch.device("meta"):
        layer = ContextLoRALinear(nn.Linear(12, 10), 3, r=4)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    ids = torch.tensor([0, 1, 2, 1])
    with run_on(path):
        with torch.inference_mode():
            evaluated = layer(torch.randn(4, 12), context=ids)
        x = torch.randn(4, 12, requires_grad=True)
        layer(x, context=ids).sum().backward()
    assert evaluated.isfinite().all() and layer.lora_A.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    return transformers.OPTForCausalLM(config).eval()


METHODS = [
    pytest.param(dict(method="context_lora", target_modules=LLAMA_ALL, r=4, alpha=8), id="lora"),
    pytest.param(dict(method="context_bitfit", target_modules=LLAMA_ALL), id="bitfit"),
    pytest.param(dict(method="context_ia3", target_modules=["k_proj", "v_proj", "down_proj"],
                      feedforward_modules=["down_proj"]), id="ia3"),
]


@pytest.mark.parametrize("kwargs", METHODS)
def test_injected_llama_trains_per_context(kwargs):
    model = bk.inject(tiny_llama(), num_adapters=2, **kwargs)
    layers = bk.model.context_layers(model)
    assert layers and all(p.requires_grad == (id(p) in {id(q) for m in layers.values() for n, q in m.named_parameters()
                                                         if not n.startswith("base_layer")})
                          for p in model.parameters())
    if kwargs["method"] == "context_ia3":
        assert {m.on for name, m in layers.items() if name.endswith("down_proj")} == {"input"}
        assert {m.on for name, m in layers.items() if name.endswith("k_proj")} == {"output"}
    assert "contexts" in bk.summary(model)
    gen = torch.Generator().manual_seed(1)
    for m in layers.values():
        _perturbed(m, gen)
    input_ids = torch.randint(0, 64, (2, 9), generator=gen)
    ids = bk.context_ids([(0, 1), (1, 4), (0, 4)], batch_size=2)
    with bk.use_contexts(model, ids):
        specific = model(input_ids).logits
        loss = specific.float().logsumexp(-1).mean()
        loss.backward()
    grads = [p.grad for p in bk.trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        with bk.use_contexts(model, bk.context_ids([(0, 1), (1, 4), (0, 4)], batch_size=2, agnostic=True)):
            agnostic = model(input_ids).logits
        with bk.use_contexts(model, 0):  # one id for everything is the same agnostic run
            agnostic_scalar = model(input_ids).logits
        with bk.use_contexts(model, one_hot_weights(ids, ids.shape, 2)):  # weights equal to the ids
            by_weights = model(input_ids).logits
        base = model(input_ids).logits  # no context: the base model
    assert torch.allclose(agnostic, agnostic_scalar, atol=1e-6)
    assert torch.allclose(by_weights, specific, atol=1e-5)
    assert not torch.allclose(agnostic, specific, atol=1e-3)
    assert not torch.allclose(base, specific, atol=1e-3)


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("kwargs", METHODS)
def test_inference_mode_forward_then_training_in_one_block(kwargs, path, monkeypatch):
    """An evaluation under ``torch.inference_mode()`` and a training step inside one
    ``use_contexts`` block: what the first call caches (the ops' constants, the route's plans) is
    not an inference tensor the second must save for backward."""
    ops = importlib.import_module("bora_kernels.ops.lora_delta")  # the module, not the op it exports
    monkeypatch.setattr(ops, "_CONSTANTS", {})  # as in a fresh process: made by the first call
    torch.manual_seed(0)
    model = bk.inject(tiny_llama(), num_adapters=3, **kwargs)
    ids = torch.randint(0, 64, (2, 6))
    with run_on(path), bk.use_contexts(model, torch.randint(0, 3, (2, 6))):
        with torch.inference_mode():
            model(ids)
        model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in bk.trainable_parameters(model))


def test_context_lora_agrees_with_multi_adapter_lora():
    """Per-token context ids through ContextLoRALinear equal the same adapters as LoRA adapters
    routed per token through MultiLoRALinear (an independently tested path)."""
    context_model = bk.inject(tiny_llama(), LLAMA_ATTENTION, num_adapters=3, r=4, alpha=8, method="context_lora")
    lora_model = bk.inject(tiny_llama(), LLAMA_ATTENTION, num_adapters=3, r=4, alpha=8)
    gen = torch.Generator().manual_seed(2)
    lora_layers = bk.model.adapter_layers(lora_model)
    for name, layer in bk.model.context_layers(context_model).items():
        _perturbed(layer, gen)
        for c in range(3):
            lora_layers[name].set_adapter(c, layer.lora_A[c].detach(), layer.lora_B[c].detach(), alpha=8)
    input_ids = torch.randint(0, 64, (2, 10), generator=gen)
    ids = torch.randint(-1, 3, (2, 10), generator=gen)
    with torch.no_grad(), bk.use_contexts(context_model, ids), bk.use_adapters(lora_model, ids):
        assert torch.allclose(context_model(input_ids).logits, lora_model(input_ids).logits, atol=1e-5)


def test_opt_sees_flattened_tokens():
    model = bk.inject(tiny_opt(), ["q_proj", "fc1", "fc2"], num_adapters=2, method="context_lora", r=2, alpha=4)
    gen = torch.Generator().manual_seed(3)
    for m in bk.model.context_layers(model).values():
        _perturbed(m, gen)
    input_ids = torch.randint(0, 64, (2, 7), generator=gen)
    ids = torch.randint(0, 2, (2, 7), generator=gen)
    with torch.no_grad(), bk.use_contexts(model, ids):
        by_ids = model(input_ids).logits
    with torch.no_grad(), bk.use_contexts(model, one_hot_weights(ids, ids.shape, 2)):
        by_weights = model(input_ids).logits
    assert torch.allclose(by_ids, by_weights, atol=1e-5)


@pytest.mark.parametrize("decode_context", ["last", 0])
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_generate_needs_a_decode_context(kind, decode_context):
    """Per-token contexts are longer than a decode step's input; OPT's MLP sees that input
    flattened to ``[B * 1]`` tokens."""
    make, targets = (tiny_llama, LLAMA_ATTENTION) if kind == "llama" else (tiny_opt, ["q_proj", "fc1", "fc2"])
    model = bk.inject(make(), targets, num_adapters=2, method="context_lora", r=2, alpha=4)
    gen = torch.Generator().manual_seed(4)
    for m in bk.model.context_layers(model).values():
        _perturbed(m, gen)
    input_ids = torch.randint(1, 64, (2, 6), generator=gen)
    ids = bk.context_ids([(1, 5), (0, 1)], batch_size=2)  # the last token is text: context 0
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with bk.use_contexts(model, ids):
        with pytest.raises(ValueError, match="decode_context"):
            model.generate(input_ids, **kwargs)
    with bk.use_contexts(model, ids, decode_context=decode_context):
        out = model.generate(input_ids, **kwargs)
    # the same greedy tokens by hand: each step runs the whole sequence, new tokens in context 0
    seq = input_ids
    with torch.no_grad():
        for _ in range(4):
            full = torch.cat([ids, torch.zeros(2, seq.shape[1] - 6, dtype=torch.long)], 1)
            with bk.use_contexts(model, full):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def _compile_case(method: str, kind: str, device: str):
    """A tiny Llama with Context-PEFT layers away from their identity start, input ids and a
    context (ids or weights), on ``device``."""
    kw = {"feedforward_modules": ["down_proj"]} if method == "context_ia3" else {}
    model = bk.inject(tiny_llama(), LLAMA_ALL, num_adapters=2, method=method, r=2, alpha=4, **kw)
    gen = torch.Generator().manual_seed(6)
    for m in bk.model.context_layers(model).values():
        _perturbed(m, gen)
    input_ids = torch.randint(0, 64, (2, 5), generator=gen)
    context = torch.randint(-1, 2, (2, 5), generator=gen) if kind == "ids" else torch.rand(2, 5, 2, generator=gen)
    return model.to(device), input_ids.to(device), context.to(device)


@pytest.mark.parametrize("path", cpu_backends())
@pytest.mark.parametrize("method,kind", [("context_lora", "ids"), ("context_bitfit", "weights"), ("context_ia3", "ids"),
                                         ("context_ia3", "weights")])
def test_compiles_without_graph_breaks(method, kind, path):
    """``torch.compile(fullgraph=True)`` of a Context-PEFT model: the ops run as custom ops (the
    tracer does not follow a kernel launch), and logits and gradients equal the eager run's.
    (Context-LoRA with float weights on the Triton path runs its passes eagerly: a graph break.)"""
    model, input_ids, context = _compile_case(method, kind, "cpu")

    @contextlib.contextmanager
    def route():
        with run_on(path), bk.use_contexts(model, context):
            yield

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    (expected, expected_grads), (got, grads) = eager_and_compiled(model, compiled, route, input_ids=input_ids)
    assert_close(got, expected.double(), torch.float32, "compiled logits")
    for g, e in zip(grads, expected_grads):
        assert_close(g, e.double(), torch.float32, "compiled grads")


@pytest.mark.gpu
@pytest.mark.parametrize("method,kind", [("context_lora", "ids"), ("context_bitfit", "weights"), ("context_ia3", "ids")])
def test_compiles_with_inductor_on_gpu(method, kind):
    """The CUDA version of the test above: inductor, the ops' custom ops on the Triton path."""
    model, input_ids, context = _compile_case(method, kind, "cuda")
    torch._dynamo.reset()
    (expected, expected_grads), (got, grads) = eager_and_compiled(
        model, torch.compile(model, fullgraph=True), lambda: bk.use_contexts(model, context), input_ids=input_ids)
    # against the eager fp32 run, not a float64 reference: inductor fuses and reorders fp32 sums
    assert rel_rms(got, expected) < 1e-4 and all(rel_rms(g, e) < 1e-4 for g, e in zip(grads, expected_grads))


def test_context_ids_layout():
    ids = bk.context_ids([(0, 1), (1, 3), (0, 2)])
    assert ids.tolist() == [0, 1, 1, 1, 0, 0]
    assert bk.context_ids([(0, 1), (1, 3)], batch_size=2, agnostic=True).tolist() == [[0] * 4] * 2
    assert bk.context_ids([(2, 2), (-1, 1)], agnostic=True).tolist() == [0, 0, -1]


@pytest.mark.parametrize("call,message", [
    (lambda: bk.inject(tiny_llama(), ["q_proj"], 2, method="prefix"), "method must be one of"),
    (lambda: bk.inject(tiny_llama(), ["q_proj"], 2, method="lora", feedforward_modules=["down_proj"]),
     "feedforward_modules applies"),
    (lambda: bk.inject(tiny_llama(), ["q_proj"], 0, method="context_bitfit"), "num_adapters"),
    (lambda: bk.use_contexts(tiny_llama(), 0).__enter__(), "no Context-PEFT layers"),
    (lambda: bk.use_contexts(bk.inject(tiny_llama(), ["q_proj"], 2), 0).__enter__(),
     "has LoRA adapter layers, not Context-PEFT layers: route .* with bora_kernels.use_adapters"),
    (lambda: bk.use_adapters(bk.inject(tiny_llama(), ["q_proj"], 2, method="context_ia3"), 0).__enter__(),
     "has Context-PEFT layers, not LoRA adapter layers: route .* with bora_kernels.use_contexts"),
    (lambda: bk.context_ids([(0, 1), ("image", 4)]), "layout must list"),
    (lambda: ContextRoute(torch.zeros(2, 3), 2), r"context weights must be float or bool \[..., 2\]"),
    (lambda: ContextRoute(torch.tensor([0, 5]), 2), "context must lie in"),
    (lambda: ContextRoute(torch.tensor([0, 1]), 2, decode_context="first"), "decode_context must be"),
    (lambda: ContextIA3(nn.Linear(3, 4), 2, on="middle"), "on must be"),
    (lambda: ContextLoRALinear(nn.Conv1d(3, 4, 1), 2), "base_layer must be an nn.Linear"),
], ids=["method", "ff-modules", "num-contexts", "no-layers", "lora-layers", "context-layers", "layout", "weights-shape", "ids-range",
        "decode-context", "ia3-on", "not-linear"])
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
