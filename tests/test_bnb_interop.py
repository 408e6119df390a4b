"""bitsandbytes 4-bit checkpoints both ways, without bitsandbytes on our side (``bnb_io.py``):
the saved form of one weight key for key and byte for byte, checkpoints transformers saved with
bitsandbytes loaded by ``from_pretrained_4bit``, and ours loaded by transformers with
bitsandbytes."""

import contextlib
import copy
import json
import shutil
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import bora_kernels as bk
from bora_kernels.nn import NF4Linear
from bora_kernels.ops import use_backend
from bora_kernels.quant import NF4Tensor, quantize_nf4
from tolerances import assert_close

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


@contextlib.contextmanager
def without_bitsandbytes():
    """``import bitsandbytes`` fails inside (modules imported before keep their reference)."""
    saved = {name: sys.modules[name] for name in list(sys.modules) if name.split(".")[0] == "bitsandbytes"}
    for name in saved:
        sys.modules[name] = None
    sys.modules["bitsandbytes"] = None
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        sys.modules.update(saved)


@pytest.fixture
def torch_path():
    """The ops' CPU torch path: what these tests check does not depend on it, and the kernels'
    bytes and products are checked against it in ``test_nf4_format.py`` and ``test_nf4_matmul.py``."""
    with use_backend("torch"):
        yield


