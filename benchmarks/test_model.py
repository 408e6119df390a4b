"""The ``model`` suite (bora_kernels/bench/model.py) as pytest-benchmark cases."""

import functools

import pytest
from conftest import DEVICE

from bora_kernels.bench import model


@functools.lru_cache(maxsize=1)
def _fns(case):
    return model.build(case, DEVICE)


@pytest.mark.parametrize("mode", model.MODES)
@pytest.mark.parametrize("variant", tuple(model.VARIANTS))
@pytest.mark.parametrize("case", model.default_cases(DEVICE, quick=True), ids=str)
def test_model(benchmark, case, variant, mode):
    benchmark.group = f"{case} {mode}"
    benchmark(_fns(case)[variant, mode])
