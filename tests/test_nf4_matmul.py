"""``nf4_matmul`` and its gradients against ``x.double() @ dequant(W).double().T``, on both CPU
paths, outputs poisoned; shapes with M = 1, odd sizes and sizes off the kernel's tiles; every
kernel path (split-K for few rows, tiled, dequantize + F.linear for many, the CUDA GEMV on GPU)."""

import dataclasses
import importlib

import pytest
import torch

from bora_kernels.ops import nf4_matmul, use_backend
from bora_kernels.ops.nf4_matmul.reference import nf4_matmul_reference
from bora_kernels.quant import quantize_nf4
from conftest import KERNEL_AND_TORCH, NEEDS_INTERPRETER
from tolerances import assert_close

nf4_package = importlib.import_module("bora_kernels.ops.nf4_matmul")  # the package, not the function


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
        with torch.no_grad():  # inference skips the autograd node, not the arithmetic
            plain = nf4_matmul(x, weight, bias)
        assert plain.grad_fn is None and torch.equal(plain, out)
        dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        inputs = [x] + ([bias] if with_bias else [])
        got = torch.autograd.grad(out, inputs, dy.to(dtype))
    want = torch.autograd.grad(ref, inputs, dy)
    for g, w, name in zip(got, want, ("x", "bias")):
        assert_close(g, w, dtype, f"d{name}")


