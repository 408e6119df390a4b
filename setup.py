"""Build: the pure-Python package, plus an optional CUDA extension from csrc/.

The extension (``bora_kernels._C``) is built only when csrc/ holds sources, torch is importable
at build time (install with ``--no-build-isolation``) and a CUDA toolkit is found; otherwise it is
skipped with a message, and ``import bora_kernels`` works the same (the extension is an optional
accelerator, never a requirement). ``BORA_NO_CUDA_EXT=1`` skips it explicitly.
"""

import glob
import os

from setuptools import setup


def _cuda_extension():
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return [], {}
    if os.environ.get("BORA_NO_CUDA_EXT") == "1":
        print("bora_kernels: BORA_NO_CUDA_EXT=1, skipping the CUDA extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("bora_kernels: torch is not importable at build time, skipping the CUDA extension")
        return [], {}
    if CUDA_HOME is None:
        print("bora_kernels: no CUDA toolkit found, skipping the CUDA extension")
        return [], {}
    ext = CUDAExtension(
        "bora_kernels._C", sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
