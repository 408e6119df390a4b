"""LoRA on token embeddings (``MultiLoRAEmbedding``, PEFT's LoRA ``Embedding`` layer): a batch
mixing adapters against a float64 reference (forward and every gradient, every CPU path, padding
and a scaled embedding), injection, merge (refused over a tied output head), checkpoints that
carry the base embedding, and bad input. Whole Llama, OPT and GPT-2 models with embedding
adapters against PEFT (mixed batches, gradients, generate, saving) are test_peft_interop's.

PEFT's trainable tokens (``trainable_token_indices``) on the same layer, and the tied output head
that follows them (``TiedTokenHead``): against PEFT on tied and untied Llamas (mixed batches on
every CPU path, every gradient, checkpoints both ways), injection, merge, generate, bad input."""

import copy
import json
import shutil

import pytest
import torch
from conftest import ROUTINGS, cpu_backends, eager_and_compiled, routed_forward, run_on
from tolerances import assert_close
from torch import nn

import bora_kernels as bk
from bora_kernels.nn import MultiLoRAEmbedding, TiedTokenHead
from bora_kernels.ops import lora_expand, lora_shrink

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
    with pytest.raises(ValueError, match=r"is an embedding's weight, but module '.*q_proj' is a linear layer"):
        bk.load_peft_adapters(tiny_llama(tied=True), {"bad": swapped})


@pytest.mark.parametrize("call, match", [
    (lambda: MultiLoRAEmbedding(nn.Linear(4, 4), 2), "base_layer must be an nn.Embedding"),
    (lambda: MultiLoRAEmbedding(nn.Embedding(V, H, max_norm=1.0), 2), "max_norm or scale_grad_by_freq"),
    (lambda: MultiLoRAEmbedding(nn.Embedding(V, H), 2, use_dora=[False, True]), "use_dora is not supported"),
    (lambda: make_layer().set_adapter(0, torch.zeros(2, V), torch.zeros(H, 2), magnitude=torch.ones(H)),
     "no DoRA magnitude or lora_bias"),
    (lambda: make_layer()(torch.zeros(2, 3, 4, dtype=torch.long), torch.tensor([0, 1])), r"token ids \[T\] or \[B, L\]"),
    (lambda: lora_expand(torch.zeros(3, 5), torch.zeros(2, H, 4), torch.tensor([0, 1, 1])), r"R=4"),
    (lambda: lora_shrink(torch.zeros(3, 5), torch.zeros(2, 4), torch.tensor([0, 1, 1])), r"lora_a must be \[D, R, K\]"),
    (lambda: make_layer().set_adapter(0, None, None, tokens=([1, 1], None)), "distinct ints"),
    (lambda: make_layer().set_adapter(0, None, None, tokens=([V], None)), r"in \[0, 50\)"),
    (lambda: make_layer().set_adapter(0, None, None, tokens=([1, 2], torch.zeros(2, H + 1))), r"rows must be \[2, 24\]"),
    (lambda: make_layer().set_adapter(0, torch.zeros(2, V), torch.zeros(H, 2), tokens=([1], None)), "not both"),
], ids=["linear_base", "max_norm", "dora", "set_magnitude", "ids_3d", "expand_rank", "shrink_a", "token_repeated",
        "token_range", "token_rows", "tokens_and_lora"])
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


# --- trainable tokens ------------------------------------------------------------------------

TOKEN_SETS = {"t0": [5, 9, 60], "t1": [9, 11]}  # overlapping: one id, two adapters' own rows
TOKEN_ROUTE = ["t0", "t1", None, "lora", "t0"]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def token_folders(request, tmp_path_factory):
    """``(tied, {name: folder}, {name: PeftModel})``: two PEFT adapters with trainable tokens
    (moved off the base rows) and LoRA on q_proj, and one with LoRA alone."""
    peft = pytest.importorskip("peft")
    tied = request.param
    folders, models = {}, {}
    for i, name in enumerate([*TOKEN_SETS, "lora"]):
        torch.manual_seed(30 + i)
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                                 trainable_token_indices=TOKEN_SETS.get(name))
        model = peft.get_peft_model(tiny_llama(tied=tied), config)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "trainable_tokens_delta" in key:
                    p.normal_()
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        models[name] = model
    return tied, folders, models


TOKEN_INPUT = torch.tensor([[5, 9, 60, 11, 3, 9], [9, 11, 5, 1, 2, 60], [5, 9, 11, 60, 7, 9], [9, 11, 5, 60, 4, 4],
                            [60, 60, 9, 5, 11, 0]])


