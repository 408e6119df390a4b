"""NF4 (4-bit NormalFloat, Dettmers et al., QLoRA) weights in bitsandbytes' exact format.

Layout, as bitsandbytes 0.50 ``quantize_4bit(..., quant_type="nf4")`` writes it:

- the weight is flattened row-major and cut into blocks of ``blocksize`` elements (32..4096, a
  power of two; the last block may be partial); each block keeps its fp32 ``absmax``;
- an element ``x`` becomes the index of the nearest of the 16 NF4 code values to
  ``clamp(x * (1 / absmax), -1, 1)`` (ties go up, as ``torch.bucketize`` on the midpoints does);
- codes are packed two per byte, element ``2j`` in the high nibble and ``2j + 1`` in the low one
  (``[ceil(n / 2), 1]`` uint8, an odd count padded with code 7, zero);
- with ``double_quant`` (bitsandbytes' ``compress_statistics=True``) the absmax are stored as
  ``offset = mean(absmax)`` plus ``absmax - offset`` quantized to 8 bits with the signed dynamic
  map in blocks of 256 (their own fp32 absmax each).

``NF4Tensor.from_bnb`` / ``to_bnb`` adopt and hand back bitsandbytes' tensors without
re-quantizing. The 4-bit codes are quantized and dequantized by Triton kernels (``triton.py``) on
CUDA and under the interpreter, by torch ops on CPU otherwise (the dispatch rule of ``ops``); the
nested statistics (a 64th of the weight) are torch ops everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from types import SimpleNamespace

import torch

from ..ops._dispatch import backend

# The 16 NF4 values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (QLoRA, appendix E).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
BLOCKSIZES = tuple(2 ** k for k in range(5, 13))
# the keys, after the layer's ``weight``, that bitsandbytes saves a 4-bit weight under (``bnb_state_dict``)
BNB_WEIGHT_KEYS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")
NESTED_BLOCKSIZE = 256


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool = True, exponent_bits: int = 7, total_bits: int = 8) -> tuple[float, ...]:
    """The 8-bit dynamic quantization map (Dettmers, "8-Bit Approximations for Parallelism in
    Deep Learning"): for each decade ``10**-6 .. 10**0`` a linear grid whose size doubles with the
    decade, the midpoints of ``linspace(0.1, 1)`` scaled by it, mirrored when signed; then 0 and 1,
    sorted. Computed in fp32 as bitsandbytes does, so the values are identical."""
    values: list[float] = []
    magnitude_bits = total_bits - 1

    def decade(scale: float, steps: int):
        grid = torch.linspace(0.1, 1, steps, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        values.extend((scale * mids).tolist())  # fp32 products, as bitsandbytes computes them
        if signed:
            values.extend((-scale * mids).tolist())

    for i in range(exponent_bits):
        grow = i + magnitude_bits - exponent_bits
        decade(10 ** (-(exponent_bits - 1) + i), 2 ** grow + 1 if signed else 2 ** (grow + 1) + 1)
    extra = 2 ** (magnitude_bits - exponent_bits) - 1
    if extra > 0:
        decade(1.0, extra + 1)
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return tuple(sorted(values))


def _table(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def code_table(device: torch.device) -> torch.Tensor:
    """The NF4 values on ``device``, made once: a matmul must not copy them host-to-device (a
    synchronising copy) every call. Read-only; tensors handed to users get their own copy."""
    return _table(NF4_CODE, device)


@functools.lru_cache(maxsize=None)
def _byte_values(device: torch.device) -> torch.Tensor:
    """``[256, 2]``: the (high nibble, low nibble) code values of every byte."""
    byte = torch.arange(256, device=device)
    return torch.stack([code_table(device)[byte >> 4], code_table(device)[byte & 0xF]], 1)


def _block_absmax_and_scaled(flat: torch.Tensor, blocksize: int, keep_tiny_tail: bool = True):
    """Per-block fp32 absmax and ``clamp(x * (1/absmax), -1, 1)``, the last block possibly partial.
    bitsandbytes stores an all-zero partial last block's absmax as 1e-38 for the 4-bit codes and
    as 0 for the 8-bit nested ones (``keep_tiny_tail=False``)."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max()
        tail_div = tail_max.clamp(min=1e-38)
        absmax = torch.cat([absmax, (tail_div if keep_tiny_tail else tail_max).view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_div).clamp(-1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (ties go up), as uint8."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)


def _times_block_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[e] * absmax[e // blocksize]`` in fp32 (the last block may be partial)."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    torch.mul(values[:full].view(-1, blocksize), absmax[:full // blocksize, None], out=out[:full].view(-1, blocksize))
    if full < n:
        torch.mul(values[full:], absmax[-1], out=out[full:])
    return out


@dataclasses.dataclass
class NF4Tensor:
    """A weight in NF4: ``packed`` ``[ceil(n/2), 1]`` uint8 and its absmax, either fp32 per block
    (``double_quant=False``) or 8-bit codes with ``offset``, ``nested_absmax`` and the dynamic map."""
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    offset: torch.Tensor | None = None         # double quantization: mean of the block absmax (fp32 scalar)
    nested_absmax: torch.Tensor | None = None  # fp32, one per NESTED_BLOCKSIZE absmax
    nested_code: torch.Tensor | None = None    # the 256-entry dynamic map

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (undoing the double quantization, as bitsandbytes does)."""
        if not self.double_quant:
            return self.absmax
        return _times_block_absmax(self.nested_code[self.absmax.long()], self.nested_absmax,
                                   NESTED_BLOCKSIZE) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back in ``dtype`` (default: the dtype it was quantized from): computed in
        fp32, then rounded once, as bitsandbytes does."""
        dtype = dtype or self.dtype
        if backend(self.device) == "triton":
            from .triton import dequantize

            return dequantize(self, dtype).view(self.shape)
        values = _byte_values(self.device)[self.packed.reshape(-1).long()].reshape(-1)[:self.numel]
        return _times_block_absmax(values, self.block_absmax(), self.blocksize).view(self.shape).to(dtype)

    def nbytes(self) -> int:
        """Storage of the quantized weight and its statistics, in bytes."""
        tensors = [self.packed, self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # --------------------------------------------------------------- bitsandbytes
    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Tensor":
        """Adopt bitsandbytes' packed tensor and ``QuantState`` (``quant_type="nf4"``) as they are.
        A weight that bitsandbytes repacked for its CPU kernel is read in that layout (see
        ``_from_bnb_cpu_layout``)."""
        if getattr(quant_state, "quant_type", None) != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got {getattr(quant_state, 'quant_type', None)!r}: "
                             f"only NF4 is supported (bnb_4bit_quant_type='nf4', QLoRA's choice)")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        shape = torch.Size(quant_state.shape)
        if packed.numel() != (math.prod(shape) + 1) // 2:
            raise ValueError(f"packed holds {packed.numel()} bytes, but shape {tuple(shape)} needs "
                             f"{(math.prod(shape) + 1) // 2}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            return cls._from_bnb_cpu_layout(packed, quant_state)
        if quant_state.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {quant_state.blocksize}")
        blocks = -(-math.prod(shape) // quant_state.blocksize)
        if quant_state.absmax.numel() != blocks:
            raise ValueError(f"absmax holds {quant_state.absmax.numel()} values, but shape {tuple(shape)} in blocks of "
                             f"{quant_state.blocksize} needs {blocks}")
        if quant_state.nested:
            s2 = quant_state.state2
            if s2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize {s2.blocksize} is not {NESTED_BLOCKSIZE}")
            nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
            if s2.absmax.numel() != nested_blocks or s2.code.numel() != 256:
                raise ValueError(f"the nested statistics of {blocks} blocks need {nested_blocks} absmax and a "
                                 f"256-value map, got {s2.absmax.numel()} and {s2.code.numel()}")
            return cls(packed.reshape(-1, 1), quant_state.absmax, shape, quant_state.dtype, quant_state.blocksize,
                       offset=torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device),
                       nested_absmax=s2.absmax, nested_code=s2.code)
        return cls(packed.reshape(-1, 1), quant_state.absmax, shape, quant_state.dtype, quant_state.blocksize)

    @classmethod
    def _from_bnb_cpu_layout(cls, packed: torch.Tensor, quant_state, tile_rows: int = 32) -> "NF4Tensor":
        """bitsandbytes 0.49+ repacks a ``Linear4bit`` weight for its CPU kernel at the layer's first
        forward in eval mode without grad, on CPUs with AVX512-BF16: the codes of each tile of 32
        rows are interleaved (a byte holds two rows' codes), and the block absmax, nested statistics
        expanded, is stored transposed in bf16. The packed bytes alone do not say so (the same count
        in another order): ``quant_state.packing_format_for_cpu`` does. The codes are put back in
        the standard order; the absmax keeps the bf16 values that bitsandbytes now multiplies by
        (its repacking rounded them; the double quantization is gone)."""
        n, k = quant_state.shape
        if len(quant_state.shape) != 2 or n % tile_rows or k % 2:
            raise ValueError(f"a CPU-repacked weight must be 2-D with rows a multiple of {tile_rows}, got "
                             f"{tuple(quant_state.shape)}")
        pairs = packed.reshape(-1, tile_rows)  # a byte: a code of the tile's first half (low), one of its second
        codes = torch.cat([pairs & 0xF, pairs >> 4], dim=1)  # [tiles * k/2, (row in tile, column pair)]
        codes = codes.reshape(n // tile_rows, k // 2, tile_rows, 2).transpose(1, 2).reshape(-1)  # row-major
        standard = (codes[0::2] << 4) | codes[1::2]  # element 2j in the high nibble
        absmax = quant_state.absmax.float().T.reshape(-1)  # [k / blocksize, n] -> blocks in order
        dtype = getattr(quant_state, "original_dtype", quant_state.dtype)
        return cls(standard.reshape(-1, 1), absmax, torch.Size((n, k)), dtype, quant_state.blocksize)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> "NF4Tensor":
        """The weight a bitsandbytes 4-bit layer saved under ``prefix`` (say
        ``"model.layers.0.mlp.up_proj."``), read without bitsandbytes: ``weight`` (the packed
        codes), ``weight.absmax``, ``weight.quant_map`` (the 16 code values), with double
        quantization ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
        ``weight.quant_state.bitsandbytes__nf4``, a uint8 tensor holding the JSON of the rest
        (``quant_type``, ``blocksize``, ``dtype``, ``shape``; ``nested_blocksize``, ``nested_dtype``,
        ``nested_offset``). A ``ValueError`` names the key of anything that is not NF4 or does
        not fit."""
        key = prefix + "weight"
        packed_key = f"{key}.quant_state.bitsandbytes__nf4"
        if packed_key not in state_dict:
            other = [k for k in state_dict if k.startswith(f"{key}.quant_state.")]
            raise ValueError(f"{other[0]!r}: only NF4 4-bit weights are supported (bnb_4bit_quant_type='nf4')"
                             if other else f"no bitsandbytes 4-bit weight under {key!r}: {packed_key!r} is missing")

        def tensor(suffix: str, dtype: torch.dtype) -> torch.Tensor:
            name = key + suffix
            if name not in state_dict:
                raise ValueError(f"{name!r} is missing: {packed_key!r} says the weight needs it")
            value = state_dict[name]
            if not isinstance(value, torch.Tensor) or value.dtype != dtype:
                raise ValueError(f"{name!r} must be a {dtype} tensor, got "
                                 f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
            return value

        try:  # the JSON's fields, in the shape of bitsandbytes' QuantState that from_bnb reads
            info = json.loads(tensor(".quant_state.bitsandbytes__nf4", torch.uint8).cpu().numpy().tobytes())
            nested = "nested_offset" in info
            state = SimpleNamespace(
                quant_type=info["quant_type"], blocksize=int(info["blocksize"]), dtype=getattr(torch, info["dtype"]),
                shape=torch.Size(int(d) for d in info["shape"]), nested=nested,
                offset=float(info["nested_offset"]) if nested else None,
                state2=SimpleNamespace(blocksize=int(info["nested_blocksize"])) if nested else None)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{packed_key!r} does not hold bitsandbytes' quant state ({type(err).__name__}: {err})") from None
        if state.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{packed_key!r}: dtype must be float32, float16 or bfloat16, got {info['dtype']!r}")
        if nested and info.get("nested_dtype") != "float32":
            raise ValueError(f"{packed_key!r}: nested_dtype must be float32, got {info.get('nested_dtype')!r}")
        quant_map = tensor(".quant_map", torch.float32)
        if not torch.equal(quant_map, code_table(quant_map.device)):
            raise ValueError(f"{key + '.quant_map'!r} is not the NF4 code")
        packed = state_dict.get(key)
        if not isinstance(packed, torch.Tensor):  # of any dtype: bnb_4bit_quant_storage holds the bytes in another
            raise ValueError(f"{key!r} must be a tensor of packed codes, got {type(packed).__name__}")
        state.absmax = tensor(".absmax", torch.uint8 if nested else torch.float32)
        if nested:
            state.state2.absmax = tensor(".nested_absmax", torch.float32)
            state.state2.code = tensor(".nested_quant_map", torch.float32)
        try:
            return cls.from_bnb(packed, state)
        except ValueError as err:
            raise ValueError(f"{key!r}: {err}") from None

    def bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """This weight as bitsandbytes' ``Linear4bit`` saves it under ``prefix`` (the keys
        ``from_bnb_state_dict`` reads), key for key and byte for byte."""
        key = prefix + "weight"
        info = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": str(self.dtype).removeprefix("torch."),
                "shape": list(self.shape)}
        out = {key: self.packed, f"{key}.absmax": self.absmax, f"{key}.quant_map": code_table(self.device).clone()}
        if self.double_quant:
            out[f"{key}.nested_absmax"] = self.nested_absmax
            out[f"{key}.nested_quant_map"] = self.nested_code.clone()
            info.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(self.offset))
        out[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
        return out

    def to_bnb(self):
        """``(packed, QuantState)`` for bitsandbytes (needs bitsandbytes installed)."""
        from bitsandbytes.functional import QuantState

        code = code_table(self.device).clone()
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                           quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)
        return self.packed, state


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``w`` (fp32, fp16 or bf16, any shape) to NF4, byte for byte as bitsandbytes does."""
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"w must be a float32, float16 or bfloat16 tensor, got "
                         f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.numel() == 0:
        raise ValueError(f"w must have elements, got shape {tuple(w.shape)}")
    with torch.no_grad():
        if backend(w.device) == "triton":
            from .triton import quantize_codes

            packed, absmax = quantize_codes(w.detach().reshape(-1).contiguous(), code_table(w.device), blocksize)
        else:
            absmax, scaled = _block_absmax_and_scaled(w.detach().reshape(-1).float(), blocksize)
            codes = _nearest(scaled, code_table(w.device))
            if codes.numel() % 2:
                codes = torch.cat([codes, codes.new_full((1,), 7)])
            packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
        if not double_quant:
            return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
        offset = absmax.mean()
        nested_absmax, nested_scaled = _block_absmax_and_scaled(absmax - offset, NESTED_BLOCKSIZE, keep_tiny_tail=False)
        nested_code = _table(dynamic_map(), w.device)
        qabsmax = _nearest(nested_scaled, nested_code)
        return NF4Tensor(packed, qabsmax, w.shape, w.dtype, blocksize, offset=offset, nested_absmax=nested_absmax,
                         nested_code=nested_code)
