"""DoRA adapters in ``MultiLoRALinear`` (``nn/dora.py``): the norms against a float64 reference,
a batch mixing DoRA, plain LoRA and no adapter against PEFT's DoRA layer (forward and every
gradient, every CPU path), dropout, the kept norms, NF4 bases, inject, and bad input. Whole
models with DoRA checkpoints are in test_peft_interop."""

import copy

import pytest
import torch
from conftest import ROUTINGS, assert_equals_peft_per_sequence, cpu_backends, routed_forward, run_on
from lora_reference import assert_matches_reference, reference
from tolerances import assert_close
from torch import nn

import bora_kernels as bk
from bora_kernels.bench.baselines import peft_lora_linear
from bora_kernels.nn import MultiLoRALinear, NF4Linear
from bora_kernels.nn.dora import base_row_norms_sq, dora_norms
from bora_kernels.quant import quantize_nf4

K, N = 64, 36
RANKS, ALPHAS, DORA = (4, 8, 2, 3), (8, 16, 3, 6), (True, False, True, True)


# adapter 1, plain in the other tests, with PEFT's lora_bias (test_lora_bias): the GPU and autocast
# tests run both layers
WITH_LORA_BIAS = {"dora": {}, "dora_and_lora_bias": {"lora_bias": [False, True, False, False]}}


def make_layer(bias=True, seed=0, **kwargs):
    """Adapters 0, 2, 3 DoRA and 1 plain, B, the magnitudes (and any lora_bias) moved off their
    initial values."""
    torch.manual_seed(seed)
    kwargs = dict(r=list(RANKS), alpha=list(ALPHAS), use_dora=list(DORA)) | kwargs
    layer = MultiLoRALinear(nn.Linear(K, N, bias=bias), len(RANKS), **kwargs)
    with torch.no_grad():
        for d, r in enumerate(kwargs["r"]):
            layer.lora_B[d, :, :r].normal_(std=0.3)
        layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
        if layer.lora_bias_vector is not None:
            layer.lora_bias_vector.normal_()
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "fan_in_fan_out"])
def test_norms_equal_the_dense_reference(fan_in_fan_out):
    torch.manual_seed(1)
    a, b = torch.randn(3, 5, K), torch.randn(3, N, 5)  # adapter 1 uses 3 of the 5 ranks: the rest is not read
    scaling, ranks = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([5, 3, 5], dtype=torch.int32)
    weight = torch.randn(N, K)
    base = nn.Linear(K, N)
    base.weight.data = weight.T.contiguous() if fan_in_fan_out else weight
    got = dora_norms(base, a, b, scaling, ranks, base_row_norms_sq(base, fan_in_fan_out), fan_in_fan_out)
    want = torch.stack([(weight.double() + scaling[d].double() * b[d, :, :r].double() @ a[d, :r].double()).norm(dim=1)
                        for d, r in enumerate(ranks.tolist())])
    assert_close(got, want, torch.float32, "norms")


def test_norms_over_an_nf4_base_are_those_of_its_dequantized_weight():
    torch.manual_seed(2)
    base = NF4Linear(quantize_nf4(torch.randn(N, K)))
    a, b, scaling = torch.randn(2, 4, K), torch.randn(2, N, 4), torch.tensor([1.0, 0.25])
    dense = base.nf4_weight().dequantize().double()
    got = dora_norms(base, a, b, scaling, torch.tensor([4, 4]), base_row_norms_sq(base, False), False)
    want = torch.stack([(dense + scaling[d].double() * b[d].double() @ a[d].double()).norm(dim=1) for d in range(2)])
    assert_close(got, want, torch.float32, "nf4 norms")


