"""Triton kernels for the NF4 format: quantize a weight's 4-bit codes and dequantize them.

The nested (double-quantization) statistics are a 64th of the weight's size and stay torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import rounded_for

QUANT_WARPS = 4
DEQUANT_BLOCK = 1024


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
    safe = tl.maximum(absmax, 1e-38)
    # bitsandbytes multiplies full blocks by the reciprocal and divides the partial last block
    if partial:
        scaled = tl.div_rn(x, safe)
    else:
        scaled = x * tl.div_rn(1.0, safe)
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
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (4 * (1 - offs % 2))) & 0xF
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0) * tl.load(absmax_ptr + offs // blocksize, mask=mask,
                                                                       other=0.0)
    tl.store(out_ptr + offs, rounded_for(value, out_ptr), mask=mask)


def quantize_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """``(packed [ceil(n/2), 1] uint8, absmax [blocks] fp32)`` of a flat weight."""
    n = flat.numel()
    blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    _nf4_quantize_kernel[(blocks,)](flat, code, packed, absmax, n, BLOCKSIZE=blocksize, PAIRS=blocksize // 2,
                                    num_warps=QUANT_WARPS)
    return packed, absmax


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``code[nibble] * absmax[block]`` for ``n`` elements, in ``dtype``."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    _nf4_dequantize_kernel[(triton.cdiv(n, DEQUANT_BLOCK),)](packed, absmax, code, out, n, blocksize,
                                                            BLOCK=DEQUANT_BLOCK)
    return out
