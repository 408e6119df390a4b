"""Hugging Face models with PEFT adapters: injection, routing, checkpoints both ways, merge,
generate, training gradients and torch.compile, against PEFT itself (tiny models from configs)."""

import contextlib
import copy
import json

import pytest
import torch

import bora_kernels as bk
from bora_kernels.ops import use_backend
from tests.conftest import cpu_backends, run_on
from tests.tolerances import assert_close, rel_rms

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
LoraConfig, PeftModel, get_peft_model = peft.LoraConfig, peft.PeftModel, peft.get_peft_model

VOCAB = 64
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# four adapters that differ in rank, alpha, rsLoRA, DoRA, patterns and target modules (the token
# embedding too: untied in Llama, tied to the output head in OPT and GPT-2), per model
ADAPTERS = {
    "llama": {
        "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "beta": dict(r=8, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=LLAMA_ALL),
        "gamma": dict(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|down_proj)", rank_pattern={"down_proj": 6},
                      alpha_pattern={"q_proj": 3}, use_dora=True),
        "delta": dict(r=16, lora_alpha=32, target_modules="all-linear", exclude_modules=["o_proj"]),
    },
    "opt": {
        "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "beta": dict(r=8, lora_alpha=16, use_rslora=True, use_dora=True,
                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
        "gamma": dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "embed_tokens"], rank_pattern={"fc2": 5}),
        "delta": dict(r=16, lora_alpha=32, target_modules=["k_proj", "out_proj"]),
    },
    "gpt2": {
        "alpha": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        "beta": dict(r=8, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"],
                     fan_in_fan_out=True),
        "gamma": dict(r=2, lora_alpha=4, target_modules=["c_fc", "wte"], fan_in_fan_out=True),
        "delta": dict(r=16, lora_alpha=32, target_modules=["c_proj"], fan_in_fan_out=True),
    },
}
NAMES = ["alpha", "beta", "gamma", "delta"]


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "opt":
        config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
        return transformers.OPTForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(autouse=True)
def torch_path():
    """Model tests run the CPU torch path; the kernels' own paths are covered in test_lora_delta
    (one parity test below runs every CPU path)."""
    with use_backend("torch"):
        yield


@pytest.fixture(scope="module", params=["llama", "opt", "gpt2"])
def saved(request, tmp_path_factory):
    """(kind, base model, {name: folder}, PeftModel holding all four adapters)."""
    kind = request.param
    base = tiny_model(kind)
    folders = {}
    for i, name in enumerate(NAMES):
        torch.manual_seed(10 + i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **ADAPTERS[kind][name]))
        with torch.no_grad():  # DoRA starts with magnitudes equal to the norms (a scale of 1): move them
            for key, p in model.named_parameters():
                if "lora_magnitude_vector" in key:
                    p.mul_(torch.rand_like(p) + 0.5)
        folders[name] = tmp_path_factory.mktemp(f"{kind}-{name}")
        model.save_pretrained(folders[name])
    reference = PeftModel.from_pretrained(copy.deepcopy(base), folders[NAMES[0]], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        reference.load_adapter(folders[name], adapter_name=name)
    return kind, base, folders, reference


@contextlib.contextmanager
def peft_alone(reference, name):
    """PEFT running adapter ``name`` alone, or the base model for None."""
    if name is None:
        with torch.no_grad(), reference.disable_adapter():
            yield reference
    else:
        reference.set_adapter(name)
        with torch.no_grad():
            yield reference


def peft_logits(reference, name, input_ids):
    with peft_alone(reference, name):
        return reference(input_ids=input_ids).logits


ROUTE = ["alpha", "beta", None, "gamma", "delta", "beta"]


def autocast(amp):
    """``torch.autocast`` on the CPU in ``amp`` (None: off)."""
    return torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)


@pytest.mark.parametrize("path", cpu_backends())
def test_mixed_batch_equals_peft_per_sequence(saved, path):
    kind, base, folders, reference = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    input_ids = torch.randint(0, VOCAB, (len(ROUTE), 7), generator=torch.Generator().manual_seed(1))
    with run_on(path), torch.no_grad(), bk.use_adapters(model, ROUTE):
        logits = model(input_ids=input_ids).logits
    for i, name in enumerate(ROUTE):
        assert_close(logits[i:i + 1], peft_logits(reference, name, input_ids[i:i + 1]), torch.float32,
                     f"{kind} sequence {i} ({name})")


