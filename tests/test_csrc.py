"""The optional CUDA extension (csrc/): it compiles, and without it everything still works.

The compile checks run wherever ``nvcc`` is on the PATH, GPU or not, so that a syntax error in
the CUDA sources cannot land from a CPU-only machine: the kernel is compiled by nvcc
(compile-only), and the torch bindings are checked by the host compiler (through nvcc) against the
installed torch's headers (a CPU build of torch lacks one generated CUDA header, stood in for here).
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from bora_kernels import _cuda_ext

NVCC = shutil.which("nvcc")
CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on the PATH")
@pytest.mark.parametrize("arch", ["sm_90", "sm_75"])
def test_kernel_compiles_with_nvcc(tmp_path, arch):
    """sm_90 (H100/H200) and sm_75 (T4, the oldest CUDA 13 builds for), where the tensor-core
    kernel has no mma.sync and must compile to a stub that is never launched."""
    for cu in sorted(CSRC.rglob("*.cu")):
        done = subprocess.run([NVCC, "-std=c++17", "-O3", f"-arch={arch}", "-c", str(cu), "-o", str(tmp_path / "k.o"),
                               "-I", str(CSRC)], capture_output=True, text=True)
        assert done.returncode == 0, f"nvcc failed on {cu.name} for {arch}:\n{done.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on the PATH")
def test_bindings_compile_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "shim"
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / macros).is_file() for p in include_paths()):
        (shim / macros).parent.mkdir(parents=True)
        (shim / macros).write_text("#pragma once\n")
    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").is_file():
        pytest.skip(f"Python headers not installed ({python_include})")
    # nvcc hands .cpp files to the host compiler with the CUDA headers on its include path
    cmd = [NVCC, "-std=c++20", "-Xcompiler", "-fsyntax-only", "-I", str(shim), *(f"-I{p}" for p in include_paths()),
           "-I", python_include, "-I", str(CSRC), "-DTORCH_EXTENSION_NAME=bora_kernels_C"]
    for cpp in sorted(CSRC.rglob("*.cpp")):
        done = subprocess.run([*cmd, "-c", str(cpp), "-o", str(tmp_path / "b.o")], capture_output=True, text=True)
        assert done.returncode == 0, f"the host compiler failed on {cpp.name}:\n{done.stderr[-4000:]}"


def test_sources_listed_for_the_jit_build_are_all_the_sources():
    on_disk = sorted(str(p.relative_to(CSRC)) for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))
    assert sorted(_cuda_ext.SOURCES) == on_disk


def test_without_a_gpu_the_extension_is_absent_and_import_works():
    code = ("import logging; logging.basicConfig(level=logging.INFO); import bora_kernels; "
            "from bora_kernels._cuda_ext import extension; assert extension() is None")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "CUDA extension unavailable (no CUDA device" in done.stderr
    assert done.stderr.count("CUDA extension unavailable") == 1


def test_the_extension_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BORA_NO_CUDA_EXT", "1")
    _cuda_ext.extension.cache_clear()
    try:
        assert _cuda_ext.extension() is None
    finally:
        _cuda_ext.extension.cache_clear()


# --- the GEMV's per-lane code, run on the CPU ------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """tests/csrc/nf4_gemv_emulate.cu built with nvcc as a host program (no GPU needed)."""
    if NVCC is None:
        pytest.skip("nvcc not on the PATH")
    exe = tmp_path_factory.mktemp("emulate") / "nf4_gemv_emulate"
    source = Path(__file__).resolve().parent / "csrc" / "nf4_gemv_emulate.cu"
    done = subprocess.run([NVCC, "-std=c++17", "-O2", "-Xcompiler", "-ffp-contract=off", "-I", str(CSRC), str(source),
                           "-o", str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, f"nvcc failed on {source.name}:\n{done.stderr}"
    return exe


def test_gemv_code_table_is_bitsandbytes_nf4(emulator):
    """The kernel writes its code table from immediates: they must be NF4_CODE's fp32 values."""
    from bora_kernels.quant.nf4 import NF4_CODE

    printed = subprocess.run([str(emulator), "code"], capture_output=True, text=True, check=True).stdout.split()
    want = torch.tensor(NF4_CODE, dtype=torch.float32).view(torch.int32).tolist()
    assert [int(h, 16) for h in printed] == [w & 0xFFFFFFFF for w in want]


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().tobytes()


