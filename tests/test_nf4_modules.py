"""``NF4Linear`` against bitsandbytes' ``Linear4bit`` and the dense layer it came from, and
multi-adapter QLoRA: ``inject(..., quantize="nf4")`` on a tiny Llama trains and serves adapters
over one 4-bit base."""

import contextlib
import copy

import pytest
import torch
import transformers

import bora_kernels as bk
from bora_kernels.nn import CONTEXT_LAYERS, MultiLoRALinear, NF4Linear, is_bnb_4bit
from bora_kernels.ops import use_backend
from bora_kernels.quant import NF4Tensor, quantize_nf4
from conftest import KERNEL_AND_TORCH, NEEDS_INTERPRETER, eager_and_compiled
from tolerances import assert_close, rel_rms



def bnb_linear4bit(linear, double_quant, quant_type="nf4"):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, quant_type=quant_type, compress_statistics=double_quant)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_nf4_linear_matches_bitsandbytes_linear4bit(double_quant, backend):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    theirs = bnb_linear4bit(linear, double_quant)
    with use_backend("torch"):
        ours = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
        adopted = NF4Linear.from_bnb(theirs)
    assert torch.equal(ours.packed, adopted.packed)
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        want = theirs(x)
        with use_backend(backend):
            got, got_adopted = ours(x), adopted(x)
    assert_close(got, want.double(), torch.float32, "NF4Linear vs Linear4bit")
    assert_close(got_adopted, want.double(), torch.float32, "NF4Linear.from_bnb vs Linear4bit")
    dense = linear(x).detach()
    assert ((got - dense).norm() / dense.norm()) < 0.15, "NF4 error larger than expected"
    assert ours.base_bytes() < 0.6 * 128 * 64


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_from_bnb_reads_a_weight_bitsandbytes_repacked_for_its_cpu_kernel(double_quant):
    """bitsandbytes repacks a Linear4bit for its CPU kernel at its first eval forward without grad
    (on CPUs with AVX512-BF16): same byte count, another order, absmax rounded to bf16. Adopted
    then, the layer must hold the same codes and the bf16 absmax bnb now uses; where this CPU has
    the kernel, its output must match bnb's."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    layer = bnb_linear4bit(linear, double_quant)
    with use_backend("torch"):
        standard = NF4Linear.from_bnb(layer).nf4_weight()
        state = copy.deepcopy(layer.weight.quant_state)
        packed, state = _convert_weight_packed_for_cpu(layer.weight.data.clone(), state)
        repacked = NF4Tensor.from_bnb(packed, state)
        assert not torch.equal(packed.reshape(-1), standard.packed.reshape(-1))  # the layout did change
        assert torch.equal(repacked.packed, standard.packed)
        bf16_absmax = standard.block_absmax().to(torch.bfloat16).float()
        assert torch.equal(repacked.absmax, bf16_absmax) and repacked.dtype == torch.float32
        want = NF4Tensor(standard.packed, bf16_absmax, standard.shape, torch.float32, standard.blocksize)
        assert torch.equal(repacked.dequantize(), want.dequantize())
    if has_avx512bf16():
        x = torch.randn(3, 128)
        with torch.no_grad():
            theirs = layer.eval()(x)  # repacks, then runs bnb's CPU kernel
            assert layer.weight.quant_state.packing_format_for_cpu
            ours = NF4Linear.from_bnb(layer)(x)
        assert ((ours - theirs).norm() / theirs.norm()) < 1e-2


def test_nf4_linear_moves_without_rounding_its_statistics():
    with use_backend("torch"):
        layer = NF4Linear(quantize_nf4(torch.randn(16, 64), 64, double_quant=True), torch.randn(16))
    absmax = layer.nested_absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.nested_absmax.dtype == torch.float32 and torch.equal(layer.nested_absmax, absmax)
    x = torch.randn(3, 64)
    with use_backend("torch"):  # it computes in the dtype it was cast to, as the rest of a model does
        out = layer(x.bfloat16())
        assert out.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
        assert_close(out, x.double() @ layer.nf4_weight().dequantize(torch.float64).T + layer.bias.double(),
                     torch.bfloat16, "bf16 forward")
        assert layer.float()(x).dtype == torch.float32
    assert set(layer.state_dict()) >= {"packed", "absmax", "offset", "nested_absmax", "nested_code", "bias"}
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        NF4Linear(quantize_nf4(torch.randn(16, 96), 64))


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_multi_adapter_qlora_trains_and_serves(backend):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dense = tiny_llama()
    with use_backend("torch"):
        model = bk.inject(tiny_llama(), targets, num_adapters=3, r=4, alpha=8, quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    ids = torch.randint(0, 64, (3, 9))
    with use_backend(backend):
        with bk.use_adapters(model, torch.tensor([0, 2, -1])):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad(), bk.use_adapters(model, torch.tensor([-1, -1, -1])):
            base_logits = model(input_ids=ids).logits
    grads = [m.lora_B.grad for m in layers]
    assert all(g is not None for g in grads)
    # adapters 0 and 2 were used, adapter 1 was not
    assert all(g[1].abs().sum() == 0 for g in grads) and any(g[0].abs().sum() > 0 for g in grads)
    with torch.no_grad():
        want = dense(input_ids=ids).logits
    err = ((base_logits - want).norm() / want.norm()).item()
    assert err < 0.2, f"the 4-bit base drifts {err:.2f} from the dense model"
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        bk.inject(tiny_llama(), ["q_proj"], 2, quantize="int8")


@pytest.mark.gpu
def test_merging_into_the_nf4_base_on_the_gpu_gives_the_cpu_bytes():
    """On the GPU the merge dequantizes and quantizes with the Triton kernels: the CPU's merged
    weights (a code may flip where the GPU's fused multiply-add rounds a sum on a boundary), and
    unmerging restores the original codes."""
    model = tiny_llama()
    bk.inject(model, ["q_proj", "down_proj"], 1, r=4, alpha=8, quantize="nf4")
    torch.manual_seed(1)
    for layer in bk.model.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    gpu = copy.deepcopy(model).cuda()
    original = {n: m.base_layer.packed.clone() for n, m in bk.model.adapter_layers(gpu).items()}
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        with use_backend("torch"):
            bk.merge_adapter(model, 0)
        bk.merge_adapter(gpu, 0)
    for name, layer in bk.model.adapter_layers(gpu).items():
        got = layer.base_layer.nf4_weight().dequantize().cpu()
        want = model.get_submodule(name).base_layer.nf4_weight().dequantize()
        assert (got != want).float().mean() < 1e-3 and rel_rms(got, want) < 1e-3, name
    bk.unmerge_adapter(gpu)
    assert all(torch.equal(m.base_layer.packed, original[n]) for n, m in bk.model.adapter_layers(gpu).items())


@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "single"])
def test_merging_into_the_nf4_base_quantizes_again_and_unmerging_restores_it(double_quant, tmp_path):
    """``merge_adapter`` over an NF4 base (PEFT's merge into 4-bit layers): each layer's codes
    become those of ``quantize_nf4(dequant(W) + delta)``, exactly, with a warning that outputs
    move by 4-bit rounding; the merged model's logits are within that of the routed adapter's,
    and ``unmerge_adapter`` puts back the original codes bit for bit."""
    with use_backend("torch"):  # (the kernels' bytes and products are checked in test_nf4_format, test_nf4_matmul)
        _merge_and_unmerge(double_quant, tmp_path)


def _merge_and_unmerge(double_quant, folder):
    model = tiny_llama()
    for name, m in list(model.model.layers.named_modules(prefix="model.layers")):
        if isinstance(m, torch.nn.Linear):
            bk.model._replace(model, name, NF4Linear.from_linear(m, 64, double_quant))
    bk.inject(model, "all-linear", 2, r=4, alpha=8)
    layers = bk.model.adapter_layers(model)
    torch.manual_seed(1)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    original = {n: {p: getattr(m.base_layer, p) for p in ("packed", "absmax", "offset", "nested_absmax")}
                for n, m in layers.items()}
    want = {n: quantize_nf4(m.base_layer.nf4_weight().dequantize().float() + m.delta_weight(1), 64, double_quant)
            for n, m in layers.items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with bk.use_adapters(model, 1):
            routed = model(input_ids=ids).logits
        base = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="quantizes the sum again") as warned:
            bk.merge_adapter(model, 1)
        assert len(warned) == 1, "one warning for the model, not one per layer"
        for name, layer in layers.items():
            got = layer.base_layer
            assert got.compute_dtype == torch.float32 and (got.offset is not None) == double_quant
            assert all(torch.equal(getattr(got, p), getattr(want[name], p))
                       for p in ("packed", "absmax", "nested_absmax") if getattr(got, p) is not None), name
        merged = model(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="merged into the base weights"), bk.use_adapters(model, 0):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="merged into the base weights; .* or bora_kernels.merge_and_unload to save"):
            bk.bnb_4bit_state_dict(model)
        # 4-bit rounding of the sum (0.15 here; the NF4 base itself is 0.2 from the dense model) against
        # the adapter's whole effect (0.9)
        assert 0 < rel_rms(merged, routed) < 0.25 and rel_rms(merged, base) > 3 * rel_rms(merged, routed)
        bk.unmerge_adapter(model)
        assert all(getattr(m.base_layer, p) is original[n][p] for n, m in layers.items() for p in original[n])
        assert torch.equal(model(input_ids=ids).logits, base)
        # merged and unloaded, the model saves as a 4-bit checkpoint that loads to the same logits
        with pytest.warns(UserWarning, match="quantizes the sum again"):
            plain = bk.merge_and_unload(model, 1)
        assert not bk.model.adapter_layers(plain)
        bk.save_pretrained_4bit(plain, folder)
        assert torch.equal(bk.from_pretrained_4bit(folder)(input_ids=ids).logits, merged)
    with pytest.raises(ValueError, match=r"this layer holds \(64, 64\) in blocks of 64"):
        layers["model.layers.0.self_attn.q_proj"].base_layer.set_nf4_weight(quantize_nf4(torch.randn(64, 64), 32))


def test_merge_into_a_bitsandbytes_4bit_model_equals_peft_merge_and_unload(tmp_path):
    """A PEFT adapter over a model bitsandbytes loaded in 4-bit: PEFT's ``merge_and_unload`` and
    our ``merge_adapter`` (over the adopted layers) give the same dequantized weights, exactly."""
    F = pytest.importorskip("bitsandbytes").functional
    peft = pytest.importorskip("peft")
    tiny_llama().save_pretrained(tmp_path / "dense")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config,
                                                                 device_map="cpu")

    theirs = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    theirs.save_pretrained(tmp_path / "adapter")
    theirs = theirs.merge_and_unload()
    ours = bk.load_peft_adapters(load(), {"a": tmp_path / "adapter"})
    with use_backend("torch"), pytest.warns(UserWarning, match="quantizes the sum again"):
        bk.merge_adapter(ours, "a")
    layers = bk.model.adapter_layers(ours)
    assert len(layers) == 6
    for name, layer in layers.items():
        weight = theirs.get_submodule(name).weight
        assert torch.equal(layer.base_layer.nf4_weight().dequantize(), F.dequantize_4bit(weight.data, weight.quant_state))


@pytest.mark.parametrize("backend,amp", [pytest.param("triton", None, marks=NEEDS_INTERPRETER, id="triton"),
                                         pytest.param("torch", None, id="torch"),
                                         pytest.param("torch", torch.bfloat16, id="torch-autocast-bf16")])
def test_qlora_over_layers_with_biases_trains_like_the_dequantized_model(backend, amp):
    """OPT: every projection has a bias, and its MLP sees the tokens flattened to ``[B * L, K]``.
    The adapters' gradients over the NF4 base equal those over the dense model whose weights are
    the dequantized ones (the delta is added into the base output in place, which autograd
    refused when that output was a view). Under bf16 autocast too, on the torch path, where the
    NF4 layer dequantizes to bf16 and multiplies as ``nn.Linear`` does under autocast: the same
    products, so the same gradients (on the Triton path the fused kernel sums in another order,
    and a bf16 model amplifies that; test_autocast checks the op there)."""
    config = transformers.OPTConfig(vocab_size=64, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.OPTForCausalLM(config).eval()  # no dropout
    targets = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]
    with use_backend("torch"):
        quantized = bk.inject(copy.deepcopy(dense), targets, num_adapters=2, r=4, alpha=8, quantize="nf4")
    layers = bk.model.adapter_layers(quantized)
    assert len(layers) == 10 and all(m.base_layer.bias is not None for m in layers.values())
    for name, layer in layers.items():
        dense.get_submodule(name).weight.data.copy_(layer.base_layer.nf4_weight().dequantize())
    dense = bk.inject(dense, targets, num_adapters=2, r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    for name, p in quantized.named_parameters():
        if p.requires_grad:
            p.data.copy_(0.1 * torch.randn(p.shape, generator=gen))
            dense.get_parameter(name).data.copy_(p)
    ids = torch.randint(0, 64, (3, 7), generator=gen)
    with use_backend(backend):
        for model in (quantized, dense):
            with bk.use_adapters(model, [1, -1, 0]), torch.autocast("cpu", torch.bfloat16, enabled=amp is not None):
                model(input_ids=ids, labels=ids).loss.backward()
    for name, layer in layers.items():
        want = dense.get_submodule(name)
        assert_close(layer.lora_A.grad, want.lora_A.grad.double(), torch.float32, f"{name} dA")
        assert_close(layer.lora_B.grad, want.lora_B.grad.double(), torch.float32, f"{name} dB")


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_qlora_compiles_without_graph_breaks(backend):
    """``torch.compile(fullgraph=True)`` of a QLoRA model with per-token adapter ids: ``nf4_matmul``
    runs as the custom ops ``bora_kernels::nf4_matmul`` and ``nf4_matmul_dx``, and logits and
    adapter gradients equal the eager run's, also after the ids change."""
    model, input_ids, gen = _qlora_compile_case("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for ids in (torch.randint(-1, 2, (2, 5), generator=gen), torch.randint(-1, 2, (2, 5), generator=gen)):
        @contextlib.contextmanager
        def route(ids=ids):
            with use_backend(backend), bk.use_adapters(model, ids):
                yield

        (expected, expected_grads), (got, grads) = eager_and_compiled(model, compiled, route, input_ids=input_ids)
        assert_close(got, expected.double(), torch.float32, "compiled logits")
        for g, e in zip(grads, expected_grads):
            assert_close(g, e.double(), torch.float32, "compiled grads")


@pytest.mark.gpu
def test_qlora_compiles_with_inductor_on_gpu():
    """The CUDA version of the test above: inductor, the ops' custom ops on the GPU paths."""
    model, input_ids, gen = _qlora_compile_case("cuda")
    ids = torch.randint(-1, 2, (2, 5), generator=gen).cuda()
    torch._dynamo.reset()
    (expected, expected_grads), (got, grads) = eager_and_compiled(
        model, torch.compile(model, fullgraph=True), lambda: bk.use_adapters(model, ids), input_ids=input_ids)
    # against the eager fp32 run, not a float64 reference: inductor fuses and reorders fp32 sums
    assert rel_rms(got, expected) < 1e-4 and all(rel_rms(g, e) < 1e-4 for g, e in zip(grads, expected_grads))


def _qlora_compile_case(device: str):
    """A tiny Llama with 2 adapters on every linear layer over NF4 bases, adapters away from
    zero; input ids; the generator to draw adapter ids from."""
    with use_backend("torch"):
        model = bk.inject(tiny_llama(), "all-linear", num_adapters=2, r=4, alpha=8, quantize="nf4")
    gen = torch.Generator().manual_seed(2)
    for p in bk.trainable_parameters(model):
        p.data.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.to(device), torch.randint(0, 64, (2, 5), generator=gen).to(device), gen


def bnb_llama(quant_type="nf4"):
    """``tiny_llama()`` with every q_proj and v_proj a bitsandbytes ``Linear4bit``, as
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` makes them."""
    model = tiny_llama()
    for block in model.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(block.self_attn, name, bnb_linear4bit(getattr(block.self_attn, name), True, quant_type))
    return model


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_inject_adopts_a_bitsandbytes_4bit_model(backend, tmp_path):
    """A model loaded in 4-bit by bitsandbytes takes adapters: each ``Linear4bit`` becomes an
    ``NF4Linear`` holding the same bytes (not quantized again), the base model's output is
    unchanged, the adapters train, and PEFT adapters load onto such a model."""
    model = bnb_llama()
    bnb_layers = {name: m for name, m in model.named_modules() if is_bnb_4bit(m)}
    dense_shapes = {name: m.weight.shape[::-1] for name, m in tiny_llama().named_modules() if name in bnb_layers}
    assert len(bnb_layers) == 4 and {n: bk.model.linear_features(m) for n, m in bnb_layers.items()} == dense_shapes
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    bk.inject(model, ["q_proj", "v_proj"], 2, r=4, alpha=8)
    for name, theirs in bnb_layers.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, MultiLoRALinear) and isinstance(layer.base_layer, NF4Linear)
        assert (layer.in_features, layer.out_features) == dense_shapes[name]
        assert torch.equal(layer.base_layer.packed.flatten(), theirs.weight.data.flatten())
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    with use_backend(backend):
        with torch.no_grad(), bk.use_adapters(model, [-1, -1]):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with bk.use_adapters(model, [0, 1]):
            model(input_ids=ids, labels=ids).loss.backward()
    grads = [model.get_submodule(name).lora_A.grad for name in bnb_layers]
    assert all(g is not None and g[0].abs().sum() > 0 and g[1].abs().sum() > 0 for g in grads)

    dense = bk.inject(tiny_llama(), ["q_proj", "v_proj"], 1, r=4, alpha=8, adapter_names=["task"])
    for layer in bk.model.adapter_layers(dense).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    bk.save_peft_adapter(dense, "task", tmp_path / "task")
    loaded = bk.load_peft_adapters(bnb_llama(), {"task": tmp_path / "task"})
    layers = bk.model.adapter_layers(loaded)
    assert set(layers) == set(bnb_layers) and all(isinstance(m.base_layer, NF4Linear) for m in layers.values())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_B[0], bk.model.adapter_layers(dense)[name].lora_B[0])


def test_a_layer_inject_cannot_take_leaves_the_model_as_it_was():
    """bitsandbytes FP4 layers are refused by name; a layer the quantizer refuses (in_features
    not a multiple of the blocksize, a weight on the meta device) stops ``inject`` before any
    layer is replaced."""
    fp4 = bnb_llama("fp4")
    trainable = [p.requires_grad for p in fp4.parameters()]
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is a bitsandbytes 4-bit layer quantized "
                                         r"as 'fp4'"):
        bk.inject(fp4, ["q_proj", "v_proj"], 2)
    assert not bk.model.adapter_layers(fp4) and [p.requires_grad for p in fp4.parameters()] == trainable
    with pytest.raises(ValueError, match="only NF4 is supported"):
        NF4Linear.from_bnb(fp4.model.layers[0].self_attn.q_proj)
    with pytest.raises(ValueError, match=r"NF4Linear.from_bnb\(base_layer\)"):
        MultiLoRALinear(bnb_llama().model.layers[0].self_attn.q_proj, 2)

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with use_backend("torch"), pytest.raises(ValueError, match="multiple of the blocksize"):
        bk.inject(model, r"\d", 2, quantize="nf4")
    assert all(type(m) is torch.nn.Linear for m in model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.device("meta"):  # no values to quantize yet
        meta = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="'0' is on the meta device: load the base weights first"):
        bk.inject(meta, ["0"], 2, quantize="nf4")
    assert type(meta[0]) is torch.nn.Linear


