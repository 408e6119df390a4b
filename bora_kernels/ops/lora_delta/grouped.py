"""The torch path of ``lora_delta`` for CPU tensors: grouped GEMMs over the plan's segments.

The plan already orders tokens by adapter (one sort per batch). Two ways to run the per-adapter
GEMMs, chosen per batch by how even the mix is:

- padded: every adapter present gets a slot of M rows (M = its largest token count), so the whole
  batch is one gather, two ``bmm`` and one gather back. Used while padding at most doubles the
  rows; a BLAS call costs ~8 us on a 2-core CPU, so this is 2x faster than a loop at 16 adapters.
- looped: one gather, then a GEMM pair per adapter on its contiguous slice, written in place, and
  one gather back. Used for lopsided mixes, where padding would multiply the work.

Results return to the original token order by a gather through the inverse permutation, not a
scatter (``index_select`` is parallel on CPU, ``index_copy_`` is not: 6x apart at 1024 tokens);
results added into an fp32 tensor (``add_to``) go straight into it by ``index_add_`` instead
(2.5x faster than a gather and an add at 2048 x 1024 on 1 and 2 threads, no temporary). The
gathered inputs and the GEMMs' output rows live in work buffers kept between calls (``_work``).
Neither way gathers a weight matrix per token. fp16 and bf16 are widened to fp32 once per call,
so accumulation is in fp32 as on the GPU.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import torch

# padded slots may hold at most this many times the routed tokens (tests move it to force a path)
PADDING_LIMIT = 2.0
# work buffers up to this many bytes are kept between calls (per thread and role); larger ones are new each call
WORK_LIMIT = 64 << 20
POISON_WORK = False  # fill every work buffer with NaN when handed out (the tests': an unwritten row fails)
_WORK = threading.local()


def _work(role: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor of ``shape`` on ``like``'s device whose contents are undefined, kept between
    calls per thread and ``role``. glibc's allocator hands freed blocks of a few megabytes back
    to the kernel, and every call would fault its pages in again: at 2048 x 1024 rows that cost
    more than the GEMMs (benchmarks/NOTES.md, 2026-12-05, twenty-first session). Past
    ``WORK_LIMIT`` bytes, a new tensor. Never an inference tensor, which a later call under
    autograd could not write."""
    numel = math.prod(shape)
    if numel * 4 > WORK_LIMIT:
        return like.new_empty(shape, dtype=torch.float32)
    kept = _WORK.__dict__.setdefault("buffers", {})
    buffer = kept.get(role)
    if buffer is None or buffer.numel() < numel or buffer.device != like.device:
        with torch.inference_mode(False):
            buffer = kept[role] = torch.empty(numel, dtype=torch.float32, device=like.device)
    work = buffer[:numel].view(shape)
    return work.fill_(float("nan")) if POISON_WORK else work


@dataclasses.dataclass
class _Groups:
    """How one batch is laid out in the work buffers (rows of fp32, filled by the GEMMs)."""

    edges: list  # segment bounds (see LoRAPlan)
    present: list  # adapters with tokens
    perm: torch.Tensor  # [T] original row of each token in adapter order
    gather: torch.Tensor  # [T] buffer row holding each token's result, in the original order
    slots: tuple | None = None  # padded: (P, M); None: looped, the buffer is in adapter order
    src: torch.Tensor | None = None  # padded: [P * M] token read by each slot (any row if empty)
    valid: torch.Tensor | None = None  # padded: [P, M, 1] the slot holds a token
    index: torch.Tensor | None = None  # padded: [P] the adapters present, as a tensor


def _groups(plan) -> _Groups:
    """The layout of a plan, derived once and kept on the plan: every layer of a model, forward
    and backward, shares it."""
    key = ("grouped", PADDING_LIMIT)
    if key not in plan.derived:
        plan.derived[key] = _derive_groups(plan.perm, plan.bounds, plan.num_adapters)
    return plan.derived[key]


