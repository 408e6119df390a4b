"""``lora_delta``: a batch where every sequence or token uses its own LoRA adapter.

    y[t] = scaling[d] * (x[t] @ A[d][:r_d]^T) @ B[d][:, :r_d]^T      with d = adapter_ids[t]

forward and backward in one pass over the batch (so many task adapters train together), never
building ``B @ A``. This file checks inputs, groups tokens by adapter (``lora_plan``) and holds the
autograd Function; ``triton.py`` (GPU and interpreter) and ``grouped.py`` (CPU torch) compute.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .._dispatch import (
    autocast_off,
    backend,
    follows_autocast,
    recording_graph,
    records_grad,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class LoRAPlan(NamedTuple):
    """Tokens grouped by adapter, built once per batch and reusable by every layer of a model.

    ``perm[j]`` is the original row (in ``x.reshape(-1, K)``) of the j-th token in adapter order;
    segment ``s`` holds positions ``bounds[s]:bounds[s + 1]`` of that order. Segments: 0 = ids
    below -1, 1 = id -1 (no adapter), ``2 + d`` = adapter d, ``D + 2`` = ids at or above D (the
    two invalid segments stay empty whenever the ids were checked).
    """

    perm: torch.Tensor  # [T] int64 (int32 accepted)
    bounds: torch.Tensor  # [D + 4] int32
    batch_shape: tuple
    num_adapters: int
    derived: dict  # layouts a backend derives from the plan once and reuses (CPU path)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def check_adapter_ids(adapter_ids, num_adapters: int, name: str = "adapter_ids"):
    """A ``ValueError`` (naming the argument ``name``) unless ``adapter_ids`` is an integer tensor;
    CPU ids must also lie in ``[-1, num_adapters)``. GPU ids are not read (a host sync):
    out-of-range ones give NaN rows."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {adapter_ids.dtype}")
    if adapter_ids.device.type == "cpu" and adapter_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(adapter_ids.min()), int(adapter_ids.max())
        if low < -1 or high >= num_adapters:
            raise ValueError(
                f"{name} must lie in [-1, {num_adapters}) for {num_adapters} adapters, "
                f"got values from {low} to {high}")


def ids_per_sequence(ids: torch.Tensor, batch_shape: tuple, name: str = "adapter_ids") -> bool:
    """True for one id per sequence (``[B]`` of a ``[B, L]`` batch), False for one per token
    (``batch_shape``); a ``ValueError`` naming ``name`` for any other shape."""
    per_sequence = len(batch_shape) == 2 and tuple(ids.shape) == batch_shape[:1]
    if tuple(ids.shape) != batch_shape and not per_sequence:
        expected = f"{batch_shape} (per token)"
        if len(batch_shape) == 2:
            expected += f" or {batch_shape[:1]} (per sequence)"
        raise ValueError(f"{name} has shape {_shape(ids)}, expected {expected}")
    return per_sequence


def lora_plan(adapter_ids: torch.Tensor, batch_shape: Sequence[int], num_adapters: int,
              device: torch.device | None = None, name: str = "adapter_ids") -> LoRAPlan:
    """Group the tokens of a batch of shape ``batch_shape`` (``x.shape[:-1]``) by adapter.

    ``adapter_ids`` is per token (shape ``batch_shape``) or, for a ``[B, L]`` batch, per sequence
    (shape ``[B]``); ``-1`` means no adapter. Ids on the CPU are checked against
    ``[-1, num_adapters)`` (a ``ValueError`` otherwise). Ids already on a GPU are not checked,
    because that needs a host sync: out-of-range ids there give NaN rows, never a plausible result.
    One stable sort, no host sync; deterministic. ``name`` is the argument errors name.
    """
    batch_shape = tuple(batch_shape)
    check_adapter_ids(adapter_ids, num_adapters, name)
    per_sequence = ids_per_sequence(adapter_ids, batch_shape, name)
    device = adapter_ids.device if device is None else torch.device(device)
    ids = adapter_ids.to(device).reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()

    # Few launches, as each costs ~20 us of host time on a GPU: sort, clamp and one searchsorted
    # straight to int32 bounds; the order stays sort's int64 (no conversion launch). Clamping puts
    # ids below -1 at -2 and ids >= D at D, inside the two invalid segments, so that the probes -2
    # and D + 1 give 0 and T.
    sorted_ids, order = torch.sort(ids, stable=True)
    bounds = torch.searchsorted(sorted_ids.clamp_(-2, num_adapters), _probes(num_adapters, ids.dtype, device),
                                out_int32=True)
    run = batch_shape[1] if per_sequence else 1
    if run > 1:  # per-sequence ids sort the sequences, and every token follows its sequence
        order = torch.arange(run, device=device).add(order[:, None], alpha=run)
        bounds = bounds * run
    return LoRAPlan(order.reshape(-1), bounds, batch_shape, num_adapters, {})


