"""The optional CUDA C++ extension built from ``csrc/`` (the NF4 decode GEMV so far).

``extension()`` returns the module or None. It is ``bora_kernels._C`` when ``setup.py`` built it
(a CUDA toolkit and a CUDA build of torch at install time); otherwise, on a machine with a CUDA
device, a CUDA build of torch, a toolkit and ninja, it is JIT-built from ``csrc/`` on first use
(about a minute, cached by torch under ``~/.cache/torch_extensions``). When neither works the
callers use their Triton kernels; the reason is logged once. ``BORA_NO_CUDA_EXT=1`` turns the
extension off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("bora_kernels")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "nf4_gemv/nf4_gemv.cu")
API_VERSION = 3  # bindings.cpp's; 2: nf4_gemv takes no code table and up to 16 rows; 3: and `kernel`


def _sources_digest() -> str:
    """A digest of every file under csrc/, headers included. torch's JIT versioning hashes the
    listed sources and the build flags only, so the digest goes into the flags: a changed header
    then rebuilds a cached extension instead of loading a stale one."""
    digest = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _without(reason: str, level: int = logging.WARNING):
    log.log(level, "bora_kernels: CUDA extension unavailable (%s); the Triton kernels run instead", reason)
    return None


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module (``nf4_gemv``), or None when it cannot be had (reason logged once)."""
    if os.environ.get("BORA_NO_CUDA_EXT") == "1":
        return _without("BORA_NO_CUDA_EXT=1", logging.INFO)
    if torch.version.cuda is None or not torch.cuda.is_available():
        return _without("no CUDA device or a CPU build of torch", logging.INFO)
    try:
        from . import _C

        if getattr(_C, "API_VERSION", 1) == API_VERSION:
            return _C
        not_built = f"the installed bora_kernels._C has API {getattr(_C, 'API_VERSION', 1)}, not {API_VERSION}"
    except ImportError as exc:
        not_built = str(exc)
    sources = [CSRC / s for s in SOURCES]
    if not all(s.is_file() for s in sources):
        return _without(f"not built at install ({not_built}) and csrc/ sources are not at {CSRC}")
    try:
        from torch.utils.cpp_extension import CUDA_HOME, load, verify_ninja_availability

        if CUDA_HOME is None:
            return _without(f"not built at install ({not_built}) and no CUDA toolkit for a JIT build")
        verify_ninja_availability()
        log.warning("bora_kernels: JIT-building the CUDA extension from %s (first use only, about a minute)", CSRC)
        return load(name="bora_kernels_C", sources=[str(s) for s in sources], extra_include_paths=[str(CSRC)],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-lineinfo", f"-DBORA_CSRC_DIGEST={_sources_digest()}"])
    except Exception as exc:  # a failed build must leave the Triton path working
        return _without(f"JIT build failed: {type(exc).__name__}: {exc}")
