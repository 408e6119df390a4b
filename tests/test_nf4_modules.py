"""``NF4Linear`` against bitsandbytes' ``Linear4bit`` and the dense layer it came from, and
multi-adapter QLoRA: ``inject(..., quantize="nf4")`` on a tiny Llama trains and serves adapters
over one 4-bit base."""

import pytest
import torch
import transformers

import bora_kernels as bk
from bora_kernels.nn import MultiLoRALinear, NF4Linear
from bora_kernels.ops import use_backend
from bora_kernels.quant import quantize_nf4
from conftest import KERNEL_AND_TORCH
from tolerances import assert_close



def bnb_linear4bit(linear, double_quant):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, quant_type="nf4", compress_statistics=double_quant)
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


def test_nf4_linear_moves_without_rounding_its_statistics():
    with use_backend("torch"):
        layer = NF4Linear(quantize_nf4(torch.randn(16, 64), 64, double_quant=True), torch.randn(16))
    absmax = layer.nested_absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.nested_absmax.dtype == torch.float32 and torch.equal(layer.nested_absmax, absmax)
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
    with pytest.raises(ValueError, match="4-bit"):
        layers[0].merge(0)
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        bk.inject(tiny_llama(), ["q_proj"], 2, quantize="int8")
