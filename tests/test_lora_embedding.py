"""LoRA on token embeddings (``MultiLoRAEmbedding``, PEFT's LoRA ``Embedding`` layer): a batch
mixing adapters against a float64 reference (forward and every gradient, every CPU path, padding
and a scaled embedding), injection, merge (refused over a tied output head), checkpoints that
carry the base embedding, and bad input. Whole Llama, OPT and GPT-2 models with embedding
adapters against PEFT (mixed batches, gradients, generate, saving) are test_peft_interop's."""

import copy
import json
import shutil

import pytest
import torch
from conftest import ROUTINGS, cpu_backends, routed_forward, run_on
from tolerances import assert_close
from torch import nn

import bora_kernels as bk
from bora_kernels.nn import MultiLoRAEmbedding
from bora_kernels.ops import lora_expand

V, H, PAD = 50, 24, 3
RANKS, ALPHAS, RSLORA = (4, 8, 0, 3), (8, 16, 4, 6), (False, True, False, False)  # adapter 2 absent here


class ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output, as Gemma's (``embed_scale``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(H ** 0.5), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale


def make_layer(base="plain", seed=0):
    """A and B moved off PEFT's initial values (A is zero there)."""
    torch.manual_seed(seed)
    embedding = ScaledEmbedding(V, H) if base == "scaled" else nn.Embedding(V, H, padding_idx=PAD)
    layer = MultiLoRAEmbedding(embedding, len(RANKS), r=list(RANKS), alpha=list(ALPHAS), use_rslora=list(RSLORA))
    with torch.no_grad():
        for d, r in enumerate(RANKS):
            layer.lora_A[d, :r].normal_()
    return layer


def reference(layer, x, ids):
    """float64, token by token: ``W[t] + s_d B_d A_d[:, t]`` (``W[t]`` for -1 and rank 0), times the
    base's ``embed_scale``; A's column at the padding index is a constant, as F.embedding's."""
    scale = float(getattr(layer.base_layer, "embed_scale", 1.0))
    w = layer.base_layer.weight.double()
    out = []
    for t, d in zip(x.reshape(-1).tolist(), ids.reshape(-1).tolist()):
        y = w[t]
        if d >= 0 and layer.rank_values[d]:
            r = layer.rank_values[d]
            column = layer.lora_A[d, :r, t].double()
            column = column.detach() if t == layer.padding_idx else column
            y = y + layer.scaling_values[d] * layer.lora_B[d, :, :r].double() @ column
        out.append(y * scale)
    return torch.stack(out).reshape(*x.shape, H)


TOKENS = torch.tensor([[5, PAD, 7, 7, 49], [0, 12, PAD, 33, 5], [20, 21, 22, 23, PAD]])
TOKEN_IDS = torch.tensor([[0, 1, -1, 3, 2], [3, 3, 0, -1, 1], [1, 0, 1, 3, -1]])
SEQUENCE_IDS = torch.tensor([1, -1, 3])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("how", ROUTINGS)
@pytest.mark.parametrize("base", ["plain", "scaled"])
def test_mixed_batch_forward_and_gradients(backend, how, base, poison_empty):
    layer = make_layer(base)
    dy = torch.randn(3, 5, H)
    with run_on(backend):
        out, token_ids = routed_forward(layer, TOKENS, TOKEN_IDS, SEQUENCE_IDS, how, (3, 5))
        (out * dy).sum().backward()
    ref_layer = copy.deepcopy(layer)
    ref_layer.lora_A.grad = ref_layer.lora_B.grad = None
    want = reference(ref_layer, TOKENS, token_ids)
    (want * dy.double()).sum().backward()
    assert_close(out, want, torch.float32, "forward")
    for name in ("lora_A", "lora_B"):
        ref = getattr(ref_layer, name).grad
        assert_close(getattr(layer, name).grad, torch.zeros_like(getattr(layer, name)) if ref is None else ref,
                     torch.float32, f"d{name}")
    if base == "plain":
        assert (layer.lora_A.grad[..., PAD] == 0).all(), "the padding index's column of A gets no gradient"