@pytest.mark.parametrize("backend", cpu_backends())
def test_trainable_tokens_equal_peft_in_a_mixed_batch(token_folders, backend):
    tied, folders, models = token_folders
    model = bk.load_peft_adapters(tiny_llama(tied=tied), folders)
    assert isinstance(model.lm_head, TiedTokenHead) == tied, "a tied head follows the tokens"
    assert "t0:r=4+3 tokens" in bk.summary(model) and "lora:r=4]" in bk.summary(model)
    with run_on(backend), torch.no_grad(), bk.use_adapters(model, TOKEN_ROUTE):
        logits = model(input_ids=TOKEN_INPUT).logits
    for i, name in enumerate(TOKEN_ROUTE):
        with torch.no_grad():
            theirs = (models[name] if name else tiny_llama(tied=tied))(input_ids=TOKEN_INPUT[i:i + 1]).logits
        assert_close(logits[i:i + 1], theirs, torch.float32, f"sequence {i} ({name})")


def test_trainable_tokens_gradients_equal_peft(token_folders):
    tied, folders, models = token_folders
    model = bk.load_peft_adapters(tiny_llama(tied=tied), folders)
    with bk.use_adapters(model, TOKEN_ROUTE):
        model(input_ids=TOKEN_INPUT, labels=TOKEN_INPUT).loss.backward()
    embedding = model.get_input_embeddings()
    for d, name in enumerate(TOKEN_SETS):
        rows = [i for i, n in enumerate(TOKEN_ROUTE) if n == name]
        theirs = models[name]
        theirs.zero_grad()
        # the same loss: the mean over the whole batch's shifted tokens, of this adapter's rows only
        logits = theirs(input_ids=TOKEN_INPUT[rows]).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), TOKEN_INPUT[rows, 1:].reshape(-1),
                                          reduction="sum").div(TOKEN_INPUT[:, 1:].numel()).backward()
        delta = theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
        k = len(TOKEN_SETS[name])
        assert_close(embedding.token_values.grad[d, :k], delta.grad, torch.float32, f"{name} token rows")
        assert (embedding.token_values.grad[d, k:] == 0).all()


def test_trainable_tokens_save_and_load_both_ways(token_folders, tmp_path):
    peft = pytest.importorskip("peft")
    tied, folders, _ = token_folders
    model = bk.load_peft_adapters(tiny_llama(tied=tied), folders)
    with torch.no_grad():
        model.get_input_embeddings().token_values.mul_(1.5)  # ours, not the loaded ones, must be saved
        with bk.use_adapters(model, "t1"):
            ours = model(input_ids=TOKEN_INPUT).logits
    saved = bk.save_peft_adapter(model, "t1", tmp_path / "t1")
    assert json.loads((saved / "adapter_config.json").read_text())["trainable_token_indices"] == TOKEN_SETS["t1"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(tied=tied), saved).eval()
    with torch.no_grad():
        assert_close(theirs(input_ids=TOKEN_INPUT).logits, ours, torch.float32, "saved for PEFT")


