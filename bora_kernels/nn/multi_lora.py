"""``MultiLoRALinear``: a linear layer plus D LoRA adapters, each token using its own."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..ops._dispatch import autocast_dtype, recording_graph
from ..ops.context_vector import context_bias, context_scale
from ..ops.lora_delta import LoRAPlan, lora_delta, plan_ids
from ..quant import NF4Tensor, quantize_nf4
from .dora import base_key, base_row_norms_sq, check_dora_base, dora_norms
from .nf4_linear import NF4Linear, is_bnb_4bit
from .routing import AdapterRoute


def _per_adapter(value, num_adapters: int, name: str) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * num_adapters
    if len(values) != num_adapters:
        raise ValueError(f"{name} must be one value or {num_adapters} values (one per adapter), "
                         f"got {len(values)}")
    return values


def linear_shape(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int, torch.Tensor]:
    """``(in, out, weight)`` of a layer an adapter can wrap: an ``nn.Linear``, or with
    ``fan_in_fan_out`` a layer whose weight is ``[in, out]``; a ``ValueError`` otherwise."""
    if isinstance(base_layer, NF4Linear):  # no dense weight: a stand-in carries its device and dtype
        return base_layer.in_features, base_layer.out_features, base_layer.packed.new_empty(
            0, dtype=base_layer.compute_dtype)
    if is_bnb_4bit(base_layer):
        raise ValueError("base_layer is a bitsandbytes 4-bit layer, whose weight is packed codes: wrap "
                         "NF4Linear.from_bnb(base_layer) instead (inject does so)")
    weight = getattr(base_layer, "weight", None)
    if not fan_in_fan_out and not isinstance(base_layer, nn.Linear):
        raise ValueError(f"base_layer must be an nn.Linear (or a [in, out] layer with "
                         f"fan_in_fan_out=True), got {type(base_layer).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"base_layer must have a 2-D weight, got {type(base_layer).__name__}")
    k, n = weight.shape if fan_in_fan_out else weight.shape[::-1]
    return k, n, weight


class AdapterVectors(nn.Parameter):
    """A parameter holding one vector per adapter, ``[D, N]`` (DoRA's magnitudes, ``lora_bias``):
    2-D, but not a weight matrix, so that what treats 2-D parameters as matrices can tell (IVON-LoRA's
    pruning, ``bayes.prune_uncertain``: zeroing a DoRA magnitude would zero the output feature).
    Copies, moves and casts keep the type."""


def check_lora_bias_base(base_layer: nn.Module) -> None:
    """PEFT's rule for ``lora_bias``: the base layer has a bias of its own (a merge adds into it)."""
    if getattr(base_layer, "bias", None) is None:
        raise ValueError(f"lora_bias needs a base layer with a bias (PEFT's rule: a merge adds the adapter's bias "
                         f"into it), and this {type(base_layer).__name__} has none")


class ReadsThroughToBase:
    """``weight`` and ``bias`` of an adapter layer are its base layer's, read-only, as in PEFT's
    layers: model code that reads a projection's weight keeps working with adapters in (T5's
    feed-forward reads ``self.wo.weight.dtype``; others cast inputs to ``proj.weight.dtype``)."""

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias


def plus_delta(base_layer: nn.Module, result: torch.Tensor, delta) -> torch.Tensor:
    """``result`` (``base_layer``'s output) plus the adapters' delta, where ``delta(add_to)`` is the
    op that computes it (``add_to``: a tensor to add it into in place, or None). In place (one pass
    less) only over layers whose output comes from ordinary ops (``nn.Linear``, ``NF4Linear``,
    GPT-2's ``Conv1D``, ``nn.Embedding``); another layer's output may be a view made inside its own autograd
    Function, which autograd forbids changing in place (bitsandbytes' 8-bit ``Linear8bitLt``)."""
    if type(base_layer) in (nn.Linear, NF4Linear, nn.Embedding) or type(base_layer).__name__ == "Conv1D":
        return delta(result)
    return result + delta(None).to(result.dtype)


def parameter_kwargs(weight: torch.Tensor, dtype: torch.dtype | None) -> dict:
    """Where adapter parameters live: the base weight's device, ``dtype`` or the base weight's
    (fp32 for a quantized integer weight)."""
    return dict(device=weight.device,
                dtype=dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32))


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale of ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; 0 for rank 0."""
    if rank == 0:
        return 0.0
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class DerivedBuffers:
    """Mixin of adapter layers whose buffers hold values the layer keeps in Python
    (``_buffer_values()``: ``{name: (values, dtype)}``), such as the fp32 scales. They are written
    again, on the device of ``lora_A``, whenever the layer is moved or cast (``model.to(bf16)``
    must not round the scales; ``to_empty()`` leaves buffers unset) and after a state dict is
    loaded (``assign=True`` moves the parameters off the meta device). In place where the buffer
    fits, so that a captured CUDA graph keeps reading the same tensor; never as an inference
    tensor, which training could not save for backward."""

    def _buffer_values(self) -> dict:
        raise NotImplementedError

    @torch.inference_mode(False)
    def _write_buffers(self):
        device = self.lora_A.device
        for name, (values, dtype) in self._buffer_values().items():
            now, new = getattr(self, name), torch.tensor(values, dtype=dtype)
            if now.dtype == dtype and now.shape == new.shape and now.device == device and not now.is_meta:
                now.copy_(new)
            else:
                setattr(self, name, new.to(device))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._write_buffers()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._write_buffers()


class MultiLoRALinear(DerivedBuffers, ReadsThroughToBase, nn.Module):
    _LEAST_RANK = 1  # the largest rank must reach it (an embedding may hold trainable tokens only)

    """``base_layer(x) + scaling[d] * B_d A_d x`` with ``d`` chosen per sequence or token.

    Adapters are stacked: ``lora_A`` is ``[D, R, K]`` and ``lora_B`` is ``[D, N, R]`` with R the
    largest rank (smaller ranks zero-padded, never computed with). Rank 0 means the adapter does
    not touch this layer (its tokens get the base output). Initialised as PEFT does (A
    Kaiming-uniform, B zero), so a fresh layer equals its base layer. The base layer is frozen.

    ``base_layer`` is an ``nn.Linear``, or with ``fan_in_fan_out=True`` a layer whose weight is
    stored ``[in, out]`` (GPT-2's ``Conv1D``, PEFT's ``fan_in_fan_out``).

    ``use_dora`` (one value or one per adapter): DoRA adapters (``nn/dora.py``), each with a
    trained magnitude per output feature in ``lora_magnitude`` (``[D, N]``, a parameter only when
    some adapter uses DoRA, initialised to the base weight's row norms so that a fresh adapter
    equals the base); DoRA and plain adapters mix in one batch. Over a float or NF4 base.

    ``lora_bias`` (one value or one per adapter; PEFT's ``lora_bias``, for LoRA extracted from a
    full fine-tune): a trained bias of ``B`` per adapter in ``lora_bias_vector`` (``[D, N]``, a
    parameter only when some adapter has one, zeros at first), added as ``scaling[d] * b_d``. The
    base layer must have a bias, and an adapter cannot have both a bias and DoRA (PEFT's rules).

    ``forward(x, adapter_ids=None)``: ids per token (``x.shape[:-1]``) or per sequence (``[B]``),
    ``-1`` for none, or a ``LoRAPlan``. Without ids the layer uses ``self.adapter_ids`` (set for a
    whole model by ``bora_kernels.use_adapters``), and when that is None too, the base layer alone.
    """

    def __init__(self, base_layer: nn.Module, num_adapters: int, r=8, alpha=16, dropout: float = 0.0,
                 dtype: torch.dtype | None = None, use_rslora=False, fan_in_fan_out: bool = False,
                 adapter_names: Sequence[str] | None = None, use_dora=False, lora_bias=False):
        super().__init__()
        k, n, weight = self._base_shape(base_layer, fan_in_fan_out)
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
        ranks = _per_adapter(r, num_adapters, "r")
        alphas = _per_adapter(alpha, num_adapters, "alpha")
        rslora = _per_adapter(use_rslora, num_adapters, "use_rslora")
        dora = [bool(v) for v in _per_adapter(use_dora, num_adapters, "use_dora")]
        biased = [bool(v) for v in _per_adapter(lora_bias, num_adapters, "lora_bias")]
        if any(dora):
            check_dora_base(base_layer)
        if any(biased):
            check_lora_bias_base(base_layer)
        if any(u and b for u, b in zip(dora, biased)):
            raise ValueError(f"an adapter cannot have both use_dora and lora_bias (as in PEFT), got use_dora {dora} "
                             f"and lora_bias {biased}")
        if any(not isinstance(v, int) or v < 0 for v in ranks) or max(ranks) < self._LEAST_RANK:
            raise ValueError(f"r must be ints >= 0 (0: adapter absent here), at least one positive, got {ranks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        names = [str(d) for d in range(num_adapters)] if adapter_names is None else list(adapter_names)
        if len(names) != num_adapters or len(set(names)) != num_adapters:
            raise ValueError(f"adapter_names must be {num_adapters} distinct names, got {names}")
        kw = parameter_kwargs(weight, dtype)
        max_rank = max(ranks)

        self.base_layer = base_layer.requires_grad_(False)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = k, n
        self.num_adapters = num_adapters
        self.adapter_names = tuple(names)
        self.lora_A = nn.Parameter(torch.zeros(num_adapters, max_rank, k, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, n, max_rank, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # the ranks live in a Python list (read without a device sync; a layer made on the meta
        # device gets them back after ``to_empty``) and in the buffer a state dict carries
        self.rank_values = list(ranks)
        self.alphas, self.use_rslora = [float(a) for a in alphas], [bool(v) for v in rslora]
        self.register_buffer("ranks", torch.empty(num_adapters, dtype=torch.int32, device=weight.device))
        self.register_buffer("scaling", torch.empty(num_adapters, device=weight.device), persistent=False)
        self.use_dora = dora
        self.register_buffer("dora", torch.empty(num_adapters, device=weight.device), persistent=False)
        self.register_parameter("lora_magnitude", None)
        self.use_lora_bias = biased
        self.register_buffer("bias_scale", torch.empty(num_adapters, device=weight.device), persistent=False)
        self.register_parameter("lora_bias_vector", None)
        self._dora_cache: dict = {}  # base row norms and adapter norms, each with the key it was computed for
        self._write_buffers()
        if any(dora):
            self._add_magnitude()
        if any(biased):
            self._add_bias()
        self.adapter_ids: AdapterRoute | torch.Tensor | LoRAPlan | None = None
        # (adapter, base weight before the merge: a tensor, or an NF4 base's NF4Tensor; and its
        # bias before the merge where the adapter has a lora_bias, else None)
        self.merged: tuple[int, torch.Tensor | NF4Tensor, torch.Tensor | None] | None = None
        self.reset_lora_parameters()

    @staticmethod
    def _base_shape(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int, torch.Tensor]:
        """``(K, N, weight)`` of the layer the adapters wrap (``linear_shape``)."""
        return linear_shape(base_layer, fan_in_fan_out)

    @property
    def scaling_values(self) -> list[float]:
        """Each adapter's scale of ``B A`` (``lora_scaling`` of its alpha and rank)."""
        return [lora_scaling(a, rk, rs) for a, rk, rs in zip(self.alphas, self.rank_values, self.use_rslora)]

    def _buffer_values(self) -> dict:
        # DoRA only where the adapter is present: a rank-0 slot leaves the layer alone
        dora = [float(u and rank > 0) for u, rank in zip(self.use_dora, self.rank_values)]
        bias_scale = [s if u else 0.0 for u, s in zip(self.use_lora_bias, self.scaling_values)]  # (0 at rank 0)
        return {"ranks": (self.rank_values, torch.int32), "scaling": (self.scaling_values, torch.float32),
                "dora": (dora, torch.float32), "bias_scale": (bias_scale, torch.float32)}

    def _vectors(self) -> AdapterVectors:
        """A new ``[D, N]`` parameter of zeros beside the adapters (their dtype and device)."""
        return AdapterVectors(self.lora_A.new_zeros(self.num_adapters, self.out_features))

    def _add_bias(self):
        """The ``lora_bias_vector`` parameter, zeros (its base layer checked by the caller)."""
        self.lora_bias_vector = self._vectors()

    def _add_magnitude(self):
        """The ``lora_magnitude`` parameter (its base layer checked by the caller)."""
        self.lora_magnitude = self._vectors()
        self._reset_magnitude()

    @torch.no_grad()
    def _reset_magnitude(self):
        """Every row the base weight's row norms: DoRA's initial ``||W + s B A||`` with B zero
        (rows of adapters set later, or without DoRA, are written or never read)."""
        self.lora_magnitude.copy_(self._row_norms_sq().sqrt().expand_as(self.lora_magnitude))

    @torch.no_grad()
    def reset_lora_parameters(self):
        """A_d Kaiming-uniform (a=sqrt(5)) on its first r_d rows, as PEFT's ``init_lora_weights``;
        B zero; padded rank zero; a DoRA magnitude the base weight's row norms."""
        self.lora_A.zero_()
        self.lora_B.zero_()
        for d, rank in enumerate(self.rank_values):
            if rank:
                nn.init.kaiming_uniform_(self.lora_A[d, :rank], a=math.sqrt(5))
        if self.lora_magnitude is not None:
            self._reset_magnitude()

    def _cached(self, name: str, key: tuple, make, fresh: bool = False) -> torch.Tensor:
        """``make()``, kept while ``key`` stays the same; made afresh when ``fresh``."""
        hit = self._dora_cache.get(name)
        if fresh or hit is None or hit[0] != key:
            hit = self._dora_cache[name] = (key, make())
        return hit[1]

    def _norms(self) -> torch.Tensor:
        """``||W + s_d B_d A_d||`` per output row, fp32 ``[D, N]``. Computed at every forward that
        may train the adapters (train mode or grad enabled, as PEFT does); otherwise (``eval()``
        under ``no_grad``: serving) kept until the base weight, A, B, ranks or scales change, as
        PyTorch's version counters tell, so serving pays for it once per adapter. Writes through
        ``.data`` bypass those counters: call ``clear_dora_cache()`` after them."""
        def norms(row_norms_sq):
            return dora_norms(self.base_layer, self.lora_A, self.lora_B, self.scaling, self.ranks, row_norms_sq,
                              self.fan_in_fan_out)

        row_norms_sq = self._row_norms_sq()
        if self._uncached():
            return norms(row_norms_sq)
        key = (base_key(self.base_layer),
               *((t.data_ptr(), t._version) for t in (self.lora_A, self.lora_B, self.scaling, self.ranks)))
        # training: in train mode (reentrant checkpointing runs the first forward without grad)
        # or with grad enabled, while the adapters train
        trains = self.lora_A.requires_grad or self.lora_B.requires_grad
        training = (self.training or torch.is_grad_enabled()) and trains
        return self._cached("norms", key, lambda: norms(row_norms_sq), fresh=training)

    def _uncached(self) -> bool:
        """While torch.compile traces or a CUDA graph is captured, values are made afresh, never kept."""
        return torch.compiler.is_compiling() or recording_graph(self.lora_A.device)

    def _row_norms_sq(self) -> torch.Tensor:
        """The frozen base weight's ``||W[n, :]||^2``, fp32 ``[N]``, kept while it stays the same."""
        if self._uncached():
            return base_row_norms_sq(self.base_layer, self.fan_in_fan_out)
        return self._cached("base", base_key(self.base_layer),
                            lambda: base_row_norms_sq(self.base_layer, self.fan_in_fan_out))

    def _write_buffers(self):
        super()._write_buffers()
        self._dora_cache.clear()  # moved, cast or loaded: what was kept belongs to the old tensors

    def clear_dora_cache(self):
        """Forget the kept DoRA norms, after writing the base or adapter weights through ``.data``
        (which PyTorch's version counters do not see; in-place ops, ``copy_`` and
        ``load_state_dict`` need nothing)."""
        self._dora_cache.clear()

    def _dora_shift(self) -> torch.Tensor:
        """``t_d = m_d / norm_d - 1`` for DoRA adapters and 0 for the others, fp32 ``[D, N]``;
        differentiable in the magnitude only (the norm is a constant, as in DoRA and PEFT)."""
        return self.dora[:, None] * (self.lora_magnitude.float() / self._norms() - 1)

    @torch.no_grad()
    def set_adapter(self, d: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                    alpha: float = 16, use_rslora: bool = False, magnitude: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None):
        """Put one adapter's PEFT-layout weights (A ``[r, K]``, B ``[N, r]``) into slot ``d``;
        ``None`` for both makes the adapter absent from this layer (rank 0). ``magnitude``
        (``[N]``) makes it a DoRA adapter (PEFT's ``lora_magnitude_vector``); a layer without DoRA
        adapters gets its ``lora_magnitude`` parameter then (give an optimizer the parameters
        after loading). ``bias`` (``[N]``, PEFT's ``lora_B.bias`` under ``lora_bias``) likewise,
        in ``lora_bias_vector``."""
        if bias is not None:
            if lora_a is None or lora_b is None or magnitude is not None:
                raise ValueError("a lora_bias needs the adapter's A and B weights, and cannot go with a DoRA magnitude")
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}] (one per output feature), got {tuple(bias.shape)}")
            check_lora_bias_base(self.base_layer)
        if magnitude is not None:
            if lora_a is None or lora_b is None:
                raise ValueError("a DoRA magnitude needs the adapter's A and B weights too")
            if tuple(magnitude.shape) != (self.out_features,):
                raise ValueError(f"magnitude must be [{self.out_features}] (one per output feature), "
                                 f"got {tuple(magnitude.shape)}")
            check_dora_base(self.base_layer)
        if lora_a is None or lora_b is None:
            rank = 0
        else:
            rank = lora_a.shape[0]
            if tuple(lora_a.shape) != (rank, self.in_features) or tuple(lora_b.shape) != (self.out_features, rank):
                raise ValueError(f"adapter weights must be A [r, {self.in_features}] and B "
                                 f"[{self.out_features}, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
            if rank > self.lora_A.shape[1]:
                raise ValueError(f"rank {rank} exceeds this layer's largest rank {self.lora_A.shape[1]}")
        self.lora_A[d].zero_()
        self.lora_B[d].zero_()
        if rank:
            self.lora_A[d, :rank].copy_(lora_a)
            self.lora_B[d, :, :rank].copy_(lora_b)
        self.rank_values[d] = rank
        self.alphas[d], self.use_rslora[d] = float(alpha), bool(use_rslora)
        self.use_dora[d] = magnitude is not None
        self.use_lora_bias[d] = bias is not None
        self._write_buffers()
        if magnitude is not None:
            if self.lora_magnitude is None:
                self._add_magnitude()
            self.lora_magnitude[d].copy_(magnitude)
        if bias is not None and self.lora_bias_vector is None:
            self._add_bias()
        if bias is not None:
            self.lora_bias_vector[d].copy_(bias)
        elif self.lora_bias_vector is not None:  # (a slot reused: no bias left from its last adapter)
            self.lora_bias_vector[d].zero_()

    def touches(self, d: int) -> bool:
        """Whether adapter ``d`` changes this layer's output (a merge has something to fold in)."""
        return bool(self.rank_values[d])

    def adapter_bias(self, d: int) -> torch.Tensor | None:
        """Adapter ``d``'s ``lora_bias`` ``[N]`` as PEFT stores it (unscaled), or None (none here)."""
        return self.lora_bias_vector[d].detach() if self.use_lora_bias[d] and self.rank_values[d] else None

    def adapter_magnitude(self, d: int) -> torch.Tensor | None:
        """Adapter ``d``'s DoRA magnitude ``[N]`` as PEFT stores it, or None (no DoRA here)."""
        return self.lora_magnitude[d].detach() if self.use_dora[d] and self.rank_values[d] else None

    def adapter_weights(self, d: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adapter ``d`` as PEFT stores it: (A ``[r, K]``, B ``[N, r]``), or None when absent."""
        rank = self.rank_values[d]
        if rank == 0:
            return None
        return self.lora_A[d, :rank].detach(), self.lora_B[d, :, :rank].detach()

    def delta_weight(self, d: int) -> torch.Tensor:
        """``scaling_d * B_d A_d`` laid out like the base weight, in fp32 (the first ``r_d`` ranks,
        as the forward reads them)."""
        rank = self.rank_values[d]
        a, b = self.lora_A[d, :rank].detach().float(), self.lora_B[d, :, :rank].detach().float()
        delta = self.scaling_values[d] * (b @ a)
        return delta.T if self.fan_in_fan_out else delta

    def _merged_weight(self, d: int, weight: torch.Tensor) -> torch.Tensor:
        """The base weight ``weight`` (fp32, laid out as stored) with adapter ``d`` folded in:
        ``W + s B A``, and for DoRA each output row then scaled by ``m / ||W + s B A||``."""
        merged = weight + self.delta_weight(d).to(weight.device)
        if self.adapter_magnitude(d) is None:
            return merged
        factor = (self.lora_magnitude[d].detach().float() / self._norms()[d]).to(weight.device)
        return merged * (factor[None, :] if self.fan_in_fan_out else factor[:, None])

    @torch.no_grad()
    def merge(self, d: int):
        """Fold adapter ``d`` into the base weight; ``unmerge`` puts back the saved weight. An NF4
        base is dequantized, the delta added and the sum quantized again (as PEFT merges into
        4-bit layers): its outputs then differ from the unmerged adapter's by 4-bit rounding
        (``merge_adapter`` warns); the original codes are kept, so ``unmerge`` is exact."""
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.adapter_names[self.merged[0]]!r} is already merged; unmerge first")
        if isinstance(self.base_layer, NF4Linear):
            base = self.base_layer
            saved = base.nf4_weight()
            weight = self._merged_weight(d, saved.dequantize().float())
            base.set_nf4_weight(quantize_nf4(weight.to(base.compute_dtype), base.blocksize, saved.double_quant))
            self.merged = (d, saved, self._merge_bias(d))
            return
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:  # bitsandbytes' int8 codes: adding a float delta corrupts them
            raise ValueError(f"cannot merge an adapter into a quantized {weight.dtype} base weight; serve it unmerged")
        saved = weight.detach().clone()
        weight.data = self._merged_weight(d, weight.detach().float()).to(weight.dtype)
        self.merged = (d, saved, self._merge_bias(d))

    def _merge_bias(self, d: int) -> torch.Tensor | None:
        """Add adapter ``d``'s ``scaling * lora_bias`` into the base bias (there is one:
        ``check_lora_bias_base``); the bias before, or None where the adapter has no bias."""
        if self.adapter_bias(d) is None:
            return None
        bias = self.base_layer.bias
        saved = bias.detach().clone()
        bias.data = (bias.detach().float() + self.scaling_values[d] * self.adapter_bias(d).float()).to(bias.dtype)
        return saved

    @torch.no_grad()
    def unmerge(self):
        if self.merged is not None:
            _, saved, saved_bias = self.merged
            if isinstance(saved, NF4Tensor):
                self.base_layer.set_nf4_weight(saved)
            else:
                self.base_layer.weight.data.copy_(saved)
            if saved_bias is not None:
                self.base_layer.bias.data.copy_(saved_bias)
            self.merged = None
            self.clear_dora_cache()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the loaded ranks become the layer's, and its scales follow them (alpha / r, as PEFT
        # computes them from its config); ranks this layer cannot hold load nothing of it
        ranks = state_dict.get(prefix + "ranks")
        if ranks is not None:
            if (ranks.shape != self.ranks.shape or bool((ranks < 0).any())
                    or bool((ranks > self.lora_A.shape[1]).any())):
                error_msgs.append(f"{prefix}ranks must be {self.num_adapters} ints in [0, {self.lora_A.shape[1]}] "
                                  f"(this layer's adapters and largest rank), got {ranks.tolist()}")
                return
            self.rank_values = [int(v) for v in ranks.tolist()]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _given(self, adapter_ids):
        """The ids a forward routes by (``adapter_ids``, else the layer's own ``adapter_ids``), or
        None for the base layer alone; an error while an adapter is merged."""
        given = self.adapter_ids if adapter_ids is None else adapter_ids
        if given is not None and self.merged is not None:
            raise RuntimeError(f"adapter {self.adapter_names[self.merged[0]]!r} is merged into the base "
                               f"weights; call bora_kernels.unmerge_adapter before routing adapters")
        return given

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        result = self.base_layer(x)
        given = self._given(adapter_ids)
        if given is None:
            return result
        ids = given.plan(x.shape[:-1], self.num_adapters, x.device) if isinstance(given, AdapterRoute) else given
        dropped = self.lora_dropout(x)
        x_in = dropped.to(autocast_dtype(x) or self.lora_A.dtype)  # the op's dtype: no cast in it

        def delta(into=None):
            return lora_delta(x_in, self.lora_A, self.lora_B, ids, self.scaling, self.ranks, add_to=into)

        dora = self.lora_magnitude is not None and any(self.use_dora)
        biased = self.lora_bias_vector is not None and any(self.use_lora_bias)
        token_ids = self._token_ids(x.shape[:-1], x.device, given, ids) if dora or biased else None
        if dora and dropped is not x:
            # DoRA under dropout (training) scales ``W x' + s B A x'`` of the dropped input, as PEFT
            # does: the base layer again, and the delta once, out of place, for both sums
            added = delta()
            out = self._dora(result + added.to(result.dtype), self.base_layer(dropped) + added, token_ids)
        else:
            # added into the base output in place by the kernel that computes the delta, where the
            # base output is a fresh tensor its backward does not need (``plus_delta``)
            out = plus_delta(self.base_layer, result, delta)
            out = self._dora(out, out, token_ids) if dora else out
        if biased:  # ``scaling[d] * b_d`` per token
            out = context_bias(out, self.lora_bias_vector * self.bias_scale[:, None], token_ids)
        return out

    def _dora(self, out: torch.Tensor, inner: torch.Tensor, token_ids: torch.Tensor):
        """DoRA's ``out + t_d * (inner - bias)`` per token (``nn/dora.py``) in ``out``'s dtype:
        ``out`` the LoRA layer's output, ``inner`` its ``W x' + bias + s B A x'`` (``out`` itself
        without dropout)."""
        bias = getattr(self.base_layer, "bias", None)
        if inner is out and bias is None:
            # ``out * (1 + t_d)``: one pass, rounded once; a token without an adapter (id -1)
            # reads an appended row of ones
            scale = 1 + self._dora_shift()
            scale = torch.cat([scale, scale.new_ones(1, scale.shape[1])])
            return context_scale(out, scale, torch.where(token_ids < 0, self.num_adapters, token_ids))
        if bias is not None:  # in fp32, so that a bf16 output (autocast) is rounded once, at the end
            inner = inner.float() - bias.float()
        shifted = context_scale(inner, self._dora_shift(), token_ids)
        return (out + shifted).to(out.dtype)

    @staticmethod
    def _token_ids(batch_shape, device: torch.device, given, plan: LoRAPlan | torch.Tensor) -> torch.Tensor:
        """Each token's adapter id for an input whose leading dims are ``batch_shape`` (per
        sequence where ``given`` has them so): ``given`` the ids the forward got (a route, a tensor
        or a plan), ``plan`` what lora_delta runs."""
        if isinstance(given, AdapterRoute):
            return given.ids(batch_shape, device)
        if isinstance(given, torch.Tensor):
            return given.to(device)
        return plan_ids(plan)

    def extra_repr(self) -> str:
        ranks = self.rank_values
        rank_text = str(ranks[0]) if len(set(ranks)) == 1 else str(ranks)
        return (f"in={self.in_features}, out={self.out_features}, adapters={self.num_adapters}, "
                f"r={rank_text}, dtype={self.lora_A.dtype}" + (", fan_in_fan_out" if self.fan_in_fan_out else "")
                + (f", dora={[d for d, u in enumerate(self.use_dora) if u]}" if any(self.use_dora) else "")
                + (f", lora_bias={[d for d, u in enumerate(self.use_lora_bias) if u]}" if any(self.use_lora_bias) else ""))