def plan_ids(plan: LoRAPlan) -> torch.Tensor:
    """Each token's id (-1: none; -2 for the invalid ids below -1), int64 shaped
    ``plan.batch_shape``, rebuilt from the grouping without a host sync and kept in
    ``plan.derived``: for what needs ids beside the grouping (DoRA's per-adapter scales,
    Context-PEFT's one-hot weights)."""
    if "ids" not in plan.derived:
        positions = torch.arange(plan.perm.numel(), device=plan.perm.device, dtype=plan.bounds.dtype)
        segment = torch.searchsorted(plan.bounds[1:].contiguous(), positions, right=True)
        ids = torch.empty_like(segment)
        ids[plan.perm] = segment - 2  # segment 1 holds id -1, segment 2 + d adapter d
        plan.derived["ids"] = ids
    return plan.derived["ids"].reshape(plan.batch_shape)


_CONSTANTS: dict = {}


def _constant(key: tuple, device: torch.device, make) -> torch.Tensor:
    """A small constant tensor, ``make()`` once per ``key`` and device rather than one launch per
    call; made afresh while a CUDA graph is captured or torch.compile traces (a tensor made then
    belongs to the graph). Callers never write to it. Made outside inference mode: a tensor made
    in it could not be saved for backward by the later calls that share it."""
    key = (*key, device)
    value = _CONSTANTS.get(key)
    if value is None:
        with torch.inference_mode(False):
            value = make()
        if not recording_graph(device):
            _CONSTANTS[key] = value
    return value