def test_injected_tokens_start_at_the_base_rows_train_and_merge():
    model = bk.inject(tiny_llama(), ["q_proj"], 2, r=4, trainable_token_indices=[[3, 7], [7]])
    embedding = model.get_input_embeddings()
    assert embedding.token_indices == [(3, 7), (7,)] and embedding.rank_values == [0, 0]
    assert not isinstance(model.lm_head, TiedTokenHead), "an untied head is left alone"
    x = torch.tensor([[3, 7, 1, 7], [7, 3, 3, 2]])
    with torch.no_grad():
        base = model(input_ids=x).logits
        with bk.use_adapters(model, [0, 1]):
            assert torch.equal(model(input_ids=x).logits, base), "fresh tokens are the base rows (PEFT's init)"
    optimizer = torch.optim.SGD(bk.trainable_parameters(model), lr=1.0)
    with bk.use_adapters(model, [0, 1]):
        model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    assert embedding.token_values.grad[0, :2].abs().sum() > 0 and embedding.token_values.grad[1, 0].abs().sum() > 0
    with torch.no_grad(), bk.use_adapters(model, [1, 1]):
        routed = model(input_ids=x).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bk.merge_adapter(model, 1)
    with torch.no_grad():
        assert_close(model(input_ids=x).logits, routed, torch.float32, "merged tokens")
    bk.unmerge_adapter(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "unmerge is exact"
    plain = bk.merge_and_unload(model, 1)
    assert type(plain.get_input_embeddings()) is nn.Embedding and not bk.model.adapter_layers(plain)
    with torch.no_grad():
        assert_close(plain(input_ids=x).logits, routed, torch.float32, "merged and unloaded")
    tied = bk.inject(tiny_llama(tied=True), ["q_proj"], 1, trainable_token_indices=[3])
    assert isinstance(tied.lm_head, TiedTokenHead) and tied.lm_head.weight is tied.get_input_embeddings().weight
    prompts = torch.tensor([[3, 4, 5], [6, 3, 1]])
    with torch.no_grad():
        tied.get_input_embeddings().token_values.normal_()
        with bk.use_adapters(tied, [0, None]):
            mixed = tied.generate(input_ids=prompts, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        for i, name in enumerate([0, None]):
            with bk.use_adapters(tied, name):
                alone = tied.generate(input_ids=prompts[i:i + 1], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      pad_token_id=0)
            assert torch.equal(mixed[i:i + 1], alone)
    with pytest.raises(ValueError, match="tied to"):
        bk.merge_adapter(tied, 0)


def test_trainable_tokens_under_torch_compile_without_graph_breaks():
    """A tied Llama (the head follows the tokens) compiled with ``fullgraph=True``: logits and the
    token rows' gradients equal eager ones, for two routes."""
    model = bk.inject(tiny_llama(tied=True), ["q_proj"], 3, r=[2, 4, 8], trainable_token_indices=[[3, 5], [5], [7, 9]])
    with torch.no_grad():
        model.get_input_embeddings().token_values.normal_()
    input_ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(7))
    input_ids[:, 0] = 5
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    for route in ([0, 1, None, 2], [2, 2, 0, 1]):
        (eager, eager_grads), (got, grads) = eager_and_compiled(model, compiled, lambda: bk.use_adapters(model, route),
                                                                input_ids=input_ids)
        assert_close(got, eager, torch.float32, "compiled logits")
        for g, e in zip(grads, eager_grads):
            assert_close(g, e, torch.float32, "compiled grads")


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["q_proj", "embed_tokens"]), "a LoRA target and would hold trainable tokens too"),
    (dict(trainable_token_indices=[[1], [2], [3]]), "one list of int token ids, or 2 lists"),
    (dict(trainable_token_indices=[1.5]), "one list of int token ids"),
    (dict(trainable_token_indices=[[1], 2]), "a non-empty list of token ids, or one list per adapter"),
    (dict(trainable_token_indices=3), "a non-empty list of token ids, or one list per adapter"),
    (dict(trainable_token_indices=[64]), r"in \[0, 64\)"),
    (dict(method="context_lora"), "trainable_token_indices applies to method='lora' only"),
], ids=["lora_and_tokens", "per_adapter_count", "not_ints", "mixed", "not_a_list", "out_of_range", "context"])
def test_bad_trainable_token_arguments_change_nothing(kwargs, match):
    model = tiny_llama(tied=True)
    kwargs = dict(target_modules=["q_proj"], trainable_token_indices=[1]) | kwargs
    with pytest.raises(ValueError, match=match):
        bk.inject(model, kwargs.pop("target_modules"), 2, **kwargs)
    assert not bk.model.adapter_layers(model) and type(model.lm_head) is nn.Linear, "left as it was"


def test_bad_trainable_token_checkpoints(token_folders, tmp_path):
    _, folders, _ = token_folders
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"

    def moved(tensors):
        tensors[key.replace("embed_tokens", "layers.0.self_attn.v_proj")] = tensors.pop(key)
        return tensors

    cases = [(dict(config={"trainable_token_indices": [5, 9]}), r"has shape \(3, 32\), but trainable_token_indices lists 2"),
             (dict(config={"trainable_token_indices": {"lm_head": [5, 9, 60]}}), "gives no list of token ids for module"),
             (dict(change=moved), r"is an embedding's weight, but module '.*v_proj' is a linear layer"),
             (dict(change=lambda t: {k: v for k, v in t.items() if k != key}), "holds no token_adapter")]
    for i, (how, match) in enumerate(cases):
        model = tiny_llama()
        with pytest.raises(ValueError, match=match):
            bk.load_peft_adapters(model, {"bad": _rewritten(folders["t0"], tmp_path / str(i), **how)})
        assert not bk.model.adapter_layers(model), "a refused adapter leaves the model as it was"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainable_tokens_on_gpu(dtype):
    """A tied Llama with trainable tokens and LoRA, mixed batch on the GPU (Triton kernels) against
    the CPU's torch path in fp32: logits and the token rows' gradients."""
    from bora_kernels.ops import use_backend

    model = bk.inject(tiny_llama(tied=True), ["q_proj"], 3, r=[2, 4, 8], trainable_token_indices=[[3, 5], [5], [7, 9]])
    with torch.no_grad():
        model.get_input_embeddings().token_values.normal_()
    input_ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(7))
    input_ids[:, :2] = torch.tensor([5, 9])
    results = []
    for device, run_dtype, backend in (("cuda", dtype, None), ("cpu", torch.float32, "torch")):
        copy_ = copy.deepcopy(model).to(device, run_dtype)
        with use_backend(backend), bk.use_adapters(copy_, [0, 2, None]):
            logits = copy_(input_ids=input_ids.to(device)).logits
            logits.float().square().mean().backward()
        results.append((logits.cpu(), copy_.get_input_embeddings().token_values.grad.cpu()))
    (logits, grad), (want, want_grad) = results
    assert_close(logits, want, dtype, "logits")
    assert_close(grad, want_grad, dtype, "token rows' gradient")
