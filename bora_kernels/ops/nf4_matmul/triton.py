"""Triton kernels for ``nf4_matmul``: a GEMM whose weight tiles are dequantized from NF4 in
registers inside the K loop (never written to memory).

    forward   y  = x @ W^T (+ bias)     W tile [BLOCK_N, BLOCK_K] built from packed nibbles
    backward  dx = dy @ W               W tile [BLOCK_N, BLOCK_K] again, reduced over N

When the output tiles are too few to fill the GPU (decode, or a few row tiles of a wide weight),
the reduction is split: each program sums one stretch of it into an fp32 partial, and
``_sum_splits_kernel`` adds the partials in a fixed order (no atomics: the result does not depend
on scheduling), the bias, and rounds.

A weight element (n, k) sits at flat index n*K + k: its byte is index // 2 (high nibble for even
k, since K is even), its absmax is block (n*K + k) // blocksize = n*(K/blocksize) + k//blocksize
(K is a multiple of the blocksize, so no block straddles two rows).

Inside the K loop a weight tile reads memory only for its codes (int32 words of eight, one row's
words contiguous) and one scale per block and row of the tile. Each code's value is a select on
its four bits between the 16 table values, picked once per program; no load per element (the
first version gathered every code value and every byte's scale from memory, and Triton's
pipeliner turned those gathers into per-element asynchronous copies: 166 global loads and ~390
address computations per 64 weights a thread; 0.6 ms at M = 1 on a 4096 x 4096 weight, H100).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.nf4 import code_table
from ...quant.triton import block_scale, nf4_code_values, scale_operands
from .._common import cdiv, dot_dtype, dot_precision, gpu_sized, launch, or_unused, rounded_for, splits_to_fill

SUM_BLOCK = 1024
SPLIT_MAX_M = 16  # up to this many rows: one 16-row tile (the smallest tl.dot) and a 64-row weight tile


def _tiles(m: int, device: torch.device) -> dict:
    """Tile sizes (N and K of the weight tile; M of the activation tile). Up to 16 rows use one
    16-row tile (the smallest ``tl.dot``) and 64-row weight tiles; ``_launch`` splits the reduction
    when the tiles are too few. The interpreter uses small tiles so that CPU tests stay quick and
    cover partial tiles."""
    if m <= SPLIT_MAX_M:
        return dict(BLOCK_M=SPLIT_MAX_M, BLOCK_N=64, BLOCK_K=128 if gpu_sized(device) else 64, num_warps=4,
                    num_stages=2)
    if gpu_sized(device):
        # two stages, chosen when the pipeliner staged every gathered code value and scale (~80 KB
        # a stage at 128 x 64); a stage now holds the x tile, the code words and the scales (37 KB
        # in all at two), so more would fit: to tune with a GPU
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)


@triton.jit
def _nf4_tile(words_ptr, table, offs_n, k_start, N, K, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
              offset_ptr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCKSIZE: tl.constexpr,
              WIDTH: tl.constexpr):
    """The fp32 weight tile ``W[offs_n, k_start : k_start + WIDTH]`` (``k_start`` a multiple of
    WIDTH, K of 8).

    The packed codes are read as int32 words of eight (row-major element 8w + e sits in byte e // 2
    of word w, high nibble for even e; bytes little-endian), the values come from
    ``nf4_code_values`` and the scales once per block of the tile (``[rows, WIDTH / BLOCKSIZE]``,
    or one per row when a block spans the tile), broadcast over their elements."""
    ROWS: tl.constexpr = offs_n.shape[0]
    GROUPS: tl.constexpr = WIDTH // BLOCKSIZE if BLOCKSIZE < WIDTH else 1
    offs_w = k_start // 8 + tl.arange(0, WIDTH // 8)
    rows = offs_n[:, None].to(tl.int64)
    words = tl.load(words_ptr + rows * (K // 8) + offs_w[None, :], mask=(offs_n[:, None] < N)
                    & (offs_w[None, :] < K // 8), other=0)
    e = tl.arange(0, 8)
    codes = (words[:, :, None] >> (8 * (e // 2) + 4 * (1 - e % 2))[None, None, :]) & 0xF
    values = nf4_code_values(tl.reshape(codes, (ROWS, WIDTH)), table)
    k_group = k_start + tl.arange(0, GROUPS) * (WIDTH // GROUPS)
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                        rows * (K // BLOCKSIZE) + k_group[None, :] // BLOCKSIZE,
                        (offs_n[:, None] < N) & (k_group[None, :] < K), DOUBLE_QUANT, NESTED_BLOCKSIZE)
    return tl.reshape(tl.reshape(values, (ROWS, GROUPS, WIDTH // GROUPS)) * scale[:, :, None], (ROWS, WIDTH))


@triton.jit
def _nf4_matmul_kernel(a_ptr, words_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, stride_am, stride_om, q_per_split,
                       absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, DOUBLE_QUANT: tl.constexpr,
                       NESTED_BLOCKSIZE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                       BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """``out[M, P] = a[M, Q] @ (W^T or W)``: forward ``y = x @ W^T`` (P = N, Q = K), backward
    ``dx = dy @ W`` (P = K, Q = N). Weight tiles are always read as [n, k] and dequantized here.
    Program (i, j, s) sums Q from ``s * q_per_split``; ``PARTIAL`` stores that fp32 sum (no bias)
    as ``out[s, M, P]``, otherwise the single split stores the result."""
    if BACKWARD:
        P = K
        Q = N
    else:
        P = N
        Q = K
    pid_m = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    table = tl.load(code_ptr + tl.arange(0, 16))
    q_start = pid_s * q_per_split
    for q in range(q_start, tl.minimum(Q, q_start + q_per_split), BLOCK_Q):
        offs_q = q + tl.arange(0, BLOCK_Q)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_q[None, :],
                    mask=(offs_m[:, None] < M) & (offs_q[None, :] < Q), other=0.0)
        if BACKWARD:
            w = _nf4_tile(words_ptr, table, offs_q, pid_p * BLOCK_P, N, K, absmax_ptr, nested_absmax_ptr,
                          nested_code_ptr, offset_ptr, DOUBLE_QUANT, NESTED_BLOCKSIZE, BLOCKSIZE, BLOCK_P)
        else:
            w = tl.trans(_nf4_tile(words_ptr, table, offs_p, q, N, K, absmax_ptr, nested_absmax_ptr,
                                   nested_code_ptr, offset_ptr, DOUBLE_QUANT, NESTED_BLOCKSIZE, BLOCKSIZE, BLOCK_Q))
        acc += tl.dot(a.to(DOT_DTYPE), w.to(a.dtype).to(DOT_DTYPE), input_precision=PRECISION)
    mask = (offs_m[:, None] < M) & (offs_p[None, :] < P)
    if PARTIAL:
        tl.store(out_ptr + pid_s.to(tl.int64) * M * P + offs_m[:, None] * P + offs_p[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_p[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, SPLITS, MP, P, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out[M, P] = sum_s part[s, M, P] (+ bias)``, the splits added in order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MP
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * MP + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % P, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, rounded_for(acc, out_ptr), mask=mask)


def code_words(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as int32 words of eight (``_nf4_tile``): a view, or an aligned copy of a
    tensor that starts mid-word (a view into a larger buffer)."""
    flat = packed.reshape(-1)
    if flat.storage_offset() % 4:
        flat = flat.clone()
    return flat.view(torch.int32)