def test_fresh_layer_equals_its_base_and_trains():
    """PEFT's initialisation (A zero, B normal): a fresh adapter adds nothing, yet A gets a gradient."""
    torch.manual_seed(1)
    layer = MultiLoRAEmbedding(nn.Embedding(V, H), 2, r=4)
    x, ids = torch.randint(0, V, (2, 6)), torch.tensor([0, 1])
    assert torch.equal(layer(x, ids), layer.base_layer(x))
    layer(x, ids).square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and (layer.lora_B.grad == 0).all()


def tiny_llama(tied=False, hidden=32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def _randomized(model):
    with torch.no_grad():
        for layer in bk.model.adapter_layers(model).values():
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
    return model


def test_inject_wraps_embeddings_for_lora_only():
    model = bk.inject(tiny_llama(hidden=64), ["embed_tokens", "q_proj"], 2, r=4, quantize="nf4")
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, MultiLoRAEmbedding) and isinstance(embedding.base_layer, nn.Embedding), \
        "the embedding is wrapped, never quantized"
    assert (embedding.num_embeddings, embedding.embedding_dim) == (64, 64)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bk.nn.NF4Linear)
    assert "2 LoRA layers x 2 adapters" in bk.summary(model)
    everything = bk.inject(tiny_llama(), "all-linear", 1)
    assert not isinstance(everything.get_input_embeddings(), MultiLoRAEmbedding), "all-linear means linear layers"
    for kwargs, match in ((dict(method="context_lora"), "only nn.Linear and GPT-2's Conv1D layers can take these"),
                          (dict(use_dora=True), "use_dora is not supported on an embedding layer"),
                          (dict(lora_bias=[False, True]), "lora_bias is not supported on an embedding layer")):
        model = tiny_llama()
        with pytest.raises(ValueError, match=match):
            bk.inject(model, ["embed_tokens", "q_proj"], 2, **kwargs)
        assert not bk.model.adapter_layers(model) and not bk.model.context_layers(model), "left as it was"


