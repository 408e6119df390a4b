"""The torch path of ``context_bias`` / ``context_scale`` for CPU tensors: a gather (ids) or one
small GEMM (weights) builds the per-row vectors, then one elementwise op; fp32 throughout."""

from __future__ import annotations



def _row_vectors(vectors, context, ids, rows_per_id):
    vec = vectors.float()
    if not ids:
        return context.float() @ vec
    rows = context.long().repeat_interleave(rows_per_id)
    return vec.index_select(0, rows.clamp(min=0)) * (rows >= 0)[:, None]


def context_vector_forward(u, vectors, context, ids, rows_per_id, multiply):
    v = _row_vectors(vectors, context, ids, rows_per_id)
    return (u.float() * v if multiply else u.float() + v).to(u.dtype)


def context_vector_backward(dy, u, vectors, context, ids, rows_per_id, multiply, needs_grad):
    """Returns ``(du, dvectors, dweights)`` (fp32 for the last two), None where not wanted."""
    needs_du, needs_dvec, needs_dw = needs_grad
    du = dvec = dw = None
    if needs_du:
        du = (dy.float() * _row_vectors(vectors, context, ids, rows_per_id)).to(dy.dtype) if multiply else dy
    p = dy.float() * u.float() if multiply else dy.float()
    if needs_dvec:
        if ids:
            rows = context.long().repeat_interleave(rows_per_id)
            keep = rows >= 0
            dvec = p.new_zeros((vectors.shape[0], p.shape[1])).index_add_(0, rows[keep], p[keep])
        else:
            dvec = context.float().T @ p
    if needs_dw:
        dw = p @ vectors.float().T
    return du, dvec, dw