def _run_emulator(emulator, tmp_path, kernel, k, n, blocksize, m, double_quant, dtype):
    """Quantizes a random [n, k] weight, runs the emulated kernel on random x and bias, and returns
    (x, weight, bias, reduced fp32 sums [m, n], output [m, n])."""
    from bora_kernels.ops import use_backend
    from bora_kernels.quant import quantize_nf4

    gen = torch.Generator().manual_seed(k + n + m)
    with use_backend("torch"):
        weight = quantize_nf4(torch.randn(n, k, generator=gen).to(dtype), blocksize, double_quant)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    files = {"x": x, "packed": weight.packed, "absmax": weight.absmax, "bias": bias,
             "out": torch.full((m, n), float("nan"), dtype=dtype)}
    if double_quant:
        files.update(nested_absmax=weight.nested_absmax, nested_code=weight.nested_code, offset=weight.offset)
    for name, t in files.items():
        (tmp_path / f"{name}.bin").write_bytes(_raw(t))
    args = [str(tmp_path), m, n, k, blocksize.bit_length() - 1, int(dtype == torch.bfloat16), int(double_quant), 1,
            kernel]
    done = subprocess.run([str(emulator), *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    acc = torch.frombuffer(bytearray((tmp_path / "acc.bin").read_bytes()), dtype=torch.float32).view(m, n)
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.int16).view(dtype).view(m, n)
    return x, weight, bias, acc, out


def _check_sums(x, w, bias, acc, out, dtype):
    """The reduced fp32 sums within fp32 rounding of the float64 product (bounded by |x| @ |W|^T,
    so that one wrong weight of 11008 fails), and the output exactly those sums plus the bias,
    rounded once (it starts poisoned, so unwritten outputs fail)."""
    from bora_kernels.ops import use_backend

    with use_backend("torch"):
        w = w.double()
    exact = x.double() @ w.T
    bound = 3e-5 * (x.double().abs() @ w.abs().T)
    assert ((acc.double() - exact).abs() <= bound).all(), f"max error {(acc.double() - exact).abs().max():.3e}"
    assert torch.equal(out, (acc + bias.float()).to(dtype)), "out is not the reduced sums plus bias, rounded once"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("k,n,blocksize", [(4096, 6, 64), (11008, 5, 256), (96, 9, 32), (2048, 3, 2048)])
def test_gemv_lanes_match_reference_on_cpu(emulator, tmp_path, k, n, blocksize, m, double_quant, dtype):
    """CUDA cores. Every lane's chunks (K = 4096: four per lane, one group of loads; K = 11008: 344
    chunks, so lanes hold 10 or 11 and the last group is partial; K = 96: 29 idle lanes), every
    blocksize path, M = 1, 3, 8 and the largest (16), both dtypes; the kernel multiplies by the
    fp32 dequantized weight."""
    x, weight, bias, acc, out = _run_emulator(emulator, tmp_path, "cores", k, n, blocksize, m, double_quant, dtype)
    _check_sums(x, weight.dequantize(torch.float32), bias, acc, out, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("k,n,blocksize,m", [(4096, 21, 64, 16), (11008, 5, 256, 9), (96, 16, 32, 5),
                                             (2048, 3, 2048, 1), (4224, 17, 128, 8)])
def test_gemv_mma_warps_match_reference_on_cpu(emulator, tmp_path, k, n, blocksize, m, double_quant, dtype):
    """Tensor cores, the lanes of each warp run as threads with an emulated mma.sync. K = 4096: 32
    warp chunks, four per warp, one group of loads; K = 11008: 86 chunks, the last one half full
    (lanes t = 2, 3 idle), warps holding 10 or 11; K = 96: one partial chunk, seven idle warps;
    K = 4224: 33 chunks, warp 0 holding a second group of one. N = 21 and 17: a second, partial
    16-row tile; N = 3, 5: rows g + 8 all past N. M = 1, 5, 8 (one token tile), 9 and 16 (two).
    The kernel multiplies by the weight dequantized to x's dtype."""
    x, weight, bias, acc, out = _run_emulator(emulator, tmp_path, "mma", k, n, blocksize, m, double_quant, dtype)
    _check_sums(x, weight.dequantize(dtype), bias, acc, out, dtype)


def test_python_expects_the_bindings_api_version():
    """A module built from older sources must be refused, not called with the wrong arguments."""
    import re

    declared = re.search(r'm\.attr\("API_VERSION"\) = (\d+);', (CSRC / "bindings.cpp").read_text())
    assert declared is not None and int(declared.group(1)) == _cuda_ext.API_VERSION
