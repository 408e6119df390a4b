"""``MultiLoRALinear`` against PEFT's LoRA ``Linear`` holding the same adapters."""

import math

import pytest
import torch
from conftest import cpu_backends, run_on
from tolerances import assert_close
from torch import nn

import bora_kernels as bk
from bora_kernels.bench.baselines import peft_lora_linear
from bora_kernels.nn import MultiLoRALinear

K, N = 40, 36


def make_layer(ranks=(4, 8, 2), alphas=(8, 16, 3), seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = MultiLoRALinear(nn.Linear(K, N), len(ranks), r=list(ranks), alpha=list(alphas), **kwargs)
    with torch.no_grad():  # B starts at zero; give it values so that the adapters differ
        for d, r in enumerate(ranks):
            layer.lora_B[d, :, :r].normal_()
    return layer


def test_fresh_layer_equals_base():
    layer = MultiLoRALinear(nn.Linear(K, N), 3, r=[4, 8, 2], alpha=16)
    x = torch.randn(5, K)
    out = layer(x, torch.tensor([0, 1, 2, -1, 1]))
    torch.testing.assert_close(out, layer.base_layer(x), rtol=0, atol=0)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias  # as PEFT's layers


def test_init_as_peft():
    layer = MultiLoRALinear(nn.Linear(K, N), 3, r=[4, 8, 2], alpha=[8, 16, 3])
    bound = 1 / math.sqrt(K)  # kaiming_uniform(a=sqrt(5)) on fan_in K
    for d, r in enumerate([4, 8, 2]):
        a = layer.lora_A[d]
        assert a[:r].abs().max() <= bound and a[:r].abs().max() > bound / 2
        assert (a[r:] == 0).all()
    assert (layer.lora_B == 0).all()
    assert layer.scaling.tolist() == [2.0, 2.0, 1.5]
    assert not layer.base_layer.weight.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("backend", cpu_backends())
def test_each_adapter_equals_peft(backend):
    layer = make_layer()
    peft_layer, names = peft_lora_linear(layer)
    x = torch.randn(2, 5, K)
    for d, name in enumerate(names):
        peft_layer.set_adapter(name)
        with run_on(backend), torch.no_grad():
            ours = layer(x, torch.full((2,), d))
            theirs = peft_layer(x)
        assert_close(ours, theirs, torch.float32, f"adapter {name}")


def mixed_batch_with_peft():
    """Our layer, PEFT's with the same adapters, and a batch mixing them (one sequence on none)."""
    layer = make_layer()
    peft_layer, names = peft_lora_linear(layer)
    return layer, peft_layer, names, torch.randn(6, 5, K), torch.tensor([2, -1, 0, 1, 0, 2])


@pytest.mark.parametrize("backend", cpu_backends())
def test_mixed_batch_equals_peft(backend):
    layer, peft_layer, names, x, ids = mixed_batch_with_peft()
    with run_on(backend), torch.no_grad():
        ours = layer(x, ids)
        theirs = peft_layer(x, adapter_names=[names[i] if i >= 0 else "__base__" for i in ids])
    assert_close(ours, theirs, torch.float32, "mixed batch")


@pytest.mark.parametrize("backend", cpu_backends())
def test_mixed_batch_gradients_equal_peft_per_task(backend):
    """One backward over a mixed batch gives each adapter what PEFT gives it on its own sub-batch."""
    layer, peft_layer, names, x, ids = mixed_batch_with_peft()
    dy = torch.randn(6, 5, N)
    with run_on(backend):
        (layer(x, ids) * dy).sum().backward()
    for d, name in enumerate(names):
        peft_layer.set_adapter(name)
        sel = ids == d
        (peft_layer(x[sel]) * dy[sel]).sum().backward()
        r = layer.ranks[d]
        assert_close(layer.lora_A.grad[d, :r], peft_layer.lora_A[name].weight.grad, torch.float32, f"dA {name}")
        assert_close(layer.lora_B.grad[d, :, :r], peft_layer.lora_B[name].weight.grad, torch.float32, f"dB {name}")
        assert (layer.lora_A.grad[d, r:] == 0).all()


def test_routing_attribute_and_use_adapters():
    model = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, N))
    bk.inject(model, ["0", "2"], num_adapters=3, r=4)
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            nn.init.normal_(m.lora_B)
    x = torch.randn(4, 3, K)
    ids = torch.tensor([0, 1, -1, 2])
    base = model(x)
    with bk.use_adapters(model, ids):
        routed = model(x)
        with bk.use_adapters(model, None):
            torch.testing.assert_close(model(x), base, rtol=0, atol=0)
        torch.testing.assert_close(model(x), routed, rtol=0, atol=0)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    assert not torch.allclose(routed[0], base[0])
    torch.testing.assert_close(routed[2], base[2], rtol=0, atol=0)  # id -1: base model
    explicit = model[2](model[1](model[0](x, ids)), ids)
    torch.testing.assert_close(routed, explicit, rtol=0, atol=0)


def test_use_adapters_restores_after_error():
    model = bk.inject(nn.Sequential(nn.Linear(K, N)), ["0"], num_adapters=2)
    with pytest.raises(RuntimeError, match="boom"):
        with bk.use_adapters(model, torch.tensor([1])):
            raise RuntimeError("boom")
    assert model[0].adapter_ids is None


