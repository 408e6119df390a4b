"""Triton kernels for ``context_bias`` / ``context_scale``: one pass over the base output.

Forward reads a tile of ``u`` (the base layer's output, or its input for IA3 on the input),
builds each row's vector ``v[t] = sum_c w[t, c] * vec[c]`` (or ``vec[id[t]]``) in registers and
writes ``u + v`` or ``u * v``: the ``[T, N]`` vector is never stored. Backward reads ``dy`` (and
``u`` to multiply) once and writes ``du`` together with per-block partial sums of the vector
and weight gradients; a fixed-order sum of the partials finishes them (no atomics, so results
are the same run to run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import cdiv, gpu_sized, launch, or_unused


@triton.jit
def _row_vectors(vec_ptr, ctx_ptr, offs_m, offs_n, mask_m, mask_n, C, rows_per_id, stride_ct, stride_cc,
                 stride_vc, IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``v[t, n]`` for a tile: the gathered vector of each row's context, or the weighted sum."""
    if IDS:
        ids = tl.load(ctx_ptr + (offs_m // rows_per_id).to(tl.int64) * stride_ct, mask=mask_m, other=-1)
        ok = (ids >= 0) & (ids < C)
        v = tl.load(vec_ptr + ids.to(tl.int64)[:, None] * stride_vc + offs_n[None, :],
                    mask=ok[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        # an id outside [-1, C) (GPU ids are not checked, to avoid a host sync) poisons its row
        v = tl.where(((ids < -1) | (ids >= C))[:, None], float("nan"), v)
    else:
        v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in range(C):
            w = tl.load(ctx_ptr + offs_m.to(tl.int64) * stride_ct + c * stride_cc, mask=mask_m, other=0.0)
            vc = tl.load(vec_ptr + c * stride_vc + offs_n, mask=mask_n, other=0.0)
            v += w.to(tl.float32)[:, None] * vc.to(tl.float32)[None, :]
    return v


@triton.jit
def _context_vector_kernel(
    u_ptr, vec_ptr, ctx_ptr, out_ptr,
    T, N, C, rows_per_id, stride_ut, stride_ot, stride_ct, stride_cc, stride_vc,
    MULTIPLY: tl.constexpr, IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = u * v (MULTIPLY) or u + v, v built per row by ``_row_vectors``."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < T, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    v = _row_vectors(vec_ptr, ctx_ptr, offs_m, offs_n, mask_m, mask_n, C, rows_per_id, stride_ct, stride_cc,
                     stride_vc, IDS, BLOCK_M, BLOCK_N)
    u = tl.load(u_ptr + offs_m[:, None] * stride_ut + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = u * v if MULTIPLY else u + v
    tl.store(out_ptr + offs_m[:, None] * stride_ot + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _context_vector_backward_kernel(
    g_ptr, u_ptr, vec_ptr, ctx_ptr, du_ptr, dvec_ptr, dw_ptr,
    T, N, C, rows_per_id, stride_gt, stride_ut, stride_dut, stride_ct, stride_cc, stride_vc,
    stride_dvs, stride_dvc, stride_dws, stride_dwt,
    MULTIPLY: tl.constexpr, IDS: tl.constexpr, STORE_DU: tl.constexpr, STORE_DVEC: tl.constexpr,
    STORE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """With p = dy * u (MULTIPLY) or dy:  du = dy * v (MULTIPLY; for add, du is dy itself),
    dvec partial [row block, c, n] = sum_t w[t, c] p[t, n], dw partial [col block, t, c] =
    sum_n p[t, n] vec[c, n]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < T, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    p = tl.load(g_ptr + offs_m[:, None] * stride_gt + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if MULTIPLY:
        if STORE_DU:
            v = _row_vectors(vec_ptr, ctx_ptr, offs_m, offs_n, mask_m, mask_n, C, rows_per_id, stride_ct,
                             stride_cc, stride_vc, IDS, BLOCK_M, BLOCK_N)
            tl.store(du_ptr + offs_m[:, None] * stride_dut + offs_n[None, :],
                     (p * v).to(du_ptr.dtype.element_ty), mask=mask)
        p = p * tl.load(u_ptr + offs_m[:, None] * stride_ut + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_DVEC:
        if IDS:
            ids = tl.load(ctx_ptr + (offs_m // rows_per_id).to(tl.int64) * stride_ct, mask=mask_m, other=-1)
        for c in range(C):
            if IDS:
                w = (ids == c).to(tl.float32)
            else:
                w = tl.load(ctx_ptr + offs_m * stride_ct + c * stride_cc, mask=mask_m, other=0.0).to(tl.float32)
            part = tl.sum(w[:, None] * p, axis=0)
            tl.store(dvec_ptr + pid_m.to(tl.int64) * stride_dvs + c * stride_dvc + offs_n, part, mask=mask_n)
    if STORE_DW:
        for c in range(C):
            vc = tl.load(vec_ptr + c * stride_vc + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            part = tl.sum(p * vc[None, :], axis=1)
            tl.store(dw_ptr + pid_n.to(tl.int64) * stride_dws + offs_m * stride_dwt + c, part, mask=mask_m)


def _tiles(device: torch.device) -> dict:
    # an elementwise pass: 64 x 128 fp32 tiles keep 4 warps busy with 64 values per thread on a
    # GPU; the interpreter uses small tiles so that CPU tests stay quick and cover partial blocks
    if not gpu_sized(device):
        return dict(BLOCK_M=8, BLOCK_N=16, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4)


def _unit_columns(t):
    """``t`` [rows, N] as the kernels read it, one stride per row and consecutive columns: a copy
    when its columns are not (an incoming gradient expanded from a sum has stride 0)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _context_strides(context, ids: bool):
    # ids are [T / rows_per_id]; weights [T, C]
    return context.stride(0), 0 if ids else context.stride(1)


def context_vector_forward(u, vectors, context, ids, rows_per_id, multiply):
    """``u [T, N]`` with the vector of each row added (or multiplied); ``context`` is ids
    ``[T / rows_per_id]`` or float weights ``[T, C]``."""
    u, vectors = _unit_columns(u), _unit_columns(vectors)
    t, n = u.shape
    tiles = _tiles(u.device)
    out = torch.empty_like(u)
    stride_ct, stride_cc = _context_strides(context, ids)
    grid = (cdiv(t, tiles["BLOCK_M"]), cdiv(n, tiles["BLOCK_N"]))
    launch(_context_vector_kernel, grid,
        u, vectors, context, out, t, n, vectors.shape[0], rows_per_id,
        u.stride(0), out.stride(0), stride_ct, stride_cc, vectors.stride(0),
        MULTIPLY=multiply, IDS=ids, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], num_warps=tiles["num_warps"],
    )
    return out


def context_vector_backward(dy, u, vectors, context, ids, rows_per_id, multiply, needs_grad):
    """Returns ``(du, dvectors, dweights)`` (fp32 for the last two), None where not wanted."""
    needs_du, needs_dvec, needs_dw = needs_grad
    dy, u, vectors = _unit_columns(dy), _unit_columns(u), _unit_columns(vectors)
    t, n = dy.shape
    num_contexts = vectors.shape[0]
    tiles = _tiles(dy.device)
    row_blocks, col_blocks = cdiv(t, tiles["BLOCK_M"]), cdiv(n, tiles["BLOCK_N"])
    du = torch.empty_like(dy) if needs_du and multiply else None
    dvec = torch.empty((row_blocks, num_contexts, n), device=dy.device, dtype=torch.float32) if needs_dvec else None
    dw = torch.empty((col_blocks, t, num_contexts), device=dy.device, dtype=torch.float32) if needs_dw else None
    if du is not None or dvec is not None or dw is not None:
        stride_ct, stride_cc = _context_strides(context, ids)
        launch(_context_vector_backward_kernel, (row_blocks, col_blocks),
            dy, or_unused(u, dy), vectors, context, or_unused(du, dy), or_unused(dvec, dy), or_unused(dw, dy),
            t, n, num_contexts, rows_per_id, dy.stride(0), u.stride(0) if u is not None else 0,
            du.stride(0) if du is not None else 0, stride_ct, stride_cc, vectors.stride(0),
            dvec.stride(0) if dvec is not None else 0, dvec.stride(1) if dvec is not None else 0,
            dw.stride(0) if dw is not None else 0, dw.stride(1) if dw is not None else 0,
            MULTIPLY=multiply, IDS=ids, STORE_DU=du is not None, STORE_DVEC=dvec is not None,
            STORE_DW=dw is not None, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], num_warps=tiles["num_warps"],
        )
    if needs_du and not multiply:
        du = dy
    return du, None if dvec is None else dvec.sum(0), None if dw is None else dw.sum(0)