@pytest.mark.parametrize("path", cpu_backends())
def test_mixed_batch_under_autocast_is_as_accurate_as_peft(saved, path):
    """Under ``torch.autocast`` (bf16, as HF's Trainer runs with ``bf16=True``) PEFT's layers and
    ours multiply in bf16, each rounding differently; a whole model in bf16 drifts ~2% from fp32.
    Ours must drift no more than PEFT's own bf16 run, per sequence."""
    kind, base, folders, reference = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    input_ids = torch.randint(0, VOCAB, (len(ROUTE), 7), generator=torch.Generator().manual_seed(1))
    with run_on(path), torch.no_grad(), bk.use_adapters(model, ROUTE), autocast(torch.bfloat16):
        logits = model(input_ids=input_ids).logits
    assert logits.dtype == torch.bfloat16
    for i, name in enumerate(ROUTE):
        exact = peft_logits(reference, name, input_ids[i:i + 1])
        with autocast(torch.bfloat16):
            theirs = peft_logits(reference, name, input_ids[i:i + 1])
        ours_err, peft_err = rel_rms(logits[i:i + 1], exact), rel_rms(theirs, exact)
        assert ours_err <= 1.25 * peft_err + 1e-3, f"{kind} sequence {i} ({name}): {ours_err:.2e} vs PEFT {peft_err:.2e}"


def test_load_builds_layers_per_adapter_targets(saved):
    kind, base, folders, _ = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    layers = bk.model.adapter_layers(model)
    assert bk.adapter_names(model) == tuple(NAMES)
    for module, layer in layers.items():
        for d, name in enumerate(NAMES):
            config = json.loads((folders[name] / "adapter_config.json").read_text())
            targeted = bk.model.matches(module, config["target_modules"]) if config["target_modules"] != "all-linear" \
                else True
            targeted = targeted and not bk.model.matches(module, config.get("exclude_modules"))
            assert (int(layer.ranks[d]) > 0) == targeted, (module, name)
            assert (layer.adapter_magnitude(d) is not None) == (targeted and config["use_dora"]), (module, name)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert {id(p) for p in bk.trainable_parameters(model)} == \
        {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude)
         if p is not None}
    line = bk.summary(model)
    assert f"{len(layers)} LoRA layers x 4 adapters" in line and "alpha:r=4," in line and "beta:r=8+DoRA" in line, line


def test_save_round_trip_loads_in_peft(saved, tmp_path):
    kind, base, folders, _ = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    for name in NAMES:
        # change the weights so the saved file must carry ours, not the loaded ones
        with torch.no_grad():
            for layer in bk.model.adapter_layers(model).values():
                layer.lora_B[NAMES.index(name)] *= 1.5
                if layer.lora_magnitude is not None:
                    layer.lora_magnitude[NAMES.index(name)] *= 0.75
        out = bk.save_peft_adapter(model, name, tmp_path / name)
        with torch.no_grad(), bk.use_adapters(model, name):
            ours = model(input_ids=input_ids).logits
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), out)
        with torch.no_grad():
            assert_close(ours, theirs(input_ids=input_ids).logits, torch.float32, f"{kind} saved {name}")
        again = bk.load_peft_adapters(copy.deepcopy(base), {name: out})
        with torch.no_grad(), bk.use_adapters(again, [name, name]):
            assert_close(again(input_ids=input_ids).logits, ours, torch.float32, f"{kind} reloaded {name}")