@pytest.mark.parametrize("method", ["context_lora", "context_bitfit", "context_ia3"])
def test_context_peft_over_an_nf4_base(method):
    """Context-PEFT layers take an NF4 base too: the logits equal those of the dense model whose
    weights are the dequantized ones, with the same context parameters, and every context
    parameter that a token's context selects gets a gradient."""
    targets = ["q_proj", "v_proj", "down_proj"]
    kw = {"feedforward_modules": ["down_proj"]} if method == "context_ia3" else {}
    with use_backend("torch"):
        quantized = bk.inject(tiny_llama(), targets, 2, method=method, quantize="nf4", **kw)
    dense = tiny_llama()
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, CONTEXT_LAYERS)}
    assert len(layers) == 6 and all(isinstance(m.base_layer, NF4Linear) for m in layers.values())
    for name, layer in layers.items():
        dense.get_submodule(name).weight.data.copy_(layer.base_layer.nf4_weight().dequantize())
    dense = bk.inject(dense, targets, 2, method=method, **kw)
    gen = torch.Generator().manual_seed(0)
    for name, p in quantized.named_parameters():
        if p.requires_grad:
            p.data.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))  # away from the identity start
            dense.get_parameter(name).data.copy_(p)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    contexts = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    with use_backend("torch"), bk.use_contexts(quantized, contexts):
        logits = quantized(input_ids=ids).logits
        logits.sum().backward()
        with torch.no_grad(), bk.use_contexts(dense, contexts):
            want = dense(input_ids=ids).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    grads = [p.grad for p in quantized.parameters() if p.requires_grad]
    assert grads and all(g is not None and g[0].abs().sum() > 0 and g[1].abs().sum() > 0 for g in grads)


