"""Triton kernels for the NF4 format: quantize a weight's 4-bit codes and dequantize them, and
``block_scale``, the per-block absmax every NF4 kernel reads (``nf4_matmul`` too): with double
quantization it is decoded where it is used (``nested_code[q] * nested_absmax[b // 256] + offset``,
bitsandbytes' order), never expanded into an fp32 tensor first. The code values come from
``nf4_byte_values`` (gathered from the table) or ``nf4_code_values`` (selected by the code's bits,
for K loops).

Quantizing the nested statistics (a 64th of the weight) stays torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import cdiv, launch, or_unused, rounded_for
from .nf4 import NESTED_BLOCKSIZE, code_table

QUANT_WARPS = 4
DEQUANT_BYTES = 512  # 1024 weights a program


@triton.jit
def _nf4_quantize_kernel(w_ptr, code_ptr, packed_ptr, absmax_ptr, n,
                         BLOCKSIZE: tl.constexpr, PAIRS: tl.constexpr):
    """One program per block of BLOCKSIZE elements, seen as [BLOCKSIZE/2, 2] pairs so that each
    pair packs into one byte (element 2j high nibble, 2j+1 low)."""
    blk = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, PAIRS)
    c = tl.arange(0, 2)
    offs = blk * BLOCKSIZE + 2 * j[:, None] + c[None, :]
    mask = offs < n
    x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    partial = (blk + 1) * BLOCKSIZE > n
    # bitsandbytes clamps the absmax at 1e-38. That is an fp32 denormal, and a literal below fp32's
    # normal range compiles as fp64, so it is written as its fp32 bits. Dividing by it is avoided:
    # an all-zero block scales to zeros whatever the divisor, and a flushed denormal would give 0/0.
    tiny = tl.full((), 0x6CE3EE, tl.int32).to(tl.float32, bitcast=True)
    safe = tl.maximum(absmax, tiny)
    divisor = tl.where(absmax > 0, safe, 1.0)
    # bitsandbytes multiplies full blocks by the reciprocal and divides the partial last block
    if partial:
        scaled = tl.div_rn(x, divisor)
    else:
        scaled = x * tl.div_rn(1.0, divisor)
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    # the nearest code (ties up): how many midpoints lie strictly below
    idx = tl.zeros((PAIRS, 2), tl.int32)
    for k in tl.static_range(15):
        mid = (tl.load(code_ptr + k) + tl.load(code_ptr + k + 1)) / 2
        idx += (scaled > mid).to(tl.int32)
    idx = tl.where(mask, idx, 7)  # an odd count's padding nibble is code 7 (zero)
    shift = 4 * (1 - c[None, :])
    byte = tl.sum(idx << shift, axis=1)
    tl.store(packed_ptr + blk * PAIRS + j, byte.to(tl.uint8), mask=blk * BLOCKSIZE + 2 * j < n)
    tl.store(absmax_ptr + blk, tl.where(partial, safe, absmax))


@triton.jit
def block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask,
                DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The fp32 absmax of NF4 block(s) ``block``."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * nested + tl.load(offset_ptr)
    else:  # one return for both: the compiler types the code after a constexpr `if` as well
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


def scale_operands(weight) -> tuple[tuple, dict]:
    """``block_scale``'s pointer arguments (positional, in the kernels' order: absmax, nested
    absmax, nested code, offset; stand-ins when unused) and its constexpr flags (by keyword) for an
    ``NF4Tensor``.

    ``enable_fp_fusion=False`` keeps ``code * nested + offset`` two roundings, as bitsandbytes
    computes it (two kernels) and as the interpreter and the torch path do; contracted to one FMA
    the fp32 absmax can differ in its last bit (unverified guess for the one H100 test failure of
    2026-11-23, double quantization at blocksize 256; see benchmarks/NOTES.md)."""
    a = weight.absmax
    pointers = (a, or_unused(weight.nested_absmax, a), or_unused(weight.nested_code, a), or_unused(weight.offset, a))
    return pointers, dict(DOUBLE_QUANT=weight.double_quant, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, enable_fp_fusion=False)


@triton.jit
def _pick(table, i: tl.constexpr):
    """``table[i]`` of a 16-value tensor, as a scalar (exact: one value plus zeros)."""
    return tl.sum(tl.where(tl.arange(0, 16) == i, table, 0.0))


@triton.jit
def nf4_code_values(codes, table):
    """The NF4 values of 4-bit ``codes`` (int32, any shape): a select on each bit of the code,
    between values picked from the 16-entry ``table`` (loaded once by the caller). Inside a K loop
    the picks are hoisted, so the loop reads no memory per element for the lookup: what
    ``nf4_matmul``'s GEMM uses, where Triton's pipeliner turns per-element gathers into
    per-element asynchronous copies. ``nf4_byte_values`` gathers instead (one pass, no loop)."""
    b0 = (codes & 1) != 0
    b1 = (codes & 2) != 0
    b2 = (codes & 4) != 0
    v01 = tl.where(b0, _pick(table, 1), _pick(table, 0))
    v23 = tl.where(b0, _pick(table, 3), _pick(table, 2))
    v45 = tl.where(b0, _pick(table, 5), _pick(table, 4))
    v67 = tl.where(b0, _pick(table, 7), _pick(table, 6))
    v89 = tl.where(b0, _pick(table, 9), _pick(table, 8))
    vab = tl.where(b0, _pick(table, 11), _pick(table, 10))
    vcd = tl.where(b0, _pick(table, 13), _pick(table, 12))
    vef = tl.where(b0, _pick(table, 15), _pick(table, 14))
    v03 = tl.where(b1, v23, v01)
    v47 = tl.where(b1, v67, v45)
    v8b = tl.where(b1, vab, v89)
    vcf = tl.where(b1, vef, vcd)
    return tl.where((codes & 8) != 0, tl.where(b2, vcf, v8b), tl.where(b2, v47, v03))


@triton.jit
def nf4_byte_values(packed_ptr, code_ptr, byte_index, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                    offset_ptr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    BLOCKSIZE: tl.constexpr):
    """``(high, low)``: the fp32 weights ``2i`` and ``2i + 1`` of the packed bytes ``i =
    byte_index`` (any shape), their code values gathered from ``code_ptr`` (``nf4_code_values``
    looks them up without loads). Each byte and its block's scale are loaded once for both of its
    weights (one block holds both: BLOCKSIZE is even), and the block index is a shift (BLOCKSIZE a
    constexpr power of two), never a 64-bit division per weight."""
    byte = tl.load(packed_ptr + byte_index, mask=mask, other=0).to(tl.int32)
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, (2 * byte_index) // BLOCKSIZE,
                        mask, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    high = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0) * scale
    low = tl.load(code_ptr + (byte & 0xF), mask=mask, other=0.0) * scale
    return high, low


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, code_ptr, out_ptr, n, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                           offset_ptr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                           BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr):
    """One program per BYTES packed bytes, written as [BYTES, 2] weights (high nibble first)."""
    j = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    high, low = nf4_byte_values(packed_ptr, code_ptr, j, 2 * j < n, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                offset_ptr, DOUBLE_QUANT, NESTED_BLOCKSIZE, BLOCKSIZE)
    offs = 2 * j[:, None] + tl.arange(0, 2)[None, :]
    tl.store(out_ptr + offs, rounded_for(tl.join(high, low), out_ptr), mask=offs < n)


def quantize_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """``(packed [ceil(n/2), 1] uint8, absmax [blocks] fp32)`` of a flat weight."""
    n = flat.numel()
    blocks = cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    launch(_nf4_quantize_kernel, (blocks,), flat, code, packed, absmax, n, BLOCKSIZE=blocksize, PAIRS=blocksize // 2,
           num_warps=QUANT_WARPS)
    return packed, absmax


def dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    """An ``NF4Tensor``'s ``code[nibble] * absmax[block]``, flat, in ``dtype``."""
    n = weight.numel
    out = torch.empty(n, dtype=dtype, device=weight.device)
    pointers, flags = scale_operands(weight)
    launch(_nf4_dequantize_kernel, (cdiv(n, 2 * DEQUANT_BYTES),), weight.packed, code_table(weight.device), out, n,
           *pointers, **flags, BLOCKSIZE=weight.blocksize, BYTES=DEQUANT_BYTES)
    return out