def test_fp32_adapters_on_bf16_base():
    layer = MultiLoRALinear(nn.Linear(K, N).to(torch.bfloat16), 2, r=4, alpha=[16, 5], dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32
    out = layer(torch.randn(3, K, dtype=torch.bfloat16), torch.tensor([0, 1, -1]))
    assert out.dtype == torch.bfloat16


def test_to_dtype_keeps_scaling_exact():
    layer = MultiLoRALinear(nn.Linear(K, N), 2, r=3, alpha=16).to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer.scaling.dtype == torch.float32 and layer.scaling[0] == torch.tensor(16 / 3)


def test_state_dict_carries_the_ranks_and_the_scales_follow():
    """A layer whose ranks changed after it was made (``set_adapter``, PEFT checkpoints of other
    ranks) loads into a fresh layer with the scales of the loaded ranks (alpha / r)."""
    trained = make_layer()
    with torch.no_grad():
        trained.set_adapter(0, torch.randn(3, K), torch.randn(N, 3), alpha=8)  # rank 4 -> 3
        trained.set_adapter(2, None, None)  # absent here
    fresh = make_layer(seed=1)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.rank_values == [3, 8, 0] and fresh.scaling_values == trained.scaling_values
    x, ids = torch.randn(6, K), torch.tensor([0, 1, 2, -1, 0, 2])
    torch.testing.assert_close(fresh(x, ids), trained(x, ids), rtol=0, atol=0)
    for ranks in ([3, 9, 0], [3, -1, 0], [3, 8]):  # above the largest rank, negative, wrong length
        bad = dict(trained.state_dict(), ranks=torch.tensor(ranks, dtype=torch.int32))
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(RuntimeError, match=r"ranks must be 3 ints in \[0, 8\]"):
            fresh.load_state_dict(bad)
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_made_on_the_meta_device_then_loaded(how):
    """Big-model loading: inject into a model made on the meta device, then load the weights
    (``to_empty`` then ``load_state_dict``, or ``load_state_dict(assign=True)``)."""
    trained = nn.Sequential(make_layer())
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(K, N))
        bk.inject(model, ["0"], num_adapters=3, r=8, alpha=[8, 16, 3])  # the ranks come with the weights
    assert "r=8" in repr(model)  # no value read from a meta tensor
    if how == "to_empty":
        model.to_empty(device="cpu").load_state_dict(trained.state_dict())
    else:
        model.load_state_dict(trained.state_dict(), assign=True)
    layer = model[0]
    assert layer.rank_values == [4, 8, 2] and layer.scaling.device.type == "cpu"
    x, ids = torch.randn(6, K), torch.tensor([0, 1, 2, -1, 0, 2])
    torch.testing.assert_close(layer(x, ids), trained[0](x, ids), rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_adapter_set_in_inference_mode_then_trains(backend):
    """``set_adapter`` inside ``torch.inference_mode()`` (a server loading an adapter, an
    evaluation script) leaves no inference tensor that training would save for backward."""
    layer = make_layer()
    with torch.inference_mode():
        layer.set_adapter(0, torch.randn(2, K), torch.randn(N, 2), alpha=4)
    x = torch.randn(5, K, requires_grad=True)
    with run_on(backend):
        layer(x, torch.tensor([0, 1, 2, 0, -1])).sum().backward()
    assert layer.lora_A.grad[0, :2].abs().sum() > 0 and x.grad.abs().sum() > 0


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    ref = make_layer()
    x = torch.randn(4, K)
    ids = torch.tensor([0, 1, 2, 0])
    layer.eval()
    torch.testing.assert_close(layer(x, ids), ref(x, ids))
    layer.train()
    assert not torch.allclose(layer(x, ids), ref(x, ids))


@pytest.mark.parametrize("kwargs,match", [
    (dict(base_layer=nn.Conv1d(3, 3, 1), num_adapters=2), "base_layer must be an nn.Linear"),
    (dict(num_adapters=0), "num_adapters must be"),
    (dict(num_adapters=2, r=[4, 4, 4]), "r must be one value or 2 values"),
    (dict(num_adapters=2, r=0), "at least one positive"),
    (dict(num_adapters=2, r=[2, -1]), "r must be ints >= 0"),
    (dict(num_adapters=2, alpha=[1]), "alpha must be one value or 2 values"),
    (dict(num_adapters=2, dropout=1.0), "dropout must lie"),
], ids=["base", "num_adapters", "r_len", "r_zero", "r_negative", "alpha_len", "dropout"])
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("base_layer", nn.Linear(K, N))
    with pytest.raises(ValueError, match=match):
        MultiLoRALinear(**kwargs)


def test_inject_errors():
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU())
    with pytest.raises(ValueError, match="matched no module"):
        bk.inject(model, ["q_proj"], num_adapters=2)
    with pytest.raises(ValueError, match="is a ReLU; only nn.Linear"):
        bk.inject(model, ["1"], num_adapters=2)
    with pytest.raises(ValueError, match="no adapter layers"):
        with bk.use_adapters(nn.Sequential(nn.Linear(K, N)), torch.tensor([0])):
            pass
