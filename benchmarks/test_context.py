"""The ``context`` suite (bora_kernels/bench/context.py) as pytest-benchmark cases."""

import functools

import pytest
from conftest import DEVICE

from bora_kernels.bench import context


@functools.lru_cache(maxsize=1)
def _fns(case):
    return context.build(case, DEVICE, sync=True)


@pytest.mark.parametrize("mode", context.MODES)
@pytest.mark.parametrize("variant", tuple(context.VARIANTS))
@pytest.mark.parametrize("case", context.default_cases(DEVICE, quick=True), ids=str)
def test_context(benchmark, case, variant, mode):
    benchmark.group = f"{case} {mode}"
    benchmark(_fns(case)[variant, mode])