def test_training_step_gradients_match_peft_per_task(saved):
    kind, base, folders, reference = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    route = ["gamma", "alpha", "delta", "alpha", None, "beta", "gamma"]
    input_ids = torch.randint(0, VOCAB, (len(route), 6), generator=torch.Generator().manual_seed(3))
    with bk.use_adapters(model, route):
        model(input_ids=input_ids, labels=input_ids).logits  # warm the route
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        loss.backward()
    layers = bk.model.adapter_layers(model)
    for d, name in enumerate(NAMES):
        rows = [i for i, n in enumerate(route) if n == name]
        reference.set_adapter(name)
        reference.zero_grad()
        sub = input_ids[rows]
        logits = reference(input_ids=sub).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), sub[:, 1:].reshape(-1),
                                          reduction="sum").backward()
        for module, layer in layers.items():
            rank = int(layer.ranks[d])
            grad_a = layer.lora_A.grad[d]
            grad_b = layer.lora_B.grad[d]
            if rank == 0:
                assert (grad_a == 0).all() and (grad_b == 0).all(), (module, name)
                continue
            peft_layer = reference.base_model.model.get_submodule(module)
            a, b = ((peft_layer.lora_embedding_A[name], peft_layer.lora_embedding_B[name]) if isinstance(
                layer, bk.nn.MultiLoRAEmbedding) else (peft_layer.lora_A[name].weight, peft_layer.lora_B[name].weight))
            assert_close(grad_a[:rank], a.grad, torch.float32, f"{module} {name} dA")
            assert_close(grad_b[:, :rank], b.grad, torch.float32, f"{module} {name} dB")
            assert (grad_a[rank:] == 0).all() and (grad_b[:, rank:] == 0).all()
            if name in peft_layer.lora_magnitude_vector:
                assert_close(layer.lora_magnitude.grad[d], peft_layer.lora_magnitude_vector[name].weight.grad,
                             torch.float32, f"{module} {name} dm")
            elif layer.lora_magnitude is not None:
                assert (layer.lora_magnitude.grad[d] == 0).all(), (module, name)


def test_generate_holds_ids_through_decode(saved):
    kind, base, folders, reference = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    prompts = torch.randint(1, VOCAB, (5, 4), generator=torch.Generator().manual_seed(4))
    route = ["delta", None, "alpha", "beta", "gamma"]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)  # no early EOS
    with torch.no_grad(), bk.use_adapters(model, route):
        tokens = model.generate(input_ids=prompts, **kwargs)
        repeated = model.generate(input_ids=prompts, num_return_sequences=2, num_beams=2, **kwargs)
    assert repeated.shape[0] == 10
    for i, name in enumerate(route):
        with peft_alone(reference, name):
            expected = reference.generate(input_ids=prompts[i:i + 1], **kwargs)
        assert torch.equal(tokens[i:i + 1], expected), f"{kind} sequence {i} ({name})"


def test_merge_and_unmerge(saved):
    kind, base, folders, reference = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    input_ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    bk.merge_adapter(model, "beta")
    with torch.no_grad():
        merged = model(input_ids=input_ids).logits
    assert_close(merged, peft_logits(reference, "beta", input_ids), torch.float32, f"{kind} merged")
    with pytest.raises(RuntimeError, match="merged"), bk.use_adapters(model, ["alpha"]):
        model(input_ids=input_ids)
    with pytest.raises(RuntimeError, match="already merged"):
        bk.merge_adapter(model, "alpha")
    bk.unmerge_adapter(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "unmerge must restore exactly"

    # merge_and_unload: the plain model (the base's keys and layer types) holding PEFT's merged weights
    plain = bk.merge_and_unload(model, "beta")
    assert not bk.model.adapter_layers(plain) and plain.state_dict().keys() == base.state_dict().keys()
    assert all(type(plain.get_submodule(n)) is type(m) for n, m in base.named_modules())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=input_ids).logits, merged)
    theirs = copy.deepcopy(reference)
    theirs.set_adapter("beta")
    theirs = theirs.merge_and_unload()
    for key, tensor in theirs.state_dict().items():
        assert_close(plain.state_dict()[key], tensor.double(), torch.float32, key)