def test_generate_and_merge_with_an_embedding_adapter():
    model = _randomized(bk.inject(tiny_llama(), ["embed_tokens", "v_proj"], 2, r=4, adapter_names=["a", "b"]))
    prompts = torch.randint(1, 64, (3, 4), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with bk.use_adapters(model, ["b", None, "a"]):
            mixed = model.generate(input_ids=prompts, **kwargs)
            logits = model(input_ids=prompts).logits
        for i, name in enumerate(["b", None, "a"]):
            with bk.use_adapters(model, name):
                assert torch.equal(model.generate(input_ids=prompts[i:i + 1], **kwargs), mixed[i:i + 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bk.merge_adapter(model, "a")
    with torch.no_grad():
        assert_close(model(input_ids=prompts[2:]).logits, logits[2:], torch.float32, "merged")
    bk.unmerge_adapter(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "unmerge is exact"


def test_merge_is_refused_over_a_tied_output_head():
    model = _randomized(bk.inject(tiny_llama(tied=True), ["embed_tokens", "q_proj"], 2, r=4))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"base weight of 'model\.embed_tokens' is tied to \['lm_head\.weight'\]"):
        bk.merge_adapter(model, 0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "no layer was merged"
    assert all(m.merged is None for m in bk.model.adapter_layers(model).values())


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """A PEFT adapter on the embedding and q_proj of a tied Llama (PEFT saves the base embedding
    beside it), and PEFT's logits with it."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_llama(tied=True), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                       target_modules=["embed_tokens", "q_proj"]))
    folder = tmp_path_factory.mktemp("embedding")
    model.save_pretrained(folder)
    input_ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return folder, input_ids, model(input_ids=input_ids).logits


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _rewritten(source, folder, change=None, config=None):
    """A copy of PEFT folder ``source`` whose tensors went through ``change`` and config through ``config``."""
    from safetensors.torch import save_file

    shutil.copytree(source, folder)
    tensors = _tensors(source)
    save_file(change(tensors) if change else tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(json.loads((source / "adapter_config.json").read_text())
                                                           | (config or {})))
    return folder


BASE_KEY = "base_model.model.model.embed_tokens.base_layer.weight"


def test_checkpoints_carrying_the_base_embedding(peft_folder, tmp_path):
    """PEFT's folder holds the base embedding too: it loads when it is the model's own, and is
    refused, naming the key, when the adapter was trained over another (the model untouched)."""
    folder, input_ids, logits = peft_folder
    assert BASE_KEY in _tensors(folder)
    model = bk.load_peft_adapters(tiny_llama(tied=True), {"emb": folder})
    with torch.no_grad(), bk.use_adapters(model, "emb"):
        assert_close(model(input_ids=input_ids).logits, logits, torch.float32, "loaded")
    saved = bk.save_peft_adapter(model, "emb", tmp_path / "saved")
    assert {k.rsplit(".", 1)[-1] for k in _tensors(saved) if "embed_tokens" in k} == \
        {"lora_embedding_A", "lora_embedding_B"}

    def changed(tensors):
        tensors[BASE_KEY] = tensors[BASE_KEY] + 1e-3
        return tensors

    def resized(tensors):
        tensors[BASE_KEY] = torch.cat([tensors[BASE_KEY], tensors[BASE_KEY][:2]])
        return tensors

    def moved(tensors):  # an embedding's A and B put at a linear layer
        for part in "AB":
            key = f"base_model.model.model.embed_tokens.lora_embedding_{part}"
            tensors[key.replace("model.embed_tokens.lora_embedding", "model.layers.0.self_attn.v_proj.lora")
                    + ".weight"] = tensors.pop(key)
        return tensors

    cases = [(dict(change=changed), r"'model\.embed_tokens\.base_layer\.weight' is a whole weight .* other values"),
             (dict(change=resized), r"\(66, 32\) against \(64, 32\)"),
             (dict(change=moved), r"v_proj\.lora_A\.weight has shape \(4, 64\)"),
             (dict(config={"use_dora": True}), r"use_dora is set, and embedding 'model\.embed_tokens'")]
    for i, (how, match) in enumerate(cases):
        model = tiny_llama(tied=True)
        with pytest.raises(ValueError, match=match):
            bk.load_peft_adapters(model, {"bad": _rewritten(folder, tmp_path / str(i), **how)})
        assert not bk.model.adapter_layers(model), "a refused adapter leaves the model as it was"
    swapped = _rewritten(folder, tmp_path / "swapped", change=lambda t: {
        k.replace("self_attn.q_proj.lora_", "self_attn.q_proj.lora_embedding_").replace(".weight", ""): v
        for k, v in t.items() if k != BASE_KEY})
    with pytest.raises(ValueError, match=r"is an embedding's LoRA weight, but module '.*q_proj' is a linear layer"):
        bk.load_peft_adapters(tiny_llama(tied=True), {"bad": swapped})


@pytest.mark.parametrize("call, match", [
    (lambda: MultiLoRAEmbedding(nn.Linear(4, 4), 2), "base_layer must be an nn.Embedding"),
    (lambda: MultiLoRAEmbedding(nn.Embedding(V, H, max_norm=1.0), 2), "max_norm or scale_grad_by_freq"),
    (lambda: MultiLoRAEmbedding(nn.Embedding(V, H), 2, use_dora=[False, True]), "use_dora is not supported"),
    (lambda: make_layer().set_adapter(0, torch.zeros(2, V), torch.zeros(H, 2), magnitude=torch.ones(H)),
     "no DoRA magnitude or lora_bias"),
    (lambda: make_layer()(torch.zeros(2, 3, 4, dtype=torch.long), torch.tensor([0, 1])), r"token ids \[T\] or \[B, L\]"),
    (lambda: lora_expand(torch.zeros(3, 5), torch.zeros(2, H, 4), torch.tensor([0, 1, 1])), r"R=4"),
], ids=["linear_base", "max_norm", "dora", "set_magnitude", "ids_3d", "expand_rank"])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_on_gpu(dtype):
    from bora_kernels.ops import use_backend

    layer = make_layer().to("cuda", dtype)
    dy = torch.randn(3, 5, H, device="cuda", dtype=dtype)
    with use_backend(None):
        out = layer(TOKENS.cuda(), TOKEN_IDS.cuda())
        (out * dy).sum().backward()
    ref_layer = copy.deepcopy(layer).cpu()
    ref_layer.lora_A.grad = ref_layer.lora_B.grad = None
    want = reference(ref_layer, TOKENS, TOKEN_IDS)
    (want * dy.cpu().double()).sum().backward()
    assert_close(out.cpu(), want, dtype, "forward")
    assert_close(layer.lora_A.grad.cpu(), ref_layer.lora_A.grad, dtype, "dlora_A")
    assert_close(layer.lora_B.grad.cpu(), ref_layer.lora_B.grad, dtype, "dlora_B")
