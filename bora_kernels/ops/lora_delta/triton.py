"""Triton kernels for ``lora_delta``: shrink, expand and the per-adapter weight gradient.

Tokens arrive grouped by adapter (``perm`` lists the original row of each token in adapter order,
``bounds`` the segment edges; see ``LoRAPlan``). Every kernel walks blocks of one segment, so a
block multiplies by a single adapter's weights and the tensor cores see ordinary tiles, whatever
the mix of adapters in the batch. Three kernels serve forward and backward:

    forward    h  = x  @ A_d^T                    shrink (split along K when the batch is small)
               y  = s_d * h @ B_d^T               expand (also writes the summed h for backward)
    backward   dh = s_d * dy @ B_d                shrink, with B_d^T as its weight (split along N)
               dx = dh @ A_d                      expand, with A_d^T as its weight
               dA_d = dh_d^T @ x_d                weight_grad over exactly adapter d's tokens
               dB_d = s_d * dy_d^T @ h_d          weight_grad, stored transposed

Segments (from ``LoRAPlan``): 0 holds ids below -1, 1 holds -1, ``2 + d`` holds adapter ``d`` and
the last one ids at or above D. Rows of segment 1 get exact zeros; rows of the two invalid
segments get NaN, so an id that escaped checking (CUDA ids are not checked, to avoid a host
sync) can never give a plausible wrong answer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import cdiv, dot_dtype, dot_precision, next_power_of_2, or_unused, segment_block, splits_to_fill

NONE_SEGMENT = tl.constexpr(1)
FIRST_ADAPTER_SEGMENT = tl.constexpr(2)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, w_ptr, h_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr,
    num_segs, K, R, k_per_split,
    stride_xt, stride_xk, stride_wd, stride_wr, stride_wk, stride_hs, stride_ht,
    APPLY_SCALE: tl.constexpr, ROW_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[split, j, :] = sum over this split's K range of x[perm[j]] @ W_d^T, for sorted rows j
    (times ``scale[d]`` and ``row_weight[perm[j]]`` where asked)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1).to(tl.int64)
    seg, start, end = segment_block(bounds_ptr, num_segs, pid_m, BLOCK_M, BLOCK_S)
    adapter = seg - FIRST_ADAPTER_SEGMENT
    if (adapter < 0) | (seg >= num_segs - 1):  # no adapter: expand writes these rows itself
        return
    rank = tl.minimum(tl.load(rank_ptr + adapter), R)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank  # padded rank is never read
    w_base = w_ptr + adapter.to(tl.int64) * stride_wd + offs_r[:, None] * stride_wr

    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_base + offs_k[None, :] * stride_wk, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
    if APPLY_SCALE:
        acc = acc * tl.load(scale_ptr + adapter)
    if ROW_WEIGHT:
        acc = acc * tl.load(row_weight_ptr + rows, mask=mask_m, other=0.0)[:, None]
    h_ptrs = h_ptr + pid_k * stride_hs + offs_m[:, None].to(tl.int64) * stride_ht + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=mask_m[:, None])


@triton.jit
def _lora_expand_kernel(
    h_ptr, w_ptr, out_ptr, hsum_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr,
    num_segs, N, R,
    stride_hs, stride_ht, stride_wd, stride_wn, stride_wr, stride_ot, stride_on,
    NUM_SPLITS: tl.constexpr, APPLY_SCALE: tl.constexpr, ROW_WEIGHT: tl.constexpr,
    ACCUMULATE: tl.constexpr, STORE_OUT: tl.constexpr,
    STORE_HSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[perm[j]] = h[j] @ W_d^T with h summed over the shrink's splits (a fixed order, so the
    result is the same run to run); the first column block also stores that sum for backward.

    ``ROW_WEIGHT`` multiplies each row by ``row_weight[perm[j]]`` (Context-PEFT's per-token context
    weight); ``ACCUMULATE`` adds to ``out`` instead of overwriting it (rows without an adapter keep
    what they hold), so several passes over one output sum without an extra buffer."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg, start, end = segment_block(bounds_ptr, num_segs, pid_m, BLOCK_M, BLOCK_S)
    if seg >= num_segs:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    adapter = seg - FIRST_ADAPTER_SEGMENT
    if (adapter >= 0) & (seg < num_segs - 1):
        rank = tl.minimum(tl.load(rank_ptr + adapter), R)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_r[None, :]
        h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            h += tl.load(h_ptrs + s * stride_hs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if STORE_HSUM:
            if pid_n == 0:
                hsum_ptrs = hsum_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_r[None, :]
                tl.store(hsum_ptrs, h, mask=mask_m[:, None])
        w = tl.load(w_ptr + adapter.to(tl.int64) * stride_wd + offs_n[:, None] * stride_wn
                    + offs_r[None, :] * stride_wr, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
        if APPLY_SCALE:
            acc = acc * tl.load(scale_ptr + adapter)
        if ROW_WEIGHT:
            acc = acc * tl.load(row_weight_ptr + rows, mask=mask_m, other=0.0)[:, None]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if seg != NONE_SEGMENT:  # an id outside [-1, D): poison the rows
            acc += float("nan")
    if STORE_OUT:
        out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
        if ACCUMULATE:  # each row belongs to one program of this launch: no race
            acc += tl.load(out_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_weight_grad_kernel(
    p_ptr, q_ptr, g_ptr, perm_ptr, bounds_ptr, rank_ptr, scale_ptr, row_weight_ptr,
    C, R,
    stride_pt, stride_qt, stride_qc, stride_gs, stride_gd, stride_gr, stride_gc,
    APPLY_SCALE: tl.constexpr, ROW_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """g[split, d, :, c] = sum over adapter d's tokens in this split of p[j]^T q[perm[j], c].

    p is [T, BLOCK_R] in adapter order (h or dh), q is [T, C] in the original order (dy or x);
    ``ROW_WEIGHT`` multiplies p's row j by ``row_weight[perm[j]]``.
    Each adapter owns its output tile, so there are no atomics and the sum order is fixed.
    """
    adapter = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(2)
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
        if ROW_WEIGHT:
            p = p * tl.load(row_weight_ptr + rows, mask=mask_t, other=0.0)[:, None]
        q = tl.load(q_ptr + rows[:, None] * stride_qt + offs_c[None, :] * stride_qc,
                    mask=mask_t[:, None] & mask_c[None, :], other=0.0)
        acc += tl.dot(tl.trans(p.to(DOT_DTYPE)), q.to(DOT_DTYPE), input_precision=PRECISION)
    if APPLY_SCALE:
        acc = acc * tl.load(scale_ptr + adapter)
    g_ptrs = (g_ptr + pid_s.to(tl.int64) * stride_gs + adapter.to(tl.int64) * stride_gd
              + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc)
    # rows at or past the adapter's rank are stored too: they hold exact zeros
    tl.store(g_ptrs, acc.to(g_ptr.dtype.element_ty), mask=(offs_r < R)[:, None] & mask_c[None, :])


# --- launchers ---------------------------------------------------------------------------------


def _tiles(num_tokens: int, num_adapters: int, max_rank: int, device: torch.device) -> dict:
    """Block sizes: a documented heuristic rather than autotuning, so that every call of a shape
    runs the same code (deterministic) and the first call is not slow.

    BLOCK_M follows the tokens per adapter: decode batches (about one token per adapter) waste
    less of a 16-row tile; prefill and training use 64 rows. The reduction tiles are 128 wide
    on a GPU (128-byte bf16 rows per load); the interpreter uses small tiles to stay quick.
    """
    block_r = max(16, next_power_of_2(max_rank))
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, BLOCK_R=block_r, num_warps=4)
    per_adapter = num_tokens // max(1, min(num_adapters, num_tokens))
    block_m = 16 if per_adapter < 32 else (64 if block_r <= 64 else 32)
    return dict(BLOCK_M=block_m, BLOCK_K=128, BLOCK_N=128, BLOCK_R=block_r, num_warps=4)


def _row_programs(num_tokens: int, num_segs: int, block_m: int) -> int:
    # every segment may end in a partial block: cdiv(T, BLOCK_M) + num_segs blocks at most
    return cdiv(num_tokens, block_m) + num_segs


def lora_shrink(x, w, plan, ranks, scaling, tiles, apply_scale, split=None, row_weight=None):
    """``h[s, j] = x[perm[j]] @ W_d^T`` over split ``s`` of the reduction.

    ``x`` is [T, K]; ``w`` is a [D, R, K] view (A itself, or B transposed for backward).
    ``row_weight`` (fp32 [T], original order) multiplies each row. Returns h as
    [splits, T, BLOCK_R] fp32, rows in adapter order.
    """
    perm, bounds = plan.perm, plan.bounds
    num_tokens, k = x.shape
    num_segs = bounds.numel() - 1
    block_k = tiles["BLOCK_K"]
    programs = _row_programs(num_tokens, num_segs, tiles["BLOCK_M"])
    if split is None:  # small batches split the reduction to keep the GPU busy
        split = splits_to_fill(programs, x.device, most=cdiv(k, block_k))
    k_per_split = cdiv(cdiv(k, split), block_k) * block_k
    split = cdiv(k, k_per_split)
    h = torch.empty((split, num_tokens, tiles["BLOCK_R"]), device=x.device, dtype=torch.float32)
    _lora_shrink_kernel[(programs, split)](
        x, w, h, perm, bounds, ranks, scaling, or_unused(row_weight, scaling),
        num_segs, k, w.shape[1], k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), h.stride(0), h.stride(1),
        APPLY_SCALE=apply_scale, ROW_WEIGHT=row_weight is not None, BLOCK_M=tiles["BLOCK_M"], BLOCK_K=block_k,
        BLOCK_R=tiles["BLOCK_R"], BLOCK_S=next_power_of_2(num_segs + 1),
        DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(), num_warps=tiles["num_warps"],
    )
    return h


def lora_expand(h, w, out, plan, ranks, scaling, tiles, apply_scale, hsum=None, row_weight=None,
                accumulate=False):
    """``out[perm[j]] = sum_s h[s, j] @ W_d^T``; ``hsum`` (if given) receives ``sum_s h[s]``.

    ``w`` is a [D, N, R] view (B itself, or A transposed for backward). ``out=None`` only sums h
    (backward needs dh for dA even when x needs no gradient). ``row_weight`` (fp32 [T], original
    order) multiplies each output row; ``accumulate`` adds to ``out`` instead of overwriting it.
    """
    perm, bounds = plan.perm, plan.bounds
    num_tokens = h.shape[1]
    num_segs = bounds.numel() - 1
    n = w.shape[1]
    programs = _row_programs(num_tokens, num_segs, tiles["BLOCK_M"])
    col_blocks = cdiv(n, tiles["BLOCK_N"]) if out is not None else 1
    _lora_expand_kernel[(programs, col_blocks)](
        h, w, or_unused(out, h), or_unused(hsum, h), perm, bounds, ranks, scaling, or_unused(row_weight, scaling),
        num_segs, n, w.shape[2],
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
        NUM_SPLITS=h.shape[0], APPLY_SCALE=apply_scale, ROW_WEIGHT=row_weight is not None,
        ACCUMULATE=accumulate, STORE_OUT=out is not None,
        STORE_HSUM=hsum is not None, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"],
        BLOCK_R=tiles["BLOCK_R"], BLOCK_S=next_power_of_2(num_segs + 1),
        DOT_DTYPE=dot_dtype(w.dtype), PRECISION=dot_precision(), num_warps=tiles["num_warps"],
    )


def lora_weight_grad(p, q, g, plan, ranks, scaling, tiles, apply_scale, split=None, row_weight=None):
    """``g[d] = sum over adapter d's tokens of p[j]^T q[perm[j]]`` into ``g``, a [D, R, C] view
    (p's rows times ``row_weight[perm[j]]`` when given).

    Few adapters leave few programs, so the tokens of each adapter are split in that case and the
    fp32 partial sums added afterwards in a fixed order.
    """
    perm, bounds = plan.perm, plan.bounds
    num_adapters, max_rank, c = g.shape
    block_c = tiles["BLOCK_N"]
    col_blocks = cdiv(c, block_c)
    if split is None:
        split = splits_to_fill(num_adapters * col_blocks, g.device,
                               most=cdiv(q.shape[0], 4 * tiles["BLOCK_M"]))
    target = g.unsqueeze(0) if split == 1 else torch.empty(
        (split, *g.shape), device=g.device, dtype=torch.float32)
    _lora_weight_grad_kernel[(num_adapters, col_blocks, split)](
        p, q, target, perm, bounds, ranks, scaling, or_unused(row_weight, scaling),
        c, max_rank,
        p.stride(0), q.stride(0), q.stride(1),
        target.stride(0), target.stride(1), target.stride(2), target.stride(3),
        APPLY_SCALE=apply_scale, ROW_WEIGHT=row_weight is not None, BLOCK_M=tiles["BLOCK_M"], BLOCK_C=block_c,
        BLOCK_R=tiles["BLOCK_R"], DOT_DTYPE=dot_dtype(q.dtype), PRECISION=dot_precision(),
        num_warps=tiles["num_warps"],
    )
    if split > 1:
        g.copy_(target.sum(0))


# --- the op's two entry points (the torch path in grouped.py has the same two) -----------------
# ``row_weight`` (fp32 [T], original token order, or None) multiplies each token's delta: the
# per-token context weight of Context-PEFT. ``out`` / ``dx`` given: add into them (one pass of a
# sum over several contexts per token); None: allocate and overwrite.


def lora_delta_forward(x, lora_a, lora_b, plan, scaling, ranks, save_h, row_weight=None, out=None):
    """Returns ``(out [T, N], h)``; h ([T, BLOCK_R] fp32, adapter order, unweighted) only when
    ``save_h``."""
    tiles = _tiles(x.shape[0], lora_a.shape[0], lora_a.shape[1], x.device)
    h = lora_shrink(x, lora_a, plan, ranks, scaling, tiles, apply_scale=False)
    accumulate = out is not None
    if out is None:
        out = torch.empty((x.shape[0], lora_b.shape[1]), device=x.device, dtype=x.dtype)
    hsum = torch.empty_like(h[0]) if save_h else None
    lora_expand(h, lora_b, out, plan, ranks, scaling, tiles, apply_scale=True, hsum=hsum,
                row_weight=row_weight, accumulate=accumulate)
    return out, hsum


def lora_delta_backward(dy, x, lora_a, lora_b, h, plan, scaling, ranks, needs_grad, row_weight=None, dx=None):
    """Returns ``(dx, dA, dB)``, each None where ``needs_grad`` says it is not wanted. ``h=None``
    recomputes h from x, for dB only."""
    needs_dx, needs_da, needs_db = needs_grad
    tiles = _tiles(x.shape[0], lora_a.shape[0], lora_a.shape[1], x.device)
    accumulate = dx is not None
    da = db = None
    if needs_dx or needs_da:
        dh = lora_shrink(dy, lora_b.transpose(1, 2), plan, ranks, scaling, tiles, apply_scale=True,
                         row_weight=row_weight)
        if needs_dx and dx is None:
            dx = torch.empty_like(x)
        dh_sum = torch.empty_like(dh[0]) if needs_da else None
        lora_expand(dh, lora_a.transpose(1, 2), dx if needs_dx else None, plan, ranks, scaling, tiles,
                    apply_scale=False, hsum=dh_sum, accumulate=accumulate)
        if needs_da:
            da = torch.empty_like(lora_a)
            lora_weight_grad(dh_sum, x, da, plan, ranks, scaling, tiles, apply_scale=False)
    if needs_db:
        if h is None:  # not saved (the torch.compile path): one unsplit shrink gives it
            h = lora_shrink(x, lora_a, plan, ranks, scaling, tiles, apply_scale=False, split=1)[0]
        db = torch.empty_like(lora_b)
        lora_weight_grad(h, dy, db.transpose(1, 2), plan, ranks, scaling, tiles, apply_scale=True,
                         row_weight=row_weight)
    return (dx if needs_dx else None), da, db
