"""The CPU torch path of the IVON step: the kernel's arithmetic as in-place torch ops.

The flat buffers are walked in chunks of 256K elements (1 MB per buffer) that stay in cache, so the ~20 ops
per chunk cost about one pass over memory instead of twenty. Noise comes from buffers only (Philox
lives inside the Triton kernel); the optimizer draws them with ``torch.randn`` on this path.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 18


def _step_chunk(sl, mean, momentum, hess, s, grad, count, avg_grad, avg_hess_stat, update, sample, mean_copy,
                eps_now, eps_next, draw_ess, price, read_avg):
    h = hess[sl]
    h_wd = h + s.weight_decay
    g_avg = h_avg = None
    if grad is not None:
        g = grad[sl].float()
        if price:
            stat = torch.sqrt_(h_wd * s.ess)
            stat = torch.div(eps_now[sl], stat).mul_(g)
        else:
            stat = g * g
        if read_avg:
            g_avg = avg_grad[sl].add_(torch.sub(g, avg_grad[sl]).div_(count))
            h_avg = avg_hess_stat[sl].add_(stat.sub_(avg_hess_stat[sl]).div_(count))
        else:
            g_avg, h_avg = g, stat
            if not update:
                avg_grad[sl].copy_(g)
                avg_hess_stat[sl].copy_(stat)
    elif read_avg:
        g_avg, h_avg = avg_grad[sl], avg_hess_stat[sl]
    m = mean[sl]
    if update:
        mom = momentum[sl].mul_(s.beta1).add_(g_avg * (1.0 - s.beta1))
        f = (h_avg * h_wd).mul_(s.ess) if price else h_avg * s.ess
        d = torch.sub(h, f)
        d.mul_(d).mul_(0.5 * (1.0 - s.beta2) ** 2).div_(h_wd)
        h.mul_(s.beta2).add_(f.mul_(1.0 - s.beta2)).add_(d)
        torch.add(h, s.weight_decay, out=h_wd)
        step = torch.div(mom, s.debias).add_(m * s.weight_decay).div_(h_wd).clamp_(-s.clip_radius, s.clip_radius)
        m.sub_(step.mul_(s.lr))
        if mean_copy is not None:
            mean_copy[sl].copy_(m)
    if sample is not None:
        noise = torch.div(eps_next[sl], h_wd.mul_(draw_ess).sqrt_())
        sample[sl].copy_(noise.add_(m))


def ivon_step(mean, momentum, hess, scalars, *, grad, count, avg_grad, avg_hess_stat, update, sample, mean_copy,
              eps_now, eps_next, draw_ess, price, read_avg, seed, index_base, counters):
    """Same contract as the Triton launcher, with noise given as tensors (``seed``/``index_base``
    only place Philox noise, which this path never draws). The step count in ``counters`` is
    read on the host: this path runs CPU tensors, which no CUDA graph captures."""
    for name, eps in (("eps_now", eps_now), ("eps_next", eps_next)):
        if eps is not None and not isinstance(eps, torch.Tensor):
            raise ValueError(f"{name}: the torch path takes noise as a tensor, not a Philox draw index")
    if scalars.debias is None:
        scalars = scalars._replace(debias=1.0 - math.pow(scalars.beta1, float(counters[0])))
    n = mean.numel()
    for start in range(0, n, CHUNK):
        _step_chunk(slice(start, min(start + CHUNK, n)), mean, momentum, hess, scalars, grad, count, avg_grad,
                    avg_hess_stat, update, sample, mean_copy, eps_now, eps_next, draw_ess, price, read_avg)
