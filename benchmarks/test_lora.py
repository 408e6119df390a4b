"""The ``lora`` suite (bora_kernels/bench/lora.py) as pytest-benchmark cases."""

import functools

import pytest
from conftest import DEVICE

from bora_kernels.bench import lora


@functools.lru_cache(maxsize=1)
def _fns(case):
    return lora.build(case, DEVICE, sync=True)


@pytest.mark.parametrize("mode", lora.MODES)
@pytest.mark.parametrize("variant", tuple(lora.VARIANTS))
@pytest.mark.parametrize("case", lora.default_cases(DEVICE, quick=True), ids=str)
def test_lora(benchmark, case, variant, mode):
    benchmark.group = f"{case} {mode}"
    benchmark(_fns(case)[variant, mode])
