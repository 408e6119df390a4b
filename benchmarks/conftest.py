"""pytest-benchmark suites: the cases of ``bora-bench`` timed by pytest-benchmark.

    pytest benchmarks/ --benchmark-json=out.json          (CUDA when available, else CPU)
    pytest benchmarks/ --benchmark-disable                 (each case once: a smoke test, in CI)

Never under the Triton interpreter: CPU cases run the torch path.
"""

import pytest
import torch

from bora_kernels.ops import use_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _compiled_or_torch_path():
    with use_backend("torch" if DEVICE.type == "cpu" else None):
        yield
