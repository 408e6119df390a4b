"""Every ``bora-bench`` suite (bora_kernels/bench/) as pytest-benchmark cases: the quick cases of
each, every variant and mode, grouped so that a case's variants compare side by side."""

import functools

import pytest
import torch
from conftest import DEVICE

from bora_kernels.bench.cli import SUITES


@functools.lru_cache(maxsize=1)
def _fns(suite: str, case):
    return SUITES[suite].build(case, DEVICE)


def _synced(fn):
    # pytest-benchmark's timer does not wait for the GPU; the suites' own timer (do_bench) does
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(DEVICE)
    return run


CASES = [pytest.param(suite, case, variant, mode, id=f"{suite}-{case}-{variant}-{mode}")
         for suite, module in SUITES.items() for case in module.default_cases(DEVICE, quick=True)
         for variant in module.VARIANTS for mode in module.MODES]


@pytest.mark.parametrize("suite,case,variant,mode", CASES)
def test_suite(benchmark, suite, case, variant, mode):
    fns = _fns(suite, case)
    if (variant, mode) not in fns:  # e.g. the CUDA GEMV off a GPU, or above its 4 rows
        pytest.skip(f"{variant} does not apply to {case} on {DEVICE}")
    benchmark.group = f"{suite} {case} {mode}"
    benchmark(_synced(fns[variant, mode]))