def test_per_token_ids_and_names():
    model = bk.inject(tiny_model("llama"), ["q_proj", "o_proj"], num_adapters=3, r=4,
                      adapter_names=["x", "y", "z"])
    for layer in bk.model.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    per_token = [["x", "y", None, "z", "x"], [2, 2, -1, 0, 1]]
    with torch.no_grad(), bk.use_adapters(model, per_token):
        mixed = model(input_ids=input_ids).logits
        with bk.use_adapters(model, "y"):  # nested: one adapter for everything
            inner = model(input_ids=input_ids).logits
        again = model(input_ids=input_ids).logits
    torch.testing.assert_close(again, mixed, rtol=0, atol=0)
    with torch.no_grad(), bk.use_adapters(model, torch.tensor([[1] * 5, [1] * 5])):
        torch.testing.assert_close(inner, model(input_ids=input_ids).logits, rtol=0, atol=0)
    with torch.no_grad(), bk.use_adapters(model, None):
        plain = model(input_ids=input_ids).logits
    assert (plain - mixed).abs().max() > 1e-4  # the adapters do change the output
    with pytest.raises(ValueError, match="decode steps"), torch.no_grad(), bk.use_adapters(model, per_token):
        model.generate(input_ids=input_ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="no adapter named 'w'"):
        with bk.use_adapters(model, ["x", "w"]):
            pass
    with pytest.raises(ValueError, match=r"must lie in \[-1, 3\)"):
        with bk.use_adapters(model, torch.tensor([0, 3])):
            pass
    with pytest.raises(ValueError, match="adapter index 3 is out of range for 3 adapters"):
        with bk.use_adapters(model, [0, 3]):
            pass
    layers = bk.model.adapter_layers(model).values()
    assert all(layer.adapter_ids is None for layer in layers), "ids must be cleared after the blocks"


def test_exception_inside_block_restores_ids():
    model = bk.inject(tiny_model("llama"), ["q_proj"], num_adapters=2)
    with pytest.raises(KeyError):
        with bk.use_adapters(model, [0, 1]):
            raise KeyError("boom")
    assert all(layer.adapter_ids is None for layer in bk.model.adapter_layers(model).values())


ROUTED_METHODS = {  # (inject kwargs, the route of each of two forwards, use_adapters or use_contexts)
    "lora": (dict(target_modules=LLAMA_ALL, r=4), ([0, 2, -1], [1, 1, 0]), bk.use_adapters),
    "lora_and_dora": (dict(target_modules=LLAMA_ALL, r=4, use_dora=[True, False, True]), ([0, 2, -1], [1, 1, 0]),
                      bk.use_adapters),
    "context_lora": (dict(method="context_lora", target_modules=LLAMA_ALL, r=4),
                     (bk.context_ids([(0, 1), (1, 3), (0, 4)], batch_size=3), [1, 0, -1]), bk.use_contexts),
    "context_ia3": (dict(method="context_ia3", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]), ([0, 1, 1], [1, 0, 0]), bk.use_contexts),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", list(ROUTED_METHODS))