def _probes(num_adapters: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[-2, -1, 0, ..., D + 1]``: the first sorted position of each segment's smallest id, and T."""
    return _constant(("probes", num_adapters, dtype), device,
                     lambda: torch.arange(-2, num_adapters + 2, device=device, dtype=dtype))


def full_ranks(num_adapters: int, max_rank: int, device: torch.device) -> torch.Tensor:
    """``ranks`` when none are given: every adapter at ``max_rank`` (int32)."""
    return _constant(("ranks", num_adapters, max_rank), device,
                     lambda: torch.full((num_adapters,), max_rank, device=device, dtype=torch.int32))


def unit_scaling(num_adapters: int, device: torch.device) -> torch.Tensor:
    """``scaling`` when none is given: 1.0 for every adapter (fp32)."""
    return _constant(("ones", num_adapters), device, lambda: torch.ones(num_adapters, device=device))


def _check_inputs(x, lora_a, lora_b, scaling, ranks):
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"x must be a [T, K] or [B, L, K] tensor, got shape {_shape(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    k = x.shape[-1]
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3 or lora_a.shape[2] != k:
        raise ValueError(f"lora_a must be [D, R, K] with K={k} (from x {_shape(x)}), got {_shape(lora_a)}")
    num_adapters, max_rank, _ = lora_a.shape
    if num_adapters < 1:
        raise ValueError(f"lora_a must hold at least one adapter, got {_shape(lora_a)}")
    if not isinstance(lora_b, torch.Tensor) or lora_b.dim() != 3 or lora_b.shape[0] != num_adapters \
            or lora_b.shape[2] != max_rank:
        raise ValueError(
            f"lora_b must be [D, N, R] with D={num_adapters}, R={max_rank} (from lora_a "
            f"{_shape(lora_a)}), got {_shape(lora_b)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast one of them")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if scaling is not None:
        if not isinstance(scaling, torch.Tensor) or tuple(scaling.shape) != (num_adapters,) \
                or not scaling.dtype.is_floating_point:
            raise ValueError(f"scaling must be a float tensor of shape ({num_adapters},) or None, "
                             f"got {_shape(scaling)}")
    if ranks is not None:
        if not isinstance(ranks, torch.Tensor) or tuple(ranks.shape) != (num_adapters,) \
                or ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
            raise ValueError(f"ranks must be an integer tensor of shape ({num_adapters},) or None, "
                             f"got {_shape(ranks)}")
        if ranks.device.type == "cpu" and ranks.numel() and not torch.compiler.is_compiling() \
                and (int(ranks.min()) < 0 or int(ranks.max()) > max_rank):
            raise ValueError(f"ranks must lie in [0, {max_rank}] (R of lora_a), got {ranks.tolist()}")


class LoRADeltaFunction(torch.autograd.Function):
    """Forward saves x, the weights and h = x @ A^T ([T, R], small); backward gives dx, dA, dB.
    With ``add_to`` the delta is added into it in place (its gradient is dy itself). ``add_to``
    is the first input: when it is a view (a 3-D ``F.linear`` output with a bias is one), autograd
    routes the base's gradient through the function's first input."""

    @staticmethod
    def forward(ctx, add_to, x, lora_a, lora_b, scaling, ranks, plan, kernels):
        needs_grad = any(ctx.needs_input_grad[1:4])
        into = None if add_to is None else add_to.view(x.shape[0], lora_b.shape[1])
        out, h = kernels.lora_delta_forward(x, lora_a, lora_b, plan, scaling, ranks, save_h=needs_grad, out=into)
        ctx.kernels, ctx.plan = kernels, plan  # the plan holds index tensors only, no autograd state
        ctx.save_for_backward(x, lora_a, lora_b, h, scaling, ranks)
        if add_to is not None:
            ctx.mark_dirty(add_to)
            return add_to
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off  # backward may be called inside an autocast region
    def backward(ctx, dy):
        x, lora_a, lora_b, h, scaling, ranks = ctx.saved_tensors
        dx, da, db = ctx.kernels.lora_delta_backward(
            dy.reshape(x.shape[0], -1), x, lora_a, lora_b, h, ctx.plan, scaling, ranks, ctx.needs_input_grad[1:4])
        return (dy if ctx.needs_input_grad[0] else None), dx, da, db, None, None, None, None


def check_add_to(add_to, x, n: int):
    """``add_to`` (or None) must be a float tensor shaped ``x.shape[:-1] + (N,)`` on x's device."""
    if add_to is None:
        return
    want = tuple(x.shape[:-1]) + (n,)
    if not isinstance(add_to, torch.Tensor) or tuple(add_to.shape) != want or not add_to.dtype.is_floating_point:
        raise ValueError(f"add_to must be a float tensor of shape {want} (x.shape[:-1] + (N,)), got "
                         f"{_shape(add_to)}{'' if not isinstance(add_to, torch.Tensor) else ' ' + str(add_to.dtype)}")
    if add_to.device != x.device:
        raise ValueError(f"add_to is on {add_to.device} but x is on {x.device}")


# --- the same op as torch.library custom ops, for torch.compile ----------------------------------
# Eager calls use LoRADeltaFunction above (less dispatch overhead, h saved for backward). Under
# torch.compile the op is opaque to the tracer through these two custom ops and their fake
# (shape-only) implementations; the backward op recomputes h (x @ A^T, for dB) instead of saving
# it, because h's layout depends on the backend and, on the CPU path, on the data.


def _op_plan(perm, bounds, num_tokens, num_adapters):
    return LoRAPlan(perm, bounds, (num_tokens,), num_adapters, {})


@torch.library.custom_op("bora_kernels::lora_delta", mutates_args=())
@autocast_off  # a compiled graph runs it inside the caller's autocast region
def _lora_delta_op(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, perm: torch.Tensor,
                   bounds: torch.Tensor, scaling: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    plan = _op_plan(perm, bounds, x.shape[0], lora_a.shape[0])
    return _kernels(x.device).lora_delta_forward(x, lora_a, lora_b, plan, scaling, ranks, save_h=False)[0]


@_lora_delta_op.register_fake
def _(x, lora_a, lora_b, perm, bounds, scaling, ranks):
    return x.new_empty((x.shape[0], lora_b.shape[1]))


@torch.library.custom_op("bora_kernels::lora_delta_backward", mutates_args=())
@autocast_off  # a compiled graph runs it inside the caller's autocast region
def _lora_delta_backward_op(dy: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                            perm: torch.Tensor, bounds: torch.Tensor, scaling: torch.Tensor, ranks: torch.Tensor,
                            needs_dx: bool, needs_da: bool, needs_db: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _op_plan(perm, bounds, x.shape[0], lora_a.shape[0])
    grads = _kernels(x.device).lora_delta_backward(dy, x, lora_a, lora_b, None, plan, scaling, ranks,
                                                   (needs_dx, needs_da, needs_db))
    # a custom op returns tensors: empty ones stand for gradients not asked for
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_lora_delta_backward_op.register_fake
def _(dy, x, lora_a, lora_b, perm, bounds, scaling, ranks, needs_dx, needs_da, needs_db):
    return tuple(t.new_empty(t.shape if need else (0,))
                 for t, need in ((x, needs_dx), (lora_a, needs_da), (lora_b, needs_db)))


def _op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _op_backward(ctx, dy):
    needs = ctx.needs_input_grad[:3]
    grads = _lora_delta_backward_op(dy, *ctx.saved_tensors, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


_lora_delta_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _kernels(device: torch.device):
    if backend(device) == "triton":
        from . import triton as kernels
    else:
        from . import grouped as kernels
    return kernels


@follows_autocast("x", "lora_a", "lora_b")
def lora_delta(x, lora_a, lora_b, adapter_ids, scaling=None, ranks=None, add_to=None):
    """Per-token LoRA delta for a batch mixing many adapters.

    Args:
        x: ``[T, K]`` or ``[B, L, K]``, float16, bfloat16 or float32.
        lora_a: ``[D, R, K]``, the A matrices of D adapters (smaller ranks zero-padded to R).
        lora_b: ``[D, N, R]``, the B matrices.
        adapter_ids: integer tensor per token (``x.shape[:-1]``) or per sequence (``[B]``), ``-1``
            for no adapter; or a ``LoRAPlan`` from ``lora_plan`` to share one grouping between
            layers.
        scaling: ``None`` (1.0) or ``[D]`` float (alpha / r per adapter).
        ranks: ``None`` (all R) or ``[D]`` integer ranks; padded rank is then neither read nor
            computed with.

        add_to: optional ``x.shape[:-1] + (N,)`` float tensor (a base layer's output, say) that
            the delta is added into, in place, in the same pass that computes it (no separate
            add); it is returned, and its gradient is the incoming gradient.

    Returns ``x.shape[:-1] + (N,)`` in x's dtype, accumulated in fp32; rows with id -1 are exactly
    zero (with ``add_to``: ``add_to`` plus the delta, rounded once). Differentiable in x, lora_a,
    lora_b and ``add_to``.

    Inside ``torch.autocast`` x, lora_a and lora_b are cast to autocast's dtype first, as
    ``F.linear``'s are, and the result is in that dtype (``add_to`` keeps its own).
    """
    _check_inputs(x, lora_a, lora_b, scaling, ranks)
    num_adapters, max_rank, k = lora_a.shape
    batch_shape = tuple(x.shape[:-1])
    if isinstance(adapter_ids, LoRAPlan):
        plan = adapter_ids
        if plan.batch_shape != batch_shape or plan.num_adapters != num_adapters:
            raise ValueError(
                f"adapter_ids is a plan for batch {plan.batch_shape} and {plan.num_adapters} "
                f"adapters, but x is {_shape(x)} and lora_a holds {num_adapters} adapters")
        if plan.perm.device != x.device:
            raise ValueError(f"adapter_ids plan is on {plan.perm.device} but x is on {x.device}")
    else:
        plan = lora_plan(adapter_ids, batch_shape, num_adapters, device=x.device)

    device = x.device
    scaling = unit_scaling(num_adapters, device) if scaling is None else scaling.to(device=device,
                                                                                    dtype=torch.float32)
    ranks = full_ranks(num_adapters, max_rank, device) if ranks is None else ranks.to(device=device,
                                                                                    dtype=torch.int32)
    check_add_to(add_to, x, lora_b.shape[1])
    return apply_delta(x.reshape(-1, k), lora_a, lora_b, plan, scaling, ranks, batch_shape, add_to)


def _identity(num_adapters: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    """``[D, R, R]`` identity matrices in ``like``'s dtype and device (a kept constant)."""
    return _constant(("eye", num_adapters, rank, like.dtype), like.device,
                     lambda: torch.eye(rank, dtype=like.dtype, device=like.device).expand(num_adapters, rank, rank)
                     .contiguous())


def lora_shrink(x, lora_a, adapter_ids, scaling=None, ranks=None):
    """The first half of ``lora_delta`` alone, ``h[t] = scaling[d] * x[t] @ A[d][:r_d]^T``
    (``[..., R]``, zero past an adapter's rank and for id -1): each token's products with its
    adapter's rows, as a tied output head needs them for an adapter's trainable tokens
    (``nn.TiedTokenHead``). Arguments as ``lora_delta``'s; differentiable in ``x`` and ``lora_a``.
    It is ``lora_delta`` with every B the identity (a kept constant)."""
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3:
        raise ValueError(f"lora_a must be [D, R, K], got {_shape(lora_a)}")
    return lora_delta(x, lora_a, _identity(lora_a.shape[0], lora_a.shape[1], lora_a), adapter_ids, scaling, ranks)


def lora_expand(h, lora_b, adapter_ids, scaling=None, ranks=None, add_to=None):
    """The second half of ``lora_delta`` alone, ``y[t] = scaling[d] * h[t] @ B[d][:, :r_d]^T``,
    for inputs already in rank space: an embedding adapter's columns of A, gathered by token
    (``nn.MultiLoRAEmbedding``). ``h`` is ``[T, R]`` or ``[B, L, R]`` (R of ``lora_b``, in its
    dtype); the other arguments and the result are ``lora_delta``'s, differentiable in ``h``,
    ``lora_b`` and ``add_to``. It is ``lora_delta`` with every A the identity (a kept constant,
    never a parameter): the same kernels, whose first product is then ``R x R`` per token."""
    if not isinstance(lora_b, torch.Tensor) or lora_b.dim() != 3:
        raise ValueError(f"lora_b must be [D, N, R], got {_shape(lora_b)}")
    num_adapters, _, rank = lora_b.shape
    if not isinstance(h, torch.Tensor) or h.dim() not in (2, 3) or h.shape[-1] != rank:
        raise ValueError(f"h must be a [T, R] or [B, L, R] tensor with R={rank} (from lora_b {_shape(lora_b)}), "
                         f"got {_shape(h)}")
    return lora_delta(h, _identity(num_adapters, rank, lora_b), lora_b, adapter_ids, scaling, ranks, add_to)


def apply_delta(x2, lora_a, lora_b, plan, scaling, ranks, batch_shape, add_to=None):
    """``lora_delta`` after its checks: ``x2`` is ``[T, K]``, ``plan`` groups its T rows,
    ``scaling`` fp32 and ``ranks`` int32 on x's device. Returns the delta shaped
    ``batch_shape + (N,)``, or ``add_to`` (that shape) with the delta added in place."""
    n = lora_b.shape[1]
    if add_to is not None and (x2.shape[0] == 0 or not add_to.is_contiguous() or torch.compiler.is_compiling()):
        return add_to.add_(apply_delta(x2, lora_a, lora_b, plan, scaling, ranks, batch_shape))  # a separate add
    if x2.shape[0] == 0:  # nothing to launch; keep the autograd graph connected
        return (x2 @ lora_a[0].T @ lora_b[0].T).reshape(*batch_shape, n)
    if torch.compiler.is_compiling():
        return _lora_delta_op(x2, lora_a, lora_b, plan.perm, plan.bounds, scaling, ranks).reshape(*batch_shape, n)
    kernels = _kernels(x2.device)
    if records_grad(x2, lora_a, lora_b, add_to):
        out = LoRADeltaFunction.apply(add_to, x2, lora_a, lora_b, scaling, ranks, plan, kernels)
        return out if add_to is not None else out.reshape(*batch_shape, n)
    into = None if add_to is None else add_to.view(-1, n)
    out, _ = kernels.lora_delta_forward(x2, lora_a, lora_b, plan, scaling, ranks, save_h=False, out=into)
    return add_to if add_to is not None else out.reshape(*batch_shape, n)
