"""The ``ivon`` suite: one IVON step, the next weight sample included, against what users run.

- ``ours``: ``bora_kernels.optim.IVON``: ``sampled_params(train=True)`` entered and left (the
  sample swapped in and out, gradients taken from the flat buffer) and ``step()`` (one kernel:
  update plus the next sample);
- ``ivon_opt``: ivon-opt 0.1.3's ``IVON``: the same ``sampled_params`` block and ``step()``;
- ``adamw``: ``torch.optim.AdamW`` (``fused=True`` on CUDA, ``foreach=True`` on CPU), ``step()``;
- ``copy``: a device copy moving as many bytes as our step must (its time over ours is the
  fraction of copy bandwidth the step reaches).

With ``bora-bench ivon --graph`` each callable is replayed from a CUDA graph (device time alone):
``build_captured`` then builds our IVON and AdamW with ``capturable=True``. ivon-opt has no such
option; its replays repeat one step's noise, which leaves its device work, what is timed, the same.

Parameters are ``tensors`` fp32 tensors (default 256, as LoRA r=16 on q/k/v/o of a 32-layer
model), gradients already in place. The bytes our step must move per element: the gradient, mean,
momentum and ``h`` read once (4 x 4 B) and the mean, momentum, ``h`` and the next sample written
once (4 x 4 B): 32 B in fp32 (the noise is made in the kernel).
"""

from __future__ import annotations

import dataclasses

import torch

from ..optim import IVON
from .baselines import require

VARIANTS = {
    "ours": "bora_kernels.optim.IVON: sampled_params(train=True) block + step() (update and next sample)",
    "ivon_opt": "ivon-opt 0.1.3 IVON: the same sampled_params block + step()",
    "adamw": "torch.optim.AdamW step (fused=True on CUDA, foreach=True on CPU)",
    "copy": "a device copy of the bytes our step must move (read + write)",
}
MODES = ("step",)
COMPARISONS = (
    ("ours", "ivon_opt", "speed-up over ivon-opt's step + sample"),
    ("ours", "adamw", "speed-up over torch's AdamW step"),
    ("ours", "copy", "fraction of copy bandwidth reached"),
)
BYTES_PER_ELEMENT = 32  # fp32: read grad, mean, momentum, h; write mean, momentum, h, sample


@dataclasses.dataclass(frozen=True)
class IVONCase:
    params: int
    tensors: int = 256

    def __str__(self) -> str:
        return f"P{self.params / 2 ** 20:g}M-t{self.tensors}-fp32"

    @property
    def bytes_moved(self) -> int:
        return BYTES_PER_ELEMENT * self.params


def default_cases(device: torch.device, quick: bool = False) -> list[IVONCase]:
    """1M, 16M and 128M parameters on a GPU; 1M, 4M and 16M on a CPU."""
    sizes = (1, 16, 128) if device.type == "cuda" else (1, 4, 16)
    if quick:
        sizes = sizes[1:2] if device.type == "cuda" else sizes[:1]
    return [IVONCase(s * 2 ** 20) for s in sizes]


def _parameters(case: IVONCase, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    size = case.params // case.tensors
    params = []
    for i in range(case.tensors):
        n = size if i < case.tensors - 1 else case.params - size * (case.tensors - 1)
        p = torch.nn.Parameter((0.02 * torch.randn(n, generator=gen)).to(device))
        p.grad = (0.01 * torch.randn(n, generator=gen)).to(device)
        params.append(p)
    return params


def training_step(opt):
    """What a step costs an IVON optimizer (ours or ivon-opt's) with the gradients in place: a
    ``sampled_params(train=True)`` block entered and left, then ``step()``."""
    def run():
        with opt.sampled_params(train=True):
            pass
        opt.step()
    return run


def build(case: IVONCase, device: torch.device, variants=tuple(VARIANTS), capturable: bool = False) -> dict:
    """``{(variant, "step"): callable}``; each variant owns its parameters (same values).
    ``capturable``: our IVON and AdamW built to be replayed from CUDA graphs."""
    hyper = dict(lr=0.03, ess=1e6, hess_init=5e-3, beta2=0.99999, clip_radius=0.01, weight_decay=0.0)
    fns = {}
    if "ours" in variants:
        fns["ours", "step"] = training_step(IVON(_parameters(case, device), **hyper, capturable=capturable))
    if "ivon_opt" in variants:
        ivon = require("ivon", "ivon-opt==0.1.3", "ivon", "ours adamw copy")

        fns["ivon_opt", "step"] = training_step(ivon.IVON(_parameters(case, device), **hyper))
    if "adamw" in variants:
        flavour = {"fused": True} if device.type == "cuda" else {"foreach": True}
        adamw = torch.optim.AdamW(_parameters(case, device), lr=2e-4, weight_decay=0.0, capturable=capturable,
                                  **flavour)
        fns["adamw", "step"] = adamw.step
    if "copy" in variants:
        src = torch.randn(case.bytes_moved // 8, device=device)
        dst = torch.empty_like(src)
        fns["copy", "step"] = lambda: dst.copy_(src)
    return fns


def build_captured(case: IVONCase, device: torch.device, variants=tuple(VARIANTS)) -> dict:
    """``build`` for ``--graph``: the optimizers that can be captured are built capturable."""
    return build(case, device, variants, capturable=True)