def test_backward_after_the_blocks_under_gradient_checkpointing(method, reentrant):
    """HF's Trainer runs ``loss.backward()`` apart from the forward, so after any routing block
    around the forward has ended; under gradient checkpointing that backward recomputes each
    layer's forward. Two forwards with different routes, one backward of their summed losses
    after both blocks: the gradients equal the run without checkpointing. (Before, the
    recomputation saw no route: no adapter gradients at all with reentrant checkpointing, a
    ``CheckpointError`` without.)"""
    kwargs, routes, route_with = ROUTED_METHODS[method]
    input_ids = torch.randint(0, VOCAB, (2, 3, 8), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        model = bk.inject(tiny_model("llama"), num_adapters=3 if "lora" == method[:4] else 2, **kwargs)
        gen = torch.Generator().manual_seed(5)
        for p in bk.trainable_parameters(model):
            p.data.add_(0.1 * torch.randn(p.shape, generator=gen))
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.24's name
                enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.config.use_cache = False
            if reentrant:
                model.enable_input_require_grads()  # as HF's Trainer does with reentrant checkpointing
        model.train()
        losses = []
        for batch, route in zip(input_ids, routes):
            with route_with(model, route):
                losses.append(model(input_ids=batch, labels=batch).loss)
        sum(losses).backward()
        grads.append([p.grad for p in bk.trainable_parameters(model)])
    assert all(g is not None for g in grads[1]), "parameters without gradients"
    for i, (got, want) in enumerate(zip(grads[1], grads[0])):
        assert_close(got, want, torch.float32, f"{method} parameter {i}")
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_inject_matching_rules():
    model = bk.inject(tiny_model("llama"), r".*layers\.1\..*_proj", num_adapters=2, exclude_modules=["up_proj"])
    names = set(bk.model.adapter_layers(model))
    assert names == {f"model.layers.1.{p}" for p in
                     ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.down_proj"]}
    model = bk.inject(tiny_model("llama"), ["self_attn.q_proj", "model.layers.0.mlp.up_proj"], num_adapters=1)
    assert set(bk.model.adapter_layers(model)) == {"model.layers.0.self_attn.q_proj",
                                                    "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"}
    gpt2 = bk.inject(tiny_model("gpt2"), ["c_attn"], num_adapters=2)
    layer = gpt2.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    for kind in ("llama", "opt", "gpt2"):  # PEFT's shorthand: every linear layer but the output head
        base = tiny_model(kind)
        peft_targets = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear")).targeted_module_names
        model = bk.inject(base, "all-linear", num_adapters=2, exclude_modules=[r"q_proj"])
        assert set(bk.model.adapter_layers(model)) == {n for n in peft_targets if not n.endswith("q_proj")}, kind


def test_inject_errors():
    with pytest.raises(ValueError, match=r"matched no module.*near names: \['q_proj'"):
        bk.inject(tiny_model("llama"), ["q_prj"], num_adapters=2)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn' matched target_modules but is a LlamaAttention"):
        bk.inject(tiny_model("llama"), ["self_attn"], num_adapters=2)
    with pytest.raises(ValueError, match="is a LlamaRMSNorm"):
        bk.inject(tiny_model("llama"), r".*layernorm", num_adapters=2)
    with pytest.raises(ValueError, match="'all-linear'.*found no linear layer in Sequential"):
        bk.inject(torch.nn.Sequential(torch.nn.ReLU()), "all-linear", num_adapters=2)
    model = bk.inject(tiny_model("llama"), ["q_proj"], num_adapters=2)
    with pytest.raises(ValueError, match="already has adapter layers"):
        bk.inject(model, ["v_proj"], num_adapters=2)


def _folder(tmp_path, **config):
    model = get_peft_model(tiny_model("llama"), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_adapter_on_some_layers_loads_and_saves(tmp_path):
    """``layers_to_transform``: PEFT saves only the chosen layers' weights, and the layers come
    from the weights file's keys. The logits equal PEFT's, and the saved folder loads in PEFT."""
    base = tiny_model("llama")
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                               layers_to_transform=[1], init_lora_weights=False))
    reference.save_pretrained(tmp_path / "peft")
    model = bk.load_peft_adapters(copy.deepcopy(base), {"a": tmp_path / "peft"})
    assert set(bk.model.adapter_layers(model)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), bk.use_adapters(model, "a"):
        logits = model(input_ids=input_ids).logits
    with torch.no_grad():
        want = reference(input_ids=input_ids).logits
        assert_close(logits, want.double(), torch.float32, "layers_to_transform")
        again = PeftModel.from_pretrained(copy.deepcopy(base), bk.save_peft_adapter(model, "a", tmp_path / "ours"))
        assert_close(again(input_ids=input_ids).logits, want.double(), torch.float32, "saved back")


def test_pickle_adapters_load_as_safetensors_ones(tmp_path):
    """PEFT's older format, ``adapter_model.bin`` (``safe_serialization=False``), loads to the
    same weights as ``adapter_model.safetensors``: the logits are PEFT's, bit for bit the same
    either way."""
    base = tiny_model("llama")
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    reference.save_pretrained(tmp_path / "safetensors")
    assert {p.name for p in (tmp_path / "bin").iterdir()} == {"adapter_config.json", "adapter_model.bin", "README.md"}
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    logits = {}
    for form in ("bin", "safetensors"):
        model = bk.load_peft_adapters(copy.deepcopy(base), {"a": tmp_path / form})
        with torch.no_grad(), bk.use_adapters(model, "a"):
            logits[form] = model(input_ids=input_ids).logits
    assert torch.equal(logits["bin"], logits["safetensors"])
    with torch.no_grad():
        assert_close(logits["bin"], reference(input_ids=input_ids).logits.double(), torch.float32, "pickle adapter")


def test_adapters_load_from_hub_ids(fake_hub, tmp_path, monkeypatch):
    """An ``"owner/repo"`` that is not a local path is fetched from the Hub as PEFT does: its
    config and safetensors weights, or its ``adapter_model.bin`` where it has none; the logits
    are PEFT's. A path that exists is never fetched, and a failed fetch names the adapter."""
    base = tiny_model("llama")
    references = {}
    for name, safe in (("st", True), ("bin", False)):
        references[name] = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False))
        references[name].save_pretrained(fake_hub.repos / "org" / name, safe_serialization=safe)
        (fake_hub.repos / "org" / name / "training_args.bin").write_bytes(b"not fetched")
    monkeypatch.chdir(tmp_path)  # (where no org/ folder is)
    model = bk.load_peft_adapters(copy.deepcopy(base), {"st": "org/st", "bin": "org/bin"})
    config, safetensors, pickle = ["adapter_config.json"], "adapter_model.safetensors", "adapter_model.bin"
    assert fake_hub.asked == [("org/st", config), ("org/st", [*config, safetensors]),
                              ("org/bin", config), ("org/bin", [*config, safetensors]), ("org/bin", [*config, pickle])]
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for name, reference in references.items():
            with bk.use_adapters(model, name):
                assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits.double(),
                             torch.float32, name)

    fake_hub.asked.clear()
    with pytest.raises(ValueError, match=r"adapter 'x': 'org/missing' is not a folder here, and fetching it as a "
                                         r"Hugging Face Hub repository failed \(FileNotFoundError: 404"):
        bk.load_peft_adapters(copy.deepcopy(base), {"x": "org/missing"})
    (tmp_path / "org" / "st").mkdir(parents=True)  # a local folder of that name wins, and lacks a config
    for missing in ("org/st", "no/such/folder", "/no/such"):
        with pytest.raises(ValueError, match="adapter 'x': .* has no adapter_config.json|is not a folder"):
            bk.load_peft_adapters(copy.deepcopy(base), {"x": missing})
    assert fake_hub.asked == [("org/missing", ["adapter_config.json"])]
    # a revision of the Hub id (one for all, or per adapter): that version's weights
    v2 = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    v2.save_pretrained(tmp_path / "v2")
    fake_hub.revisions[("org/bin", "v2")] = tmp_path / "v2"
    for revision in ("v2", {"hubbed": "v2"}):
        model = bk.load_peft_adapters(copy.deepcopy(base), {"hubbed": "org/bin"}, revision=revision)
        with torch.no_grad(), bk.use_adapters(model, "hubbed"):
            assert_close(model(input_ids=input_ids).logits, v2(input_ids=input_ids).logits.double(), torch.float32, "v2")
    with pytest.raises(ValueError, match=r"revision names adapters that are not loaded here: \['other'\]"):
        bk.load_peft_adapters(copy.deepcopy(base), {"hubbed": "org/bin"}, revision={"other": "v2"})