IDS = {  # DoRA, plain LoRA and no adapter side by side
    "per_token": torch.tensor([[0, 1, -1, 2, 3], [3, 3, 0, -1, 1], [2, 0, 1, 1, -1]]),
    "per_sequence": torch.tensor([2, -1, 1]),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("how", ROUTINGS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_mixed_batch_forward_and_gradients(backend, how, bias, poison_empty):
    layer = make_layer(bias=bias)
    x = torch.randn(3, 5, K, requires_grad=True)
    dy = torch.randn(3, 5, N)
    with run_on(backend):
        out, token_ids = routed_forward(layer, x, IDS["per_token"], IDS["per_sequence"], how, (3, 5))
        (out * dy).sum().backward()
    assert_matches_reference(layer, x, token_ids, out, dy, torch.float32)
    assert (layer.lora_magnitude.grad[1] == 0).all(), "a plain LoRA adapter's magnitude row gets no gradient"


@pytest.mark.parametrize("backend", cpu_backends())
def test_mixed_batch_equals_peft_per_sequence(backend):
    """PEFT refuses a mixed batch with DoRA adapters (``adapter_names``); it runs one at a time."""
    assert_equals_peft_per_sequence(make_layer(), torch.randn(6, 5, K), torch.tensor([2, -1, 0, 1, 3, 2]), backend)


def test_dropout_in_training_as_peft():
    """With dropout PEFT computes DoRA's ``W x'`` from the dropped input (an extra base matmul);
    the same seed draws the same mask in both, so the outputs and gradients agree."""
    layer = make_layer(dropout=0.3).train()
    peft_layer, names = peft_lora_linear(layer, dropout=0.3)
    peft_layer.train()
    x = torch.randn(2, 5, K)
    for d, name in enumerate(names):
        peft_layer.set_adapter(name)
        torch.manual_seed(7)
        ours = layer(x, torch.full((2,), d))
        torch.manual_seed(7)
        theirs = peft_layer(x)
        assert_close(ours, theirs, torch.float32, f"adapter {name} with dropout")
        ours.square().sum().backward()
        theirs.square().sum().backward()
        r = layer.rank_values[d]
        assert_close(layer.lora_A.grad[d, :r], peft_layer.lora_A[name].weight.grad, torch.float32, f"dA {name}")
        if layer.use_dora[d]:
            assert_close(layer.lora_magnitude.grad[d], peft_layer.lora_magnitude_vector[name].weight.grad,
                         torch.float32, f"dm {name}")


def test_norms_are_kept_while_serving_and_follow_every_change():
    layer = make_layer().eval()
    x, ids = torch.randn(4, K), torch.tensor([0, 2, 3, 1])
    with torch.no_grad():
        first = layer(x, ids)
        kept = layer._norms()
        assert layer._norms() is kept, "serving computes the norms once"
        assert torch.equal(layer(x, ids), first)
        layer.lora_B[0] *= 2  # an in-place write: PyTorch's version counter moves
    assert layer._norms() is not kept
    with torch.no_grad():
        assert_close(layer(x, ids), reference(layer, x, ids), torch.float32, "after an in-place write")
    layer.lora_A.data[2] *= 3  # through .data, unseen by the counters: clear_dora_cache says so
    layer.clear_dora_cache()
    with torch.no_grad():
        assert_close(layer(x, ids), reference(layer, x, ids), torch.float32, "after clear_dora_cache")
    # training: fresh norms at every forward, even after writes no counter saw (a CUDA graph's
    # replayed optimizer step writes so), also without grad in train mode (reentrant checkpointing)
    layer.lora_B.data[3] *= 0.5
    assert_close(layer(x, ids), reference(layer, x, ids), torch.float32, "training after a write through .data")
    layer.train()
    layer.lora_B.data[3] *= 0.5
    with torch.no_grad():
        assert_close(layer(x, ids), reference(layer, x, ids), torch.float32, "train mode without grad")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x, ids).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert_close(layer(x, ids), reference(layer, x, ids), torch.float32, "after an optimizer step")


def test_fresh_dora_adapters_equal_the_base_and_train_and_save_for_peft(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, N))
    bk.inject(model, ["0", "2"], num_adapters=2, r=4, use_dora=[True, False], adapter_names=["dora", "plain"])
    x = torch.randn(3, K)
    base = model[2].base_layer(torch.relu(model[0].base_layer(x)))
    with bk.use_adapters(model, ["dora", "plain", None]):
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
    magnitude = model[0].lora_magnitude
    assert torch.allclose(magnitude[0], model[0].base_layer.weight.norm(dim=1))
    optimizer = torch.optim.AdamW(bk.trainable_parameters(model), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        with bk.use_adapters(model, ["dora", "plain", "dora"]):
            model(x).sum().backward()
        optimizer.step()
    assert not torch.allclose(magnitude[0], model[0].base_layer.weight.norm(dim=1)), "the magnitude trains"

    peft = pytest.importorskip("peft")
    for name in ("dora", "plain"):
        folder = bk.save_peft_adapter(model, name, tmp_path / name)
        holder = nn.Sequential(*[copy.deepcopy(m.base_layer) if isinstance(m, MultiLoRALinear) else m for m in model])
        theirs = peft.PeftModel.from_pretrained(holder, folder).eval()
        with torch.no_grad(), bk.use_adapters(model, name):
            assert_close(model(x), theirs(x), torch.float32, f"{name} saved for PEFT")


def test_nf4_base_with_dora_and_its_merge():
    torch.manual_seed(4)
    layer = MultiLoRALinear(NF4Linear(quantize_nf4(torch.randn(N, K))), 2, r=4, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude.mul_(1.5)
    dense = MultiLoRALinear(nn.Linear(K, N, bias=False), 2, r=4, use_dora=True)
    dense.base_layer.weight.data = layer.base_layer.nf4_weight().dequantize()
    dense.load_state_dict(layer.state_dict(), strict=False)
    x, ids = torch.randn(5, K), torch.tensor([0, 1, -1, 1, 0])
    with torch.no_grad():
        before = layer(x, ids)
        assert_close(before, reference(dense, x, ids), torch.float32, "nf4 base")
        layer.merge(1)
        dense.merge(1)  # DoRA's merge: each row of W + s B A scaled by m / ||W + s B A||
        assert_close(dense.base_layer(x), reference(dense.unmerge() or dense, x, torch.ones(5, dtype=torch.long)),
                     torch.float32, "dense merge")
        # the NF4 merge quantizes that weight again
        assert torch.equal(layer.base_layer.nf4_weight().dequantize(),
                           quantize_nf4(dense._merged_weight(1, dense.base_layer.weight.float())).dequantize())
        layer.unmerge()
        assert torch.equal(layer(x, ids), before), "unmerge restores the NF4 codes"


@pytest.mark.parametrize("call, match", [
    (lambda layer: layer.set_adapter(0, torch.zeros(4, K), torch.zeros(N, 4), magnitude=torch.ones(N + 1)),
     r"magnitude must be \[36\]"),
    (lambda layer: layer.set_adapter(0, None, None, magnitude=torch.ones(N)), "needs the adapter's A and B"),
], ids=["magnitude_shape", "magnitude_without_weights"])
def test_bad_arguments(call, match):
    layer = make_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        call(layer)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items()), "a refused call changes nothing"


def test_dora_needs_the_base_weights_values():
    base = nn.Linear(K, N)
    base.weight = nn.Parameter(torch.zeros(N, K, dtype=torch.int8), requires_grad=False)  # as 8-bit codes
    with pytest.raises(ValueError, match="use_dora needs the base weight's values"):
        MultiLoRALinear(base, 2, r=4, use_dora=True)
    with pytest.raises(ValueError, match="use_dora applies to method='lora' only"):
        bk.inject(nn.Sequential(nn.Linear(K, N)), ["0"], 2, method="context_lora", use_dora=True)


def test_ivon_posterior_samples_reach_the_norms():
    """IVON writes the mean and each weight sample with its own kernel and tells PyTorch so
    (``increment_version``): every sample of ``sampled_params`` is predicted with its own norms."""
    layer = make_layer()
    optimizer = bk.optim.IVON([p for p in layer.parameters() if p.requires_grad], lr=0.05, ess=100.0,
                              hess_init=0.5)
    x, ids = torch.randn(6, K), torch.tensor([0, 2, 3, 1, -1, 0])
    for _ in range(2):
        with optimizer.sampled_params(train=True):
            layer(x, ids).square().mean().backward()
        optimizer.step()
    outputs = []
    layer.eval()  # predicting: the norms are kept between calls while the weights stay
    with torch.no_grad():
        for _ in range(3):
            with optimizer.sampled_params():
                out = layer(x, ids)
                assert_close(out, reference(layer, x, ids), torch.float32, "a posterior sample")
                outputs.append(out)
        assert_close(layer(x, ids), reference(layer, x, ids), torch.float32, "the mean")
    assert not torch.equal(outputs[0], outputs[1]), "the samples differ"


def test_dora_adapter_set_into_a_plain_layer():
    """``set_adapter`` with a magnitude (how checkpoints and the server load adapters) makes the
    layer's ``lora_magnitude`` then, and the norms follow the new weights and scales."""
    source = make_layer()
    layer = MultiLoRALinear(copy.deepcopy(source.base_layer), 2, r=8)
    assert layer.lora_magnitude is None
    for slot, d in ((1, 1), (0, 2)):  # the DoRA adapter last: nothing written after it
        a, b = source.adapter_weights(d)
        layer.set_adapter(slot, a, b, alpha=source.alphas[d], magnitude=source.adapter_magnitude(d))
    assert layer.use_dora == [True, False] and layer.adapter_magnitude(1) is None
    x = torch.randn(4, K)
    with torch.no_grad():
        assert_close(layer(x, torch.tensor([0, 1, 0, -1])), source(x, torch.tensor([2, 1, 2, -1])), torch.float32,
                     "set adapters")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(WITH_LORA_BIAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_on_gpu(dtype, variant):
    """The Triton kernels and the norms' GEMM on the GPU: forward and every gradient."""
    from bora_kernels.ops import use_backend

    layer = make_layer(**WITH_LORA_BIAS[variant]).to("cuda", dtype)
    ids = IDS["per_token"].cuda()
    x = torch.randn(3, 5, K, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 5, N, device="cuda", dtype=dtype)
    with use_backend(None):
        out = layer(x, ids)
        (out * dy).sum().backward()
    assert_matches_reference(layer, x, ids, out, dy, dtype)


@pytest.mark.parametrize("variant", list(WITH_LORA_BIAS))
def test_output_dtype_under_autocast_is_the_base_layers(variant):
    """An fp32 bias must not turn the bf16 output of an autocast region into fp32."""
    layer = make_layer(**WITH_LORA_BIAS[variant]).eval()
    x, ids = torch.randn(4, K), torch.tensor([0, 1, 2, -1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, ids)
        assert out.dtype == layer.base_layer(x).dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(out.float(), reference(layer, x, ids), torch.bfloat16, "under autocast")
