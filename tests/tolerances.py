"""The one table of tolerances: relative RMS error ``||got - ref|| / ||ref||`` against the
float64 reference, per input dtype. fp16 and bf16 round the inputs' products and the rank-r
intermediate once each; the figures leave about 5x headroom over what the kernels reach."""

import torch

REL_RMS = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm()).item()


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str):
    """Relative RMS within the table; a reference that is exactly zero must be matched exactly."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    if ref.abs().max() == 0:
        assert (got == 0).all(), f"{what}: should be exactly zero"
        return
    err = rel_rms(got, ref)
    assert err <= REL_RMS[dtype], f"{what}: relative RMS error {err:.2e} > {REL_RMS[dtype]:.0e}"
