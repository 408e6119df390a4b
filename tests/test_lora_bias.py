"""PEFT's ``lora_bias`` (a trained bias of B, for LoRA extracted from a full fine-tune) in
``MultiLoRALinear``: a batch mixing biased, plain, DoRA and no adapter against a float64
reference (forward and every gradient, every CPU path) and against PEFT, merge, checkpoints both
ways on a model whose layers have biases, and bad input. The GPU and autocast tests of a layer
with a lora_bias adapter are test_dora's (``WITH_LORA_BIAS``)."""

import copy

import pytest
import torch
from conftest import ROUTINGS, assert_equals_peft_per_sequence, cpu_backends, routed_forward, run_on
from lora_reference import assert_matches_reference, reference
from tolerances import assert_close
from torch import nn

import bora_kernels as bk
from bora_kernels.nn import MultiLoRALinear, NF4Linear
from bora_kernels.quant import quantize_nf4

K, N = 64, 40
RANKS, ALPHAS = (4, 8, 2, 3), (8, 16, 3, 6)
BIAS, DORA = (True, False, True, False), (False, False, False, True)  # adapter 3: DoRA beside them


def make_layer(seed=0, base=None, **kwargs):
    """B, the biases and the magnitude moved off their initial values."""
    torch.manual_seed(seed)
    kwargs = dict(r=list(RANKS), alpha=list(ALPHAS), lora_bias=list(BIAS), use_dora=list(DORA)) | kwargs
    layer = MultiLoRALinear(nn.Linear(K, N) if base is None else base, len(kwargs["r"]), **kwargs)
    with torch.no_grad():
        for d, r in enumerate(kwargs["r"]):
            layer.lora_B[d, :, :r].normal_(std=0.3)
        layer.lora_bias_vector.normal_()
        if layer.lora_magnitude is not None:
            layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    return layer


TOKEN_IDS = torch.tensor([[0, 1, -1, 2, 3], [3, 2, 0, -1, 1], [2, 0, 1, 1, -1]])
SEQUENCE_IDS = torch.tensor([2, -1, 0])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("how", ROUTINGS)
def test_mixed_batch_forward_and_gradients(backend, how, poison_empty):
    layer = make_layer()
    x = torch.randn(3, 5, K, requires_grad=True)
    dy = torch.randn(3, 5, N)
    with run_on(backend):
        out, token_ids = routed_forward(layer, x, TOKEN_IDS, SEQUENCE_IDS, how, (3, 5))
        (out * dy).sum().backward()
    assert_matches_reference(layer, x, token_ids, out, dy, torch.float32)
    assert (layer.lora_bias_vector.grad[[1, 3]] == 0).all(), "adapters without a lora_bias get no bias gradient"


@pytest.mark.parametrize("backend", cpu_backends())
def test_equals_peft_adapter_by_adapter(backend):
    """PEFT runs one adapter at a time (DoRA in the layer forbids its mixed batch); ours mixes them."""
    assert_equals_peft_per_sequence(make_layer(), torch.randn(6, 5, K), torch.tensor([2, -1, 0, 1, 3, 2]), backend)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_merge_adds_the_bias_and_unmerge_restores_it(nf4):
    torch.manual_seed(5)
    base = NF4Linear(quantize_nf4(torch.randn(N, K)), torch.randn(N)) if nf4 else None
    layer = make_layer(base=base, use_dora=False)
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    x = torch.randn(7, K)
    with torch.no_grad():
        routed = layer(x, torch.zeros(7, dtype=torch.long))
        layer.merge(0)
        merged_bias = layer.base_layer.bias.clone()
        merged = layer.base_layer(x)
        layer.unmerge()
        assert all(torch.equal(v, before[k]) for k, v in layer.base_layer.state_dict().items()), "unmerge is exact"
        assert torch.equal(layer(x, torch.zeros(7, dtype=torch.long)), routed)
    want_bias = before["bias"].double() + layer.scaling_values[0] * layer.lora_bias_vector[0].double()
    assert_close(merged_bias, want_bias, torch.float32, "merged bias")
    if nf4:  # the weight quantized again: 4-bit rounding, as PEFT's merge into 4-bit layers
        assert (merged - routed).abs().max() < 0.2 * routed.abs().max()
    else:
        assert_close(merged, routed, torch.float32, "merged")