def bnb_saved(w, blocksize, double_quant, storage=torch.uint8, prefix=""):
    """What bitsandbytes' ``Params4bit`` saves for ``w`` (its ``_save_to_state_dict``)."""
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4",
                                    quant_storage=storage)
    return {prefix + "weight": packed, **{f"{prefix}weight.{k}": v for k, v in state.as_dict(packed=True).items()}}, \
        (packed, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_one_weight_saves_as_bitsandbytes_saves_it(blocksize, double_quant, dtype):
    """``bnb_state_dict`` equals what bitsandbytes saves, key for key (in its order) and byte for
    byte, the quant state's JSON included (for our own quantization too, but for the near-ties
    of the 8-bit absmax codes that ``test_nf4_format.py`` allows); ``from_bnb_state_dict`` reads
    back the tensors bitsandbytes made, also when the codes are stored in another dtype
    (``bnb_4bit_quant_storage``). Blocks span rows here (320 columns): bitsandbytes 0.50.2's
    CPU ``dequantize_4bit`` is wrong for such weights, so the dequantized weight is compared
    with ours of bitsandbytes' tensors (checked against the formula in ``test_nf4_format.py``)."""
    with use_backend("torch"):  # the format is the same on every path (the kernels: test_nf4_format.py)
        w = torch.randn(48, 320, generator=torch.Generator().manual_seed(blocksize)).to(dtype)
        w[3, :40] = 0  # an all-zero block
        w[7, 5] = 30.0  # an outlier
        theirs, (packed, state) = bnb_saved(w, blocksize, double_quant)
        adopted = NF4Tensor.from_bnb(packed, state).bnb_state_dict()
        quantized = quantize_nf4(w, blocksize, double_quant).bnb_state_dict()
        assert list(adopted) == list(quantized) == list(theirs)
        for key in theirs:
            assert adopted[key].dtype == theirs[key].dtype and torch.equal(adopted[key], theirs[key]), key
            if key != "weight.absmax" or not double_quant:  # (8-bit absmax codes: near-ties, see test_nf4_format)
                assert torch.equal(quantized[key], theirs[key]), key
        want = NF4Tensor.from_bnb(packed, state)
        for storage in (torch.uint8, torch.bfloat16):
            saved, _ = bnb_saved(w, blocksize, double_quant, storage, prefix="layer.")
            read = NF4Tensor.from_bnb_state_dict(saved, "layer.")
            assert (read.shape, read.dtype, read.blocksize, read.double_quant) == (w.shape, dtype, blocksize, double_quant)
            for part in ("packed", "absmax", "offset", "nested_absmax", "nested_code"):
                assert torch.equal(getattr(read, part), getattr(want, part)) if double_quant or part in (
                    "packed", "absmax") else getattr(read, part) is None, part
            assert torch.equal(read.dequantize(), want.dequantize())


def test_bad_saved_weights_are_refused_by_key():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    good, _ = bnb_saved(w, 64, True, prefix="p.")
    fp4, _ = F.quantize_4bit(w, blocksize=64, quant_type="fp4")

    def changed(**kw):
        sd = dict(good)
        for key, value in kw.items():
            key = "p.weight" + key.replace("__", ".").replace("qs", "quant_state.bitsandbytes__nf4")
            if value is None:
                del sd[key]
            else:
                sd[key] = value
        return sd

    def packed_json(text):
        return torch.tensor(list(text.encode()), dtype=torch.uint8)

    cases = [
        ({}, "q.", "no bitsandbytes 4-bit weight under 'q.weight'"),
        ({k.replace("nf4", "fp4"): v for k, v in good.items()}, "p.", "only NF4"),
        (changed(__absmax=None), "p.", "'p.weight.absmax' is missing"),
        (changed(__absmax=good["p.weight.absmax"].float()), "p.", "'p.weight.absmax' must be a torch.uint8"),
        (changed(__absmax=good["p.weight.absmax"][:-1]), "p.", "absmax holds 31 values"),
        (changed(__quant_map=torch.linspace(-1, 1, 16)), "p.", "'p.weight.quant_map' is not the NF4 code"),
        (changed(__nested_quant_map=torch.zeros(128)), "p.", "256-value map"),
        (changed(__qs=packed_json("{not json")), "p.", "does not hold bitsandbytes' quant state"),
        (changed(__qs=packed_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}')), "p.",
         "KeyError: 'shape'"),
        (changed(__qs=packed_json('{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [16, 128], '
                                  '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}')),
         "p.", "blocksize must be one of"),
        (changed(__qs=packed_json('{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [16, 128], '
                                  '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}')),
         "p.", "dtype must be float32, float16 or bfloat16"),
        (changed(**{"": fp4[:-1]}), "p.", "packed holds 1023 bytes"),
    ]
    for state_dict, prefix, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            NF4Tensor.from_bnb_state_dict(state_dict, prefix)


def tiny_llama(tie: bool, seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def dense_copy(model):
    """``model`` with each ``Linear4bit`` or ``NF4Linear`` made an ``nn.Linear`` of its dequantized weight."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if type(m).__name__ == "Linear4bit":
            weight = F.dequantize_4bit(m.weight.data, m.weight.quant_state)
        elif isinstance(m, NF4Linear):
            weight = m.nf4_weight().dequantize()
        else:
            continue
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=m.bias is not None, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        if m.bias is not None:
            linear.bias.data.copy_(m.bias.data)
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent), child, linear)
    return dense


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_checkpoint_transformers_saved_in_4bit_loads_without_bitsandbytes(tie, tmp_path):
    """transformers quantizes with bitsandbytes and saves (here in shards); ``from_pretrained_4bit``
    builds the model without bitsandbytes: every quantized layer an ``NF4Linear`` with
    bitsandbytes' own dequantized weight, nothing left on the meta device (the rotary table is
    made, not loaded), a tied head still tied. Its logits are the dense model's of the same
    weights (in bf16 with ``dtype``); adapters injected over it train, and a PEFT adapter loads
    onto it."""
    tiny_llama(tie).save_pretrained(tmp_path / "dense")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config,
                                                               device_map="cpu")
    theirs.save_pretrained(tmp_path / "4bit", max_shard_size="30KB")
    assert (tmp_path / "4bit" / "model.safetensors.index.json").is_file()
    quantized = {n: m for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit"}
    with without_bitsandbytes():
        ours = bk.from_pretrained_4bit(tmp_path / "4bit")
        assert set(quantized) == {n for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
        for name, m in quantized.items():
            want = F.dequantize_4bit(m.weight.data, m.weight.quant_state)
            assert torch.equal(ours.get_submodule(name).nf4_weight().dequantize(), want), name
        assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
        assert torch.equal(ours.model.rotary_emb.inv_freq, theirs.model.rotary_emb.inv_freq)
        assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert_close(ours(input_ids=ids).logits, dense_copy(theirs)(input_ids=ids).logits, torch.float32,
                         "logits")
        bk.inject(ours, "all-linear", 2, r=4, alpha=8)
        for layer in bk.model.adapter_layers(ours).values():
            torch.nn.init.normal_(layer.lora_B, std=0.1)
        with bk.use_adapters(ours, [0, 1]):
            ours(input_ids=ids, labels=ids).loss.backward()
        assert all(layer.lora_A.grad.abs().sum() > 0 for layer in bk.model.adapter_layers(ours).values())
        half = bk.from_pretrained_4bit(tmp_path / "4bit", dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        assert half.model.rotary_emb.inv_freq.dtype == torch.float32  # made by the model, as from_pretrained's
        assert {m.compute_dtype for m in half.modules() if isinstance(m, NF4Linear)} == {torch.bfloat16}
        with torch.no_grad():
            assert_close(half(input_ids=ids).logits.float(), dense_copy(theirs)(input_ids=ids).logits, torch.bfloat16,
                         "bf16 logits")
        bk.save_peft_adapter(ours, "1", tmp_path / "adapter")
        loaded = bk.load_peft_adapters(bk.from_pretrained_4bit(tmp_path / "4bit"), {"task": tmp_path / "adapter"})
        with torch.no_grad(), bk.use_adapters(loaded, 0), bk.use_adapters(ours, 1):
            torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_our_4bit_checkpoint_loads_in_transformers_with_bitsandbytes(tie, tmp_path):
    """A QLoRA model (some layers in NF4 under adapters, the rest dense) saved by
    ``save_pretrained_4bit`` loads in transformers with bitsandbytes: ``Linear4bit`` exactly where
    ours are NF4 (the same dequantized weights), dense layers where ours are dense, and the base
    model's logits (bitsandbytes' CPU kernel rounds its absmax to bf16: the tolerance). It loads
    back with ``from_pretrained_4bit`` to the same bytes and logits, without bitsandbytes."""
    model = bk.inject(tiny_llama(tie), ["q_proj", "v_proj", "up_proj"], 2, r=4, alpha=8, quantize="nf4")
    for layer in bk.model.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    with without_bitsandbytes():
        bk.save_pretrained_4bit(model, tmp_path)
    nf4 = {n: m.base_layer for n, m in bk.model.adapter_layers(model).items()}
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), bk.use_adapters(model, -1):
        want = model(input_ids=ids).logits

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert {n for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit"} == set(nf4)
    for name, layer in nf4.items():
        m = theirs.get_submodule(name)
        assert torch.equal(F.dequantize_4bit(m.weight.data, m.weight.quant_state), layer.nf4_weight().dequantize())
    dense = {n: m for n, m in tiny_llama(tie).named_modules() if isinstance(m, torch.nn.Linear) and n not in nf4}
    assert all(torch.equal(theirs.get_submodule(n).weight, m.weight) for n, m in dense.items())
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=0, atol=2e-2)

    with without_bitsandbytes():
        back = bk.from_pretrained_4bit(tmp_path)
        assert {n for n, m in back.named_modules() if isinstance(m, NF4Linear)} == set(nf4)
        for name, layer in nf4.items():
            for part in ("packed", "absmax", "offset", "nested_absmax", "nested_code"):
                assert torch.equal(getattr(back.get_submodule(name), part), getattr(layer, part)), (name, part)
        with torch.no_grad():
            assert torch.equal(back(input_ids=ids).logits, want)
        assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie


def test_load_refuses_what_does_not_fit_and_leaves_the_model_as_it_was(tmp_path):
    source = bk.inject(tiny_llama(False), ["q_proj"], 1, quantize="nf4")
    state = bk.bnb_4bit_state_dict(source)
    assert not any("lora" in k or "base_layer" in k for k in state)
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in state
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in state.items()}
    other = tiny_llama(False, seed=1)
    cases = [
        ({k: v for k, v in state.items() if k != "model.norm.weight"}, other, r"missing \['model.norm.weight'\]"),
        ({**state, "extra.weight": torch.zeros(1)}, other, r"unexpected \['extra.weight'\]"),
        ({**state, "model.norm.weight": torch.zeros(3)}, other, "'model.norm.weight': the checkpoint's tensor is"),
        (fp4, other, "quantized as 'fp4'"),
        (state, tiny_llama(False, seed=1).model, "is not a module of LlamaModel"),
        (state, bk.inject(tiny_llama(False, seed=1), ["k_proj"], 1), "has adapter layers"),
        ({k: v for k, v in state.items() if k != "model.layers.0.self_attn.q_proj.weight.absmax"}, other,
         "'model.layers.0.self_attn.q_proj.weight.absmax' is missing"),
    ]
    small = tiny_llama(False, seed=1)
    small.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    cases.append((state, small, r"layer 'model.layers.0.self_attn.q_proj': the checkpoint's weight is \(64, 64\)"))
    biased = tiny_llama(False, seed=1)
    biased.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 64, bias=True)
    cases.append((state, biased, "the checkpoint's bias None does not fit the model's \\(64,\\)"))
    for checkpoint, model, message in cases:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        modules = dict(model.named_modules())
        with pytest.raises(ValueError, match=message):
            bk.load_bnb_4bit(model, checkpoint)
        assert dict(model.named_modules()) == modules
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loose = bk.load_bnb_4bit(tiny_llama(False, seed=1), {k: v for k, v in state.items() if k != "model.norm.weight"},
                             strict=False)
    assert isinstance(loose.model.layers[0].self_attn.q_proj, NF4Linear)
    second = bk.inject(tiny_llama(False, seed=2), ["q_proj"], 1, quantize="nf4")
    reloaded = bk.load_bnb_4bit(bk.load_bnb_4bit(tiny_llama(False, seed=1), state), bk.bnb_4bit_state_dict(second))
    assert torch.equal(reloaded.model.layers[1].self_attn.q_proj.packed,  # NF4 layers load anew
                       second.model.layers[1].self_attn.q_proj.base_layer.packed)
    with pytest.raises(ValueError, match="no NF4 layers"):
        bk.save_pretrained_4bit(tiny_llama(False), tmp_path)
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit NF4 checkpoint: its config has no quantization"):
        tiny_llama(False).save_pretrained(tmp_path / "dense")
        bk.from_pretrained_4bit(tmp_path / "dense")
    merged = bk.inject(tiny_llama(False), ["k_proj"], 1, quantize=None)
    bk.merge_adapter(merged, "0")
    with pytest.raises(ValueError, match="unmerge_adapter"):
        bk.bnb_4bit_state_dict(merged)


def test_gpt2_conv1d_layers_both_ways(tmp_path):
    """GPT-2's ``Conv1D`` layers ([in, out] weights), which bitsandbytes quantizes transposed: read
    into ``NF4Linear`` layers of bitsandbytes' weights, logits the dense model's; adapters over
    them, saved back, load in transformers with bitsandbytes with the same weights."""
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "dense")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization,
                                                               device_map="cpu").eval()
    theirs.save_pretrained(tmp_path / "4bit")
    quantized = {n: F.dequantize_4bit(m.weight.data, m.weight.quant_state)
                 for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(quantized) == 4
    with without_bitsandbytes():
        ours = bk.from_pretrained_4bit(tmp_path / "4bit")
    assert all(torch.equal(ours.get_submodule(n).nf4_weight().dequantize(), w) for n, w in quantized.items())
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, dense_copy(theirs)(input_ids=ids).logits, torch.float32, "logits")
    bk.inject(ours, "all-linear", 2, r=4, alpha=8)
    with without_bitsandbytes():
        bk.save_pretrained_4bit(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    for name, weight in quantized.items():
        m = back.get_submodule(name)
        assert type(m).__name__ == "Linear4bit" and torch.equal(F.dequantize_4bit(m.weight.data, m.weight.quant_state),
                                                                 weight), name


@pytest.mark.gpu
def test_loads_straight_onto_the_gpu(tmp_path):
    """``device="cuda"``: every tensor on the GPU (the checkpoint read onto it), the logits of
    the CPU model, and the NF4 layers run by the GPU kernels."""
    model = bk.inject(tiny_llama(False), ["q_proj", "v_proj"], 1, quantize="nf4")
    bk.save_pretrained_4bit(model, tmp_path)
    gpu = bk.from_pretrained_4bit(tmp_path, device="cuda", dtype=torch.bfloat16)
    cpu = bk.from_pretrained_4bit(tmp_path, dtype=torch.bfloat16)
    assert all(t.is_cuda for t in [*gpu.parameters(), *gpu.buffers()])
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(gpu(input_ids=ids.cuda()).logits.float().cpu(), cpu(input_ids=ids).logits.float(), torch.bfloat16,
                     "logits")


def dense_checkpoint(family: str, folder):
    """A tiny dense model saved in shards: a Llama with biased projections and a tied head, or a
    GPT-2 (``Conv1D`` layers)."""
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                          attention_bias=True)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                         eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder, max_shard_size="30KB")
    return type(model)


@pytest.mark.parametrize(("family", "dtype"), [("llama", None), ("llama", torch.bfloat16), ("gpt2", None)])
def test_a_dense_checkpoint_quantizes_while_it_loads(family, dtype, tmp_path, monkeypatch, torch_path):
    """``from_pretrained_nf4`` reads a dense checkpoint one shard at a time and gives the bytes
    ``inject(..., quantize="nf4")`` gives the loaded model (biases, a tied head, GPT-2's
    transposed ``Conv1D`` weights), so the same logits; it refuses a checkpoint that does not fit,
    and a 4-bit one goes to ``from_pretrained_4bit``."""
    cls = dense_checkpoint(family, tmp_path / "dense")
    shards = len(list((tmp_path / "dense").glob("*.safetensors")))
    read = []
    original = bk.bnb_io.read_checkpoint
    monkeypatch.setattr(bk.bnb_io, "read_checkpoint", lambda path, device=None: read.append(path) or original(path, device))
    ours = bk.from_pretrained_nf4(tmp_path / "dense", dtype=dtype)
    assert shards > 3 and len(read) == shards and all(path.is_file() for path in read)
    want = bk.inject(cls.from_pretrained(tmp_path / "dense", **({"dtype": dtype} if dtype else {})).eval(),
                     "all-linear", 1, quantize="nf4")
    layers = bk.model.adapter_layers(want)
    assert {n for n, m in ours.named_modules() if isinstance(m, NF4Linear)} == set(layers)
    for name, layer in layers.items():
        got = ours.get_submodule(name)
        for part in ("packed", "absmax", "offset", "nested_absmax", "nested_code", "bias"):
            mine, theirs = getattr(got, part), getattr(layer.base_layer, part)
            assert mine is None and theirs is None or torch.equal(mine, theirs), (name, part)
        assert (got.bias is not None) == (family == "gpt2" or name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
        assert got.compute_dtype == layer.base_layer.compute_dtype == (dtype or torch.float32)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    head, embedding = ours.get_output_embeddings().weight, ours.get_input_embeddings().weight
    assert head is embedding
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), bk.use_adapters(want, -1):
        assert torch.equal(ours(input_ids=ids).logits, want(input_ids=ids).logits)

    monkeypatch.undo()
    last = max((tmp_path / "dense").glob("*.safetensors"))  # (the final norm's)
    tensors = load_file(last)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, last)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        bk.from_pretrained_nf4(tmp_path / "dense")
    first = next(iter(tensors))
    save_file({**tensors, first: torch.zeros(3)}, last)
    with pytest.raises(ValueError, match=rf"'{first}': the checkpoint's tensor is \(3,\)"):
        bk.from_pretrained_nf4(tmp_path / "dense")
    save_file(dict(list(tensors.items())[1:]), last)
    with pytest.raises(ValueError, match=rf"missing \['{first}'\]"):
        bk.from_pretrained_nf4(tmp_path / "dense")
    with pytest.raises(ValueError, match="quantized already .*from_pretrained_4bit"):
        bk.save_pretrained_4bit(ours, tmp_path / "4bit")
        bk.from_pretrained_nf4(tmp_path / "4bit")


def as_pickles(folder, out):
    """``folder``'s checkpoint as older transformers saved it: ``pytorch_model.bin``, or
    ``pytorch_model-*.bin`` shards named by ``pytorch_model.bin.index.json``."""
    out.mkdir()
    renamed = {}
    for path in folder.glob("*.safetensors"):
        renamed[path.name] = "pytorch_" + path.name.replace(".safetensors", ".bin")
        torch.save(load_file(path), out / renamed[path.name])
    for path in folder.glob("*.json"):
        if path.name == "model.safetensors.index.json":
            index = json.loads(path.read_text())
            index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
            (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        else:
            shutil.copy(path, out)
    return out


def test_pickle_checkpoints_load_as_safetensors_ones(tmp_path, torch_path):
    """Checkpoints in PyTorch's pickle format (``pytorch_model.bin``, sharded or not), read with
    ``weights_only=True``, load to the same bytes and logits as their safetensors form, dense
    (``from_pretrained_nf4``) and 4-bit (``from_pretrained_4bit``); a broken index is refused by
    name."""
    dense_checkpoint("llama", tmp_path / "dense")
    shards = len(list((tmp_path / "dense").glob("*.safetensors")))
    as_pickles(tmp_path / "dense", tmp_path / "dense_bin")
    assert len(list((tmp_path / "dense_bin").glob("pytorch_model-*.bin"))) == shards > 3
    bk.save_pretrained_4bit(bk.inject(tiny_llama(True), ["q_proj", "v_proj"], 1, quantize="nf4"), tmp_path / "4bit")
    as_pickles(tmp_path / "4bit", tmp_path / "4bit_bin")
    assert (tmp_path / "4bit_bin" / "pytorch_model.bin").is_file()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    for load, name in ((bk.from_pretrained_nf4, "dense"), (bk.from_pretrained_4bit, "4bit")):
        want, got = load(tmp_path / name), load(tmp_path / f"{name}_bin")
        assert want.state_dict().keys() == got.state_dict().keys()
        assert all(torch.equal(v, got.state_dict()[k]) for k, v in want.state_dict().items()), name
        assert sum(isinstance(m, NF4Linear) for m in got.modules()) == (14 if name == "dense" else 4)
        with torch.no_grad():
            assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits), name

    (tmp_path / "dense_bin" / "pytorch_model.bin.index.json").write_text('{"weight_map": ["not", "a", "map"]}')
    with pytest.raises(ValueError, match=r"pytorch_model.bin.index.json is not a weights index"):
        bk.from_pretrained_nf4(tmp_path / "dense_bin")


def test_hub_models_fetch_one_set_of_weights(fake_hub):
    """A Hub id fetches its JSON files, then the shards its safetensors index names (not a
    ``consolidated.safetensors`` beside them), or, with no safetensors, its pickle shards; a
    repository with one weights file gets that file."""
    repos = fake_hub.repos / "org"
    dense_checkpoint("llama", repos / "sharded")
    as_pickles(repos / "sharded", repos / "pickled")
    (repos / "sharded" / "consolidated.safetensors").write_bytes(b"the same weights again")
    (repos / "pickled" / "training_args.bin").write_bytes(b"not weights")
    tiny_llama(False).save_pretrained(repos / "single")
    shards = sorted(json.loads((repos / "sharded" / "model.safetensors.index.json").read_text())["weight_map"].values())
    index = "model.safetensors.index.json"
    wanted = {"sharded": [["*.json"], ["*.json", index, *sorted(set(shards))]],
              "pickled": [["*.json"], ["*.json", "model.safetensors"],
                          ["*.json", "pytorch_model.bin.index.json", *sorted({"pytorch_" + f.replace(".safetensors", ".bin")
                                                                              for f in shards})]],
              "single": [["*.json"], ["*.json", "model.safetensors"]]}
    for repo, calls in wanted.items():
        fake_hub.asked.clear()
        folder = bk.bnb_io._checkpoint(f"org/{repo}")[1]
        assert [patterns for _, patterns in fake_hub.asked] == calls, repo
        weights = {p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")}
        assert weights == set(calls[-1][1:]) - {index, "pytorch_model.bin.index.json"}, repo
        assert bk.bnb_io._weight_files(folder), repo


def test_hub_revisions_load_that_commit_alone(fake_hub, tmp_path, torch_path):
    """``revision`` loads that branch, tag or commit of a Hub model: its config first, then its
    weights of the same commit (the later fetches name the commit the first resolved to); the
    main branch otherwise. A checkpoint the loader refuses is refused before any weights are
    fetched, and a revision that does not exist is the Hub's error."""
    main, v1 = fake_hub.repos / "org" / "m", tmp_path / "v1"
    tiny_llama(False, seed=0).save_pretrained(main)
    tiny_llama(False, seed=1).save_pretrained(v1)
    fake_hub.revisions[("org/m", "v1")] = v1
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for revision, folder in ((None, main), ("v1", v1)):
        fake_hub.asked_revisions.clear()
        got = bk.from_pretrained_nf4("org/m", revision=revision)
        assert torch.equal(got(ids).logits, bk.from_pretrained_nf4(folder)(ids).logits), revision
        first, *later = fake_hub.asked_revisions  # the config files, then the weights
        assert first == revision and len(set(later)) == 1 and len(later[0]) == 40, fake_hub.asked_revisions
    assert not torch.equal(bk.from_pretrained_nf4("org/m")(ids).logits, got(ids).logits)  # the two differ
    fake_hub.asked.clear()
    with pytest.raises(ValueError, match="is not a bitsandbytes 4-bit NF4 checkpoint"):
        bk.from_pretrained_4bit("org/m", revision="v1")
    assert [patterns for _, patterns in fake_hub.asked] == [["*.json"]]  # no weights fetched
    with pytest.raises(FileNotFoundError, match="Revision Not Found"):
        bk.from_pretrained_nf4("org/m", revision="v2")


def test_the_generation_config_travels_with_the_checkpoint(tmp_path, torch_path):
    """``generation_config.json`` (a chat model's several stop tokens, its sampling defaults) is
    read by both loaders, as ``from_pretrained`` reads it, and written by ``save_pretrained_4bit``."""
    model = tiny_llama(False)
    model.generation_config.update(eos_token_id=[2, 7], do_sample=True, top_p=0.9)
    model.save_pretrained(tmp_path / "dense")
    dense = bk.from_pretrained_nf4(tmp_path / "dense")
    bk.save_pretrained_4bit(dense, tmp_path / "4bit")
    assert (tmp_path / "4bit" / "generation_config.json").is_file()
    for loaded in (dense, bk.from_pretrained_4bit(tmp_path / "4bit")):
        assert loaded.generation_config.eos_token_id == [2, 7] and loaded.generation_config.top_p == 0.9
    (tmp_path / "4bit" / "generation_config.json").unlink()  # then it comes from the model's config, as before
    assert bk.from_pretrained_4bit(tmp_path / "4bit").generation_config.eos_token_id == model.config.eos_token_id
