"""Build: the pure-Python package, plus an optional CUDA extension from csrc/.

The extension (``bora_kernels._C``) is built only when csrc/ holds sources, torch is importable
at build time (install with ``--no-build-isolation``), is a CUDA build and a CUDA toolkit is found
(``bora_kernels/_cuda_ext.py`` JIT-builds it on first use otherwise, when it can); otherwise it is
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
    import torch

    if torch.version.cuda is None:
        print("bora_kernels: torch is a CPU build, skipping the CUDA extension")
        return [], {}
    if CUDA_HOME is None:
        print("bora_kernels: no CUDA toolkit found, skipping the CUDA extension")
        return [], {}
    ext = CUDAExtension(
        "bora_kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )

    class OptionalBuild(BuildExtension.with_options(use_ninja=True)):
        # a failed compile must not fail the install: the Triton kernels cover every op
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:
                print(f"bora_kernels: building the CUDA extension failed ({exc}); the Triton kernels will run")

    return [ext], {"build_ext": OptionalBuild}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
