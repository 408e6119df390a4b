"""A ``MultiLoRALinear``'s output in float64, token by token, and the check of a forward and
every gradient against it: shared by the tests of DoRA and ``lora_bias`` adapters."""

import copy

import torch
from tolerances import assert_close

PARAMETERS = ("lora_A", "lora_B", "lora_magnitude", "lora_bias_vector")


def reference(layer, x, ids):
    """float64: ``W x + s B A x`` per token of adapter ``d`` (``W x`` for -1), DoRA's rows scaled by
    ``m / ||W + s B A||`` (a constant in backward), ``+ s b`` under ``lora_bias``, then the base bias."""
    w, bias = layer.base_layer.weight.double(), layer.base_layer.bias
    out = []
    for row, d in zip(x.reshape(-1, layer.in_features).double(), ids.reshape(-1).tolist()):
        y = w @ row
        if d >= 0:
            r, s = layer.rank_values[d], layer.scaling_values[d]
            delta = s * layer.lora_B[d, :, :r].double() @ layer.lora_A[d, :r].double()
            y = (w + delta) @ row
            if layer.use_dora[d]:
                y = y * layer.lora_magnitude[d].double() / (w + delta).norm(dim=1).detach()
            if layer.use_lora_bias[d]:
                y = y + s * layer.lora_bias_vector[d].double()
        out.append(y if bias is None else y + bias.double())
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features)


def assert_matches_reference(layer, x, token_ids, out, dy, dtype):
    """``out`` and the gradients its backward for ``dy`` left in x and every adapter parameter
    against the float64 reference of a copy of ``layer`` (a parameter the batch never reached:
    zeros)."""
    ref_layer = copy.deepcopy(layer)
    names = [name for name in PARAMETERS if getattr(layer, name) is not None]
    for name in names:
        getattr(ref_layer, name).grad = None
    x_ref = x.detach().double().requires_grad_()
    want = reference(ref_layer, x_ref, token_ids)
    (want * dy.double()).sum().backward()
    assert_close(out, want, dtype, "forward")
    assert_close(x.grad, x_ref.grad, dtype, "dx")
    for name in names:
        ref = getattr(ref_layer, name)
        assert_close(getattr(layer, name).grad, torch.zeros_like(ref) if ref.grad is None else ref.grad, dtype,
                     f"d{name}")