def test_bitsandbytes_8bit_base_trains_and_refuses_merge(tmp_path):
    """A model bitsandbytes loaded in 8-bit: its layers' output is a view made in bitsandbytes'
    own autograd Function, so the adapters add their delta out of place (in place, autograd
    refuses the backward); merging into its int8 codes is refused, not done."""
    tiny_llama().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    bk.inject(model, ["q_proj", "v_proj"], 2, r=4, alpha=8)
    layers = bk.model.adapter_layers(model)
    assert len(layers) == 4 and all(type(m.base_layer).__name__ == "Linear8bitLt" for m in layers.values())
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    with use_backend("torch"):
        with torch.no_grad(), bk.use_adapters(model, [-1, -1]):
            torch.testing.assert_close(model(input_ids=ids).logits, want)
        with bk.use_adapters(model, [0, 1]):
            model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.lora_A.grad[0].abs().sum() > 0 and m.lora_A.grad[1].abs().sum() > 0 for m in layers.values())
    layer = next(iter(layers.values()))
    codes = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="quantized torch.int8 base weight"):
        layer.merge(0)
    assert torch.equal(layer.base_layer.weight, codes)
    # DoRA needs the weight's values: a DoRA adapter for an 8-bit base is refused, naming both
    peft = pytest.importorskip("peft")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(ValueError, match="adapter 'dora' is a DoRA adapter, and at .*q_proj.*: use_dora needs the "
                                         "base weight's values, but Linear8bitLt holds a torch.int8 weight"):
        bk.load_peft_adapters(model, {"dora": tmp_path / "dora"})
    with pytest.raises(ValueError, match="use_dora needs the base weight's values"):
        layer.set_adapter(1, torch.zeros(4, layer.in_features), torch.zeros(layer.out_features, 4),
                          magnitude=torch.ones(layer.out_features))

