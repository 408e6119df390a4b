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
def test_kernel_compiles_with_nvcc(tmp_path):
    for cu in sorted(CSRC.rglob("*.cu")):
        done = subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-c", str(cu), "-o", str(tmp_path / "k.o"),
                               "-I", str(CSRC)], capture_output=True, text=True)
        assert done.returncode == 0, f"nvcc failed on {cu.name}:\n{done.stderr}"


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