def tiny_opt():
    """A causal LM whose linear layers have biases (Llama's have none)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    return transformers.OPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory):
    """``{name: folder}`` of two PEFT adapters of ``tiny_opt``, one with ``lora_bias``, and the
    logits PEFT computes with each."""
    peft = pytest.importorskip("peft")
    folders, logits = {}, {}
    input_ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    for i, (name, biased) in enumerate((("biased", True), ("plain", False))):
        torch.manual_seed(20 + i)
        config = peft.LoraConfig(r=4 + 2 * i, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], lora_bias=biased)
        model = peft.get_peft_model(tiny_opt(), config)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                nn.init.normal_(p, std=0.2)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        with torch.no_grad():
            logits[name] = model(input_ids=input_ids).logits
    return folders, logits, input_ids


def test_peft_checkpoints_load_and_save_both_ways(peft_folders, tmp_path):
    peft = pytest.importorskip("peft")
    folders, logits, input_ids = peft_folders
    assert any(k.endswith("lora_B.bias") for k in _tensors(folders["biased"])), "PEFT wrote B's biases"
    model = bk.load_peft_adapters(tiny_opt(), folders)
    assert "biased:r=4+bias" in bk.summary(model) and "plain:r=6]" in bk.summary(model)
    with torch.no_grad():
        with bk.use_adapters(model, ["biased", "plain"]):
            both = model(input_ids=input_ids).logits
    for i, name in enumerate(("biased", "plain")):
        assert_close(both[i], logits[name][i], torch.float32, f"{name} in a mixed batch")
        saved = bk.save_peft_adapter(model, name, tmp_path / name)
        assert (saved / "adapter_config.json").read_text().count('"lora_bias": ' + ("true" if i == 0 else "false"))
        theirs = peft.PeftModel.from_pretrained(tiny_opt(), saved).eval()
        with torch.no_grad():
            assert_close(theirs(input_ids=input_ids).logits, logits[name], torch.float32, f"{name} saved for PEFT")


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _rewritten(source, folder, config=None, drop=None):
    """A copy of the PEFT folder ``source`` with its config updated and the keys ending in ``drop`` left out."""
    import json
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(source, folder)
    tensors = {k: v for k, v in _tensors(source).items() if drop is None or not k.endswith(drop)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = json.loads((source / "adapter_config.json").read_text()) | (config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_bad_checkpoints_are_refused_naming_what_is_wrong(peft_folders, tmp_path):
    folders = peft_folders[0]
    source = folders["biased"]
    cases = [
        (_rewritten(source, tmp_path / "no_flag", {"lora_bias": False}), r"key '.*lora_B\.bias' is not a LoRA A/B weight"),
        (_rewritten(source, tmp_path / "no_bias", drop="q_proj.lora_B.bias"),
         r"lora_bias is set, but module '.*layers\.0\.self_attn\.q_proj' has no lora_B bias"),
        (_rewritten(source, tmp_path / "with_dora", {"use_dora": True}), "use_dora and lora_bias are both set"),
    ]
    for folder, match in cases:
        model = tiny_opt()
        with pytest.raises(ValueError, match=match):
            bk.load_peft_adapters(model, {"bad": folder})
        assert not bk.model.adapter_layers(model), "a refused adapter leaves the model as it was"
    unbiased = tiny_opt()  # the same layers without biases
    for m in unbiased.modules():
        if isinstance(m, nn.Linear):
            m.bias = None
    refused = r"adapter 'biased' has a lora_bias, and at 'model\.decoder\.layers\.\d\.[\w.]+': lora_bias needs a base"
    with pytest.raises(ValueError, match=refused):
        bk.load_peft_adapters(unbiased, {"biased": source})
    injected = bk.inject(copy.deepcopy(unbiased), ["q_proj", "v_proj", "fc1"], 1, r=8)
    with pytest.raises(ValueError, match=refused):
        bk.peft_io.read_peft_adapter(injected, "biased", source)


@pytest.mark.parametrize("call, match", [
    (lambda layer: layer.set_adapter(0, torch.zeros(4, K), torch.zeros(N, 4), bias=torch.ones(N + 1)),
     r"bias must be \[40\]"),
    (lambda layer: layer.set_adapter(0, None, None, bias=torch.ones(N)), "needs the adapter's A and B"),
    (lambda layer: layer.set_adapter(0, torch.zeros(4, K), torch.zeros(N, 4), bias=torch.ones(N),
                                     magnitude=torch.ones(N)), "cannot go with a DoRA magnitude"),
], ids=["bias_shape", "bias_without_weights", "bias_with_magnitude"])
def test_bad_arguments_change_nothing(call, match):
    layer = make_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        call(layer)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items()), "a refused call changes nothing"


def test_bad_layers():
    with pytest.raises(ValueError, match="lora_bias needs a base layer with a bias"):
        MultiLoRALinear(nn.Linear(K, N, bias=False), 2, r=4, lora_bias=True)
    with pytest.raises(ValueError, match="cannot have both use_dora and lora_bias"):
        MultiLoRALinear(nn.Linear(K, N), 2, r=4, lora_bias=[True, False], use_dora=[True, False])
    with pytest.raises(ValueError, match="lora_bias applies to method='lora' only"):
        bk.inject(nn.Sequential(nn.Linear(K, N)), ["0"], 2, method="context_bitfit", lora_bias=True)


def test_fresh_biases_equal_the_base_and_train_and_slots_are_reused():
    """A fresh lora_bias is zero (the layer equals its base); it trains; a slot that then gets a
    plain adapter (``set_adapter`` without a bias: how the server reuses slots) adds none."""
    torch.manual_seed(6)
    layer = MultiLoRALinear(nn.Linear(K, N), 2, r=4, lora_bias=True)
    x, ids = torch.randn(5, K), torch.tensor([0, 1, 1, -1, 0])
    torch.testing.assert_close(layer(x, ids), layer.base_layer(x), rtol=0, atol=1e-6)
    optimizer = torch.optim.SGD(bk.trainable_parameters(nn.Sequential(layer)), lr=0.1)
    layer(x, ids).square().sum().backward()
    optimizer.step()
    assert (layer.lora_bias_vector != 0).all(), "the biases train"
    a, b = layer.adapter_weights(1)
    layer.set_adapter(1, a, b, alpha=16)
    assert layer.adapter_bias(1) is None and (layer.lora_bias_vector[1] == 0).all()
    with torch.no_grad():
        assert_close(layer(x, ids), reference(layer, x, ids), torch.float32, "after the slot was reused")
