"""The fused IVON kernel: fold a gradient sample, update the posterior and draw the next weight
sample, reading and writing every state element once.

Noise: ``tl.randn4x`` turns one Philox call into four normals, so a program sees its ``BLOCK``
elements as a ``[BLOCK // 4, 4]`` tile whose column ``q`` is the sub-range ``q * BLOCK // 4 + i`` and
takes the ``q``-th normal. The Philox counter of element ``(i, q)`` is ``draw * 2**32 + (index of
element (i, 0))``: draws never share counters, and neither do parameter groups (each passes its offset in
the flat buffer as ``index_base``; the counters a partial last tile shares with the next group
belong only to masked elements). The stream therefore depends on ``BLOCK``, which is fixed.

Counters on the device (``COUNTERS``, for optimizers captured in CUDA graphs): the step count ``t``
and the number of draws made ``d`` are read from an int64 tensor, so that a replayed launch sees
this step's values. The draw indices passed are then relative to ``d`` and, with
``DEVICE_DEBIAS``, ``1 - beta1**t`` is computed here in fp64 (``beta1`` given as an fp32 pair
``hi + lo``, to about 2**-48) and rounded to fp32, as the host computes it otherwise.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._common import cdiv, launch, or_unused, rounded_for

BLOCK = 2048
NUM_WARPS = 8
# where a step's noise comes from (constexpr EPS_NOW / EPS_NEXT)
NO_NOISE, PHILOX, BUFFER = 0, 1, 2
_FP32 = struct.Struct("f")


@triton.jit
def _clip(x, radius):
    x = tl.maximum(x, -radius, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, radius, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _normals(seed, counter, SUB: tl.constexpr):
    """``[SUB, 4]`` standard normals: column ``q`` is the ``q``-th output of ``randn4x(counter)``."""
    z0, z1, z2, z3 = tl.randn4x(seed, counter)
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (SUB, 4))


@triton.jit
def _one_minus_power(t, hi, lo):
    """``1 - (hi + lo)**t`` in fp64 by repeated squaring (``0 <= t < 2**32``), rounded to fp32."""
    base = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    power = base * 0.0 + 1.0
    for _ in tl.static_range(32):
        power = tl.where((t & 1) != 0, power * base, power)
        base = base * base
        t = t >> 1
    return (1.0 - power).to(tl.float32)


@triton.jit(do_not_specialize=["n", "index_base", "seed", "now_draw", "next_draw", "count"])
def _ivon_step_kernel(mean_ptr, mom_ptr, hess_ptr, grad_ptr, avg_g_ptr, avg_h_ptr, eps_now_ptr, eps_next_ptr,
                      sample_ptr, mean_copy_ptr, counters_ptr,
                      n, index_base, seed, now_draw, next_draw, count,
                      ess, draw_ess, wd, b1, one_minus_b1, b2, one_minus_b2, half_sq_one_minus_b2, lr, debias, clip,
                      b1_hi, b1_lo,
                      FOLD: tl.constexpr, READ_AVG: tl.constexpr, WRITE_AVG: tl.constexpr, UPDATE: tl.constexpr,
                      DRAW: tl.constexpr, PRICE: tl.constexpr, MEAN_COPY: tl.constexpr,
                      EPS_NOW: tl.constexpr, EPS_NEXT: tl.constexpr, COUNTERS: tl.constexpr,
                      DEVICE_DEBIAS: tl.constexpr, BLOCK: tl.constexpr):
    SUB: tl.constexpr = BLOCK // 4
    start = tl.program_id(0).to(tl.int64) * BLOCK
    i = start + tl.arange(0, SUB)
    offs = i[:, None] + SUB * tl.arange(0, 4)[None, :]
    mask = offs < n
    draws = 0
    if COUNTERS:
        draws = tl.load(counters_ptr + 1)
        if DEVICE_DEBIAS:
            debias = _one_minus_power(tl.load(counters_ptr), b1_hi, b1_lo)
    eps_now = tl.zeros((SUB, 4), tl.float32)  # stands in for noise the call does not use
    eps_next = eps_now
    if EPS_NOW == 1:
        eps_now = _normals(seed, ((draws + now_draw).to(tl.int64) << 32) + index_base + i, SUB)
    elif EPS_NOW == 2:
        eps_now = tl.load(eps_now_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if EPS_NEXT == 1:
        eps_next = _normals(seed, ((draws + next_draw).to(tl.int64) << 32) + index_base + i, SUB)
    elif EPS_NEXT == 2:
        eps_next = tl.load(eps_next_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # The operation order follows ivon-opt's expressions term by term and divisions and square
    # roots are correctly rounded (div_rn, sqrt_rn): the fp32 trajectories then match its own.
    h = tl.load(hess_ptr + offs, mask=mask, other=1.0)
    h_wd = h + wd
    if FOLD:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PRICE:
            stat = tl.div_rn(eps_now, tl.sqrt_rn(ess * h_wd)) * g
        else:
            stat = g * g
        if READ_AVG:  # Welford running means over the step's samples
            g_avg = tl.load(avg_g_ptr + offs, mask=mask, other=0.0)
            h_avg = tl.load(avg_h_ptr + offs, mask=mask, other=0.0)
            g_avg = g_avg + tl.div_rn(g - g_avg, count)
            h_avg = h_avg + tl.div_rn(stat - h_avg, count)
        else:
            g_avg = g
            h_avg = stat
        if WRITE_AVG:
            tl.store(avg_g_ptr + offs, g_avg, mask=mask)
            tl.store(avg_h_ptr + offs, h_avg, mask=mask)
    elif READ_AVG:
        g_avg = tl.load(avg_g_ptr + offs, mask=mask, other=0.0)
        h_avg = tl.load(avg_h_ptr + offs, mask=mask, other=0.0)
    if UPDATE or DRAW:
        m = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    if UPDATE:
        mom = tl.load(mom_ptr + offs, mask=mask, other=0.0)
        mom = b1 * mom + one_minus_b1 * g_avg
        if PRICE:
            f = h_avg * h_wd * ess
        else:
            f = h_avg * ess
        d = h - f
        h = b2 * h + one_minus_b2 * f + tl.div_rn(half_sq_one_minus_b2 * (d * d), h_wd)
        h_wd = h + wd
        m = m - lr * _clip(tl.div_rn(tl.div_rn(mom, debias) + wd * m, h_wd), clip)
        tl.store(mom_ptr + offs, mom, mask=mask)
        tl.store(hess_ptr + offs, h, mask=mask)
        tl.store(mean_ptr + offs, m, mask=mask)
        if MEAN_COPY:
            tl.store(mean_copy_ptr + offs, rounded_for(m, mean_copy_ptr), mask=mask)
    if DRAW:
        theta = m + tl.div_rn(eps_next, tl.sqrt_rn(draw_ess * h_wd))
        tl.store(sample_ptr + offs, rounded_for(theta, sample_ptr), mask=mask)


def _source(eps) -> int:
    if eps is None:
        return NO_NOISE
    return BUFFER if isinstance(eps, torch.Tensor) else PHILOX


def ivon_step(mean, momentum, hess, scalars, *, grad, count, avg_grad, avg_hess_stat, update, sample, mean_copy,
              eps_now, eps_next, draw_ess, price, read_avg, seed, index_base, counters):
    """Launch one kernel over a parameter group's flat buffers (see ``ops.ivon_step``)."""
    s = scalars
    n = mean.numel()
    fold = grad is not None
    draw = sample is not None
    draw_index = [e if isinstance(e, int) else 0 for e in (eps_now, eps_next)]
    device_debias = counters is not None and s.debias is None
    beta1 = s.beta1 if device_debias else 0.0
    b1_hi = _FP32.unpack(_FP32.pack(beta1))[0] if device_debias else 0.0  # fp32 hi + lo: beta1 to ~2**-48
    launch(_ivon_step_kernel, (cdiv(n, BLOCK),),
        mean, momentum, hess, or_unused(grad, mean), or_unused(avg_grad, mean), or_unused(avg_hess_stat, mean),
        eps_now if _source(eps_now) == BUFFER else mean, eps_next if _source(eps_next) == BUFFER else mean,
        or_unused(sample, mean), or_unused(mean_copy, mean), or_unused(counters, mean),
        n, index_base, seed, draw_index[0], draw_index[1], float(count),
        s.ess, draw_ess, s.weight_decay, s.beta1, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2,
        0.5 * (1.0 - s.beta2) ** 2, s.lr, 1.0 if device_debias else s.debias, s.clip_radius, b1_hi, beta1 - b1_hi,
        FOLD=fold, READ_AVG=read_avg, WRITE_AVG=fold and not update, UPDATE=update, DRAW=draw, PRICE=price,
        MEAN_COPY=mean_copy is not None and update, EPS_NOW=_source(eps_now), EPS_NEXT=_source(eps_next),
        COUNTERS=counters is not None, DEVICE_DEBIAS=device_debias and update, BLOCK=BLOCK, num_warps=NUM_WARPS)
