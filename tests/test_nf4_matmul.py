"""``nf4_matmul`` and its gradients against ``x.double() @ dequant(W).double().T``, on both CPU
paths, outputs poisoned; shapes with M = 1, odd sizes and sizes off the kernel's tiles."""

import pytest
import torch

from bora_kernels.ops import nf4_matmul, use_backend
from bora_kernels.ops.nf4_matmul.reference import nf4_matmul_reference
from bora_kernels.quant import quantize_nf4
from conftest import KERNEL_AND_TORCH
from tolerances import assert_close

CASES = [pytest.param((1,), 64, 24, 64, id="M1-K64-N24-bs64"), pytest.param((2, 5), 192, 70, 64, id="M10-K192-N70"),
         pytest.param((33,), 128, 130, 32, id="M33-K128-N130-bs32")]


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lead,k,n,blocksize", CASES)
def test_matches_reference(lead, k, n, blocksize, with_bias, double_quant, dtype, backend, poison_empty):
    gen = torch.Generator().manual_seed(k + n)
    with use_backend("torch"):  # the format has its own tests; here it only needs to be quick
        weight = quantize_nf4(torch.randn(n, k, generator=gen).to(dtype), blocksize, double_quant)
    x = torch.randn(*lead, k, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(n, generator=gen).to(dtype).requires_grad_() if with_bias else None
    with use_backend("torch"):
        ref = nf4_matmul_reference(x, weight, bias)
    with use_backend(backend):
        out = nf4_matmul(x, weight, bias)
        assert out.dtype == dtype and out.shape == (*lead, n)
        assert_close(out, ref, dtype, "forward")
        dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        inputs = [x] + ([bias] if with_bias else [])
        got = torch.autograd.grad(out, inputs, dy.to(dtype))
    want = torch.autograd.grad(ref, inputs, dy)
    for g, w, name in zip(got, want, ("x", "bias")):
        assert_close(g, w, dtype, f"d{name}")


@pytest.mark.parametrize("call,match", [
    (lambda w: nf4_matmul(torch.randn(3, 64), torch.randn(8, 64)), "NF4Tensor"),
    (lambda w: nf4_matmul(torch.randn(3, 32), w), r"x must be a \[\.\.\., 64\]"),
    (lambda w: nf4_matmul(torch.randn(3, 64).double(), w), "float32, float16 or bfloat16"),
    (lambda w: nf4_matmul(torch.randn(3, 64), w, torch.zeros(7)), r"bias must be a \[8\]"),
    (lambda w: nf4_matmul(torch.randn(3, 96), quantize_nf4(torch.randn(8, 96), 64)), "multiple of its blocksize"),
    (lambda w: nf4_matmul(torch.randn(3, 64), quantize_nf4(torch.randn(2, 8, 64), 64)), "2-D"),
])
def test_bad_input_names_the_argument(call, match):
    with use_backend("torch"), pytest.raises(ValueError, match=match):
        call(quantize_nf4(torch.randn(8, 64), 64))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 1024])
def test_compiled_kernels_match_bitsandbytes_on_gpu(m):
    """bf16 on CUDA: ours against the float64 reference and against bitsandbytes' matmul_4bit."""
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(m)
    w = torch.randn(4096, 4096, generator=gen).to("cuda", torch.bfloat16)
    weight = quantize_nf4(w, 64, double_quant=True)
    x = torch.randn(m, 4096, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    out = nf4_matmul(x, weight)
    ref = nf4_matmul_reference(x, weight)
    assert_close(out, ref, torch.bfloat16, "forward")
    packed, state = weight.to_bnb()
    theirs = bnb.matmul_4bit(x.detach(), packed.t(), quant_state=state)
    assert_close(out, theirs.double(), torch.bfloat16, "against bitsandbytes")
    dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64).cuda()
    (dx,) = torch.autograd.grad(out, [x], dy.to(torch.bfloat16))
    (want,) = torch.autograd.grad(ref, [x], dy)
    assert_close(dx, want, torch.bfloat16, "dx")
