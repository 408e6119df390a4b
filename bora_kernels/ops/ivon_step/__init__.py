"""``ivon_step``: one fused pass of the IVON optimizer over a parameter group's flat buffers.

One call can do any of three things, in this order, reading and writing each element once:

1. **fold** the gradient of the latest weight sample into the step's running means (the averaged
   gradient, and noise-times-gradient for ``hess_approx="price"`` or squared gradient for
   ``"gradsq"``); with ``update=False`` the means are stored in ``avg_grad``/``avg_hess_stat``;
2. **update** momentum, ``h`` and the mean ``m`` (see ``reference.py`` for the formulas);
3. **draw** the next weight sample ``theta = m + eps / sqrt(draw_ess * (h + wd))`` into ``sample``.

State (``mean``, ``momentum``, ``hess``, the running means) is fp32; ``grad``, ``sample`` and
``mean_copy`` (the mean in a low-precision parameter dtype) may be fp32, fp16 or bf16. Noise is a
standard-normal tensor, or an integer draw index: Philox noise made inside the kernel from
``(seed, draw, index_base + element)`` (CUDA, or CPU under the interpreter). ``bora_kernels.optim.IVON``
is the user-facing optimizer; this op is its kernel.

``counters`` (an int64 tensor ``[t, d]`` on the device) moves what changes from step to step onto
the device, for launches replayed from a CUDA graph: Philox draw indices are then offsets from
``d`` (the draws made so far; ``-1`` is the latest), and ``scalars.debias=None`` asks for
``1 - beta1**t`` computed from ``t``. The caller advances the counters between calls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._dispatch import backend


class StepScalars(NamedTuple):
    """A parameter group's hyper-parameters for one step; ``lr`` already rescaled and ``debias``
    already ``1 - beta1**t`` (or 1.0) as ivon-opt computes them, or None: computed from the step
    count in ``counters``."""
    lr: float
    ess: float
    weight_decay: float
    beta1: float
    beta2: float
    debias: float | None
    clip_radius: float


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _check(name, t, n, device, dtypes):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n or not t.is_contiguous():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a contiguous 1-D tensor of {n} elements, got {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but mean is on {device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


def ivon_step(mean, momentum, hess, scalars: StepScalars, *, grad=None, count: int = 1, avg_grad=None,
              avg_hess_stat=None, update: bool = True, sample=None, mean_copy=None, eps_now=None, eps_next=None,
              draw_ess: float | None = None, hess_approx: str = "price", seed: int = 0, index_base: int = 0,
              counters=None):
    """Fold ``grad`` (the ``count``-th sample of this step; ``None`` when the running means are
    already final, as after a distributed all-reduce), update when ``update``, and draw into
    ``sample`` when given. ``eps_now`` is the noise of the sample ``grad`` was taken at (needed to
    fold under ``"price"``), ``eps_next`` the noise of the sample to draw: tensors, or Philox draw
    indices. ``draw_ess`` (default ``scalars.ess``) sets the sample's spread: ``tau * ess`` draws at
    test temperature ``tau``. ``counters``: see the module docstring. Everything is updated in
    place; returns None.
    """
    if hess_approx not in ("price", "gradsq"):
        raise ValueError(f"hess_approx must be 'price' or 'gradsq', got {hess_approx!r}")
    if not isinstance(mean, torch.Tensor):
        raise ValueError(f"mean must be a tensor, got {type(mean).__name__}")
    n, device = mean.numel(), mean.device
    for name, t in (("mean", mean), ("momentum", momentum), ("hess", hess), ("avg_grad", avg_grad),
                    ("avg_hess_stat", avg_hess_stat)):
        _check(name, t, n, device, (torch.float32,))
    for name, t in (("grad", grad), ("sample", sample), ("mean_copy", mean_copy)):
        _check(name, t, n, device, _FLOAT)
    if counters is not None:
        if not isinstance(counters, torch.Tensor) or counters.shape != (2,) or counters.dtype != torch.int64:
            raise ValueError("counters must be an int64 tensor [step count, draws made], got "
                             + (f"{counters.dtype} {tuple(counters.shape)}" if isinstance(counters, torch.Tensor)
                                else type(counters).__name__))
        if counters.device != device:
            raise ValueError(f"counters is on {counters.device} but mean is on {device}")
    elif scalars.debias is None:
        raise ValueError("scalars.debias=None (computed from the step count) needs counters")
    lowest = -2 ** 31 if counters is not None else 0  # relative to the draws made, or absolute
    for name, eps in (("eps_now", eps_now), ("eps_next", eps_next)):
        if isinstance(eps, torch.Tensor):
            _check(name, eps, n, device, _FLOAT)
        elif eps is not None and (not isinstance(eps, int) or not lowest <= eps < 2 ** 31):
            raise ValueError(f"{name} must be a noise tensor or a Philox draw index in [{lowest}, 2**31), got {eps!r}")
    price = hess_approx == "price"
    fold = grad is not None
    if fold and count < 1:
        raise ValueError(f"count must be >= 1 (the sample's number within the step), got {count}")
    if fold and price and eps_now is None:
        raise ValueError("eps_now is needed to fold a gradient under hess_approx='price'")
    if sample is not None and eps_next is None:
        raise ValueError("eps_next is needed to draw a sample")
    read_avg = (fold and count > 1) or (not fold and update)
    if read_avg and (avg_grad is None or avg_hess_stat is None):
        raise ValueError("avg_grad and avg_hess_stat must hold the running means "
                         + ("of the earlier samples (count > 1)" if fold else "when no grad is folded"))
    if fold and not update and (avg_grad is None or avg_hess_stat is None):
        raise ValueError("avg_grad and avg_hess_stat are needed to store a folded sample without update")
    if n == 0:
        return
    if n >= 2 ** 32:
        raise ValueError(f"one parameter group holds at most 2**32 - 1 elements, got {n}")
    if backend(device) == "triton":
        from .triton import ivon_step as launch
    else:
        from .vectorised import ivon_step as launch
    launch(mean, momentum, hess, scalars, grad=grad, count=count, avg_grad=avg_grad, avg_hess_stat=avg_hess_stat,
           update=update, sample=sample, mean_copy=mean_copy, eps_now=eps_now, eps_next=eps_next,
           draw_ess=scalars.ess if draw_ess is None else draw_ess, price=price, read_avg=read_avg, seed=seed,
           index_base=index_base, counters=counters)


__all__ = ["StepScalars", "ivon_step"]