def test_load_refuses_bad_checkpoints(tmp_path):
    good = _folder(tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj"])
    pickled = _folder(tmp_path / "pickled", r=4, lora_alpha=8, target_modules=["q_proj"])
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter 'p': .*adapter_model.bin is not a readable weights file"):
        bk.load_peft_adapters(tiny_model("llama"), {"p": pickled})
    (pickled / "adapter_model.bin").unlink()
    with pytest.raises(ValueError, match=r"adapter 'p': .* has no adapter_model.safetensors \(or adapter_model.bin\)"):
        bk.load_peft_adapters(tiny_model("llama"), {"p": pickled})

    from safetensors.torch import load_file, save_file
    tensors = load_file(good / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    bad = tmp_path / "bad_shape"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    save_file({**tensors, key: torch.zeros(31, 4)}, bad / "adapter_model.safetensors")
    before = tiny_model("llama").state_dict()
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=rf"{key} has shape \(31, 4\).*expected \(32, 4\)"):
        bk.load_peft_adapters(model, {"good": good, "bad": bad})
    assert not bk.model.adapter_layers(model), "a failed load must leave the model untouched"
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())

    config = json.loads((good / "adapter_config.json").read_text())
    for field, value, match in [("use_dora", True, "use_dora is set, but module .* has no lora_magnitude_vector"),
                                ("bias", "all", "bias='all' is not supported"),
                                ("peft_type", "IA3", "only LORA adapters load"),
                                ("layer_replication", [[0, 2], [1, 2]], r"layer_replication=\[\[0, 2\], \[1, 2\]\] is not"),
                                ("alora_invocation_tokens", [5, 7], "alora_invocation_tokens=.* is not supported"),
                                ("use_qalora", True, "use_qalora=True is not supported")]:
        folder = tmp_path / field
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        save_file(tensors, folder / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=match):
            bk.load_peft_adapters(tiny_model("llama"), {field: folder})
    with pytest.raises(ValueError, match="is not a folder"):
        bk.load_peft_adapters(tiny_model("llama"), {"missing": tmp_path / "nowhere"})

    # DoRA: a magnitude of the wrong length, and a magnitude in a checkpoint without use_dora
    dora = _folder(tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    dora_tensors = load_file(dora / "adapter_model.safetensors")
    key_m = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    dora_config = json.loads((dora / "adapter_config.json").read_text())
    for field, weights, settings, match in [
            ("short_magnitude", {**dora_tensors, key_m: torch.ones(31)}, dora_config,
             rf"{key_m} has shape \(31,\).*expected \(32,\)"),
            ("magnitude_without_dora", dora_tensors, {**dora_config, "use_dora": False},
             "lora_magnitude_vector with use_dora")]:
        folder = tmp_path / field
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(settings))
        save_file(weights, folder / "adapter_model.safetensors")
        model = tiny_model("llama")
        with pytest.raises(ValueError, match=match):
            bk.load_peft_adapters(model, {"good": good, field: folder})
        assert not bk.model.adapter_layers(model), "a failed load must leave the model untouched"