def _launch(a2, weight, bias, backward: bool, out, split=None):
    """Writes ``out`` (a tensor whose rows are contiguous, viewed as ``[M, P]``) and returns it.
    ``split``: how many stretches of the reduction (default: enough programs to fill the device
    twice; 1 once the output tiles alone do, as for M = 1024 on a 4096-wide weight)."""
    n, k = weight.shape
    m = a2.shape[0]
    tiles = _tiles(m, a2.device)
    p, q, block_p, block_q = (k, n, tiles["BLOCK_K"], tiles["BLOCK_N"]) if backward else \
        (n, k, tiles["BLOCK_N"], tiles["BLOCK_K"])
    grid_mp = (cdiv(m, tiles["BLOCK_M"]), cdiv(p, block_p))
    if split is None:
        split = splits_to_fill(grid_mp[0] * grid_mp[1], a2.device, most=cdiv(q, block_q))
    q_per_split = cdiv(cdiv(q, split), block_q) * block_q
    split = cdiv(q, q_per_split)
    target = out.view(m, p) if split == 1 else torch.empty((split, m, p), device=a2.device, dtype=torch.float32)
    pointers, flags = scale_operands(weight)
    launch(_nf4_matmul_kernel, (*grid_mp, split),
        a2, code_words(weight.packed), code_table(a2.device), or_unused(bias, a2), target, m, n, k, a2.stride(0), p,
        q_per_split,
        *pointers, **flags, BLOCKSIZE=weight.blocksize, BACKWARD=backward,
        HAS_BIAS=bias is not None, PARTIAL=split > 1, BLOCK_M=tiles["BLOCK_M"], BLOCK_P=block_p, BLOCK_Q=block_q,
        DOT_DTYPE=dot_dtype(a2.dtype), PRECISION=dot_precision(), num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"])
    if split > 1:
        launch(_sum_splits_kernel, (cdiv(m * p, SUM_BLOCK),), target, or_unused(bias, a2), out.view(m, p), split,
               m * p, p, HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK)
    return out


def nf4_matmul_forward(x2, weight, bias, out_shape, split=None):
    """``x2 [M, K] @ W^T (+ bias)`` -> a new ``out_shape`` tensor (``[..., N]``) in x's dtype."""
    return _launch(x2, weight, bias, False, torch.empty(out_shape, device=x2.device, dtype=x2.dtype), split)


def nf4_matmul_dx(dy2, weight, out_shape, split=None):
    """``dy2 [M, N] @ W`` -> a new ``out_shape`` tensor (``[..., K]``) in dy's dtype."""
    return _launch(dy2, weight, None, True, torch.empty(out_shape, device=dy2.device, dtype=dy2.dtype), split)