def _derive_groups(perm, bounds, num_adapters: int) -> _Groups:
    perm, edges = perm.long(), bounds.tolist()
    num_tokens = perm.numel()
    counts = [edges[d + 3] - edges[d + 2] for d in range(num_adapters)]
    present = [d for d in range(num_adapters) if counts[d]]
    most, routed = max(counts), sum(counts)
    if not present or len(present) * most > PADDING_LIMIT * routed:
        gather = torch.empty_like(perm)
        gather[perm] = torch.arange(num_tokens, device=perm.device)
        return _Groups(edges, present, perm, gather)

    index = torch.tensor(present, device=perm.device)
    slot = torch.arange(most, device=perm.device)
    valid = slot < torch.tensor(counts, device=perm.device)[index][:, None]
    pos = (bounds[2:2 + num_adapters].long()[index][:, None] + slot).clamp_(max=num_tokens - 1)
    src = perm[pos]
    filled = len(present) * most  # buffer rows: the slots, then one zero row, then one NaN row
    gather = torch.full_like(perm, filled + 1)
    gather[perm[edges[1]:edges[2]]] = filled
    gather[src[valid]] = torch.arange(filled, device=perm.device).view_as(valid)[valid]
    return _Groups(edges, present, perm, gather, (len(present), most), src.reshape(-1), valid[..., None], index)


def _buffer(groups, width: int, like: torch.Tensor):
    """fp32 work rows and the view the GEMMs fill. Rows of id -1 are zero and rows of an invalid
    id NaN (see triton.py), so one gather through ``groups.gather`` finishes the result."""
    if groups.slots is None:
        rows = _work("rows", (groups.perm.numel(), width), like)
        e = groups.edges
        rows[e[1]:e[2]] = 0.0
        rows[e[0]:e[1]] = float("nan")
        rows[e[-2]:e[-1]] = float("nan")
        return rows, rows
    filled = groups.slots[0] * groups.slots[1]
    rows = _work("rows", (filled + 2, width), like)
    rows[filled] = 0.0
    rows[filled + 1] = float("nan")
    return rows, rows[:filled].view(*groups.slots, width)


def _inputs(groups, t, role: str = "x"):
    """``t``'s rows laid out like the buffer (adapter order, or [P, M, width] slots), in fp32; an
    fp32 ``t`` gathered into the work buffer of ``role``."""
    index = groups.perm if groups.slots is None else groups.src
    if t.dtype == torch.float32:
        rows = torch.index_select(t, 0, index, out=_work(role, (index.numel(), t.shape[1]), t))
    else:
        rows = t.index_select(0, index).float()
    return rows if groups.slots is None else rows.view(*groups.slots, -1)


def _present(groups, t):
    if len(groups.present) == t.shape[0]:
        return t
    return t.index_select(0, groups.index)


def _padded_weights(groups, weight, ranks, rank_dim):
    """The present adapters' weights in fp32 with padded rank zeroed: the padded path runs the
    full R, so whatever the padding holds must not count."""
    w, r = _present(groups, weight.float()), _present(groups, ranks)
    if bool((r < weight.shape[rank_dim]).any()):
        keep = torch.arange(weight.shape[rank_dim], device=w.device)[None, :] < r[:, None]
        w = w * (keep[:, :, None] if rank_dim == 1 else keep[:, None, :])
    return w


def _adapters(groups, ranks, scaling):
    """(adapter, first row, end row, rank, scale) for every adapter with tokens in the batch."""
    rank_list, scale_list, e = ranks.tolist(), scaling.tolist(), groups.edges
    for d in groups.present:
        yield d, e[d + 2], e[d + 3], rank_list[d], scale_list[d]


def _padded_h(groups, x, lora_a, ranks, xs=None):
    """Unscaled ``x @ A^T`` in the padded slots (``xs``: x laid out in them already), empty slots zero."""
    xs = _inputs(groups, x) if xs is None else xs
    h = torch.bmm(xs, _padded_weights(groups, lora_a, ranks, 1).transpose(1, 2))
    return h.mul_(groups.valid)


def _finish(groups, rows, like, row_weight=None, out=None):
    """The buffer's rows back in the original token order, times ``row_weight`` (fp32, before
    the cast), in ``like``'s dtype, or added into ``out``.

    Into an fp32 ``out``, each work row is added straight into its token's row (``index_add_``;
    an empty slot's row is zero and a token of id -1 has none): no ``[T, N]`` temporary, which
    glibc would hand back to the kernel after every call and fault in again at the next
    (benchmarks/NOTES.md, 2026-12-05, twenty-first session)."""
    if out is not None and out.dtype == torch.float32 and groups.present:
        work, tokens = (rows, groups.perm) if groups.slots is None else (rows[:-2], groups.src)
        if row_weight is not None:
            work.mul_(row_weight.index_select(0, tokens)[:, None])
        return out.index_add_(0, tokens, work)
    result = rows.index_select(0, groups.gather)
    if row_weight is not None:
        result.mul_(row_weight[:, None])
    return result.to(like.dtype) if out is None else out.add_(result)


