"""Triton kernels for ``lora_delta``: the shrink-expand pair in one launch, and the per-adapter
weight gradient.

Tokens arrive grouped by adapter (``perm`` lists the original row of each token in adapter order,
``bounds`` the segment edges; see ``LoRAPlan``). Every kernel walks blocks of one segment, so a
block multiplies by a single adapter's weights and the tensor cores see ordinary tiles, whatever
the mix of adapters in the batch. Two kernels serve forward and backward:

    forward    h = x @ A_d^T,  y = s_d * h @ B_d^T          shrink_expand (stores h for backward)
    backward   dh = s_d * dy @ B_d,  dx = dh @ A_d          shrink_expand with B_d^T, A_d^T as weights
               dA_d = dh_d^T @ x_d                          weight_grad over exactly adapter d's tokens
               dB_d = s_d * dy_d^T @ h_d                    weight_grad, stored transposed

A shrink_expand program keeps its block's h ([BLOCK_M, R], fp32) in registers between the two
products, so h never round-trips through memory and a forward is one launch: on a GPU the op is
bound by host time per launch (~40-60 us each with Triton 3.6 on the H100 machine, NOTES.md), not
by its ~45 us of device work at 4096 tokens. Small batches, with fewer row blocks than SMs, cut
the output columns into shares instead of the reduction: each share recomputes the same h, so
the result does not depend on the split.

Context-PEFT's inference also runs on the shrink-expand kernel, in its ``MASKED`` mode
(``context_masked_delta``): no grouping, every context's A and B side by side as one rank-C*R
adapter, each token's columns weighted in registers by its context weight.

Segments (from ``LoRAPlan``): 0 holds ids below -1, 1 holds -1, ``2 + d`` holds adapter ``d`` and
the last one ids at or above D. Rows of segment 1 get exact zeros; rows of the two invalid
segments get NaN, so an id that escaped checking (CUDA ids are not checked, to avoid a host
sync) can never give a plausible wrong answer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._common import (cdiv, dot_dtype, dot_precision, gpu_sized, launch, next_power_of_2, num_sms, or_unused,
                       segment_block, splits_to_fill)

NONE_SEGMENT = tl.constexpr(1)
FIRST_ADAPTER_SEGMENT = tl.constexpr(2)


@triton.jit
def _shrink(x_ptr, w1_ptr, rows, mask_m, w1_cols, mask_r, K, stride_xt, stride_xk, stride_w1k,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr,
            PRECISION: tl.constexpr):
    """``h = x[rows] @ W1^T`` over all of K ([BLOCK_M, BLOCK_R] fp32), W1's column r at
    ``w1_ptr + w1_cols[r]`` (columns where ``mask_r`` is off are never read: zeros)."""
    h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w1_ptr + w1_cols[:, None] + offs_k[None, :] * stride_w1k, mask=mask_r[:, None] & mask_k[None, :],
                    other=0.0)
        h += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
    return h


@triton.jit
def _expand_store(h_dot, w2_ptr, w2_cols, mask_r, out_ptr, rows, mask_m, n_lo, n_hi, row_scale, stride_w2n,
                  stride_ot, stride_on, SCALE_ROWS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``out[rows, n_lo:n_hi] (+)= h @ W2^T`` (times ``row_scale`` per row when ``SCALE_ROWS``),
    W2's column r at ``w2_ptr + w2_cols[r]``."""
    for n in range(n_lo, n_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        w = tl.load(w2_ptr + w2_cols[None, :] + offs_n[:, None] * stride_w2n, mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0)
        acc = tl.dot(h_dot, tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
        if SCALE_ROWS:
            acc = acc * row_scale[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["num_rows"])  # the masked mode's token count: one compile for every batch size
def _lora_shrink_expand_kernel(
    x_ptr, w1_ptr, w2_ptr, out_ptr, h_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr, ctx_ptr,
    num_segs, K, N, R, n_per_split, num_rows, num_ctx, ctx_div,
    stride_xt, stride_xk, stride_w1d, stride_w1r, stride_w1k, stride_w2d, stride_w2n, stride_w2r,
    stride_ot, stride_on, stride_ht, stride_ct, stride_cc,
    SCALE_H: tl.constexpr, ROW_WEIGHT: tl.constexpr, ACCUMULATE: tl.constexpr, STORE_OUT: tl.constexpr,
    STORE_H: tl.constexpr, MASKED: tl.constexpr, CTX_IDS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """For the sorted rows j of one block, ``h = x[perm[j]] @ W1_d^T`` over all of K, then
    ``out[perm[j]] = h @ W2_d^T`` over this program's share of the columns.

    The row weight ``row_weight[perm[j]]`` (Context-PEFT's per-token context weight) and
    ``scale[d]`` multiply h (``SCALE_H``: backward's dh) or else the output rows (forward).
    ``STORE_H``: the column-share-0 program stores h ([T, BLOCK_R] fp32, adapter order).
    ``ACCUMULATE`` adds to ``out`` instead of overwriting it (rows without an adapter keep what
    they hold), so several passes over one output sum without an extra buffer. Without
    ``STORE_OUT`` the kernel is a shrink alone (h for backward). Each output row belongs to one
    program per column share: no atomics, and the result is the same run to run and for any
    column split (each share recomputes the same h).

    ``MASKED`` (Context-PEFT's masked concatenation, forward only): no grouping; block i is rows
    i * BLOCK_M.. of ``num_rows`` in order, W1 and W2 are every context's A and B side by side
    (column ``c * R + r`` is context c's rank r, ``num_ctx * R <= BLOCK_R``), and h's column is
    weighted by its context's ``scale[c]`` times the token's weight for c: ``ctx[t // ctx_div]
    == c`` for integer ids (``CTX_IDS``; ids outside [-1, num_ctx) give NaN rows), else the float
    ``ctx[t, c]`` (strides ``stride_ct``, ``stride_cc``).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_lo = pid_n * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    offs_r = tl.arange(0, BLOCK_R)
    if MASKED:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < num_rows
        rows = offs_m.to(tl.int64)
        col_ctx = offs_r // R
        mask_r = offs_r < num_ctx * R
        h = _shrink(x_ptr, w1_ptr, rows, mask_m, col_ctx.to(tl.int64) * stride_w1d + (offs_r % R) * stride_w1r, mask_r,
                    K, stride_xt, stride_xk, stride_w1k, BLOCK_M, BLOCK_K, BLOCK_R, DOT_DTYPE, PRECISION)
        if CTX_IDS:
            ids = tl.load(ctx_ptr + rows // ctx_div, mask=mask_m, other=-1)
            weight = (ids[:, None] == col_ctx[None, :]).to(tl.float32)
            row_scale = tl.where((ids < -1) | (ids >= num_ctx), float("nan"), 1.0)  # exact otherwise
        else:
            weight = tl.load(ctx_ptr + rows[:, None] * stride_ct + col_ctx[None, :] * stride_cc,
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            row_scale = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused
        h = h * (weight * tl.load(scale_ptr + col_ctx, mask=mask_r, other=0.0)[None, :])
        _expand_store(h.to(DOT_DTYPE), w2_ptr, col_ctx.to(tl.int64) * stride_w2d + (offs_r % R) * stride_w2r, mask_r,
                      out_ptr, rows, mask_m, n_lo, n_hi, row_scale, stride_w2n, stride_ot, stride_on, CTX_IDS,
                      ACCUMULATE, BLOCK_N, DOT_DTYPE, PRECISION)
    else:
        seg, start, end = segment_block(bounds_ptr, num_segs, pid_m, BLOCK_M, BLOCK_S)
        if seg >= num_segs:
            return
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        adapter = seg - FIRST_ADAPTER_SEGMENT
        if (adapter >= 0) & (seg < num_segs - 1):
            rank = tl.minimum(tl.load(rank_ptr + adapter), R)
            mask_r = offs_r < rank  # padded rank is never read
            h = _shrink(x_ptr, w1_ptr, rows, mask_m, adapter.to(tl.int64) * stride_w1d + offs_r * stride_w1r, mask_r,
                        K, stride_xt, stride_xk, stride_w1k, BLOCK_M, BLOCK_K, BLOCK_R, DOT_DTYPE, PRECISION)
            row_scale = tl.load(scale_ptr + adapter) + tl.zeros([BLOCK_M], dtype=tl.float32)
            if ROW_WEIGHT:
                row_scale = row_scale * tl.load(row_weight_ptr + rows, mask=mask_m, other=0.0)
            if SCALE_H:
                h = h * row_scale[:, None]
            if STORE_H:
                if pid_n == 0:
                    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_r[None, :]
                    tl.store(h_ptrs, h, mask=mask_m[:, None])
            if STORE_OUT:
                _expand_store(h.to(DOT_DTYPE), w2_ptr, adapter.to(tl.int64) * stride_w2d + offs_r * stride_w2r, mask_r,
                              out_ptr, rows, mask_m, n_lo, n_hi, row_scale, stride_w2n, stride_ot, stride_on,
                              not SCALE_H, ACCUMULATE, BLOCK_N, DOT_DTYPE, PRECISION)
        elif STORE_OUT:  # no adapter: exact zeros; an id outside [-1, D): NaN rows
            n_end = n_hi
            if ACCUMULATE:  # rows without an adapter keep what they hold: nothing to read or write
                n_end = tl.where(seg == NONE_SEGMENT, n_lo, n_hi)
            for n in range(n_lo, n_end, BLOCK_N):
                offs_n = n + tl.arange(0, BLOCK_N)
                mask_n = offs_n < n_hi
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if seg != NONE_SEGMENT:
                    acc += float("nan")
                out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
                if ACCUMULATE:
                    acc += tl.load(out_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _weight_grad_tile(
    p_ptr, q_ptr, g_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr,
    adapter, pid_c, pid_s, num_splits, C, R,
    stride_pt, stride_qt, stride_qc, stride_gs, stride_gd, stride_gr, stride_gc,
    WEIGHTED: tl.constexpr, ROW_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """g[split, d, :, c] = sum over adapter d's tokens in this split of p[j]^T q[perm[j], c].

    p is [T, BLOCK_R] in adapter order (h or dh), q is [T, C] in the original order (dy or x).
    ``WEIGHTED`` multiplies by ``scale[d]`` and, with ``ROW_WEIGHT``, p's row j by
    ``row_weight[perm[j]]``. Each adapter owns its output tile, so there are no atomics and the
    sum order is fixed.
    """
    seg_lo = tl.load(bounds_ptr + adapter + FIRST_ADAPTER_SEGMENT)
    seg_hi = tl.load(bounds_ptr + adapter + FIRST_ADAPTER_SEGMENT + 1)
    chunk = tl.cdiv(tl.cdiv(seg_hi - seg_lo, num_splits), BLOCK_M) * BLOCK_M
    lo = seg_lo + pid_s * chunk
    hi = tl.minimum(lo + chunk, seg_hi)
    rank = tl.minimum(tl.load(rank_ptr + adapter), R)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for t in range(lo, hi, BLOCK_M):
        offs_t = t + tl.arange(0, BLOCK_M)
        mask_t = offs_t < hi
        rows = tl.load(perm_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        p = tl.load(p_ptr + offs_t[:, None].to(tl.int64) * stride_pt + offs_r[None, :],
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0)
        if WEIGHTED:
            if ROW_WEIGHT:
                p = p * tl.load(row_weight_ptr + rows, mask=mask_t, other=0.0)[:, None]
        q = tl.load(q_ptr + rows[:, None] * stride_qt + offs_c[None, :] * stride_qc,
                    mask=mask_t[:, None] & mask_c[None, :], other=0.0)
        acc += tl.dot(tl.trans(p.to(DOT_DTYPE)), q.to(DOT_DTYPE), input_precision=PRECISION)
    if WEIGHTED:
        acc = acc * tl.load(scale_ptr + adapter)
    g_ptrs = (g_ptr + pid_s.to(tl.int64) * stride_gs + adapter.to(tl.int64) * stride_gd
              + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc)
    # rows at or past the adapter's rank are stored too: they hold exact zeros
    tl.store(g_ptrs, acc.to(g_ptr.dtype.element_ty), mask=(offs_r < R)[:, None] & mask_c[None, :])


@triton.jit
def _lora_weight_grad_kernel(
    p_ptr, q_ptr, g_ptr, p2_ptr, q2_ptr, g2_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr,
    C, C2, col_blocks, R,
    stride_pt, stride_qt, stride_qc, stride_gs, stride_gd, stride_gr, stride_gc,
    stride_p2t, stride_q2t, stride_q2c, stride_g2s, stride_g2d, stride_g2r, stride_g2c,
    WEIGHTED: tl.constexpr, WEIGHTED2: tl.constexpr, ROW_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One or two weight gradients in one launch (backward's dA and dB): column blocks below
    ``col_blocks`` belong to the first (p, q, g), the rest to the second."""
    adapter = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if pid_c < col_blocks:
        _weight_grad_tile(p_ptr, q_ptr, g_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr,
                          adapter, pid_c, pid_s, num_splits, C, R,
                          stride_pt, stride_qt, stride_qc, stride_gs, stride_gd, stride_gr, stride_gc,
                          WEIGHTED, ROW_WEIGHT, BLOCK_M, BLOCK_C, BLOCK_R, DOT_DTYPE, PRECISION)
    else:
        _weight_grad_tile(p2_ptr, q2_ptr, g2_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr,
                          adapter, pid_c - col_blocks, pid_s, num_splits, C2, R,
                          stride_p2t, stride_q2t, stride_q2c, stride_g2s, stride_g2d, stride_g2r, stride_g2c,
                          WEIGHTED2, ROW_WEIGHT, BLOCK_M, BLOCK_C, BLOCK_R, DOT_DTYPE, PRECISION)


# --- launchers ---------------------------------------------------------------------------------


def _tiles(num_tokens: int, num_adapters: int, max_rank: int, device: torch.device) -> dict:
    """Block sizes: a documented heuristic rather than autotuning, so that every call of a shape
    runs the same code (deterministic) and the first call is not slow.

    BLOCK_M follows the tokens per adapter: decode batches (about one token per adapter) waste
    less of a 16-row tile; prefill and training use 64 rows. The reduction tiles are 128 wide
    on a GPU (128-byte bf16 rows per load); the interpreter uses small tiles to stay quick.
    """
    block_r = max(16, next_power_of_2(max_rank))
    if not gpu_sized(device):
        return dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, BLOCK_R=block_r, num_warps=4)
    per_adapter = num_tokens // max(1, min(num_adapters, num_tokens))
    block_m = 16 if per_adapter < 32 else (64 if block_r <= 64 else 32)
    return dict(BLOCK_M=block_m, BLOCK_K=128, BLOCK_N=128, BLOCK_R=block_r, num_warps=4)


def _row_programs(num_tokens: int, num_segs: int, block_m: int) -> int:
    # every segment may end in a partial block: cdiv(T, BLOCK_M) + num_segs blocks at most
    return cdiv(num_tokens, block_m) + num_segs


def column_splits(programs: int, n: int, tiles: dict, device: torch.device) -> int:
    """How many shares of the output columns each row block is cut into: enough programs to give
    every SM one (a share recomputes its block's h, reading x again, mostly from L2), at most one
    share per column block."""
    return max(1, min(cdiv(num_sms(device), max(programs, 1)), cdiv(n, tiles["BLOCK_N"])))


def lora_shrink_expand(x, w1, w2, out, plan, ranks, scaling, tiles, scale_h, h=None, row_weight=None,
                       accumulate=False, split=None, context=None, per_row=1):
    """``out[perm[j]] = (x[perm[j]] @ W1_d^T) @ W2_d^T`` in one launch; ``h`` (if given, [T, BLOCK_R]
    fp32) receives the middle product in adapter order.

    ``w1`` is a [D, R, K] view and ``w2`` a [D, N, R] view: A and B for forward, B transposed and
    A transposed for backward's dx. ``scale[d]`` and ``row_weight`` (fp32 [T], original order)
    multiply h when ``scale_h`` (backward) and the output rows otherwise. ``out=None`` computes h
    alone (``w2`` unused). ``accumulate`` adds to ``out`` instead of overwriting it; ``split``
    overrides how many column shares each row block is cut into.

    With ``context`` (and ``plan``, ``ranks`` None) the kernel runs its ``MASKED`` mode, forward
    only: the D adapters are contexts used side by side (``D * R <= BLOCK_R``), each token's
    columns weighted by ``context``: integer ids, one per ``per_row`` consecutive rows (-1: none),
    or float (or bool) weights ``[T, D]``.
    """
    num_tokens, k = x.shape
    masked = context is not None
    if masked:
        perm = bounds = ranks = scaling  # not read
        num_segs, programs = 0, cdiv(num_tokens, tiles["BLOCK_M"])
        weights = context.dtype.is_floating_point or context.dtype == torch.bool
    else:
        perm, bounds = plan.perm, plan.bounds
        num_segs = bounds.numel() - 1
        programs = _row_programs(num_tokens, num_segs, tiles["BLOCK_M"])
        weights = False
    n = w2.shape[1] if out is not None else 0
    if out is None:
        split = 1
    elif split is None:
        split = column_splits(programs, n, tiles, x.device)
    n_per_split = cdiv(cdiv(n, split), tiles["BLOCK_N"]) * tiles["BLOCK_N"] if n else 0
    split = cdiv(n, n_per_split) if n else 1
    w2 = or_unused(w2, w1)
    launch(_lora_shrink_expand_kernel, (programs, split),
        x, w1, w2, or_unused(out, x), or_unused(h, scaling), perm, bounds, ranks, scaling,
        or_unused(row_weight, scaling), or_unused(context, perm),
        num_segs, k, n, w1.shape[1], n_per_split, num_tokens if masked else 0, w1.shape[0] if masked else 0, per_row,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), w2.stride(0), w2.stride(1),
        w2.stride(2), out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
        h.stride(0) if h is not None else 0, context.stride(0) if weights else 0, context.stride(1) if weights else 0,
        SCALE_H=scale_h, ROW_WEIGHT=row_weight is not None, ACCUMULATE=accumulate, STORE_OUT=out is not None,
        STORE_H=h is not None, MASKED=masked, CTX_IDS=masked and not weights, BLOCK_M=tiles["BLOCK_M"],
        BLOCK_K=tiles["BLOCK_K"], BLOCK_N=tiles["BLOCK_N"], BLOCK_R=tiles["BLOCK_R"],
        BLOCK_S=next_power_of_2(num_segs + 1), DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(),
        num_warps=tiles["num_warps"],
    )


def context_masked_delta(x, lora_a, lora_b, context, per_row, scaling, out, accumulate):
    """Context-PEFT's delta in the masked concatenation form, one launch, no grouping:
    ``out[t] (+)= sum_c w[t, c] * scale[c] * (x[t] @ A_c^T) @ B_c^T`` (the kernel's ``MASKED``
    mode; ``context`` as ``lora_shrink_expand`` takes it). Needs ``C * R <= 128``."""
    tiles = _tiles(x.shape[0], 1, lora_a.shape[0] * lora_a.shape[1], x.device)
    lora_shrink_expand(x, lora_a, lora_b, out, None, None, scaling, tiles, scale_h=False, accumulate=accumulate,
                       context=context, per_row=per_row)
    return out


class GradJob(NamedTuple):
    """One weight gradient for ``lora_weight_grads``: ``g[d] = sum over adapter d's tokens of
    p[j]^T q[perm[j]]`` into ``g``, a [D, R, C] view; ``weighted`` multiplies by ``scale[d]`` and
    p's rows by the launch's ``row_weight[perm[j]]``."""

    p: torch.Tensor  # [T, BLOCK_R] fp32, adapter order
    q: torch.Tensor  # [T, C], original order
    g: torch.Tensor
    weighted: bool


def lora_weight_grads(jobs, plan, ranks, scaling, tiles, row_weight=None, split=None):
    """One or two ``GradJob`` in one launch (same adapters, ranks and dtype of q).

    Few adapters leave few programs, so the tokens of each adapter are split in that case and the
    fp32 partial sums added afterwards in a fixed order.
    """
    perm, bounds = plan.perm, plan.bounds
    first, second = jobs[0], (jobs[1] if len(jobs) > 1 else None)
    num_adapters, max_rank, c = first.g.shape
    block_c = tiles["BLOCK_N"]
    col_blocks = cdiv(c, block_c)
    c2 = second.g.shape[2] if second is not None else 0
    all_blocks = col_blocks + cdiv(c2, block_c)
    if split is None:
        split = splits_to_fill(num_adapters * all_blocks, first.g.device,
                               most=cdiv(first.q.shape[0], 4 * tiles["BLOCK_M"]))
    targets = [job.g.unsqueeze(0) if split == 1 else torch.empty((split, *job.g.shape), device=job.g.device,
                                                                dtype=torch.float32) for job in jobs]
    second, target2 = (second, targets[1]) if second is not None else (first, targets[0])
    launch(_lora_weight_grad_kernel, (num_adapters, all_blocks, split),
        first.p, first.q, targets[0], second.p, second.q, target2, perm, bounds, ranks, scaling,
        or_unused(row_weight, scaling),
        c, c2, col_blocks, max_rank,
        first.p.stride(0), first.q.stride(0), first.q.stride(1), *targets[0].stride(),
        second.p.stride(0), second.q.stride(0), second.q.stride(1), *target2.stride(),
        WEIGHTED=first.weighted, WEIGHTED2=second.weighted, ROW_WEIGHT=row_weight is not None,
        BLOCK_M=tiles["BLOCK_M"], BLOCK_C=block_c, BLOCK_R=tiles["BLOCK_R"], DOT_DTYPE=dot_dtype(first.q.dtype),
        PRECISION=dot_precision(), num_warps=tiles["num_warps"],
    )
    if split > 1:
        for job, target in zip(jobs, targets):
            torch.sum(target, 0, out=job.g)


# --- the op's two entry points (the torch path in grouped.py has the same two) -----------------
# ``row_weight`` (fp32 [T], original token order, or None) multiplies each token's delta: the
# per-token context weight of Context-PEFT. ``out`` / ``dx`` given: add into them (one pass of a
# sum over several contexts per token); None: allocate and overwrite.


def lora_delta_forward(x, lora_a, lora_b, plan, scaling, ranks, save_h, row_weight=None, out=None):
    """Returns ``(out [T, N], h)``; h ([T, BLOCK_R] fp32, adapter order, unweighted) only when
    ``save_h``. One launch."""
    tiles = _tiles(x.shape[0], lora_a.shape[0], lora_a.shape[1], x.device)
    accumulate = out is not None
    if out is None:
        out = torch.empty((x.shape[0], lora_b.shape[1]), device=x.device, dtype=x.dtype)
    h = torch.empty((x.shape[0], tiles["BLOCK_R"]), device=x.device, dtype=torch.float32) if save_h else None
    lora_shrink_expand(x, lora_a, lora_b, out, plan, ranks, scaling, tiles, scale_h=False, h=h,
                       row_weight=row_weight, accumulate=accumulate)
    return out, h


def lora_delta_backward(dy, x, lora_a, lora_b, h, plan, scaling, ranks, needs_grad, row_weight=None, dx=None):
    """Returns ``(dx, dA, dB)``, each None where ``needs_grad`` says it is not wanted. ``h=None``
    recomputes h from x, for dB only."""
    needs_dx, needs_da, needs_db = needs_grad
    tiles = _tiles(x.shape[0], lora_a.shape[0], lora_a.shape[1], x.device)
    accumulate = dx is not None
    da = db = None
    if needs_dx or needs_da:
        if needs_dx and dx is None:
            dx = torch.empty_like(x)
        dh = torch.empty((x.shape[0], tiles["BLOCK_R"]), device=x.device, dtype=torch.float32) if needs_da else None
        # dh = s_d * row_weight * dy @ B_d, then dx = dh @ A_d
        lora_shrink_expand(dy, lora_b.transpose(1, 2), lora_a.transpose(1, 2), dx if needs_dx else None, plan,
                           ranks, scaling, tiles, scale_h=True, h=dh, row_weight=row_weight, accumulate=accumulate)
    jobs = []
    if needs_da:
        da = torch.empty_like(lora_a)
        jobs.append(GradJob(dh, x, da, weighted=False))
    if needs_db:
        if h is None:  # not saved (the torch.compile path): a shrink alone gives it
            h = torch.empty((x.shape[0], tiles["BLOCK_R"]), device=x.device, dtype=torch.float32)
            lora_shrink_expand(x, lora_a, None, None, plan, ranks, scaling, tiles, scale_h=False, h=h)
        db = torch.empty_like(lora_b)
        jobs.append(GradJob(h, dy, db.transpose(1, 2), weighted=True))
    if jobs:  # dA and dB in one launch
        lora_weight_grads(jobs, plan, ranks, scaling, tiles, row_weight=row_weight)
    return (dx if needs_dx else None), da, db