def test_load_into_injected_model(tmp_path):
    folder = _folder(tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    model = bk.inject(tiny_model("llama"), ["q_proj", "v_proj"], num_adapters=3, r=8,
                      adapter_names=["train_me", "pretrained", "other"])
    bk.load_peft_adapters(model, {"pretrained": folder})
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.ranks.tolist() == [8, 4, 8] and layer.scaling_values[1] == 2.0
    assert int(model.model.layers[0].self_attn.v_proj.ranks[1]) == 0  # not targeted: absent
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        bk.load_peft_adapters(model, {"nope": folder})
    wide = _folder(tmp_path / "wide", r=16, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="rank 16 .* more than the injected rank 8"):
        bk.load_peft_adapters(model, {"other": wide})


def test_t5_reads_projection_weights_through_the_adapter_layers(tmp_path):
    """T5's feed-forward reads ``self.wo.weight.dtype``. Adapter layers give their base layer's
    ``weight`` and ``bias``, as PEFT's layers do, so a T5 takes PEFT adapters and gives PEFT's
    logits; over an NF4 base, ``weight`` is the NF4 weight, whose dtype is the compute dtype."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False))
    reference.save_pretrained(tmp_path / "a")
    model = bk.load_peft_adapters(copy.deepcopy(base), {"a": tmp_path / "a"})
    wo = model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    gen = torch.Generator().manual_seed(2)
    input_ids, decoder_ids = torch.randint(1, VOCAB, (2, 6), generator=gen), torch.randint(1, VOCAB, (2, 3), generator=gen)
    with torch.no_grad(), bk.use_adapters(model, ["a", None]):
        logits = model(input_ids=input_ids, decoder_input_ids=decoder_ids).logits
    with torch.no_grad():
        want = reference(input_ids=input_ids[:1], decoder_input_ids=decoder_ids[:1]).logits
        with reference.disable_adapter():
            want_base = reference(input_ids=input_ids[1:], decoder_input_ids=decoder_ids[1:]).logits
    assert_close(logits[:1], want.double(), torch.float32, "adapter a")
    assert_close(logits[1:], want_base.double(), torch.float32, "base")

    quantized = bk.inject(copy.deepcopy(base), ["q", "v", "wi", "wo"], num_adapters=2, quantize="nf4")
    wo = quantized.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    assert isinstance(wo.weight, bk.quant.NF4Tensor) and wo.weight.dtype == torch.float32
    with bk.use_adapters(quantized, [0, 1]):
        quantized(input_ids=input_ids, decoder_input_ids=decoder_ids, labels=decoder_ids).loss.backward()
    grads = [layer.lora_B.grad for layer in bk.model.adapter_layers(quantized).values()]  # (B starts at zero)
    assert len(grads) == 20 and all(g[0].abs().sum() > 0 and g[1].abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("use_dora", [False, [True, False, True]], ids=["lora", "lora_and_dora"])
def test_torch_compile_mixed_batch_without_graph_breaks(use_dora):
    embedding = [] if use_dora else ["embed_tokens"]  # (embeddings take plain LoRA only)
    model = bk.inject(tiny_model("llama"), ["q_proj", "v_proj", "down_proj", *embedding], num_adapters=3,
                      r=[2, 4, 8], use_dora=use_dora)
    for layer in bk.model.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        torch.nn.init.normal_(layer.lora_A, std=0.1)
    input_ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(7))

    def step(fn, route):
        model.zero_grad()
        with bk.use_adapters(model, route):
            logits = fn(input_ids=input_ids).logits
            logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in bk.trainable_parameters(model)]

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    for route in ([0, 1, None, 2], ["2", "2", "0", "1"]):
        expected, expected_grads = step(model, route)
        got, grads = step(compiled, route)
        assert_close(got, expected, torch.float32, "compiled logits")
        for g, e in zip(grads, expected_grads):
            assert_close(g, e, torch.float32, "compiled grads")


def test_custom_ops_pass_opcheck():
    from bora_kernels.ops.lora_delta import _lora_delta_backward_op, _lora_delta_op, lora_plan

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(9, 16, generator=gen, requires_grad=True)
    a = torch.randn(3, 4, 16, generator=gen, requires_grad=True)
    b = torch.randn(3, 12, 4, generator=gen, requires_grad=True)
    plan = lora_plan(torch.tensor([0, 2, -1, 1, 1, 0, 2, 2, -1]), (9,), 3)
    scaling, ranks = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([4, 2, 3], dtype=torch.int32)
    torch.library.opcheck(_lora_delta_op, (x, a, b, plan.perm, plan.bounds, scaling, ranks))
    dy = torch.randn(9, 12, generator=gen)
    torch.library.opcheck(_lora_delta_backward_op,
                          (dy, x.detach(), a.detach(), b.detach(), plan.perm, plan.bounds, scaling, ranks, True, False, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_and_generate_on_gpu(saved, dtype):
    """The Triton kernels inside a whole model: logits per sequence against PEFT on the GPU, and
    greedy generation through the KV cache (fp32 only: bf16 ties may flip a token)."""
    kind, base, folders, reference = saved
    model = bk.load_peft_adapters(copy.deepcopy(base), folders).to("cuda", dtype)
    reference = copy.deepcopy(reference).to("cuda", dtype)
    input_ids = torch.randint(1, VOCAB, (len(ROUTE), 9), generator=torch.Generator().manual_seed(9)).cuda()
    with use_backend(None), torch.no_grad(), bk.use_adapters(model, ROUTE):
        logits = model(input_ids=input_ids).logits
        kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        tokens = model.generate(input_ids=input_ids, **kwargs)
    cpu_reference = saved[3]
    for i, name in enumerate(ROUTE):
        theirs = peft_logits(reference, name, input_ids[i:i + 1])
        if dtype == torch.float32:
            assert_close(logits[i:i + 1], theirs, dtype, f"{kind} {i} ({name})")
        else:  # a whole bf16 model drifts from fp32: ours may not drift more than PEFT's own bf16
            truth = peft_logits(cpu_reference, name, input_ids[i:i + 1].cpu()).cuda()
            ours_err, peft_err = rel_rms(logits[i:i + 1], truth), rel_rms(theirs, truth)
            assert ours_err <= 1.5 * peft_err + 1e-3, f"{kind} {i} ({name}): {ours_err:.2e} vs PEFT {peft_err:.2e}"
        if dtype == torch.float32:
            with peft_alone(reference, name):
                expected = reference.generate(input_ids=input_ids[i:i + 1], **kwargs)
            assert torch.equal(tokens[i:i + 1], expected), f"{kind} {i} ({name})"


@pytest.mark.gpu
def test_torch_compile_inductor_on_gpu():
    model = bk.inject(tiny_model("llama"), ["q_proj", "v_proj", "down_proj"], num_adapters=3, r=[2, 4, 8]).cuda()
    for layer in bk.model.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    input_ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(7)).cuda()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with use_backend(None):
        for module in (model, compiled):
            model.zero_grad()
            with bk.use_adapters(model, [0, 1, None, 2]):
                logits = module(input_ids=input_ids).logits
                logits.square().mean().backward()
            if module is model:
                expected, expected_grads = logits.detach(), [p.grad.clone() for p in bk.trainable_parameters(model)]
    assert_close(logits.detach(), expected, torch.float32, "compiled logits")
    for g, e in zip([p.grad for p in bk.trainable_parameters(model)], expected_grads):
        assert_close(g, e, torch.float32, "compiled grads")
