"""The truth for ``context_bias`` and ``context_scale``: plain float64 torch."""

from __future__ import annotations


from ..context_lora_delta.reference import as_weights


def context_vector_reference(u, vectors, context_weights):
    """``sum_c w[..., c] * vectors[c]`` per token, float64 (ids become one-hot rows, -1 a zero row)."""
    return as_weights(context_weights, u.shape[:-1], vectors.shape[0]).double() @ vectors.double()


def context_bias_reference(u, bias, context_weights):
    """Context-BitFit: ``u + sum_c w_c b_c``."""
    return u.double() + context_vector_reference(u, bias, context_weights)


def context_scale_reference(u, scale, context_weights):
    """Context-IA3: ``u * sum_c w_c l_c``."""
    return u.double() * context_vector_reference(u, scale, context_weights)