def _problem(m, k, n, blocksize, dtype, double_quant=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with use_backend("torch"):
        weight = quantize_nf4(torch.randn(n, k, generator=gen).to(dtype), blocksize, double_quant)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return weight, x, torch.randn(n, generator=gen).to(dtype), gen


@NEEDS_INTERPRETER
@pytest.mark.parametrize("split", [1, 2, 3, 5])
@pytest.mark.parametrize("m", [1, 7, 16, 40])
def test_split_k_sums_every_stretch_once(m, split, poison_empty):
    """Few output tiles split the reduction over programs (K = 320: five 64-wide tiles, so 2 and 3
    splits leave a short last stretch), in the 16-row kernel and the tiled one (M = 40); forward
    with bias and dx, against the reference."""
    from bora_kernels.ops.nf4_matmul.triton import nf4_matmul_dx, nf4_matmul_forward

    weight, x, bias, gen = _problem(m, 320, 72, 64, torch.float32, seed=m * 10 + split)
    ref = nf4_matmul_reference(x, weight, bias)
    with use_backend("triton"):
        assert_close(nf4_matmul_forward(x, weight, bias, (m, 72), split=split), ref, torch.float32, "forward")
        dy = torch.randn(m, 72, generator=gen)
        want = dy.double() @ weight.dequantize(torch.float32).double()
        assert_close(nf4_matmul_dx(dy, weight, (m, 320), split=split), want, torch.float32, "dx")


@NEEDS_INTERPRETER
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", [128, 256])
@pytest.mark.parametrize("m", [3, 40])
def test_blocks_wider_than_the_weight_tile(m, blocksize, double_quant, poison_empty):
    """A block spans several of the kernels' K tiles (64 wide under the interpreter), so a tile
    takes one scale per row; forward (split K at M = 3, tiled at 40) and dx, against the
    reference."""
    from bora_kernels.ops.nf4_matmul.triton import nf4_matmul_dx, nf4_matmul_forward

    weight, x, bias, gen = _problem(m, 512, 24, blocksize, torch.float32, double_quant, seed=blocksize + m)
    with use_backend("triton"):
        assert_close(nf4_matmul_forward(x, weight, bias, (m, 24)), nf4_matmul_reference(x, weight, bias),
                     torch.float32, "forward")
        dy = torch.randn(m, 24, generator=gen)
        want = dy.double() @ weight.dequantize(torch.float32).double()
        assert_close(nf4_matmul_dx(dy, weight, (m, 512)), want, torch.float32, "dx")


@NEEDS_INTERPRETER
def test_packed_codes_starting_mid_word(poison_empty):
    """The kernels read the codes as int32 words; packed bytes that start off a 4-byte boundary
    (a view into a larger buffer) are copied to an aligned buffer first, never misread."""
    weight, x, bias, _ = _problem(5, 128, 20, 64, torch.float32, seed=3)
    buffer = torch.zeros(weight.packed.numel() + 1, 1, dtype=torch.uint8)
    buffer[1:] = weight.packed
    shifted = dataclasses.replace(weight, packed=buffer[1:])
    assert shifted.packed.storage_offset() == 1
    with use_backend("triton"):
        assert_close(nf4_matmul(x, shifted, bias), nf4_matmul_reference(x, weight, bias), torch.float32, "forward")


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
def test_many_rows_take_the_dense_path(backend, monkeypatch, poison_empty):
    """From ``DENSE_MIN_M`` rows the weight is dequantized once and F.linear runs, forward and dx
    (the threshold lowered here so that the test stays small)."""
    monkeypatch.setitem(nf4_package.DENSE_MIN_M, "cpu", 8)
    weight, x, bias, gen = _problem(9, 128, 40, 64, torch.bfloat16)
    x.requires_grad_()
    assert nf4_package._path(x, weight, bias, forward=True)[0] == "dense"
    with use_backend(backend):
        out = nf4_matmul(x, weight, bias)
        dy = torch.randn(9, 40, generator=gen, dtype=torch.float64)
        (dx,) = torch.autograd.grad(out, [x], dy.to(torch.bfloat16))
    ref = nf4_matmul_reference(x, weight, bias)
    assert_close(out, ref, torch.bfloat16, "forward")
    assert_close(dx, torch.autograd.grad(ref, [x], dy)[0], torch.bfloat16, "dx")


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("dense_min_m", [1 << 30, 1], ids=["fused", "dense"])
def test_output_is_fresh_so_a_delta_can_be_added_in_place(dense_min_m, backend, monkeypatch, poison_empty):
    """QLoRA adds the adapters' delta into the base output in place. With a bias and ``[B, L, K]``
    inputs the output must not be a view made inside the autograd Function (F.linear's of a 3-D x
    is: autograd then refuses the in-place add), and the gradient must still be right."""
    monkeypatch.setitem(nf4_package.DENSE_MIN_M, "cpu", dense_min_m)
    weight, x, bias, gen = _problem(6, 128, 40, 64, torch.float32)
    x = x.reshape(2, 3, 128).requires_grad_()
    bias.requires_grad_()
    delta = torch.randn(2, 3, 40, generator=gen)
    with use_backend(backend):
        out = nf4_matmul(x, weight, bias)
        out.add_(delta)
        dy = torch.randn(2, 3, 40, generator=gen)
        grads = torch.autograd.grad(out, [x, bias], dy)
    ref = nf4_matmul_reference(x, weight, bias)
    assert_close(out, ref + delta, torch.float32, "forward")
    for got, want, name in zip(grads, torch.autograd.grad(ref, [x, bias], dy.double()), ["dx", "dbias"]):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("backend", KERNEL_AND_TORCH)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_custom_ops_pass_opcheck(double_quant, backend):
    """Under torch.compile the op runs as ``bora_kernels::nf4_matmul`` and ``nf4_matmul_dx``: their
    fake implementations, schemas and autograd registration as torch checks them."""
    weight, x, bias, gen = _problem(5, 128, 24, 64, torch.float32, double_quant)
    parts = (weight.packed, weight.absmax, weight.offset, weight.nested_absmax, weight.nested_code)
    with use_backend(backend):
        torch.library.opcheck(nf4_package._nf4_matmul_op, (x.requires_grad_(), *parts, bias.requires_grad_(), 24, 64))
        torch.library.opcheck(nf4_package._nf4_matmul_dx_op, (torch.randn(5, 24, generator=gen), *parts, 128, 64))


def test_cpu_never_takes_the_cuda_gemv():
    weight, x, bias, _ = _problem(1, 64, 8, 64, torch.bfloat16)
    assert nf4_package._path(x, weight, bias, forward=True)[0] == "triton"
    with pytest.raises(RuntimeError, match="CUDA NF4 GEMV cannot run"):
        nf4_package.nf4_matmul_csrc(x, weight, bias, (1, 8))
    with pytest.raises(ValueError, match="kernel must be one of"):
        nf4_package.nf4_matmul_csrc(x, weight, bias, (1, 8), kernel="tensor")


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
@pytest.mark.parametrize("path", ["dispatched", "triton"])
@pytest.mark.parametrize("m", [1, 16, 1024])
def test_compiled_kernels_match_bitsandbytes_on_gpu(m, path, monkeypatch):
    """bf16 on CUDA: ours against the float64 reference and against bitsandbytes' matmul_4bit, as
    dispatched and with the Triton kernels forced (CUDA dispatch skips them for now)."""
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(m)
    w = torch.randn(4096, 4096, generator=gen).to("cuda", torch.bfloat16)
    weight = quantize_nf4(w, 64, double_quant=True)
    x = torch.randn(m, 4096, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    if path == "triton":
        monkeypatch.setattr(nf4_package, "CSRC_MAX_M", 0)
        monkeypatch.setitem(nf4_package.DENSE_MIN_M, "cuda", 1 << 30)
        assert nf4_package._path(x, weight, None, forward=True)[0] == "triton"
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("k,n,blocksize", [(4096, 4096, 64), (11008, 523, 256), (96, 33, 32)])
def test_cuda_gemv_matches_reference(k, n, blocksize, m, double_quant, dtype, poison_empty):
    """The csrc GEMV (built at install or JIT-built here), both kernels: K off the CUDA cores'
    1024-weight stride and the tensor cores' 128-wide chunks, N off their 8- and 16-row blocks,
    every blocksize path, M from 1 to its largest (16); and such calls dispatch to it.
    (tests/test_csrc.py runs the kernels' lane and warp code on the CPU; this is the kernels.)"""
    from bora_kernels._cuda_ext import extension

    assert extension() is not None, "the CUDA extension did not build (see the bora_kernels log)"
    gen = torch.Generator().manual_seed(m)
    weight = quantize_nf4(torch.randn(n, k, generator=gen).to("cuda", dtype), blocksize, double_quant)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype)
    assert nf4_package._path(x, weight, bias, forward=True)[0] == "csrc"
    for kernel in ("cores", "mma"):
        for b in (None, bias):
            out = nf4_package.nf4_matmul_csrc(x, weight, b, (m, n), kernel=kernel)
            assert_close(out, nf4_matmul_reference(x, weight, b), dtype, f"csrc {kernel}, bias={b is not None}")
    assert_close(nf4_matmul(x, weight, bias), nf4_matmul_reference(x, weight, bias), dtype, "dispatched")