def lora_delta_forward(x, lora_a, lora_b, plan, scaling, ranks, save_h, row_weight=None, out=None):
    """Returns ``(out [T, N], h)``. h (unscaled ``x @ A^T``, fp32) is kept only when ``save_h``:
    ``[P, M, R]`` slots on the padded path, ``[T, R]`` in adapter order on the looped one.
    ``row_weight`` and ``out`` as in triton.py."""
    groups = _groups(plan)
    rows, body = _buffer(groups, lora_b.shape[1], x)
    h = None
    if groups.slots is not None:
        h = _padded_h(groups, x, lora_a, ranks)
        scale = _present(groups, scaling)[:, None, None]
        torch.bmm(h * scale, _padded_weights(groups, lora_b, ranks, 2).transpose(1, 2), out=body)
    elif groups.present:
        xs = _inputs(groups, x)
        a, b = lora_a.float(), lora_b.float()
        h = x.new_zeros((x.shape[0], lora_a.shape[1]), dtype=torch.float32) if save_h else None
        # two BLAS calls per adapter, written in place (beta=0 ignores the old contents); the
        # scale rides on the second call's alpha, so h stays unscaled for dB
        for d, lo, hi, r, s in _adapters(groups, ranks, scaling):
            h_d = h[lo:hi, :r].addmm_(xs[lo:hi], a[d, :r].T, beta=0) if save_h else xs[lo:hi] @ a[d, :r].T
            body[lo:hi].addmm_(h_d, b[d, :, :r].T, beta=0, alpha=s)
    return _finish(groups, rows, x, row_weight, out), (h if save_h else None)


def lora_delta_backward(dy, x, lora_a, lora_b, h, plan, scaling, ranks, needs_grad, row_weight=None, dx=None):
    """Returns ``(dx, dA, dB)``, each None where ``needs_grad`` says it is not wanted. ``h=None``
    (the torch.compile path saves none) recomputes it from x, for dB only. ``row_weight`` and
    ``dx`` as in triton.py."""
    needs_dx, needs_da, needs_db = needs_grad
    if row_weight is not None:  # the weight scales each token's delta, so its dy
        dy = dy.float() * row_weight[:, None]
    groups = _groups(plan)
    recompute_h = h is None and needs_db
    rows, body = _buffer(groups, x.shape[1], x) if needs_dx else (None, None)
    da = lora_a.new_zeros(lora_a.shape, dtype=torch.float32) if needs_da else None
    db = lora_b.new_zeros(lora_b.shape, dtype=torch.float32) if needs_db else None
    dys = _inputs(groups, dy, "dy") if groups.present else None
    xs = _inputs(groups, x) if groups.present and (needs_da or recompute_h) else None
    if groups.slots is not None:
        if recompute_h:
            h = _padded_h(groups, x, lora_a, ranks, xs)
        scale = _present(groups, scaling)[:, None, None]
        if needs_dx or needs_da:
            dh = torch.bmm(dys, _padded_weights(groups, lora_b, ranks, 2))
            dh.mul_(groups.valid * scale)
            if needs_dx:
                torch.bmm(dh, _padded_weights(groups, lora_a, ranks, 1), out=body)
            if needs_da:
                da.index_copy_(0, groups.index, torch.bmm(dh.transpose(1, 2), xs))
        if needs_db:
            db.index_copy_(0, groups.index, torch.bmm(dys.transpose(1, 2), h).mul_(scale))
    elif groups.present:
        a, b = lora_a.float(), lora_b.float()
        for d, lo, hi, r, s in _adapters(groups, ranks, scaling):
            if needs_dx or needs_da:
                dh = dys[lo:hi] @ b[d, :, :r]  # unscaled: s goes on each use below
                if needs_dx:
                    body[lo:hi].addmm_(dh, a[d, :r], beta=0, alpha=s)
                if needs_da:
                    da[d, :r].addmm_(dh.T, xs[lo:hi], beta=0, alpha=s)
            if needs_db:
                h_d = xs[lo:hi] @ a[d, :r].T if recompute_h else h[lo:hi, :r]
                db[d, :, :r].addmm_(dys[lo:hi].T, h_d, beta=0, alpha=s)
    dx = _finish(groups, rows, x, out=dx) if needs_dx else None
    return dx, None if da is None else da.to(lora_a.dtype), None if db is None else db.to(lora_b.dtype)
